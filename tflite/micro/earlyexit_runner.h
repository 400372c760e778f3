// Gated early-exit inference over per-exit TFLite segments on a
// microcontroller: run segment 1, stop at the first exit whose confidence
// reaches its threshold, otherwise hand the carry to the next segment.
//
// The loop mirrors keras_earlyexit/runtime/gated.py (GatedInterpreter._run)
// step for step. It sees the segments only through the small `Segment`
// interface, so it builds and is tested on a host without TFLite Micro;
// tflm_segment.h implements the interface over tflite::MicroInterpreter.
//
// The configuration (shapes, positions, quantization, thresholds) comes from
// the header that keras_earlyexit.export.to_c_arrays generates.
//
// C++17, no exceptions, no RTTI, no dynamic allocation.

#ifndef KERAS_EARLYEXIT_TFLITE_MICRO_EARLYEXIT_RUNNER_H_
#define KERAS_EARLYEXIT_TFLITE_MICRO_EARLYEXIT_RUNNER_H_

#include <cstddef>
#include <cstdint>

namespace earlyexit {

constexpr int kMaxRank = 6;
// Fixed capacity for per-segment state held by the runner (no heap).
constexpr int kMaxSegments = 16;
// Most inputs the checked Run(const InputData*, ...) takes.
constexpr int kMaxInputs = 16;
// An int8 threshold above every int8 value: no sample leaves.
constexpr int32_t kNeverQuantized = 128;

// kInt32: integer model inputs (token ids, padding masks) and carries, never
// quantized. kOther: a tensor type the runner does not handle (reported by
// a Segment).
enum class DType : uint8_t { kInt8, kFloat32, kInt32, kOther };

// One input or output tensor of a segment, as in manifest.json.
struct TensorConfig {
  const char* name;
  int position;  // index in the subgraph's input or output list
  DType dtype;
  int rank;
  int dims[kMaxRank];
  size_t bytes;
  float scale;         // 0 when the tensor is not quantized
  int32_t zero_point;  // 0 when the tensor is not quantized
  // Values an int32 model input may hold. For token ids that index an
  // embedding table: [0, vocabulary size - 1], which to_c_arrays reads from
  // the model (TFLite Micro's GATHER does not check its indices, so the
  // runners do); the whole int32 range otherwise.
  int32_t min_value = INT32_MIN;
  int32_t max_value = INT32_MAX;
};

// One model input for the checked Run: its bytes, their count and the type
// they hold, compared with the config before anything is copied.
struct InputData {
  const void* data;
  size_t bytes;
  DType dtype;
};

// A carry tensor: output `source` of segment k is input `target` of k+1.
struct CarryConfig {
  TensorConfig source;
  TensorConfig target;
  bool requantize;  // int8 parameters differ on the two sides
};

struct SegmentConfig {
  const char* exit_name;
  const unsigned char* model_data;
  size_t model_size;
  const TensorConfig* inputs;
  int num_inputs;
  TensorConfig logits;
  TensorConfig confidence;
  const CarryConfig* carry;  // to the next segment; empty for the last one
  int num_carry;
  float threshold;
  // Smallest int8 confidence that reaches `threshold`, written by the
  // exporter (see QuantizeThreshold); 128 means "never".
  int32_t threshold_quantized;
  int64_t macs;
};

struct ModelConfig {
  const SegmentConfig* segments;
  int num_segments;
  int num_classes;
  // Tensor arena bytes the segments need together (TflmEarlyExit refuses a
  // smaller arena up front); never 0.
  size_t arena_size;
  size_t carry_buffer_size;  // bytes for the largest set of carry tensors
  // Criterion "patience" (PABEE): a sample leaves non-final exit k only when
  // exits k - patience + 1 .. k all predict its class (and its confidence
  // reaches the threshold, a floor). 1 to num_segments; 0 for the other
  // criteria (the threshold alone decides).
  int patience = 0;
};

// A tensor as the segment's interpreter allocated it. `data == nullptr`:
// the segment has no tensor at that position.
struct TensorDesc {
  void* data = nullptr;
  size_t bytes = 0;
  DType dtype = DType::kOther;
  float scale = 0.0f;      // 0 when not quantized
  int32_t zero_point = 0;  // 0 when not quantized
};

// What the runner needs from one segment model. Pointers stay valid from
// setup until the segment is destroyed; an input or output's contents are
// only valid until another segment sharing the arena is invoked.
class Segment {
 public:
  virtual TensorDesc input(int position) = 0;
  virtual TensorDesc output(int position) = 0;
  virtual bool Invoke() = 0;

 protected:
  // Never deleted through this interface (no heap on device).
  ~Segment() = default;
};

enum class Status : uint8_t {
  kOk,
  kBadConfig,           // config inconsistent with itself
  kTensorMismatch,      // a segment's tensor differs from the config
  kCarryBufferTooSmall, // the buffer given is smaller than the carry needs
  kBadThreshold,        // outside [0, 1], or wrong count
  kInvokeFailed,
  kAllocationFailed,    // arena too small, or an op missing from the resolver
  kBadInput,            // null pointer, or wrong number of inputs
  kNonFiniteInput,      // NaN or infinity in a float input
  kInputOutOfRange,     // an int32 input value outside [min_value, max_value]
  kBadPatience,         // not in [1, exits], or a model of another criterion
};

const char* StatusString(Status status);

// The config's own consistency: rank and dims, byte size, quantization.
bool TensorFits(const TensorConfig& t);
// An interpreter's tensor is the one the config describes (bytes, dtype,
// int8 scale within 1e-6 relative and zero-point).
bool TensorMatches(const TensorConfig& config, const TensorDesc& tensor);
// Whether `bytes` bytes of float32 values (any alignment) are all finite.
bool AllFinite(const void* data, size_t bytes);
// Whether `bytes` bytes of int32 values (any alignment) are all in [lo, hi].
bool AllInRange(const void* data, size_t bytes, int32_t lo, int32_t hi);
// The checks every runner makes on one model input before copying it:
// kNonFiniteInput for NaN or infinity in a float32 input, kInputOutOfRange
// for an int32 value outside [t.min_value, t.max_value]. `data` holds
// t.bytes bytes.
Status CheckInputValues(const TensorConfig& t, const void* data);
// An InputData is the input `t` describes (non-null, same byte count and
// dtype: kBadInput otherwise), then CheckInputValues.
Status CheckInput(const TensorConfig& t, const InputData& input);

struct Result {
  int label;
  int exit_index;    // 0-based
  float confidence;  // dequantized
};

// Float to int8 as TFLite's QUANTIZE op does (round half away from zero,
// saturate); same arithmetic as runtime.gated.quantize. Returns
// kNonFiniteInput, leaving `q` untouched, if any x is NaN or infinite, and
// kBadInput for a scale that is not positive and finite.
Status Quantize(const float* x, int8_t* q, size_t n, float scale,
                int32_t zero_point);

// Smallest q in [-128, 127] with float32(q - zero_point) * scale >=
// threshold, scanned in float32; 128 (never) if there is none or if
// threshold >= 1. Same rule as runtime.manifest.quantize_threshold.
int32_t QuantizeThreshold(float threshold, float scale, int32_t zero_point);

class EarlyExitRunner {
 public:
  // `segments[k]` runs config.segments[k]. `carry_buffer` holds the carry
  // between two segments: with TFLite Micro the segments share the arena's
  // non-persistent section, so segment k's outputs and segment k+1's
  // inputs may overlap and the carry must be parked outside the arena.
  EarlyExitRunner(const ModelConfig& config, Segment* const* segments,
                  uint8_t* carry_buffer, size_t carry_buffer_size);

  // Checks the config against itself and against the segments' tensors
  // (position, size, dtype, int8 scale and zero-point of every input,
  // output and carry); call once before Run.
  Status Init();

  // Gated inference on one sample. `inputs[i]` holds the raw bytes of
  // segment 1's input i (config order; int8 bundles take quantized data,
  // see Quantize; int32 inputs take the ids themselves), at least the
  // input's bytes. Float inputs holding NaN or infinity are refused, and
  // int32 values outside the input's [min_value, max_value].
  Status Run(const void* const* inputs, Result* result);
  // For models with exactly one input; kBadInput otherwise.
  Status Run(const void* input, Result* result);
  // Checked: `num_inputs` inputs, each of its input's byte count and dtype
  // (kBadInput otherwise, nothing run); then as above.
  Status Run(const InputData* inputs, int num_inputs, Result* result);

  // Replaces the thresholds of the non-final exits (floats in [0, 1]); int8
  // exits get QuantizeThreshold of them. May be called before Init: the
  // values are kept instead of the config's.
  Status SetThresholds(const float* thresholds, int count);
  float threshold(int exit_index) const { return thresholds_[exit_index]; }
  int32_t threshold_quantized(int exit_index) const {
    return thresholds_quantized_[exit_index];
  }

  int num_exits() const { return config_.num_segments; }
  // Criterion "patience": replaces the config's patience (1 to
  // num_exits()). May be called before Init: the value is kept instead of
  // the config's. kBadPatience out of range or for another criterion.
  Status SetPatience(int patience);
  // The patience in use (0: not the patience criterion).
  int patience() const { return patience_; }
  uint32_t exit_count(int k) const { return exit_counts_[k]; }
  uint32_t invocations(int k) const { return invocations_[k]; }
  void ResetCounts();

 private:
  Status CheckSegment(int k);
  bool Confident(int k, const void* confidence) const;
  void ParkCarry(int k);
  void LoadCarry(int k);
  Result MakeResult(int k);

  const ModelConfig& config_;
  Segment* const* segments_;
  uint8_t* carry_buffer_;
  size_t carry_buffer_size_;
  bool initialized_ = false;
  bool thresholds_set_ = false;  // by SetThresholds, before or after Init
  bool patience_set_ = false;    // by SetPatience, before or after Init
  int patience_ = 0;
  float thresholds_[kMaxSegments] = {};
  int32_t thresholds_quantized_[kMaxSegments] = {};
  uint32_t exit_counts_[kMaxSegments] = {};
  uint32_t invocations_[kMaxSegments] = {};
};

}  // namespace earlyexit

#endif  // KERAS_EARLYEXIT_TFLITE_MICRO_EARLYEXIT_RUNNER_H_
