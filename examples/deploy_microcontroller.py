"""
Title: Deploy an early-exit CNN on a microcontroller (TFLite Micro)
Description: Train the digits CNN, calibrate its exits, export an int8
bundle, generate C arrays for the C++ runner and run the gated loop in the
TFLite Micro interpreter.

A microcontroller has no Python: the model ships as C arrays in flash and a
small C++ loop (`tflite/micro/`) runs segment 1, compares its int8
confidence with the exit's int8 threshold and only runs the next segment if
needed. This script prepares everything and runs the same bundle in the
TFLite Micro interpreter (the `tflite_micro` pip package) on the host, so
what it prints is what the device computes.

Conversion needs the TensorFlow backend; under JAX or PyTorch,
`kee.export.to_tflite` converts in a TensorFlow-backend subprocess:

    KERAS_BACKEND=torch python examples/deploy_microcontroller.py
"""

"""
## Settings
"""

EPOCHS = 30
SEED = 0
MAX_ACCURACY_DROP = 0.01  # calibrated thresholds lose at most 1 point
# Bundle and C sources go here (ignored by git); each run replaces them.
OUTPUT_DIR = "example_outputs/deploy_microcontroller"

import os  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_earlyexit as kee  # noqa: E402
from keras_earlyexit import demo  # noqa: E402
from keras_earlyexit.export.c_arrays import bundle_arena_size  # noqa: E402

keras.utils.set_random_seed(SEED)

"""
## Train the multi-exit model

The demo CNN has three exits (after each conv block); all train jointly
with one `EarlyExitLoss` through a plain `model.fit(x, y)`.
"""

data = demo.load_digits(seed=SEED)
model = demo.digits_cnn()
model.compile(keras.optimizers.Adam(3e-3), kee.EarlyExitLoss("linear"))
model.fit(data.x_train, data.y_train, epochs=EPOCHS, batch_size=32, verbose=0)

"""
## Calibrate the exit thresholds

`calibrate` picks one threshold per non-final exit on the validation split:
the least average compute whose accuracy stays within `MAX_ACCURACY_DROP`
of the final exit's. `apply=True` stores them in the gates, so they are
exported with the segments.
"""

calibration = kee.calibrate(
    model, data.x_val, data.y_val, max_accuracy_drop=MAX_ACCURACY_DROP, apply=True
)
print(calibration)

"""
## Export an int8 bundle for TFLite Micro

One fully-integer `.tflite` per exit segment. Int8 export is meant for
microcontrollers: it fails on any op TFLite Micro has no kernel for (naming
the op, the segment and the Keras layer), and measures each segment's
tensor arena in the TFLite Micro interpreter into `manifest.json`.
The validation split calibrates the int8 activation ranges.
"""

bundle = kee.export.to_tflite(
    model,
    os.path.join(OUTPUT_DIR, "digits_int8"),
    representative_data=data.x_val,
    quantization="int8",
    verbose=0,
)
manifest = kee.export.read_manifest(bundle)

"""
## Generate the C sources

`to_c_arrays` writes each segment as a 16-byte aligned C array (read in
place from flash) and `earlyexit_config.h` for the C++ runner: tensors,
int8 thresholds, the ops to register and `kArenaSize`, the measured arena
for one `MicroAllocator` shared by all segments (persistent parts summed,
activation area shared). Add the folder to a TFLite Micro project as in
`tflite/micro/README.md`.
"""

sources = kee.export.to_c_arrays(bundle, os.path.join(OUTPUT_DIR, "model"))
print(f"C sources in {sources}: {sorted(os.listdir(sources))}")

"""
## Run the gated loop in TFLite Micro

`GatedInterpreter(backend="micro")` runs the bundle segment by segment in
the TFLite Micro interpreter, with the int8 gate of the device loop.
"""

interpreter = kee.runtime.GatedInterpreter(bundle, backend="micro")
result = interpreter.predict(data.x_test)
accuracy = np.mean(result.classes == data.y_test)
shares = np.bincount(result.exit_indices, minlength=interpreter.num_exits) / len(
    data.y_test
)
cumulative = [s.cumulative_macs for s in manifest.segments]
average_macs = float(np.dot(shares, cumulative))
print(interpreter.stats)
print(f"int8 gated test accuracy (TFLite Micro): {accuracy:.4f}")
print("share leaving at each exit:", ", ".join(f"{s:.2f}" for s in shares))
print(
    f"average MACs {average_macs:,.0f} of {cumulative[-1]:,} "
    f"({cumulative[-1] / average_macs:.1f}x fewer)"
)

"""
## Memory on the device

Flash holds the segments' flatbuffers; RAM the tensor arena (plus the small
carry buffer, `kCarryBufferSize`). Arenas are measured on the host with
TFLite Micro's reference kernels; optimized kernels (e.g. CMSIS-NN) may add
scratch buffers, so confirm with `RecordingMicroAllocator` on the target.
"""

arenas = [s.arena_bytes for s in manifest.segments]
print(f"flash (model bytes): {sum(s.size_bytes for s in manifest.segments):,}")
print(f"arena per segment alone: {', '.join(f'{a:,}' for a in arenas)} bytes")
print(f"arena shared by all segments (kArenaSize): {bundle_arena_size(manifest):,}")
