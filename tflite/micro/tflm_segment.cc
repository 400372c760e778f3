#include "tflm_segment.h"

#include "tensorflow/lite/micro/micro_log.h"
#include "tensorflow/lite/schema/schema_generated.h"

namespace earlyexit {

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

void* TflmSegment::input(int position) {
  if (position < 0 || static_cast<size_t>(position) >= interpreter_.inputs_size()) {
    return nullptr;
  }
  return interpreter_.input(position)->data.raw;
}

size_t TflmSegment::input_bytes(int position) {
  if (position < 0 || static_cast<size_t>(position) >= interpreter_.inputs_size()) {
    return 0;
  }
  return interpreter_.input(position)->bytes;
}

const void* TflmSegment::output(int position) {
  if (position < 0 || static_cast<size_t>(position) >= interpreter_.outputs_size()) {
    return nullptr;
  }
  return interpreter_.output(position)->data.raw;
}

size_t TflmSegment::output_bytes(int position) {
  if (position < 0 || static_cast<size_t>(position) >= interpreter_.outputs_size()) {
    return 0;
  }
  return interpreter_.output(position)->bytes;
}

bool TflmSegment::Invoke() { return interpreter_.Invoke() == kTfLiteOk; }

}  // namespace earlyexit
