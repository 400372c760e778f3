#include "fused_runner.h"

#include <cstring>
#include <new>

#include "tensorflow/lite/micro/micro_log.h"
#include "tensorflow/lite/schema/schema_generated.h"
#include "tflm_segment.h"

namespace earlyexit {
namespace {

// An int32 or float32 scalar output at `position`, or nullptr.
const TfLiteTensor* ScalarOutput(tflite::MicroInterpreter& interpreter,
                                 int position, TfLiteType type) {
  if (position < 0 || static_cast<size_t>(position) >= interpreter.outputs_size()) {
    return nullptr;
  }
  const TfLiteTensor* t = interpreter.output(position);
  if (t == nullptr || t->type != type || t->bytes != 4 || t->data.raw == nullptr) {
    return nullptr;
  }
  return t;
}

}  // namespace

FusedRunner::FusedRunner(const FusedConfig& config,
                         const tflite::MicroOpResolver& resolver, uint8_t* arena,
                         size_t arena_size)
    : config_(config), resolver_(resolver), arena_(arena), arena_size_(arena_size) {}

FusedRunner::~FusedRunner() {
  if (interpreter_ != nullptr) interpreter_->~MicroInterpreter();
}

Status FusedRunner::CheckConfig() const {
  const FusedConfig& c = config_;
  if (c.inputs == nullptr || c.num_inputs < 1 || c.num_inputs > kMaxFusedInputs ||
      c.num_exits < 1 || c.num_classes < 1 || c.class_output < 0 ||
      c.exit_index_output < 0 || c.confidence_output < 0 ||
      c.class_output == c.exit_index_output ||
      c.class_output == c.confidence_output ||
      c.exit_index_output == c.confidence_output) {
    return Status::kBadConfig;
  }
  for (int i = 0; i < c.num_inputs; ++i) {
    if (!TensorFits(c.inputs[i])) return Status::kBadConfig;
    for (int j = 0; j < i; ++j) {
      if (c.inputs[j].position == c.inputs[i].position) return Status::kBadConfig;
    }
  }
  return Status::kOk;
}

Status FusedRunner::Init() {
  if (interpreter_ != nullptr) return Status::kBadConfig;  // once only
  Status status = CheckConfig();
  if (status != Status::kOk) return status;
  const ModelConfig arena_need = {nullptr, 0, 0, config_.arena_size, 0};
  status = CheckArena(arena_need, arena_, arena_size_);
  if (status != Status::kOk) return status;
  // TFLite Micro reads the flatbuffer in place without verifying it.
  bool valid = config_.model_data != nullptr && config_.model_size > 0;
  if (valid) {
    flatbuffers::Verifier verifier(config_.model_data, config_.model_size);
    valid = tflite::VerifyModelBuffer(verifier);
  }
  if (!valid) {
    MicroPrintf("The fused model data is not a valid TFLite flatbuffer");
    return Status::kBadConfig;
  }
  const tflite::Model* model = tflite::GetModel(config_.model_data);
  if (model->version() != TFLITE_SCHEMA_VERSION) {
    MicroPrintf("Fused model schema version %d, TFLite Micro reads %d",
                static_cast<int>(model->version()), TFLITE_SCHEMA_VERSION);
    return Status::kBadConfig;
  }
  // Placement new: the interpreter lives in this object, no heap.
  interpreter_ = new (storage_) tflite::MicroInterpreter(model, resolver_, arena_,
                                                         arena_size_);
  if (interpreter_->AllocateTensors() != kTfLiteOk) return Status::kAllocationFailed;
  status = CheckTensors();
  ready_ = status == Status::kOk;
  return status;
}

Status FusedRunner::CheckTensors() {
  tflite::MicroInterpreter& interpreter = *interpreter_;
  if (interpreter.inputs_size() != static_cast<size_t>(config_.num_inputs)) {
    MicroPrintf("The fused model has %u inputs, its config %d",
                static_cast<unsigned>(interpreter.inputs_size()), config_.num_inputs);
    return Status::kTensorMismatch;
  }
  for (int i = 0; i < config_.num_inputs; ++i) {
    const TensorConfig& t = config_.inputs[i];
    if (static_cast<size_t>(t.position) >= interpreter.inputs_size() ||
        !TensorMatches(t, DescribeTensor(interpreter.input(t.position)))) {
      MicroPrintf("Fused model input %d differs from its config", i);
      return Status::kTensorMismatch;
    }
  }
  if (ScalarOutput(interpreter, config_.class_output, kTfLiteInt32) == nullptr ||
      ScalarOutput(interpreter, config_.exit_index_output, kTfLiteInt32) == nullptr ||
      ScalarOutput(interpreter, config_.confidence_output, kTfLiteFloat32) ==
          nullptr) {
    MicroPrintf("The fused model's class, exit_index or confidence output is "
                "not at its config position with its type (int32, int32, "
                "float32 scalars)");
    return Status::kTensorMismatch;
  }
  return Status::kOk;
}

Status FusedRunner::InvokeAndRead(Result* result) {
  tflite::MicroInterpreter& interpreter = *interpreter_;
  if (interpreter.Invoke() != kTfLiteOk) return Status::kInvokeFailed;
  int32_t label;
  int32_t exit_index;
  float confidence;
  std::memcpy(&label, interpreter.output(config_.class_output)->data.raw, 4);
  std::memcpy(&exit_index, interpreter.output(config_.exit_index_output)->data.raw,
              4);
  std::memcpy(&confidence, interpreter.output(config_.confidence_output)->data.raw,
              4);
  // The graph computes these; values outside their range mean the model
  // and its config disagree.
  if (label < 0 || label >= config_.num_classes || exit_index < 0 ||
      exit_index >= config_.num_exits) {
    return Status::kTensorMismatch;
  }
  result->label = label;
  result->exit_index = exit_index;
  result->confidence = confidence;
  return Status::kOk;
}

Status FusedRunner::Run(const void* const* inputs, const size_t* sizes,
                        int num_inputs, Result* result) {
  if (!ready_) return Status::kBadConfig;
  if (inputs == nullptr || sizes == nullptr || result == nullptr ||
      num_inputs != config_.num_inputs) {
    return Status::kBadInput;
  }
  for (int i = 0; i < num_inputs; ++i) {
    const TensorConfig& t = config_.inputs[i];
    if (inputs[i] == nullptr || sizes[i] != t.bytes) return Status::kBadInput;
    const Status status = CheckInputValues(t, inputs[i]);
    if (status != Status::kOk) return status;
  }
  for (int i = 0; i < num_inputs; ++i) {
    const TensorConfig& t = config_.inputs[i];
    std::memcpy(interpreter_->input(t.position)->data.raw, inputs[i], t.bytes);
  }
  return InvokeAndRead(result);
}

Status FusedRunner::Run(const InputData* inputs, int num_inputs, Result* result) {
  if (!ready_) return Status::kBadConfig;
  if (inputs == nullptr || result == nullptr || num_inputs != config_.num_inputs) {
    return Status::kBadInput;
  }
  for (int i = 0; i < num_inputs; ++i) {
    const Status status = CheckInput(config_.inputs[i], inputs[i]);
    if (status != Status::kOk) return status;
  }
  for (int i = 0; i < num_inputs; ++i) {
    const TensorConfig& t = config_.inputs[i];
    std::memcpy(interpreter_->input(t.position)->data.raw, inputs[i].data, t.bytes);
  }
  return InvokeAndRead(result);
}

Status FusedRunner::Run(const void* input, size_t size, Result* result) {
  if (!ready_) return Status::kBadConfig;
  if (config_.num_inputs != 1) return Status::kBadInput;
  return Run(&input, &size, 1, result);
}

Status FusedRunner::RunFloat(const float* const* inputs, const size_t* counts,
                             int num_inputs, Result* result) {
  if (!ready_) return Status::kBadConfig;
  if (inputs == nullptr || counts == nullptr || result == nullptr ||
      num_inputs != config_.num_inputs) {
    return Status::kBadInput;
  }
  for (int i = 0; i < num_inputs; ++i) {
    const TensorConfig& t = config_.inputs[i];
    const size_t elements = t.dtype == DType::kInt8 ? t.bytes : t.bytes / 4;
    // Token ids are not floats: int32 inputs go through Run.
    if (inputs[i] == nullptr || counts[i] != elements || t.dtype == DType::kInt32) {
      return Status::kBadInput;
    }
    if (!AllFinite(inputs[i], elements * sizeof(float))) {
      return Status::kNonFiniteInput;
    }
  }
  for (int i = 0; i < num_inputs; ++i) {
    const TensorConfig& t = config_.inputs[i];
    void* data = interpreter_->input(t.position)->data.raw;
    if (t.dtype == DType::kInt8) {
      const Status status = Quantize(inputs[i], static_cast<int8_t*>(data),
                                     counts[i], t.scale, t.zero_point);
      if (status != Status::kOk) return status;
    } else {
      std::memcpy(data, inputs[i], t.bytes);
    }
  }
  return InvokeAndRead(result);
}

}  // namespace earlyexit
