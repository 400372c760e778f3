// Gated early-exit inference with TFLite Micro: the firmware side of a
// bundle exported by keras_earlyexit (to_tflite, then to_c_arrays). Builds
// for a board or, with TFLite Micro's host build, on a PC:
//
//   keras-earlyexit bundle -> to_c_arrays(bundle, "model/")
//   sources: model/*.cc, earlyexit_runner.cc, tflm_segment.cc, this file
//   include paths: model/, tflite/micro/, the TFLite Micro tree

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "earlyexit_config.h"
#include "earlyexit_runner.h"
#include "tensorflow/lite/micro/micro_log.h"
#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"
#include "tflm_segment.h"

namespace {

namespace config = earlyexit_config;

constexpr earlyexit::TensorConfig kInput = config::kSegment1Inputs[0];
constexpr size_t kInputValues = kInput.dtype == earlyexit::DType::kInt8
                                    ? kInput.bytes
                                    : kInput.bytes / sizeof(float);

alignas(16) uint8_t g_arena[config::kArenaSize];
alignas(16) uint8_t g_carry[config::kCarryBufferSize];
float g_sample[kInputValues];
alignas(16) uint8_t g_input[kInput.bytes];

}  // namespace

int main() {
  static_assert(config::kSegments[0].num_inputs == 1,
                "this example feeds one input; pass one pointer per input to "
                "Run(const void* const* inputs, Result*)");
  // Only the ops the segments use are linked in.
  static tflite::MicroMutableOpResolver<config::kNumOps> resolver;
#define EARLYEXIT_ADD_OP(name)                   \
  if (resolver.Add##name() != kTfLiteOk) return 1;
  EARLYEXIT_OPS(EARLYEXIT_ADD_OP)
#undef EARLYEXIT_ADD_OP

  static earlyexit::TflmEarlyExit<config::kNumSegments> model(
      config::kModel, resolver, g_arena, sizeof(g_arena), g_carry,
      sizeof(g_carry));
  const earlyexit::Status status = model.Init();
  if (status != earlyexit::Status::kOk) {
    MicroPrintf("EarlyExit init: %s", earlyexit::StatusString(status));
    return 1;
  }

  // A sample as the model was trained on (floats); a sensor driver would
  // fill `g_sample`. Int8 bundles take it quantized with segment 1's input
  // parameters, float bundles as it is.
  for (size_t i = 0; i < kInputValues; ++i) g_sample[i] = (i % 7) / 7.0f;
  if (kInput.dtype == earlyexit::DType::kInt8) {
    const earlyexit::Status quantized =
        earlyexit::Quantize(g_sample, reinterpret_cast<int8_t*>(g_input),
                            kInputValues, kInput.scale, kInput.zero_point);
    if (quantized != earlyexit::Status::kOk) {
      MicroPrintf("EarlyExit input: %s", earlyexit::StatusString(quantized));
      return 1;
    }
  } else {
    std::memcpy(g_input, g_sample, sizeof(g_sample));
  }

  earlyexit::Result result;
  const earlyexit::Status run = model.runner().Run(g_input, &result);
  if (run != earlyexit::Status::kOk) {
    MicroPrintf("EarlyExit run: %s", earlyexit::StatusString(run));
    return 1;
  }
  MicroPrintf("class %d from exit %d (%s), confidence %f", result.label,
              result.exit_index, config::kSegments[result.exit_index].exit_name,
              static_cast<double>(result.confidence));
  return 0;
}
