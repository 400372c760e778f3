// The runner's error paths on a real model in TFLite Micro: build with a
// generated config of an int8 bundle with at least two segments
// (`make tflm_test CONFIG_DIR=... TFLM_DIR=...`), whose first input is int8
// (quantized floats) or int32 (token ids). Every bad arena, config or call
// must come back as a Status; none may reach TFLite Micro in a state that
// crashes it.

#include <cmath>
#include <cstdio>
#include <cstring>

#include "earlyexit_config.h"
#include "earlyexit_runner.h"
#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"
#include "test/check.h"
#include "tflm_segment.h"

namespace {

namespace config = earlyexit_config;
using earlyexit::CarryConfig;
using earlyexit::DType;
using earlyexit::ModelConfig;
using earlyexit::Result;
using earlyexit::SegmentConfig;
using earlyexit::Status;
using earlyexit::TensorConfig;

constexpr int kN = config::kNumSegments;
static_assert(kN >= 2, "tflm_test needs a bundle with two or more segments");
constexpr int kNumInputs = config::kSegments[0].num_inputs;
// Segment 1's first input: int8 (quantized floats) or int32.
constexpr const TensorConfig& kInput = config::kSegment1Inputs[0];
constexpr bool kInt8Input = kInput.dtype == DType::kInt8;
static_assert(kInt8Input || kInput.dtype == DType::kInt32,
              "tflm_test needs an int8 bundle (int8 or int32 inputs)");

// The input of token ids, if any: int32 with a bounded range.
constexpr int TokenInput() {
  for (int i = 0; i < kNumInputs; ++i) {
    const TensorConfig& t = config::kSegment1Inputs[i];
    if (t.dtype == DType::kInt32 && t.max_value < INT32_MAX) return i;
  }
  return -1;
}
constexpr int kTokenInput = TokenInput();
constexpr bool kTokens = kTokenInput >= 0;
constexpr int kTokenSlot = kTokens ? kTokenInput : 0;
constexpr const TensorConfig& kIds = config::kSegment1Inputs[kTokenSlot];

constexpr size_t MaxInputBytes() {
  size_t bytes = 0;
  for (int i = 0; i < kNumInputs; ++i) {
    if (config::kSegment1Inputs[i].bytes > bytes) bytes = config::kSegment1Inputs[i].bytes;
  }
  return bytes;
}
static_assert(config::kSegments[0].confidence.dtype == DType::kInt8,
              "tflm_test needs an int8 bundle");
constexpr int kMaxTensors = 8;
constexpr bool CopyFits() {
  for (int k = 0; k < kN; ++k) {
    const SegmentConfig& s = config::kSegments[k];
    if (s.num_inputs > kMaxTensors || s.num_carry > kMaxTensors) return false;
  }
  return true;
}
static_assert(CopyFits(), "raise kMaxTensors for this model");

alignas(16) uint8_t g_arena[config::kArenaSize + 16];
alignas(16) uint8_t g_carry[config::kCarryBufferSize];
// One buffer per input of segment 1 (a few bytes spare, for inputs of the
// wrong size); Zeros() fills them with zeros (int8 values, token id 0, an
// empty mask).
alignas(16) uint8_t g_inputs[kNumInputs][MaxInputBytes() + 16];
alignas(16) int8_t g_sample[kInput.bytes];

const void* const* Zeros() {
  static const void* pointers[kNumInputs];
  for (int i = 0; i < kNumInputs; ++i) {
    std::memset(g_inputs[i], 0, sizeof(g_inputs[i]));
    pointers[i] = g_inputs[i];
  }
  return pointers;
}

tflite::MicroMutableOpResolver<config::kNumOps>& Resolver() {
  static tflite::MicroMutableOpResolver<config::kNumOps> resolver;
  static bool added = false;
  if (!added) {
#define EARLYEXIT_ADD_OP(name) resolver.Add##name();
    EARLYEXIT_OPS(EARLYEXIT_ADD_OP)
#undef EARLYEXIT_ADD_OP
    added = true;
  }
  return resolver;
}

Status InitWith(const ModelConfig& model, uint8_t* arena, size_t arena_size) {
  earlyexit::TflmEarlyExit<kN> m(model, Resolver(), arena, arena_size, g_carry,
                                 sizeof(g_carry));
  return m.Init();
}

// A mutable copy of the generated config, to break one thing at a time.
struct Config {
  Config() {
    for (int k = 0; k < kN; ++k) {
      segments[k] = config::kSegments[k];
      for (int i = 0; i < segments[k].num_inputs; ++i) {
        inputs[k][i] = segments[k].inputs[i];
      }
      for (int j = 0; j < segments[k].num_carry; ++j) {
        carry[k][j] = segments[k].carry[j];
      }
      segments[k].inputs = inputs[k];
      segments[k].carry = segments[k].num_carry > 0 ? carry[k] : nullptr;
    }
    model = config::kModel;
    model.segments = segments;
  }
  Status Init() { return InitWith(model, g_arena, config::kArenaSize); }

  SegmentConfig segments[kN];
  TensorConfig inputs[kN][kMaxTensors];
  CarryConfig carry[kN][kMaxTensors];
  ModelConfig model;
};

void TestArenaTooSmallIsRefusedUpFront() {
  const size_t sizes[] = {0, 16, 64, 200, 1800, 3800, 4200, config::kArenaSize - 16};
  for (size_t size : sizes) {
    CHECK_EQ(InitWith(config::kModel, g_arena, size), Status::kAllocationFailed);
  }
  CHECK_EQ(InitWith(config::kModel, nullptr, config::kArenaSize),
           Status::kAllocationFailed);
  // Misaligned: 15 bytes are lost before the first 16-byte boundary.
  CHECK_EQ(InitWith(config::kModel, g_arena + 1, config::kArenaSize),
           Status::kAllocationFailed);
  CHECK_EQ(InitWith(config::kModel, g_arena + 1, config::kArenaSize + 15), Status::kOk);
  earlyexit::TflmEarlyExit<kN> m(config::kModel, Resolver(), g_arena, 64, g_carry,
                                 sizeof(g_carry));
  CHECK_EQ(m.required_arena_size(), config::kArenaSize);
  // An arena size of 0 in the config is an error, not "use a default".
  Config zero;
  zero.model.arena_size = 0;
  CHECK_EQ(zero.Init(), Status::kBadConfig);
}

void TestInitComparesTensorsWithTheConfig() {
  if constexpr (kInt8Input) {
    {
      Config c;
      c.inputs[0][0].scale *= 2.0f;
      CHECK_EQ(c.Init(), Status::kTensorMismatch);
    }
    {
      Config c;
      c.inputs[0][0].zero_point = c.inputs[0][0].zero_point == 127 ? 126 : 127;
      CHECK_EQ(c.Init(), Status::kTensorMismatch);
    }
  }
  {
    // float32 of the same shape (4 bytes per value): the model takes int8
    // values or int32 ids.
    Config c;
    TensorConfig& t = c.inputs[0][0];
    const size_t values = kInt8Input ? t.bytes : t.bytes / 4;
    t = {t.name, t.position, DType::kFloat32, t.rank, {}, values * 4, 0.0f, 0};
    for (int d = 0; d < t.rank; ++d) t.dims[d] = kInput.dims[d];
    CHECK_EQ(c.Init(), Status::kTensorMismatch);
  }
  if constexpr (!kInt8Input) {
    // int8 of the same shape where the model takes int32 values.
    Config c;
    TensorConfig& t = c.inputs[0][0];
    t = {t.name, t.position, DType::kInt8, t.rank, {}, t.bytes / 4, 0.5f, 0};
    for (int d = 0; d < t.rank; ++d) t.dims[d] = kInput.dims[d];
    CHECK_EQ(c.Init(), Status::kTensorMismatch);
  }
  {
    Config c;
    c.segments[0].logits.zero_point += c.segments[0].logits.zero_point < 127 ? 1 : -1;
    CHECK_EQ(c.Init(), Status::kTensorMismatch);
  }
  {
    Config c;
    c.segments[kN - 1].confidence.scale *= 0.5f;
    CHECK_EQ(c.Init(), Status::kTensorMismatch);
  }
  {
    Config c;
    c.carry[0][0].source.scale *= 3.0f;
    CHECK_EQ(c.Init(), Status::kTensorMismatch);
  }
  {
    // Segment 2's first input and the carry to it at a position segment 2
    // does not have: refused, not copied to a null pointer.
    Config c;
    const int missing = 7;
    for (int j = 0; j < c.segments[0].num_carry; ++j) {
      if (c.carry[0][j].target.position == c.inputs[1][0].position) {
        c.carry[0][j].target.position = missing;
      }
    }
    c.inputs[1][0].position = missing;
    CHECK_EQ(c.Init(), Status::kTensorMismatch);
  }
  {
    // Segment 2's model data where segment 1's belongs.
    Config c;
    c.segments[0].model_data = config::kSegments[1].model_data;
    c.segments[0].model_size = config::kSegments[1].model_size;
    CHECK_EQ(c.Init(), Status::kTensorMismatch);
  }
  {
    // A truncated flatbuffer is refused before TFLite Micro reads it.
    Config c;
    c.segments[1].model_size = c.segments[1].model_size / 2;
    CHECK_EQ(c.Init(), Status::kBadConfig);
    c.segments[1].model_data = nullptr;
    CHECK_EQ(c.Init(), Status::kBadConfig);
  }
  {
    Config c;
    c.segments[0].threshold_quantized = 300;
    CHECK_EQ(c.Init(), Status::kBadConfig);
  }
  {
    Config c;
    c.model.num_classes += 1;
    CHECK_EQ(c.Init(), Status::kBadConfig);
  }
  // Patience: 0 (not the criterion) or 1 to the number of exits.
  {
    Config c;
    c.model.patience = -1;
    CHECK_EQ(c.Init(), Status::kBadConfig);
    c.model.patience = kN + 1;
    CHECK_EQ(c.Init(), Status::kBadConfig);
    c.model.patience = kN;
    CHECK_EQ(c.Init(), Status::kOk);
  }
}

// Token ids: checked against the input's range (the embedding's rows)
// before TFLite Micro's GATHER reads the table with them; the checked Run
// refuses a wrong dtype, size or input count. A refused sample runs
// nothing and leaves the runner usable.
void TestTokenInputs() {
  if constexpr (kTokens) {
    earlyexit::TflmEarlyExit<kN> m(config::kModel, Resolver(), g_arena,
                                   config::kArenaSize, g_carry, sizeof(g_carry));
    CHECK_EQ(m.Init(), Status::kOk);
    CHECK(kIds.min_value == 0);
    const void* const* raw = Zeros();
    earlyexit::InputData inputs[kNumInputs];
    for (int i = 0; i < kNumInputs; ++i) {
      const TensorConfig& t = config::kSegment1Inputs[i];
      inputs[i] = {g_inputs[i], t.bytes, t.dtype};
    }
    earlyexit::InputData& tokens = inputs[kTokenSlot];
    int32_t* ids = reinterpret_cast<int32_t*>(g_inputs[kTokenSlot]);
    const size_t count = kIds.bytes / 4;
    Result r = {-1, -1, 0.0f};
    ids[count - 1] = kIds.max_value;
    CHECK_EQ(m.runner().Run(inputs, kNumInputs, &r), Status::kOk);
    const Result first = r;
    CHECK(first.exit_index >= 0 && first.exit_index < kN);
    const uint32_t invoked = m.runner().invocations(0);
    ids[count - 1] = kIds.max_value + 1;
    CHECK_EQ(m.runner().Run(inputs, kNumInputs, &r), Status::kInputOutOfRange);
    ids[count - 1] = 0;
    ids[0] = -1;
    CHECK_EQ(m.runner().Run(inputs, kNumInputs, &r), Status::kInputOutOfRange);
    ids[0] = INT32_MIN;
    CHECK_EQ(m.runner().Run(raw, &r), Status::kInputOutOfRange);
    ids[0] = 0;
    // Floats, int8 bytes, too few or too many bytes, a wrong count.
    tokens.dtype = DType::kFloat32;
    CHECK_EQ(m.runner().Run(inputs, kNumInputs, &r), Status::kBadInput);
    tokens.dtype = DType::kInt8;
    tokens.bytes = count;
    CHECK_EQ(m.runner().Run(inputs, kNumInputs, &r), Status::kBadInput);
    tokens.dtype = DType::kInt32;
    tokens.bytes = kIds.bytes - 4;
    CHECK_EQ(m.runner().Run(inputs, kNumInputs, &r), Status::kBadInput);
    tokens.bytes = kIds.bytes + 4;
    CHECK_EQ(m.runner().Run(inputs, kNumInputs, &r), Status::kBadInput);
    tokens.bytes = kIds.bytes;
    CHECK_EQ(m.runner().Run(inputs, kNumInputs + 1, &r), Status::kBadInput);
    CHECK_EQ(m.runner().Run(inputs, kNumInputs - 1, &r), Status::kBadInput);
    CHECK_EQ(m.runner().invocations(0), invoked);  // none of these ran
    ids[count - 1] = kIds.max_value;
    CHECK_EQ(m.runner().Run(inputs, kNumInputs, &r), Status::kOk);
    CHECK_EQ(r.label, first.label);
    CHECK_EQ(r.exit_index, first.exit_index);
  }
}

void TestRunAndThresholds() {
  Config c;
  earlyexit::TflmEarlyExit<kN> m(c.model, Resolver(), g_arena, config::kArenaSize,
                                 g_carry, sizeof(g_carry));
  // Set before Init: kept, quantized with the float32 scan.
  float never[kN] = {};
  for (int k = 0; k + 1 < kN; ++k) never[k] = 1.0f;
  CHECK_EQ(m.runner().SetThresholds(never, kN - 1), Status::kOk);
  CHECK_EQ(m.Init(), Status::kOk);
  CHECK_EQ(m.Init(), Status::kBadConfig);  // once
  for (int k = 0; k + 1 < kN; ++k) {
    CHECK_EQ(m.runner().threshold_quantized(k), earlyexit::kNeverQuantized);
  }
  Result r = {-1, -1, 0.0f};
  CHECK_EQ(m.runner().Run(Zeros(), &r), Status::kOk);
  CHECK_EQ(r.exit_index, kN - 1);
  CHECK_EQ(m.runner().Run(static_cast<const void*>(nullptr), &r), Status::kBadInput);
  CHECK_EQ(m.runner().Run(Zeros(), nullptr), Status::kBadInput);
  // Threshold 0 at exit 1: every sample leaves there.
  float zero[kN] = {};
  CHECK_EQ(m.runner().SetThresholds(zero, kN - 1), Status::kOk);
  CHECK_EQ(m.runner().Run(Zeros(), &r), Status::kOk);
  CHECK_EQ(r.exit_index, 0);
  if constexpr (kInt8Input) {
    // Quantizing a NaN sample is refused, and the sample is left as it was.
    float x[kInput.bytes];
    for (float& v : x) v = 0.5f;
    x[3] = std::nanf("");
    g_sample[0] = 42;
    CHECK_EQ(earlyexit::Quantize(x, g_sample, kInput.bytes, kInput.scale,
                                 kInput.zero_point),
             Status::kNonFiniteInput);
    CHECK_EQ(g_sample[0], 42);
  }
}

}  // namespace

int main() {
  TestArenaTooSmallIsRefusedUpFront();
  TestInitComparesTensorsWithTheConfig();
  TestRunAndThresholds();
  TestTokenInputs();
  return earlyexit_test::Summary("tflm_test");
}
