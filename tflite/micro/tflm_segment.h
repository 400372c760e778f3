// The Segment interface over tflite::MicroInterpreter, and TflmEarlyExit,
// which sets up one interpreter per segment on one shared arena.
//
// Arena: all segments' interpreters are created on one tflite::MicroAllocator
// (TFLite Micro's multi-tenant mode). Each keeps its persistent data at the
// arena's tail; the activation area at the head is shared, so the arena
// needs the sum of the persistent parts plus the largest activation plan,
// not the sum of N arenas. Segments run one at a time, and a segment's
// outputs are overwritten when the next one runs: EarlyExitRunner parks the
// carry in its own buffer before invoking the next segment.

#ifndef KERAS_EARLYEXIT_TFLITE_MICRO_TFLM_SEGMENT_H_
#define KERAS_EARLYEXIT_TFLITE_MICRO_TFLM_SEGMENT_H_

#include <cstddef>
#include <cstdint>
#include <new>

#include "earlyexit_runner.h"
#include "tensorflow/lite/micro/micro_allocator.h"
#include "tensorflow/lite/micro/micro_interpreter.h"
#include "tensorflow/lite/micro/micro_op_resolver.h"

namespace earlyexit {

class TflmSegment : public Segment {
 public:
  TflmSegment(const SegmentConfig& config,
              const tflite::MicroOpResolver& resolver,
              tflite::MicroAllocator* allocator);

  // Checks the flatbuffer's schema version and allocates the tensors.
  Status Allocate();

  TensorDesc input(int position) override;
  TensorDesc output(int position) override;
  bool Invoke() override;

  tflite::MicroInterpreter& interpreter() { return interpreter_; }

 private:
  const tflite::Model* model_;
  tflite::MicroInterpreter interpreter_;
};

// A TFLite Micro tensor as the runners see it (empty for nullptr).
TensorDesc DescribeTensor(const TfLiteTensor* t);

// Checks done before TFLite Micro sees the arena or the model data, which
// it trusts (a too-small arena or a damaged flatbuffer can crash it).
// CheckArena: `arena_size` bytes at `arena`, once aligned to 16, hold at
// least config.arena_size (kArenaSize); logs how many are needed if not.
Status CheckArena(const ModelConfig& config, const uint8_t* arena,
                  size_t arena_size);
// CheckModelData: segment k's model data is a valid TFLite flatbuffer.
Status CheckModelData(const SegmentConfig& segment, int k);

// Owns the segments of a model with exactly N segments, in static storage.
//
//   tflite::MicroMutableOpResolver<earlyexit_config::kNumOps> resolver;
//   #define ADD_OP(name) resolver.Add##name();
//   EARLYEXIT_OPS(ADD_OP)
//   alignas(16) static uint8_t arena[earlyexit_config::kArenaSize];
//   alignas(16) static uint8_t carry[earlyexit_config::kCarryBufferSize];
//   static earlyexit::TflmEarlyExit<earlyexit_config::kNumSegments> model(
//       earlyexit_config::kModel, resolver, arena, sizeof(arena), carry,
//       sizeof(carry));
//   if (model.Init() != earlyexit::Status::kOk) { ... }
//   model.runner().Run(quantized_input, &result);
template <int N>
class TflmEarlyExit {
 public:
  TflmEarlyExit(const ModelConfig& config, const tflite::MicroOpResolver& resolver,
                uint8_t* arena, size_t arena_size, uint8_t* carry_buffer,
                size_t carry_buffer_size)
      : config_(config),
        resolver_(resolver),
        arena_(arena),
        arena_size_(arena_size),
        runner_(config, segments_, carry_buffer, carry_buffer_size) {}

  TflmEarlyExit(const TflmEarlyExit&) = delete;
  TflmEarlyExit& operator=(const TflmEarlyExit&) = delete;

  ~TflmEarlyExit() {
    for (int k = 0; k < created_; ++k) segment(k)->~TflmSegment();
  }

  // Creates the interpreters (once) and checks them against the config.
  // kAllocationFailed, before TFLite Micro is called, for an arena smaller
  // than required_arena_size().
  Status Init() {
    if (created_ > 0) return Status::kBadConfig;
    if (config_.num_segments != N || config_.segments == nullptr) {
      return Status::kBadConfig;
    }
    Status status = CheckArena(config_, arena_, arena_size_);
    for (int k = 0; k < N && status == Status::kOk; ++k) {
      status = CheckModelData(config_.segments[k], k);
    }
    if (status != Status::kOk) return status;
    tflite::MicroAllocator* allocator =
        tflite::MicroAllocator::Create(arena_, arena_size_);
    if (allocator == nullptr) return Status::kAllocationFailed;
    for (int k = 0; k < N; ++k) {
      // Placement new: interpreters live in this object, no heap.
      TflmSegment* s =
          new (storage_[k]) TflmSegment(config_.segments[k], resolver_, allocator);
      created_ = k + 1;
      segments_[k] = s;
      const Status allocated = s->Allocate();
      if (allocated != Status::kOk) return allocated;
    }
    return runner_.Init();
  }

  EarlyExitRunner& runner() { return runner_; }
  // Arena bytes the model needs (kArenaSize of the generated config).
  size_t required_arena_size() const { return config_.arena_size; }
  TflmSegment* segment(int k) {
    return std::launder(reinterpret_cast<TflmSegment*>(storage_[k]));
  }

 private:
  const ModelConfig& config_;
  const tflite::MicroOpResolver& resolver_;
  uint8_t* arena_;
  size_t arena_size_;
  alignas(TflmSegment) unsigned char storage_[N][sizeof(TflmSegment)];
  Segment* segments_[N] = {};
  int created_ = 0;
  EarlyExitRunner runner_;
};

}  // namespace earlyexit

#endif  // KERAS_EARLYEXIT_TFLITE_MICRO_TFLM_SEGMENT_H_
