// Gated early-exit inference with TFLite Micro: the firmware side of a
// bundle exported by keras_earlyexit (to_tflite, then to_c_arrays). Builds
// for a board or, with TFLite Micro's host build, on a PC:
//
//   keras-earlyexit bundle -> to_c_arrays(bundle, "model/")
//   sources: model/*.cc, earlyexit_runner.cc, tflm_segment.cc, this file
//   include paths: model/, tflite/micro/, the TFLite Micro tree

#include <cstdint>

#include "earlyexit_config.h"
#include "earlyexit_runner.h"
#include "tensorflow/lite/micro/micro_log.h"
#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"
#include "tflm_segment.h"

namespace {

namespace config = earlyexit_config;

alignas(16) uint8_t g_arena[config::kArenaSize];
alignas(16) uint8_t g_carry[config::kCarryBufferSize];

}  // namespace

int main() {
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

  // A sample as the model was trained on (float), quantized with segment 1's
  // input parameters; a sensor driver would fill `sample`.
  const earlyexit::TensorConfig& input = config::kSegments[0].inputs[0];
  static float sample[config::kSegment1Inputs[0].bytes];
  static int8_t quantized[config::kSegment1Inputs[0].bytes];
  for (size_t i = 0; i < input.bytes; ++i) sample[i] = (i % 7) / 7.0f;
  earlyexit::Quantize(sample, quantized, input.bytes, input.scale,
                      input.zero_point);

  earlyexit::Result result;
  if (model.runner().Run(quantized, &result) != earlyexit::Status::kOk) {
    MicroPrintf("EarlyExit run failed");
    return 1;
  }
  MicroPrintf("class %d from exit %d (%s), confidence %f", result.label,
              result.exit_index, config::kSegments[result.exit_index].exit_name,
              static_cast<double>(result.confidence));
  return 0;
}
