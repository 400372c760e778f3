// Runs a fused gated model (one .tflite whose graph gates itself) on the
// host with a plain tflite::MicroInterpreter: reads samples from a file and
// prints "label exit_index confidence" per sample, one Invoke each, then the
// per-exit counts. Build: `make fused_main TFLM_DIR=... CONFIG_DIR=...` with
// a CONFIG_DIR written by to_c_arrays("model.tflite", CONFIG_DIR).
//
//   fused_main SAMPLES_FILE [--float]
//
// A sample is every input's raw bytes in config order (int8 inputs already
// quantized, float32 values, int32 token ids), or with --float every
// input's values as float32, which FusedRunner quantizes (models with int32
// inputs take no floats). A sample it refuses (NaN, infinity, an id out of
// range) stops the program with its status.

#include <cstdint>
#include <cstdio>
#include <cstring>

#include "earlyexit_fused_config.h"
#include "fused_runner.h"
#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"

namespace {

namespace config = earlyexit_config;
constexpr int kNumInputs = config::kNumInputs;

constexpr size_t Values(const earlyexit::TensorConfig& t) {
  return t.dtype == earlyexit::DType::kInt8 ? t.bytes : t.bytes / 4;
}

constexpr size_t SampleBytes() {
  size_t bytes = 0;
  for (const earlyexit::TensorConfig& t : config::kInputs) bytes += t.bytes;
  return bytes;
}

constexpr size_t SampleValues() {
  size_t values = 0;
  for (const earlyexit::TensorConfig& t : config::kInputs) values += Values(t);
  return values;
}

alignas(16) uint8_t g_arena[config::kArenaSize];
alignas(16) uint8_t g_sample[SampleBytes()];
float g_float_sample[SampleValues()];

}  // namespace

int main(int argc, char** argv) {
  static_assert(kNumInputs <= earlyexit::kMaxFusedInputs, "too many model inputs");
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
  // Each input's place in a sample.
  earlyexit::InputData inputs[kNumInputs];
  const float* float_inputs[kNumInputs];
  size_t counts[kNumInputs];
  size_t offset = 0;
  size_t value_offset = 0;
  for (int i = 0; i < kNumInputs; ++i) {
    const earlyexit::TensorConfig& t = config::kInputs[i];
    inputs[i] = {g_sample + offset, t.bytes, t.dtype};
    float_inputs[i] = g_float_sample + value_offset;
    counts[i] = Values(t);
    offset += t.bytes;
    value_offset += Values(t);
  }
  unsigned exits[config::kNumExits] = {};
  for (;;) {
    earlyexit::Result result;
    earlyexit::Status run;
    if (floats) {
      if (std::fread(g_float_sample, sizeof(float), SampleValues(), f) !=
          SampleValues()) {
        break;
      }
      run = model.RunFloat(float_inputs, counts, kNumInputs, &result);
    } else {
      if (std::fread(g_sample, 1, SampleBytes(), f) != SampleBytes()) break;
      run = model.Run(inputs, kNumInputs, &result);
    }
    if (run != earlyexit::Status::kOk) {
      std::fprintf(stderr, "run failed: %s\n", earlyexit::StatusString(run));
      std::fclose(f);
      return 1;
    }
    ++exits[result.exit_index];
    std::printf("%d %d %.9g\n", result.label, result.exit_index,
                static_cast<double>(result.confidence));
  }
  std::fclose(f);
  for (int k = 0; k < config::kNumExits; ++k) {
    std::fprintf(stderr, "exit %d (%s): %u samples\n", k, config::kExitNames[k],
                 exits[k]);
  }
  return 0;
}
