#include "earlyexit_runner.h"

#include <cmath>
#include <cstring>

namespace earlyexit {
namespace {

// Carry tensors are parked at 16-byte offsets, as the arena aligns them.
constexpr size_t kAlignment = 16;
// Relative difference below which two float32 scales are the same number
// (the config prints them with 9 significant digits).
constexpr float kScaleTolerance = 1e-6f;

size_t AlignUp(size_t n) { return (n + kAlignment - 1) / kAlignment * kAlignment; }

size_t ElementSize(DType dtype) { return dtype == DType::kInt8 ? 1 : 4; }

// Logits and confidences: int8 or float32 (what ArgMax and the gate read).
bool IsGateType(DType dtype) { return dtype == DType::kInt8 || dtype == DType::kFloat32; }

// `x` must be finite and `scale` positive: callers check.
int8_t QuantizeOne(float x, float scale, int32_t zero_point) {
  const float v = x / scale;
  const float r = v >= 0.0f ? std::floor(v + 0.5f) : -std::floor(-v + 0.5f);
  const float q = r + static_cast<float>(zero_point);
  if (q <= -128.0f) return -128;
  if (q >= 127.0f) return 127;
  return static_cast<int8_t>(q);
}

float Dequantize(int8_t q, float scale, int32_t zero_point) {
  return static_cast<float>(static_cast<int32_t>(q) - zero_point) * scale;
}

bool ValidScale(float scale) { return std::isfinite(scale) && scale > 0.0f; }

// Index of the largest value; the first one on ties, like numpy.argmax.
int ArgMax(const TensorConfig& t, const void* data) {
  const size_t n = t.bytes / ElementSize(t.dtype);
  int best = 0;
  if (t.dtype == DType::kInt8) {
    const int8_t* v = static_cast<const int8_t*>(data);
    for (size_t i = 1; i < n; ++i) {
      if (v[i] > v[best]) best = static_cast<int>(i);
    }
  } else {
    const float* v = static_cast<const float*>(data);
    for (size_t i = 1; i < n; ++i) {
      if (v[i] > v[best]) best = static_cast<int>(i);
    }
  }
  return best;
}

bool SameScale(float a, float b) {
  return std::fabs(a - b) <= kScaleTolerance * std::fabs(b);
}

// Same position, dtype and shape-derived size (quantization may differ:
// that is what `requantize` is for).
bool SameTensor(const TensorConfig& a, const TensorConfig& b) {
  return a.position == b.position && a.dtype == b.dtype && a.bytes == b.bytes;
}

bool ThresholdFits(const SegmentConfig& s) {
  if (!(s.threshold >= 0.0f && s.threshold <= 1.0f)) return false;
  if (s.confidence.dtype != DType::kInt8) return true;
  // 1.0 means "never" on every runtime (see QuantizeThreshold).
  return s.threshold_quantized >= -128 && s.threshold_quantized <= kNeverQuantized &&
         (s.threshold < 1.0f || s.threshold_quantized == kNeverQuantized);
}

bool ConfigShapeFits(const ModelConfig& config) {
  return config.segments != nullptr && config.num_segments >= 1 &&
         config.num_segments <= kMaxSegments;
}

}  // namespace

bool TensorFits(const TensorConfig& t) {
  if (t.position < 0 || t.rank < 0 || t.rank > kMaxRank) return false;
  if (t.dtype != DType::kInt8 && t.dtype != DType::kFloat32 &&
      t.dtype != DType::kInt32) {
    return false;
  }
  size_t elements = 1;
  for (int d = 0; d < t.rank; ++d) {
    if (t.dims[d] < 1) return false;
    const size_t dim = static_cast<size_t>(t.dims[d]);
    if (elements > SIZE_MAX / ElementSize(t.dtype) / dim) return false;
    elements *= dim;
  }
  if (elements * ElementSize(t.dtype) != t.bytes) return false;
  if (t.min_value > t.max_value) return false;
  if (t.dtype != DType::kInt8) return t.scale == 0.0f && t.zero_point == 0;
  return ValidScale(t.scale) && t.zero_point >= -128 && t.zero_point <= 127;
}

bool TensorMatches(const TensorConfig& config, const TensorDesc& tensor) {
  if (tensor.data == nullptr || tensor.bytes != config.bytes ||
      tensor.dtype != config.dtype) {
    return false;
  }
  return config.dtype != DType::kInt8 ||
         (SameScale(tensor.scale, config.scale) &&
          tensor.zero_point == config.zero_point);
}

bool AllFinite(const void* data, size_t bytes) {
  // memcpy: the caller's bytes need not be float-aligned.
  const uint8_t* p = static_cast<const uint8_t*>(data);
  for (size_t b = 0; b + sizeof(float) <= bytes; b += sizeof(float)) {
    float v;
    std::memcpy(&v, p + b, sizeof(float));
    if (!std::isfinite(v)) return false;
  }
  return true;
}

bool AllInRange(const void* data, size_t bytes, int32_t lo, int32_t hi) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  for (size_t b = 0; b + sizeof(int32_t) <= bytes; b += sizeof(int32_t)) {
    int32_t v;
    std::memcpy(&v, p + b, sizeof(int32_t));
    if (v < lo || v > hi) return false;
  }
  return true;
}

Status CheckInputValues(const TensorConfig& t, const void* data) {
  if (t.dtype == DType::kFloat32 && !AllFinite(data, t.bytes)) {
    return Status::kNonFiniteInput;
  }
  if (t.dtype == DType::kInt32 && !AllInRange(data, t.bytes, t.min_value, t.max_value)) {
    return Status::kInputOutOfRange;
  }
  return Status::kOk;
}

Status CheckInput(const TensorConfig& t, const InputData& input) {
  if (input.data == nullptr || input.bytes != t.bytes || input.dtype != t.dtype) {
    return Status::kBadInput;
  }
  return CheckInputValues(t, input.data);
}

const char* StatusString(Status status) {
  switch (status) {
    case Status::kOk:
      return "ok";
    case Status::kBadConfig:
      return "the model config is inconsistent: regenerate it with "
             "keras_earlyexit.export.to_c_arrays";
    case Status::kTensorMismatch:
      return "a segment's tensor (position, size, dtype, scale or zero-point) "
             "differs from the config: the model data and earlyexit_config.h "
             "come from different bundles";
    case Status::kCarryBufferTooSmall:
      return "carry buffer smaller than config carry_buffer_size";
    case Status::kBadThreshold:
      return "thresholds: give one per non-final exit, each in [0, 1]";
    case Status::kInvokeFailed:
      return "a segment's Invoke failed (see the interpreter's log)";
    case Status::kAllocationFailed:
      return "the tensor arena is too small (give at least the model's "
             "kArenaSize bytes, 16-byte aligned) or TFLite Micro could not "
             "allocate the tensors (a resolver without an op: use "
             "EARLYEXIT_OPS); see the interpreter's log";
    case Status::kBadInput:
      return "Run needs a result and one non-null input per model input, "
             "each of the input's byte size and dtype (int8 models take "
             "quantized bytes, int32 inputs int32 ids; Run(const void*, "
             "Result*) is for single-input models only)";
    case Status::kNonFiniteInput:
      return "an input value is NaN or infinite: refused, the model's answer "
             "would be meaningless";
    case Status::kBadPatience:
      return "patience: give an int from 1 to the number of exits, for a model "
             "exported with criterion \"patience\"";
    case Status::kInputOutOfRange:
      return "an int32 input value is outside the range the model takes "
             "(token ids: 0 to the vocabulary size - 1, see the input's "
             "min_value and max_value): refused before TFLite Micro reads "
             "outside its embedding table";
  }
  return "unknown status";
}

Status Quantize(const float* x, int8_t* q, size_t n, float scale,
                int32_t zero_point) {
  if (!ValidScale(scale) || zero_point < -128 || zero_point > 127) {
    return Status::kBadInput;
  }
  if ((x == nullptr || q == nullptr) && n > 0) return Status::kBadInput;
  for (size_t i = 0; i < n; ++i) {
    if (!std::isfinite(x[i])) return Status::kNonFiniteInput;
  }
  for (size_t i = 0; i < n; ++i) q[i] = QuantizeOne(x[i], scale, zero_point);
  return Status::kOk;
}

int32_t QuantizeThreshold(float threshold, float scale, int32_t zero_point) {
  if (!(threshold < 1.0f)) return kNeverQuantized;
  for (int32_t q = -128; q <= 127; ++q) {
    // Rounded to float32 before comparing, as numpy does in Python.
    const float value = static_cast<float>(q - zero_point) * scale;
    if (value >= threshold) return q;
  }
  return kNeverQuantized;
}

EarlyExitRunner::EarlyExitRunner(const ModelConfig& config,
                                 Segment* const* segments,
                                 uint8_t* carry_buffer,
                                 size_t carry_buffer_size)
    : config_(config),
      segments_(segments),
      carry_buffer_(carry_buffer),
      carry_buffer_size_(carry_buffer_size) {}

Status EarlyExitRunner::CheckSegment(int k) {
  const int n = config_.num_segments;
  const SegmentConfig& s = config_.segments[k];
  Segment* segment = segments_[k];
  const bool last = k + 1 == n;
  if (segment == nullptr || s.num_inputs < 1 || s.inputs == nullptr ||
      !TensorFits(s.logits) || !TensorFits(s.confidence) ||
      !IsGateType(s.logits.dtype) || !IsGateType(s.confidence.dtype) ||
      s.confidence.bytes != ElementSize(s.confidence.dtype) ||
      s.logits.bytes / ElementSize(s.logits.dtype) !=
          static_cast<size_t>(config_.num_classes) ||
      (!last && !ThresholdFits(s)) ||
      (!last && (s.carry == nullptr || s.num_carry != config_.segments[k + 1].num_inputs)) ||
      (last && s.num_carry != 0)) {
    return Status::kBadConfig;
  }
  for (int i = 0; i < s.num_inputs; ++i) {
    const TensorConfig& t = s.inputs[i];
    if (!TensorFits(t)) return Status::kBadConfig;
    for (int j = 0; j < i; ++j) {
      if (s.inputs[j].position == t.position) return Status::kBadConfig;
    }
    if (!TensorMatches(t, segment->input(t.position))) return Status::kTensorMismatch;
  }
  if (!TensorMatches(s.logits, segment->output(s.logits.position)) ||
      !TensorMatches(s.confidence, segment->output(s.confidence.position))) {
    return Status::kTensorMismatch;
  }
  size_t carry_bytes = 0;
  for (int j = 0; j < s.num_carry; ++j) {
    const CarryConfig& c = s.carry[j];
    const bool int8 = c.source.dtype == DType::kInt8;
    if (!TensorFits(c.source) || !TensorFits(c.target) ||
        c.source.bytes != c.target.bytes || c.source.dtype != c.target.dtype ||
        (c.requantize && !int8)) {
      return Status::kBadConfig;
    }
    // Each carry fills a distinct input of the next segment, as listed there.
    const SegmentConfig& next = config_.segments[k + 1];
    bool listed = false;
    for (int i = 0; i < next.num_inputs; ++i) {
      listed = listed || SameTensor(next.inputs[i], c.target);
    }
    for (int i = 0; i < j; ++i) {
      if (s.carry[i].target.position == c.target.position) return Status::kBadConfig;
    }
    if (!listed) return Status::kBadConfig;
    if (!TensorMatches(c.source, segment->output(c.source.position)) ||
        !TensorMatches(c.target, segments_[k + 1]->input(c.target.position))) {
      return Status::kTensorMismatch;
    }
    carry_bytes += AlignUp(c.source.bytes);
  }
  if (carry_bytes > config_.carry_buffer_size) return Status::kBadConfig;
  if (carry_bytes > carry_buffer_size_ ||
      (carry_bytes > 0 && carry_buffer_ == nullptr)) {
    return Status::kCarryBufferTooSmall;
  }
  return Status::kOk;
}

Status EarlyExitRunner::Init() {
  initialized_ = false;
  if (!ConfigShapeFits(config_) || segments_ == nullptr || config_.num_classes < 1 ||
      config_.patience < 0 || config_.patience > config_.num_segments) {
    return Status::kBadConfig;
  }
  // The next segment's Segment is needed to check the carry targets.
  for (int k = 0; k < config_.num_segments; ++k) {
    if (segments_[k] == nullptr) return Status::kBadConfig;
  }
  for (int k = 0; k < config_.num_segments; ++k) {
    const Status status = CheckSegment(k);
    if (status != Status::kOk) return status;
  }
  if (!thresholds_set_) {
    for (int k = 0; k < config_.num_segments; ++k) {
      thresholds_[k] = config_.segments[k].threshold;
      thresholds_quantized_[k] = config_.segments[k].threshold_quantized;
    }
  }
  if (!patience_set_) patience_ = config_.patience;
  ResetCounts();
  initialized_ = true;
  return Status::kOk;
}

Status EarlyExitRunner::SetThresholds(const float* thresholds, int count) {
  if (!ConfigShapeFits(config_)) return Status::kBadConfig;
  if (thresholds == nullptr || count != config_.num_segments - 1) {
    return Status::kBadThreshold;
  }
  for (int k = 0; k < count; ++k) {
    if (!(thresholds[k] >= 0.0f && thresholds[k] <= 1.0f)) {
      return Status::kBadThreshold;
    }
    const TensorConfig& c = config_.segments[k].confidence;
    if (c.dtype == DType::kInt8 && !ValidScale(c.scale)) return Status::kBadConfig;
  }
  for (int k = 0; k < count; ++k) {
    const TensorConfig& c = config_.segments[k].confidence;
    thresholds_[k] = thresholds[k];
    thresholds_quantized_[k] =
        c.dtype == DType::kInt8 ? QuantizeThreshold(thresholds[k], c.scale, c.zero_point)
                                : 0;
  }
  thresholds_set_ = true;
  return Status::kOk;
}

Status EarlyExitRunner::SetPatience(int patience) {
  if (!ConfigShapeFits(config_)) return Status::kBadConfig;
  if (config_.patience == 0 || patience < 1 || patience > config_.num_segments) {
    return Status::kBadPatience;
  }
  patience_ = patience;
  patience_set_ = true;
  return Status::kOk;
}

void EarlyExitRunner::ResetCounts() {
  for (int k = 0; k < kMaxSegments; ++k) {
    exit_counts_[k] = 0;
    invocations_[k] = 0;
  }
}

bool EarlyExitRunner::Confident(int k, const void* confidence) const {
  // int8 bundles compare integers, as a microcontroller without FPU would;
  // the quantized threshold of 1.0 is 128, above every int8 value.
  if (config_.segments[k].confidence.dtype == DType::kInt8) {
    return *static_cast<const int8_t*>(confidence) >= thresholds_quantized_[k];
  }
  // A saturated float softmax reaches exactly 1.0: 1.0 still means never.
  return thresholds_[k] < 1.0f &&
         *static_cast<const float*>(confidence) >= thresholds_[k];
}

void EarlyExitRunner::ParkCarry(int k) {
  const SegmentConfig& s = config_.segments[k];
  size_t offset = 0;
  for (int j = 0; j < s.num_carry; ++j) {
    const CarryConfig& c = s.carry[j];
    const void* out = segments_[k]->output(c.source.position).data;
    uint8_t* parked = carry_buffer_ + offset;
    if (c.requantize) {
      // Only where the exporter could not give both sides the same scale;
      // dequantize-then-quantize, as runtime.gated.requantize.
      const int8_t* src = static_cast<const int8_t*>(out);
      int8_t* dst = reinterpret_cast<int8_t*>(parked);
      for (size_t i = 0; i < c.source.bytes; ++i) {
        dst[i] = QuantizeOne(Dequantize(src[i], c.source.scale, c.source.zero_point),
                             c.target.scale, c.target.zero_point);
      }
    } else {
      std::memcpy(parked, out, c.source.bytes);
    }
    offset += AlignUp(c.source.bytes);
  }
}

void EarlyExitRunner::LoadCarry(int k) {
  const SegmentConfig& previous = config_.segments[k - 1];
  size_t offset = 0;
  for (int j = 0; j < previous.num_carry; ++j) {
    const CarryConfig& c = previous.carry[j];
    std::memcpy(segments_[k]->input(c.target.position).data, carry_buffer_ + offset,
                c.target.bytes);
    offset += AlignUp(c.target.bytes);
  }
}

Result EarlyExitRunner::MakeResult(int k) {
  const SegmentConfig& s = config_.segments[k];
  const void* confidence = segments_[k]->output(s.confidence.position).data;
  Result result;
  result.label = ArgMax(s.logits, segments_[k]->output(s.logits.position).data);
  result.exit_index = k;
  result.confidence =
      s.confidence.dtype == DType::kInt8
          ? Dequantize(*static_cast<const int8_t*>(confidence), s.confidence.scale,
                       s.confidence.zero_point)
          : *static_cast<const float*>(confidence);
  return result;
}

Status EarlyExitRunner::Run(const void* input, Result* result) {
  if (!initialized_) return Status::kBadConfig;
  if (config_.segments[0].num_inputs != 1) return Status::kBadInput;
  return Run(&input, result);
}

Status EarlyExitRunner::Run(const InputData* inputs, int num_inputs,
                            Result* result) {
  if (!initialized_) return Status::kBadConfig;
  const SegmentConfig& first = config_.segments[0];
  if (inputs == nullptr || result == nullptr || num_inputs != first.num_inputs) {
    return Status::kBadInput;
  }
  // Fixed capacity: one pointer per input, no heap.
  if (num_inputs > kMaxInputs) return Status::kBadInput;
  const void* data[kMaxInputs];
  for (int i = 0; i < num_inputs; ++i) {
    const Status status = CheckInput(first.inputs[i], inputs[i]);
    if (status != Status::kOk) return status;
    data[i] = inputs[i].data;
  }
  return Run(data, result);
}

Status EarlyExitRunner::Run(const void* const* inputs, Result* result) {
  if (!initialized_) return Status::kBadConfig;
  const SegmentConfig& first = config_.segments[0];
  if (inputs == nullptr || result == nullptr) return Status::kBadInput;
  for (int i = 0; i < first.num_inputs; ++i) {
    if (inputs[i] == nullptr) return Status::kBadInput;
    const Status status = CheckInputValues(first.inputs[i], inputs[i]);
    if (status != Status::kOk) return status;
  }
  const int last = config_.num_segments - 1;
  // Patience: the previous exit's class and how many exits in a row, up to
  // this one, predicted it (runtime/patience.py next_streak).
  int previous_label = -1;
  int streak = 0;
  for (int k = 0; k <= last; ++k) {
    const SegmentConfig& s = config_.segments[k];
    Segment* segment = segments_[k];
    // gated.py: runner.set_input(...) for the sample or the carry.
    if (k == 0) {
      for (int i = 0; i < s.num_inputs; ++i) {
        std::memcpy(segment->input(s.inputs[i].position).data, inputs[i],
                    s.inputs[i].bytes);
      }
    } else {
      LoadCarry(k);
    }
    // gated.py: runner.invoke()
    ++invocations_[k];
    if (!segment->Invoke()) return Status::kInvokeFailed;
    // gated.py: `if k == last or gate_passes(confidence, threshold)`; for
    // patience, patience_passes(streak, patience, confidence, threshold).
    if (patience_ > 0) {
      const int label = ArgMax(s.logits, segment->output(s.logits.position).data);
      streak = label == previous_label ? streak + 1 : 1;
      previous_label = label;
    }
    const bool patient = patience_ == 0 || streak >= patience_;
    if (k == last ||
        (patient && Confident(k, segment->output(s.confidence.position).data))) {
      *result = MakeResult(k);
      ++exit_counts_[k];
      return Status::kOk;
    }
    // gated.py: collect the carry (requantizing where needed) for k + 1.
    ParkCarry(k);
  }
  return Status::kBadConfig;  // unreachable: the last exit takes every sample
}

}  // namespace earlyexit
