"""
Title: Train an early-exit CNN on digits with one loss
Description: Three exits, one label array, plain `model.fit`, on any backend.

Early-exit networks attach classifiers ("exits") at several depths so easy
inputs can stop early. Here a small CNN gets three exits and all of them
train jointly with `EarlyExitLoss` through a single `model.fit(x, y)`, on
TensorFlow, JAX or PyTorch (set `KERAS_BACKEND`).

Data: scikit-learn's 8x8 digits, 1,797 images, no download.
"""

"""
## Settings
"""

EPOCHS = 30
BATCH_SIZE = 32
LEARNING_RATE = 3e-3
SEED = 0

import keras  # noqa: E402

import keras_earlyexit as kee  # noqa: E402
from keras_earlyexit import demo  # noqa: E402

keras.utils.set_random_seed(SEED)

"""
## Data

Images scaled to [0, 1], split into train, validation and test (stratified).
"""

data = demo.load_digits(seed=SEED)
print(f"backend: {keras.backend.backend()}")
print(f"train {len(data.x_train)}, val {len(data.x_val)}, test {len(data.x_test)}")

"""
## Model

Each block of the backbone is followed by an `ExitBranch`: pooling (to a 2x2
grid, which keeps coarse position for shallow exits), optional hidden units
and a linear classifier that outputs logits. `EarlyExitModel` takes the
exits' logits, shallow to deep.
"""

inputs = keras.Input((8, 8, 1))
x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
exit_1 = kee.ExitBranch(10, pooled_size=2, name="exit_1")(x)
x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(x)
x = keras.layers.MaxPooling2D(2)(x)
exit_2 = kee.ExitBranch(10, pooled_size=2, name="exit_2")(x)
x = keras.layers.Conv2D(64, 3, padding="same", activation="relu")(x)
x = keras.layers.Conv2D(64, 3, padding="same", activation="relu")(x)
final = kee.ExitBranch(10, hidden_units=64, pooled_size=2, name="final")(x)
model = kee.EarlyExitModel(inputs, [exit_1, exit_2, final])

"""
## Train all exits with one loss

`EarlyExitLoss` sums each exit's cross-entropy with weights that sum to 1
(`"uniform"` here; `"linear"`, `"sqrt"`, `"inverse"`, `"geometric"` or a list
also work), with label smoothing 0.1 by default, and can add
self-distillation from the final exit. Metrics are tracked per exit, under
the exit's name.
"""

model.compile(
    optimizer=keras.optimizers.Adam(LEARNING_RATE),
    loss=kee.EarlyExitLoss(weights="uniform"),
    metrics=["accuracy"],
)
model.fit(
    data.x_train,
    data.y_train,
    epochs=EPOCHS,
    batch_size=BATCH_SIZE,
    validation_data=(data.x_val, data.y_val),
    verbose=2,
)

"""
## Per-exit test accuracy
"""

results = model.evaluate(data.x_test, data.y_test, verbose=0, return_dict=True)
for name in model.exit_names:
    print(f"{name:>8}: test accuracy {results[f'{name}_accuracy']:.4f}")

"""
## Calibrated gated inference

`calibrate` picks one threshold per non-final exit on the validation split:
the least average compute whose accuracy stays within 1 point of the final
exit's. `predict_early` then runs the network segment by segment; a sample
leaves at the first exit whose confidence reaches its threshold, and deeper
segments only compute the samples still in play.
"""

calibration = kee.calibrate(
    model, data.x_val, data.y_val, max_accuracy_drop=0.01, apply=True
)
print(calibration)
early = model.predict_early(data.x_test)
accuracy = (early.classes == data.y_test).mean()
shares = early.exit_counts(model.num_exits) / len(data.y_test)
macs = kee.count_macs(model)
average_macs = sum(s * m for s, m in zip(shares, macs.cumulative_macs))
thresholds = ", ".join(f"{t:.3f}" for t in model.thresholds)
print(f"gated test accuracy {accuracy:.4f} at thresholds [{thresholds}]")
print("share leaving at each exit:", ", ".join(f"{s:.2f}" for s in shares))
print(
    f"average MACs {average_macs:,.0f} of {macs.cumulative_macs[-1]:,} "
    f"({macs.cumulative_macs[-1] / average_macs:.1f}x fewer)"
)
