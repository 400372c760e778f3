// Runs a fused gated model (one .tflite whose graph gates itself) on the
// host with a plain tflite::MicroInterpreter: reads samples from a file and
// prints "label exit_index confidence" per sample, one Invoke each, then the
// per-exit counts. Build: `make fused_main TFLM_DIR=... CONFIG_DIR=...` with
// a CONFIG_DIR written by to_c_arrays("model.tflite", CONFIG_DIR).
//
//   fused_main SAMPLES_FILE [--float]
//
// Samples are the model input's raw bytes (int8 models: already
// quantized), or with --float float32 values that FusedRunner quantizes;
// a sample it refuses (NaN, infinity) stops the program with its status.

#include <cstdint>
#include <cstdio>
#include <cstring>

#include "earlyexit_fused_config.h"
#include "fused_runner.h"
#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"

namespace {

namespace config = earlyexit_config;

constexpr size_t kSampleBytes = config::kInputs[0].bytes;
constexpr size_t kSampleValues =
    config::kInputs[0].dtype == earlyexit::DType::kInt8 ? kSampleBytes
                                                        : kSampleBytes / 4;

alignas(16) uint8_t g_arena[config::kArenaSize];
alignas(16) uint8_t g_sample[kSampleBytes];
float g_float_sample[kSampleValues];

}  // namespace

int main(int argc, char** argv) {
  static_assert(config::kNumInputs == 1, "fused_main reads single-input models");
  const bool floats = argc == 3 && std::strcmp(argv[2], "--float") == 0;
  if (argc != 2 && !floats) {
    std::fprintf(stderr, "usage: %s SAMPLES_FILE [--float]\n", argv[0]);
    return 2;
  }
  // The generated op list: every subgraph's ops, IF included.
  static tflite::MicroMutableOpResolver<config::kNumOps> resolver;
#define EARLYEXIT_ADD_OP(name) \
  if (resolver.Add##name() != kTfLiteOk) return 1;
  EARLYEXIT_FUSED_OPS(EARLYEXIT_ADD_OP)
#undef EARLYEXIT_ADD_OP

  static earlyexit::FusedRunner model(config::kFusedModel, resolver, g_arena,
                                      sizeof(g_arena));
  const earlyexit::Status status = model.Init();
  if (status != earlyexit::Status::kOk) {
    std::fprintf(stderr, "init failed: %s\n", earlyexit::StatusString(status));
    return 1;
  }
  std::FILE* f = std::fopen(argv[1], "rb");
  if (f == nullptr) {
    std::fprintf(stderr, "cannot open %s\n", argv[1]);
    return 2;
  }
  unsigned counts[config::kNumExits] = {};
  for (;;) {
    earlyexit::Result result;
    earlyexit::Status run;
    if (floats) {
      if (std::fread(g_float_sample, sizeof(float), kSampleValues, f) != kSampleValues) {
        break;
      }
      const float* inputs[] = {g_float_sample};
      const size_t sizes[] = {kSampleValues};
      run = model.RunFloat(inputs, sizes, 1, &result);
    } else {
      if (std::fread(g_sample, 1, kSampleBytes, f) != kSampleBytes) break;
      run = model.Run(g_sample, sizeof(g_sample), &result);
    }
    if (run != earlyexit::Status::kOk) {
      std::fprintf(stderr, "run failed: %s\n", earlyexit::StatusString(run));
      std::fclose(f);
      return 1;
    }
    ++counts[result.exit_index];
    std::printf("%d %d %.9g\n", result.label, result.exit_index,
                static_cast<double>(result.confidence));
  }
  std::fclose(f);
  for (int k = 0; k < config::kNumExits; ++k) {
    std::fprintf(stderr, "exit %d (%s): %u samples\n", k, config::kExitNames[k],
                 counts[k]);
  }
  return 0;
}
