#include "tflm_segment.h"

#include "tensorflow/lite/micro/micro_arena_constants.h"
#include "tensorflow/lite/micro/micro_log.h"
#include "tensorflow/lite/schema/schema_generated.h"

namespace earlyexit {
namespace {

DType DTypeOf(TfLiteType type) {
  switch (type) {
    case kTfLiteInt8:
      return DType::kInt8;
    case kTfLiteFloat32:
      return DType::kFloat32;
    case kTfLiteInt32:
      return DType::kInt32;
    default:
      return DType::kOther;
  }
}

}  // namespace

TensorDesc DescribeTensor(const TfLiteTensor* t) {
  TensorDesc desc;
  if (t == nullptr) return desc;
  desc.data = t->data.raw;
  desc.bytes = t->bytes;
  desc.dtype = DTypeOf(t->type);
  desc.scale = t->params.scale;
  desc.zero_point = t->params.zero_point;
  return desc;
}

Status CheckArena(const ModelConfig& config, const uint8_t* arena,
                  size_t arena_size) {
  if (config.arena_size == 0) {
    MicroPrintf("The model config's arena_size is 0: regenerate it with "
                "keras_earlyexit.export.to_c_arrays");
    return Status::kBadConfig;
  }
  if (arena == nullptr) {
    MicroPrintf("The tensor arena is a null pointer; the model needs %u bytes "
                "(kArenaSize)", static_cast<unsigned>(config.arena_size));
    return Status::kAllocationFailed;
  }
  // MicroAllocator starts the arena at the next 16-byte boundary.
  const size_t alignment = tflite::MicroArenaBufferAlignment();
  const uintptr_t address = reinterpret_cast<uintptr_t>(arena);
  const size_t skipped = (alignment - address % alignment) % alignment;
  const size_t usable = arena_size < skipped ? 0 : arena_size - skipped;
  if (usable < config.arena_size) {
    MicroPrintf("Tensor arena of %u usable bytes (%u given, %u before the first "
                "16-byte boundary); the model needs %u (kArenaSize)",
                static_cast<unsigned>(usable), static_cast<unsigned>(arena_size),
                static_cast<unsigned>(skipped),
                static_cast<unsigned>(config.arena_size));
    return Status::kAllocationFailed;
  }
  return Status::kOk;
}

Status CheckModelData(const SegmentConfig& segment, int k) {
  // TFLite Micro reads the flatbuffer in place without verifying it.
  bool valid = segment.model_data != nullptr && segment.model_size > 0;
  if (valid) {
    flatbuffers::Verifier verifier(segment.model_data, segment.model_size);
    valid = tflite::VerifyModelBuffer(verifier);
  }
  if (!valid) {
    MicroPrintf("Segment %d's model data is not a valid TFLite flatbuffer", k + 1);
    return Status::kBadConfig;
  }
  return Status::kOk;
}

TflmSegment::TflmSegment(const SegmentConfig& config,
                         const tflite::MicroOpResolver& resolver,
                         tflite::MicroAllocator* allocator)
    : model_(tflite::GetModel(config.model_data)),
      interpreter_(model_, resolver, allocator) {}

Status TflmSegment::Allocate() {
  if (model_->version() != TFLITE_SCHEMA_VERSION) {
    MicroPrintf("Segment model schema version %d, TFLite Micro reads %d",
                static_cast<int>(model_->version()), TFLITE_SCHEMA_VERSION);
    return Status::kBadConfig;
  }
  return interpreter_.AllocateTensors() == kTfLiteOk ? Status::kOk
                                                     : Status::kAllocationFailed;
}

TensorDesc TflmSegment::input(int position) {
  if (position < 0 || static_cast<size_t>(position) >= interpreter_.inputs_size()) {
    return TensorDesc();
  }
  return DescribeTensor(interpreter_.input(position));
}

TensorDesc TflmSegment::output(int position) {
  if (position < 0 || static_cast<size_t>(position) >= interpreter_.outputs_size()) {
    return TensorDesc();
  }
  return DescribeTensor(interpreter_.output(position));
}

bool TflmSegment::Invoke() { return interpreter_.Invoke() == kTfLiteOk; }

}  // namespace earlyexit
