#include "earlyexit_runner.h"

#include <cmath>
#include <cstring>

namespace earlyexit {
namespace {

// Carry tensors are parked at 16-byte offsets, as the arena aligns them.
constexpr size_t kAlignment = 16;

size_t AlignUp(size_t n) { return (n + kAlignment - 1) / kAlignment * kAlignment; }

size_t ElementSize(DType dtype) { return dtype == DType::kInt8 ? 1 : 4; }

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

bool TensorFits(const TensorConfig& t) {
  size_t elements = 1;
  for (int d = 0; d < t.rank; ++d) elements *= static_cast<size_t>(t.dims[d]);
  return t.rank >= 0 && t.rank <= kMaxRank &&
         elements * ElementSize(t.dtype) == t.bytes &&
         (t.dtype == DType::kFloat32 || t.scale > 0.0f);
}

}  // namespace

const char* StatusString(Status status) {
  switch (status) {
    case Status::kOk:
      return "ok";
    case Status::kBadConfig:
      return "the model config is inconsistent: regenerate it with "
             "keras_earlyexit.export.to_c_arrays";
    case Status::kTensorMismatch:
      return "a segment's tensor size differs from the config: the model "
             "data and earlyexit_config.h come from different bundles";
    case Status::kCarryBufferTooSmall:
      return "carry buffer smaller than config carry_buffer_size";
    case Status::kBadThreshold:
      return "thresholds: give one per non-final exit, each in [0, 1]";
    case Status::kInvokeFailed:
      return "a segment's Invoke failed (see the interpreter's log)";
    case Status::kAllocationFailed:
      return "AllocateTensors failed: the arena is too small (raise "
             "kArenaSize) or the resolver lacks an op (use EARLYEXIT_OPS), "
             "see the interpreter's log";
  }
  return "unknown status";
}

void Quantize(const float* x, int8_t* q, size_t n, float scale,
              int32_t zero_point) {
  for (size_t i = 0; i < n; ++i) q[i] = QuantizeOne(x[i], scale, zero_point);
}

int32_t QuantizeThreshold(float threshold, float scale, int32_t zero_point) {
  // In double, as Python computes it, so both sides agree on ties.
  const double q = std::ceil(static_cast<double>(zero_point) +
                             static_cast<double>(threshold) / scale - 1e-9);
  if (q < -128.0) return -128;
  if (q > 128.0) return 128;
  return static_cast<int32_t>(q);
}

EarlyExitRunner::EarlyExitRunner(const ModelConfig& config,
                                 Segment* const* segments,
                                 uint8_t* carry_buffer,
                                 size_t carry_buffer_size)
    : config_(config),
      segments_(segments),
      carry_buffer_(carry_buffer),
      carry_buffer_size_(carry_buffer_size) {}

Status EarlyExitRunner::Init() {
  initialized_ = false;
  const int n = config_.num_segments;
  if (n < 1 || n > kMaxSegments || config_.segments == nullptr ||
      segments_ == nullptr) {
    return Status::kBadConfig;
  }
  for (int k = 0; k < n; ++k) {
    const SegmentConfig& s = config_.segments[k];
    Segment* segment = segments_[k];
    if (segment == nullptr || !TensorFits(s.logits) ||
        !TensorFits(s.confidence) || s.confidence.bytes != ElementSize(s.confidence.dtype) ||
        (k + 1 < n && s.num_carry != config_.segments[k + 1].num_inputs) ||
        (k + 1 == n && s.num_carry != 0)) {
      return Status::kBadConfig;
    }
    for (int i = 0; i < s.num_inputs; ++i) {
      const TensorConfig& t = s.inputs[i];
      if (!TensorFits(t)) return Status::kBadConfig;
      if (segment->input(t.position) == nullptr ||
          segment->input_bytes(t.position) != t.bytes) {
        return Status::kTensorMismatch;
      }
    }
    const TensorConfig* const gate_outputs[2] = {&s.logits, &s.confidence};
    for (const TensorConfig* t : gate_outputs) {
      if (segment->output(t->position) == nullptr ||
          segment->output_bytes(t->position) != t->bytes) {
        return Status::kTensorMismatch;
      }
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
      if (segment->output(c.source.position) == nullptr ||
          segment->output_bytes(c.source.position) != c.source.bytes) {
        return Status::kTensorMismatch;
      }
      carry_bytes += AlignUp(c.source.bytes);
    }
    if (carry_bytes > carry_buffer_size_ || carry_bytes > config_.carry_buffer_size) {
      return carry_bytes > carry_buffer_size_ ? Status::kCarryBufferTooSmall
                                              : Status::kBadConfig;
    }
    if (s.num_carry > 0 && carry_buffer_ == nullptr) {
      return Status::kCarryBufferTooSmall;
    }
    thresholds_[k] = s.threshold;
    thresholds_quantized_[k] = s.threshold_quantized;
  }
  ResetCounts();
  initialized_ = true;
  return Status::kOk;
}

Status EarlyExitRunner::SetThresholds(const float* thresholds, int count) {
  if (count != config_.num_segments - 1) return Status::kBadThreshold;
  for (int k = 0; k < count; ++k) {
    if (!(thresholds[k] >= 0.0f && thresholds[k] <= 1.0f)) {
      return Status::kBadThreshold;
    }
  }
  for (int k = 0; k < count; ++k) {
    const TensorConfig& c = config_.segments[k].confidence;
    thresholds_[k] = thresholds[k];
    if (c.dtype == DType::kInt8) {
      thresholds_quantized_[k] = QuantizeThreshold(thresholds[k], c.scale, c.zero_point);
    }
  }
  return Status::kOk;
}

void EarlyExitRunner::ResetCounts() {
  for (int k = 0; k < kMaxSegments; ++k) {
    exit_counts_[k] = 0;
    invocations_[k] = 0;
  }
}

bool EarlyExitRunner::Confident(int k, const void* confidence) const {
  // int8 bundles compare integers, as a microcontroller without FPU would.
  if (config_.segments[k].confidence.dtype == DType::kInt8) {
    return *static_cast<const int8_t*>(confidence) >= thresholds_quantized_[k];
  }
  return *static_cast<const float*>(confidence) >= thresholds_[k];
}

void EarlyExitRunner::ParkCarry(int k) {
  const SegmentConfig& s = config_.segments[k];
  size_t offset = 0;
  for (int j = 0; j < s.num_carry; ++j) {
    const CarryConfig& c = s.carry[j];
    const void* out = segments_[k]->output(c.source.position);
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
    std::memcpy(segments_[k]->input(c.target.position), carry_buffer_ + offset,
                c.target.bytes);
    offset += AlignUp(c.target.bytes);
  }
}

Result EarlyExitRunner::MakeResult(int k) {
  const SegmentConfig& s = config_.segments[k];
  const void* confidence = segments_[k]->output(s.confidence.position);
  Result result;
  result.label = ArgMax(s.logits, segments_[k]->output(s.logits.position));
  result.exit_index = k;
  result.confidence =
      s.confidence.dtype == DType::kInt8
          ? Dequantize(*static_cast<const int8_t*>(confidence), s.confidence.scale,
                       s.confidence.zero_point)
          : *static_cast<const float*>(confidence);
  return result;
}

Status EarlyExitRunner::Run(const void* const* inputs, Result* result) {
  if (!initialized_) return Status::kBadConfig;
  const int last = config_.num_segments - 1;
  for (int k = 0; k <= last; ++k) {
    const SegmentConfig& s = config_.segments[k];
    Segment* segment = segments_[k];
    // gated.py: runner.set_input(...) for the sample or the carry.
    if (k == 0) {
      for (int i = 0; i < s.num_inputs; ++i) {
        std::memcpy(segment->input(s.inputs[i].position), inputs[i], s.inputs[i].bytes);
      }
    } else {
      LoadCarry(k);
    }
    // gated.py: runner.invoke()
    ++invocations_[k];
    if (!segment->Invoke()) return Status::kInvokeFailed;
    // gated.py: `if k == last or confidence >= segment.threshold`
    if (k == last || Confident(k, segment->output(s.confidence.position))) {
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
