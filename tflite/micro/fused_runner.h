// Runs a fused gated model (kee.export.to_tflite(..., fused=True)) with a
// plain tflite::MicroInterpreter: the model's own graph gates itself (IF
// ops), so one Invoke per sample returns its class, exit index and
// confidence. No loop, carry or requantization on this side.
//
// The configuration comes from earlyexit_fused_config.h, which
// keras_earlyexit.export.to_c_arrays generates from the fused file:
//
//   tflite::MicroMutableOpResolver<earlyexit_config::kNumOps> resolver;
//   #define ADD_OP(name) resolver.Add##name();
//   EARLYEXIT_FUSED_OPS(ADD_OP)  // AddIf() among them
//   alignas(16) static uint8_t arena[earlyexit_config::kArenaSize];
//   static earlyexit::FusedRunner model(earlyexit_config::kFusedModel,
//                                       resolver, arena, sizeof(arena));
//   if (model.Init() != earlyexit::Status::kOk) { ... }
//   model.Run(quantized_input, sizeof(quantized_input), &result);
//
// C++17, no exceptions, no RTTI, no dynamic allocation.

#ifndef KERAS_EARLYEXIT_TFLITE_MICRO_FUSED_RUNNER_H_
#define KERAS_EARLYEXIT_TFLITE_MICRO_FUSED_RUNNER_H_

#include <cstddef>
#include <cstdint>

#include "earlyexit_runner.h"
#include "tensorflow/lite/micro/micro_interpreter.h"
#include "tensorflow/lite/micro/micro_op_resolver.h"

namespace earlyexit {

// Most inputs a fused model may have here (fixed capacity, no heap).
constexpr int kMaxFusedInputs = 8;

struct FusedConfig {
  const unsigned char* model_data;
  size_t model_size;
  const TensorConfig* inputs;  // config order, positions in the model
  int num_inputs;
  // Positions in the main subgraph's outputs.
  int class_output;       // int32
  int exit_index_output;  // int32, 0-based
  int confidence_output;  // float32
  int num_exits;
  int num_classes;
  // Tensor arena bytes the model needs (FusedRunner refuses a smaller
  // arena up front); never 0.
  size_t arena_size;
};

class FusedRunner {
 public:
  FusedRunner(const FusedConfig& config, const tflite::MicroOpResolver& resolver,
              uint8_t* arena, size_t arena_size);
  ~FusedRunner();
  FusedRunner(const FusedRunner&) = delete;
  FusedRunner& operator=(const FusedRunner&) = delete;

  // Checks the config, the arena and the model data (TFLite Micro trusts
  // both), allocates the tensors, and checks every input and output
  // against the config; call once before Run.
  Status Init();

  // One sample: `inputs[i]` holds `sizes[i]` raw bytes of input i (config
  // order; int8 models take quantized data, see Quantize; int32 inputs the
  // ids themselves). kBadInput for a wrong count, a null pointer or a size
  // other than the input's bytes; kNonFiniteInput for NaN or infinity in a
  // float input; kInputOutOfRange for an int32 value outside the input's
  // [min_value, max_value] (token ids outside the vocabulary).
  Status Run(const void* const* inputs, const size_t* sizes, int num_inputs,
             Result* result);
  // The same, each input also checked for its dtype (kBadInput).
  Status Run(const InputData* inputs, int num_inputs, Result* result);
  // For models with exactly one input; kBadInput otherwise.
  Status Run(const void* input, size_t size, Result* result);
  // Float samples, `counts[i]` values each: int8 inputs are quantized with
  // the model's scale and zero-point; NaN or infinity is refused, and so
  // is a model with an int32 input (kBadInput: give ids to Run).
  Status RunFloat(const float* const* inputs, const size_t* counts,
                  int num_inputs, Result* result);

  // Null before a successful Init.
  tflite::MicroInterpreter* interpreter() { return ready_ ? interpreter_ : nullptr; }

 private:
  Status CheckConfig() const;
  Status CheckTensors();
  Status InvokeAndRead(Result* result);

  const FusedConfig& config_;
  const tflite::MicroOpResolver& resolver_;
  uint8_t* arena_;
  size_t arena_size_;
  alignas(tflite::MicroInterpreter) unsigned char storage_[sizeof(
      tflite::MicroInterpreter)];
  tflite::MicroInterpreter* interpreter_ = nullptr;
  bool ready_ = false;
};

}  // namespace earlyexit

#endif  // KERAS_EARLYEXIT_TFLITE_MICRO_FUSED_RUNNER_H_
