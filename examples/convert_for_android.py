"""
Title: Convert an early-exit model for Android (LiteRT)
Description: Train the digits CNN, calibrate its exits, export float16 and
int8 per-exit TFLite bundles and run them in the gated LiteRT loop.

Conversion needs the TensorFlow backend; under JAX or PyTorch,
`kee.export.to_tflite` converts in a TensorFlow-backend subprocess, so this
script runs on any backend:

    KERAS_BACKEND=jax python examples/convert_for_android.py
"""

import os

import keras
import numpy as np

import keras_earlyexit as kee
from keras_earlyexit import demo

EPOCHS = 30
SEED = 0
MAX_ACCURACY_DROP = 0.01
# Everything this script writes (ignored by git); each run replaces it.
OUTPUT_DIR = os.path.join("example_outputs", "convert_for_android")
MODEL_PATH = os.path.join(OUTPUT_DIR, "digits_cnn.keras")

"""
## Train the multi-exit model

Every exit is trained jointly with one early-exit loss. The model is
trained on every run (seeded, a few seconds on a CPU), so the bundles always
match this script's settings.
"""

keras.utils.set_random_seed(SEED)
splits = demo.load_digits(seed=SEED)
model = demo.digits_cnn()
model.compile(keras.optimizers.Adam(3e-3), kee.EarlyExitLoss("linear"))
model.fit(splits.x_train, splits.y_train, epochs=EPOCHS, batch_size=32, verbose=0)

"""
## Calibrate the thresholds

Pick per-exit thresholds on the validation split that lose at most one
point of accuracy against the final exit. The gates hold them, so they are
exported with the segments.
"""

calibration = kee.calibrate(
    model, splits.x_val, splits.y_val, max_accuracy_drop=MAX_ACCURACY_DROP
)
model.set_thresholds(calibration.thresholds)
os.makedirs(OUTPUT_DIR, exist_ok=True)
model.save(MODEL_PATH)  # the calibrated model, e.g. for `keras-earlyexit convert`
print(f"saved: {MODEL_PATH}")
keras_result = model.predict_early(splits.x_test)
print(f"thresholds: {[round(t, 3) for t in model.thresholds]}")
print(f"Keras gated accuracy: {np.mean(keras_result.classes == splits.y_test):.2%}")

"""
## Export float16 and int8 bundles, run them in the gated loop

Each bundle holds one `.tflite` per exit segment and `manifest.json`. The
int8 bundle is calibrated on validation images; each segment is calibrated
on the float carry of the one before, and the carry crosses segments as
int8 bytes with identical scale and zero-point on both sides.
"""

macs = kee.count_macs(model, warn=False)
for quantization in ("float16", "int8"):
    bundle = kee.export.to_tflite(
        model,
        os.path.join(OUTPUT_DIR, quantization),
        representative_data=splits.x_val,
        quantization=quantization,
    )
    interpreter = kee.runtime.GatedInterpreter(bundle, num_threads=1)
    interpreter.predict(splits.x_test[:32])  # warm-up
    interpreter.reset_stats()
    result = interpreter.predict(splits.x_test)
    accuracy = np.mean(result.classes == splits.y_test)
    mix = np.bincount(result.exit_indices, minlength=model.num_exits) / len(
        result.classes
    )
    average_macs = mix @ np.array(macs.cumulative_macs)
    size = sum(s.size_bytes for s in interpreter.manifest.segments)
    print(f"\n== {quantization}: {bundle} ({size:,} bytes)")
    print(f"accuracy {accuracy:.2%}; exit mix {', '.join(f'{m:.0%}' for m in mix)}")
    print(f"average MACs {average_macs:,.0f} of {macs.total_macs:,}")
    print(interpreter.stats)

"""
Copy a bundle's directory into the Android app's assets: the app reads
`manifest.json`, loads each segment in a LiteRT `Interpreter` and runs the
same loop (see `tflite/android/`).
"""
