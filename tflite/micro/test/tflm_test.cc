// The runner's error paths on a real model in TFLite Micro: build with a
// generated config of an int8 bundle with at least two segments
// (`make tflm_test CONFIG_DIR=... TFLM_DIR=...`). Every bad arena, config or
// call must come back as a Status; none may reach TFLite Micro in a state
// that crashes it.

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
static_assert(config::kSegments[0].inputs[0].dtype == DType::kInt8,
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
alignas(16) int8_t g_sample[config::kSegment1Inputs[0].bytes];

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
  {
    Config c;  // float32 of the same shape: 4 bytes per value
    TensorConfig& t = c.inputs[0][0];
    t = {t.name, t.position, DType::kFloat32, t.rank, {}, t.bytes * 4, 0.0f, 0};
    for (int d = 0; d < t.rank; ++d) t.dims[d] = config::kSegment1Inputs[0].dims[d];
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
  std::memset(g_sample, 0, sizeof(g_sample));
  Result r = {-1, -1, 0.0f};
  CHECK_EQ(m.runner().Run(g_sample, &r), Status::kOk);
  CHECK_EQ(r.exit_index, kN - 1);
  CHECK_EQ(m.runner().Run(static_cast<const void*>(nullptr), &r), Status::kBadInput);
  CHECK_EQ(m.runner().Run(g_sample, nullptr), Status::kBadInput);
  // Threshold 0 at exit 1: every sample leaves there.
  float zero[kN] = {};
  CHECK_EQ(m.runner().SetThresholds(zero, kN - 1), Status::kOk);
  CHECK_EQ(m.runner().Run(g_sample, &r), Status::kOk);
  CHECK_EQ(r.exit_index, 0);
  // Quantizing a NaN sample is refused, and the sample is left as it was.
  float x[config::kSegment1Inputs[0].bytes];
  for (float& v : x) v = 0.5f;
  x[3] = std::nanf("");
  g_sample[0] = 42;
  const TensorConfig& in = config::kSegment1Inputs[0];
  CHECK_EQ(earlyexit::Quantize(x, g_sample, in.bytes, in.scale, in.zero_point),
           Status::kNonFiniteInput);
  CHECK_EQ(g_sample[0], 42);
}

}  // namespace

int main() {
  TestArenaTooSmallIsRefusedUpFront();
  TestInitComparesTensorsWithTheConfig();
  TestRunAndThresholds();
  return earlyexit_test::Summary("tflm_test");
}
