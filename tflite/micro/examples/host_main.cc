// Runs a generated model on the host through TFLite Micro: reads samples of
// segment 1's inputs (raw bytes as the model takes them: int8 already
// quantized, float32 values, int32 token ids; a sample is every input's
// bytes in config order) from a file and prints "label exit_index
// confidence" per sample, then the per-exit counts. A sample the runner
// refuses stops the program with its status. Build: `make host_main
// TFLM_DIR=... CONFIG_DIR=...`.
//
//   host_main SAMPLES_FILE [T1,T2,...] [--patience P]
//
// Thresholds given on the command line replace the config's (one per
// non-final exit), and --patience the patience of a model of criterion
// "patience"; both are set before Init, as firmware may do.

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "earlyexit_config.h"
#include "earlyexit_runner.h"
#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"
#include "tflm_segment.h"

namespace {

namespace config = earlyexit_config;

alignas(16) uint8_t g_arena[config::kArenaSize];
alignas(16) uint8_t g_carry[config::kCarryBufferSize];
constexpr int kNumInputs = config::kSegments[0].num_inputs;

constexpr size_t SampleBytes() {
  size_t bytes = 0;
  for (int i = 0; i < kNumInputs; ++i) bytes += config::kSegment1Inputs[i].bytes;
  return bytes;
}

alignas(16) uint8_t g_sample[SampleBytes()];

// "0.5,0.25" -> {0.5f, 0.25f}; false unless exactly `count` numbers.
bool ParseThresholds(const char* text, float* out, int count) {
  for (int n = 0; n < count; ++n) {
    char* end = nullptr;
    out[n] = std::strtof(text, &end);
    if (end == text || *end != (n + 1 < count ? ',' : '\0')) return false;
    text = end + 1;
  }
  return count > 0 || *text == '\0';
}

}  // namespace

int main(int argc, char** argv) {
  static_assert(kNumInputs <= earlyexit::kMaxInputs, "too many model inputs");
  const char* thresholds_arg = nullptr;
  const char* patience_arg = nullptr;
  bool usage = argc < 2;
  for (int a = 2; a < argc && !usage; ++a) {
    if (std::strcmp(argv[a], "--patience") == 0 && a + 1 < argc && !patience_arg) {
      patience_arg = argv[++a];
    } else if (thresholds_arg == nullptr) {
      thresholds_arg = argv[a];
    } else {
      usage = true;
    }
  }
  if (usage) {
    std::fprintf(stderr, "usage: %s SAMPLES_FILE [T1,T2,...] [--patience P]\n",
                 argv[0]);
    return 2;
  }
  static tflite::MicroMutableOpResolver<config::kNumOps> resolver;
#define EARLYEXIT_ADD_OP(name) \
  if (resolver.Add##name() != kTfLiteOk) return 1;
  EARLYEXIT_OPS(EARLYEXIT_ADD_OP)
#undef EARLYEXIT_ADD_OP

  static earlyexit::TflmEarlyExit<config::kNumSegments> model(
      config::kModel, resolver, g_arena, sizeof(g_arena), g_carry,
      sizeof(g_carry));
  if (patience_arg != nullptr) {
    char* end = nullptr;
    const long patience = std::strtol(patience_arg, &end, 10);
    const bool number = end != patience_arg && *end == '\0' &&
                        patience >= INT32_MIN && patience <= INT32_MAX;
    const earlyexit::Status set =
        number ? model.runner().SetPatience(static_cast<int>(patience))
               : earlyexit::Status::kBadPatience;
    if (set != earlyexit::Status::kOk) {
      std::fprintf(stderr, "patience: %s\n", earlyexit::StatusString(set));
      return 2;
    }
  }
  if (thresholds_arg != nullptr) {
    float thresholds[config::kNumSegments] = {};
    const int count = config::kNumSegments - 1;
    if (!ParseThresholds(thresholds_arg, thresholds, count)) {
      std::fprintf(stderr, "thresholds: give %d comma-separated numbers\n", count);
      return 2;
    }
    const earlyexit::Status set = model.runner().SetThresholds(thresholds, count);
    if (set != earlyexit::Status::kOk) {
      std::fprintf(stderr, "thresholds: %s\n", earlyexit::StatusString(set));
      return 2;
    }
  }
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
  earlyexit::InputData inputs[kNumInputs];
  size_t offset = 0;
  for (int i = 0; i < kNumInputs; ++i) {
    const earlyexit::TensorConfig& t = config::kSegment1Inputs[i];
    inputs[i] = {g_sample + offset, t.bytes, t.dtype};
    offset += t.bytes;
  }
  while (std::fread(g_sample, 1, sizeof(g_sample), f) == sizeof(g_sample)) {
    earlyexit::Result result;
    const earlyexit::Status run = model.runner().Run(inputs, kNumInputs, &result);
    if (run != earlyexit::Status::kOk) {
      std::fprintf(stderr, "run failed: %s\n", earlyexit::StatusString(run));
      std::fclose(f);
      return 1;
    }
    std::printf("%d %d %.9g\n", result.label, result.exit_index,
                static_cast<double>(result.confidence));
  }
  std::fclose(f);
  for (int k = 0; k < config::kNumSegments; ++k) {
    std::fprintf(stderr, "exit %d (%s): %u samples\n", k,
                 config::kSegments[k].exit_name, model.runner().exit_count(k));
  }
  return 0;
}
