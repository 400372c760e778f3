// FusedRunner's error paths on a real fused model in TFLite Micro: arenas
// too small, misaligned or null, damaged model data, a resolver without IF,
// configs that disagree with the model, Run before Init, and bad samples
// (wrong count, size, null, NaN, infinity). Each returns a Status; none
// crashes. Build: `make fused_test TFLM_DIR=... CONFIG_DIR=...` with the
// to_c_arrays output of a fused file.

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>

#include "earlyexit_fused_config.h"
#include "fused_runner.h"
#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"
#include "test/check.h"

namespace {

namespace config = earlyexit_config;
using earlyexit::FusedConfig;
using earlyexit::FusedRunner;
using earlyexit::Result;
using earlyexit::Status;

constexpr size_t kValues = config::kInputs[0].dtype == earlyexit::DType::kInt8
                               ? config::kInputs[0].bytes
                               : config::kInputs[0].bytes / 4;

alignas(16) uint8_t g_arena[config::kArenaSize + 32];

tflite::MicroMutableOpResolver<config::kNumOps> g_resolver;
tflite::MicroMutableOpResolver<config::kNumOps> g_resolver_without_if;

Status InitWith(const FusedConfig& c, const tflite::MicroOpResolver& resolver,
                uint8_t* arena, size_t size) {
  FusedRunner runner(c, resolver, arena, size);
  return runner.Init();
}

// A float sample in [0, 1] (the digits' range).
void Sample(float* x) {
  for (size_t i = 0; i < kValues; ++i) x[i] = static_cast<float>(i % 7) / 7.0f;
}

}  // namespace

int main() {
  static_assert(config::kNumInputs == 1, "fused_test runs single-input models");
#define EARLYEXIT_ADD_OP(name) g_resolver.Add##name();
  EARLYEXIT_FUSED_OPS(EARLYEXIT_ADD_OP)
#undef EARLYEXIT_ADD_OP
#define EARLYEXIT_ADD_OP_BUT_IF(name) \
  if (std::strcmp(#name, "If") != 0) g_resolver_without_if.Add##name();
  EARLYEXIT_FUSED_OPS(EARLYEXIT_ADD_OP_BUT_IF)
#undef EARLYEXIT_ADD_OP_BUT_IF
  const FusedConfig& good = config::kFusedModel;

  // Arenas: null, one aligned slot short, misaligned so that too few
  // usable bytes remain; refused before TFLite Micro sees them.
  CHECK_EQ(InitWith(good, g_resolver, nullptr, config::kArenaSize),
           Status::kAllocationFailed);
  CHECK_EQ(InitWith(good, g_resolver, g_arena, config::kArenaSize - 16),
           Status::kAllocationFailed);
  CHECK_EQ(InitWith(good, g_resolver, g_arena + 1, config::kArenaSize),
           Status::kAllocationFailed);
  // The generated op list includes IF; without it TFLite Micro fails.
  CHECK_EQ(InitWith(good, g_resolver_without_if, g_arena, sizeof(g_arena)),
           Status::kAllocationFailed);

  // Damaged or missing model data, and configs inconsistent with themselves.
  FusedConfig c = good;
  c.model_size = 64;
  CHECK_EQ(InitWith(c, g_resolver, g_arena, sizeof(g_arena)), Status::kBadConfig);
  c = good;
  c.model_data = nullptr;
  CHECK_EQ(InitWith(c, g_resolver, g_arena, sizeof(g_arena)), Status::kBadConfig);
  c = good;
  c.exit_index_output = c.class_output;
  CHECK_EQ(InitWith(c, g_resolver, g_arena, sizeof(g_arena)), Status::kBadConfig);
  c = good;
  c.num_inputs = 0;
  CHECK_EQ(InitWith(c, g_resolver, g_arena, sizeof(g_arena)), Status::kBadConfig);

  // Configs that disagree with the model: input parameters, output slots.
  earlyexit::TensorConfig input = config::kInputs[0];
  if (input.dtype == earlyexit::DType::kInt8) {
    input.scale *= 2.0f;
  } else {
    input.position += 1;
  }
  c = good;
  c.inputs = &input;
  CHECK_EQ(InitWith(c, g_resolver, g_arena, sizeof(g_arena)),
           Status::kTensorMismatch);
  c = good;
  c.class_output = good.confidence_output;
  c.confidence_output = good.class_output;
  CHECK_EQ(InitWith(c, g_resolver, g_arena, sizeof(g_arena)),
           Status::kTensorMismatch);
  c = good;
  c.confidence_output = 40;
  CHECK_EQ(InitWith(c, g_resolver, g_arena, sizeof(g_arena)),
           Status::kTensorMismatch);

  FusedRunner runner(good, g_resolver, g_arena, sizeof(g_arena));
  Result result{};
  float x[kValues];
  Sample(x);
  const float* floats[] = {x};
  size_t counts[] = {kValues};
  CHECK_EQ(runner.RunFloat(floats, counts, 1, &result), Status::kBadConfig);
  CHECK(runner.interpreter() == nullptr);
  CHECK_EQ(runner.Init(), Status::kOk);
  CHECK_EQ(runner.Init(), Status::kBadConfig);  // once only
  CHECK(runner.interpreter() != nullptr);

  // Bad samples.
  CHECK_EQ(runner.RunFloat(floats, counts, 2, &result), Status::kBadInput);
  CHECK_EQ(runner.RunFloat(nullptr, counts, 1, &result), Status::kBadInput);
  CHECK_EQ(runner.RunFloat(floats, counts, 1, nullptr), Status::kBadInput);
  counts[0] = kValues - 1;
  CHECK_EQ(runner.RunFloat(floats, counts, 1, &result), Status::kBadInput);
  counts[0] = kValues;
  const float* no_sample[] = {nullptr};
  CHECK_EQ(runner.RunFloat(no_sample, counts, 1, &result), Status::kBadInput);
  x[3] = std::numeric_limits<float>::quiet_NaN();
  CHECK_EQ(runner.RunFloat(floats, counts, 1, &result), Status::kNonFiniteInput);
  x[3] = std::numeric_limits<float>::infinity();
  CHECK_EQ(runner.RunFloat(floats, counts, 1, &result), Status::kNonFiniteInput);
  alignas(4) uint8_t raw[config::kInputs[0].bytes] = {};
  CHECK_EQ(runner.Run(raw, sizeof(raw) - 1, &result), Status::kBadInput);
  CHECK_EQ(runner.Run(nullptr, sizeof(raw), &result), Status::kBadInput);
  if (config::kInputs[0].dtype == earlyexit::DType::kFloat32) {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    std::memcpy(raw, &nan, sizeof(nan));
    CHECK_EQ(runner.Run(raw, sizeof(raw), &result), Status::kNonFiniteInput);
  }

  // A refused sample leaves the runner usable: float and raw input agree.
  Sample(x);
  CHECK_EQ(runner.RunFloat(floats, counts, 1, &result), Status::kOk);
  if (config::kInputs[0].dtype == earlyexit::DType::kInt8) {
    CHECK_EQ(earlyexit::Quantize(x, reinterpret_cast<int8_t*>(raw), kValues,
                                 config::kInputs[0].scale,
                                 config::kInputs[0].zero_point),
             Status::kOk);
  } else {
    std::memcpy(raw, x, sizeof(raw));
  }
  Result again{};
  CHECK_EQ(runner.Run(raw, sizeof(raw), &again), Status::kOk);
  CHECK_EQ(again.label, result.label);
  CHECK_EQ(again.exit_index, result.exit_index);
  CHECK_EQ(again.confidence, result.confidence);
  // The checked Run: dtype, byte count and input count before anything.
  const earlyexit::DType dtype = config::kInputs[0].dtype;
  earlyexit::InputData typed[2] = {{raw, sizeof(raw), dtype}, {raw, sizeof(raw), dtype}};
  Result checked{};
  CHECK_EQ(runner.Run(typed, 1, &checked), Status::kOk);
  CHECK_EQ(checked.label, result.label);
  CHECK_EQ(checked.exit_index, result.exit_index);
  CHECK_EQ(runner.Run(typed, 2, &checked), Status::kBadInput);
  CHECK_EQ(runner.Run(typed, 1, nullptr), Status::kBadInput);
  typed[0].dtype = earlyexit::DType::kInt32;
  CHECK_EQ(runner.Run(typed, 1, &checked), Status::kBadInput);
  typed[0].dtype = dtype;
  typed[0].bytes = sizeof(raw) + 1;
  CHECK_EQ(runner.Run(typed, 1, &checked), Status::kBadInput);
  typed[0] = {nullptr, sizeof(raw), dtype};
  CHECK_EQ(runner.Run(typed, 1, &checked), Status::kBadInput);
  CHECK(result.exit_index >= 0 && result.exit_index < config::kNumExits);
  CHECK(result.label >= 0 && result.label < config::kNumClasses);
  CHECK(result.confidence >= 0.0f && result.confidence <= 1.0f);
  std::printf("sample: class %d, exit %d, confidence %.9g\n", result.label,
              result.exit_index, static_cast<double>(result.confidence));
  return earlyexit_test::Summary("fused_test");
}
