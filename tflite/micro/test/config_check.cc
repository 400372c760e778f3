// Compiles the runner with a generated earlyexit_config.h (include its
// directory and link its segment_*_model_data.cc), prints the config for
// tests/test_micro_cpp.py to compare with manifest.json, and runs the
// runner's routing over segments that are plain buffers sized from the
// config (no TFLite Micro): a confidence at the quantized threshold exits
// (with patience, once the streak allows: every exit predicts class 0).
//
//   config_check [THRESHOLDS_FILE]
//
// With a file of float32 thresholds, also prints QuantizeThreshold of each
// at each int8 exit's confidence parameters ("quantized k index q").

#include <cstdint>
#include <cstdio>
#include <cstring>

#include "earlyexit_config.h"
#include "earlyexit_runner.h"

namespace {

namespace config = earlyexit_config;
using earlyexit::TensorConfig;

constexpr size_t kPoolBytes = 1 << 20;
alignas(16) uint8_t g_pool[kPoolBytes];
size_t g_pool_used = 0;

uint8_t* Take(size_t bytes) {
  if (g_pool_used + bytes > kPoolBytes) return nullptr;
  uint8_t* p = g_pool + g_pool_used;
  g_pool_used += (bytes + 15) / 16 * 16;
  return p;
}

// A segment whose tensors are buffers of the config's sizes; Invoke writes
// `confidence` into the confidence output.
class BufferSegment : public earlyexit::Segment {
 public:
  static constexpr int kMaxTensors = 16;

  void Setup(const earlyexit::SegmentConfig& s) {
    config_ = &s;
    for (int i = 0; i < s.num_inputs; ++i) Add(in_, s.inputs[i]);
    Add(out_, s.logits);
    Add(out_, s.confidence);
    for (int j = 0; j < s.num_carry; ++j) Add(out_, s.carry[j].source);
  }
  earlyexit::TensorDesc input(int p) override {
    return Valid(p) ? in_[p] : earlyexit::TensorDesc();
  }
  earlyexit::TensorDesc output(int p) override {
    return Valid(p) ? out_[p] : earlyexit::TensorDesc();
  }
  bool Invoke() override {
    std::memset(out_[config_->logits.position].data, 0, config_->logits.bytes);
    *static_cast<int8_t*>(out_[config_->confidence.position].data) = confidence;
    ++invocations;
    return true;
  }
  int8_t confidence = 0;
  int invocations = 0;

 private:
  static bool Valid(int p) { return p >= 0 && p < kMaxTensors; }
  static void Add(earlyexit::TensorDesc* descs, const TensorConfig& t) {
    descs[t.position] = {Take(t.bytes), t.bytes, t.dtype, t.scale, t.zero_point};
  }
  const earlyexit::SegmentConfig* config_ = nullptr;
  earlyexit::TensorDesc in_[kMaxTensors];
  earlyexit::TensorDesc out_[kMaxTensors];
};

void PrintTensor(const char* role, int k, const TensorConfig& t) {
  std::printf("tensor %d %s %s %d %d %zu %.9g %d", k, role, t.name, t.position,
              static_cast<int>(t.dtype), t.bytes, static_cast<double>(t.scale),
              static_cast<int>(t.zero_point));
  for (int d = 0; d < t.rank; ++d) std::printf(" %d", t.dims[d]);
  std::printf("\n");
}

}  // namespace

// QuantizeThreshold of each float32 in `path` at each int8 exit.
bool PrintQuantizedThresholds(const char* path) {
  std::FILE* f = std::fopen(path, "rb");
  if (f == nullptr) return false;
  float t;
  for (int i = 0; std::fread(&t, sizeof(t), 1, f) == 1; ++i) {
    for (int k = 0; k + 1 < config::kNumSegments; ++k) {
      const TensorConfig& c = config::kSegments[k].confidence;
      if (c.dtype != earlyexit::DType::kInt8) continue;
      std::printf("quantized %d %d %d\n", k, i,
                  static_cast<int>(earlyexit::QuantizeThreshold(t, c.scale, c.zero_point)));
    }
  }
  std::fclose(f);
  return true;
}

int main(int argc, char** argv) {
  if (argc == 2 && !PrintQuantizedThresholds(argv[1])) return 2;
  std::printf("model %d %d %zu %zu %d\n", config::kNumSegments, config::kNumClasses,
              config::kArenaSize, config::kCarryBufferSize, config::kNumOps);
  std::printf("criterion %s %d %d\n", config::kCriterion, config::kPatience,
              config::kModel.patience);
  for (int i = 0; i < config::kSegments[0].num_inputs; ++i) {
    const TensorConfig& t = config::kSegment1Inputs[i];
    if (t.dtype == earlyexit::DType::kInt32) {
      std::printf("range %s %ld %ld\n", t.name, static_cast<long>(t.min_value),
                  static_cast<long>(t.max_value));
    }
  }
#define PRINT_OP(name) std::printf("op %s\n", #name);
  EARLYEXIT_OPS(PRINT_OP)
#undef PRINT_OP
  for (int k = 0; k < config::kNumSegments; ++k) {
    const earlyexit::SegmentConfig& s = config::kSegments[k];
    // A TFLite flatbuffer has the identifier "TFL3" at offset 4.
    const bool flatbuffer = std::memcmp(s.model_data + 4, "TFL3", 4) == 0;
    std::printf("segment %d %s %zu %d %.9g %d %lld\n", k, s.exit_name, s.model_size,
                flatbuffer ? 1 : 0, static_cast<double>(s.threshold),
                static_cast<int>(s.threshold_quantized),
                static_cast<long long>(s.macs));
    for (int i = 0; i < s.num_inputs; ++i) PrintTensor("input", k, s.inputs[i]);
    PrintTensor("logits", k, s.logits);
    PrintTensor("confidence", k, s.confidence);
    for (int j = 0; j < s.num_carry; ++j) {
      PrintTensor("carry_source", k, s.carry[j].source);
      PrintTensor("carry_target", k, s.carry[j].target);
    }
  }

  static BufferSegment segments[config::kNumSegments];
  static earlyexit::Segment* pointers[config::kNumSegments];
  for (int k = 0; k < config::kNumSegments; ++k) {
    segments[k].Setup(config::kSegments[k]);
    pointers[k] = &segments[k];
  }
  alignas(16) static uint8_t carry[config::kCarryBufferSize + 1];
  earlyexit::EarlyExitRunner runner(config::kModel, pointers, carry,
                                    config::kCarryBufferSize);
  const earlyexit::Status status = runner.Init();
  std::printf("init %s\n", earlyexit::StatusString(status));
  if (status != earlyexit::Status::kOk) return 1;
  const void* inputs[8] = {};
  for (int i = 0; i < config::kSegments[0].num_inputs; ++i) {
    inputs[i] = segments[0].input(config::kSegments[0].inputs[i].position).data;
  }
  // For each exit k: confidences one below the threshold before k, at the
  // threshold at k; int8 bundles only (float confidences are not set here).
  for (int k = 0; k < config::kNumSegments; ++k) {
    for (int j = 0; j < config::kNumSegments; ++j) {
      const int32_t q = config::kSegments[j].threshold_quantized;
      const int32_t c = j < k ? q - 1 : q;
      segments[j].confidence = static_cast<int8_t>(c < -128 ? -128 : c > 127 ? 127 : c);
    }
    earlyexit::Result result;
    if (runner.Run(inputs, &result) != earlyexit::Status::kOk) return 1;
    std::printf("route %d %d\n", k, result.exit_index);
  }
  return 0;
}
