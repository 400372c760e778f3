"""
Title: Early exits on a transformer encoder, from training to int8 on LiteRT
Description: A 6-layer encoder with an exit after every layer, trained with
one loss, calibrated, run with per-sample exits and exported to int8.

Transformer encoders are where early exit is used most (DeeBERT, FastBERT,
PABEE): an exit after each layer lets easy inputs stop after one or two
layers. This example takes a small encoder through the whole chain:

1. train all exits jointly with `EarlyExitLoss` (plain `model.fit`);
2. `profile` accuracy against compute per exit;
3. `calibrate` thresholds for at most 1 point of accuracy drop, then run
   `predict_early` (segments run one after another, samples that exit
   are not computed further);
4. the patience criterion (PABEE): leave when consecutive exits agree;
5. export an int8 bundle (`to_tflite`) and run it on LiteRT with the gated
   interpreter loop (`kee.runtime.GatedInterpreter`).

Data: a generated sequence-classification task (`keras_earlyexit.demo_text`,
no download). Most samples are decided by a class marker and its left
neighbour (*local*); a quarter need the order of two bigrams far apart
(*long-range*). Its module docstring says what makes samples easy or hard.
The task is easy for attention: the first layer's exit is right on about
97% of the samples (96% of the long-range ones), and a 1-layer encoder
trained alone is as accurate as the calibrated early exits at the same
compute (`benchmarks/results/text_classifier.md`).

Runs on TensorFlow, JAX or PyTorch (set `KERAS_BACKEND`); conversion to
TFLite runs in a TensorFlow-backend subprocess under JAX and PyTorch:

    KERAS_BACKEND=jax python examples/train_text_classifier.py
"""

"""
## Settings
"""

EPOCHS = 20
TRAIN_SAMPLES = 16000
BATCH_SIZE = 128
LEARNING_RATE = 3e-3
SEED = 0
MAX_ACCURACY_DROP = 0.01  # calibrated exits lose at most 1 point
# The int8 bundle goes here (ignored by git); each run replaces it.
OUTPUT_DIR = "example_outputs/train_text_classifier"

import os  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_earlyexit as kee  # noqa: E402
from keras_earlyexit import demo_text  # noqa: E402

"""
## Data

Token ids `(n, 32)` padded with 0; lengths vary from 16 to 32, so the
attention and the exits' pooling must ignore padding. `hard_*` flags the
long-range samples of each split.
"""


def load_data(sizes=(TRAIN_SAMPLES, 2000, 2000), seed: int = SEED):
    return demo_text.load_sequences(sizes, seed=seed)


"""
## Model and training

`demo_text.text_encoder` builds token and learned position embeddings and
6 pre-norm encoder layers (`MultiHeadAttention`, `LayerNormalization`, a
ReLU feed-forward; width 32, about 2 million MACs per sample), with an
`ExitBranch` (average over the valid tokens, one hidden layer) after every
layer. The padding mask is computed from the token ids inside the graph
(the attention's keys and the exits' pooling read it), so segment 1 takes
the ids alone and each segment hands the mask on with the hidden states.
All exits train jointly with one `EarlyExitLoss` and one label array.
"""


def train(
    model, data, epochs: int = EPOCHS, batch_size: int = BATCH_SIZE, verbose: int = 2
):
    model.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        loss=kee.EarlyExitLoss(weights="uniform"),
    )
    model.fit(
        data.x_train,
        data.y_train,
        epochs=epochs,
        batch_size=batch_size,
        verbose=verbose,
    )
    return model


def accuracy_by_kind(correct: np.ndarray, hard: np.ndarray) -> str:
    return (
        f"{correct.mean():.4f} (local {correct[~hard].mean():.4f}, "
        f"long-range {correct[hard].mean():.4f})"
    )


"""
## Gated inference

`calibrate` chooses the thresholds on the validation split only; the test
split then measures real gated inference. The average MACs count each
sample up to the exit it took.
"""


def gated_figures(model, data, result, cumulative_macs) -> dict:
    correct = result.classes == data.y_test
    shares = result.exit_counts(model.num_exits) / len(data.y_test)
    average = float(np.dot(shares, cumulative_macs))
    return {
        "accuracy": accuracy_by_kind(correct, data.hard_test),
        "exit shares": ", ".join(f"{s:.2f}" for s in shares),
        "average MACs": f"{average:,.0f} of {cumulative_macs[-1]:,} "
        f"({cumulative_macs[-1] / average:.2f}x fewer)",
    }


def calibrated_max_prob(model, data) -> dict:
    calibration = kee.calibrate(
        model, data.x_val, data.y_val, max_accuracy_drop=MAX_ACCURACY_DROP, apply=True
    )
    print(calibration)
    result = model.predict_early(data.x_test)
    return gated_figures(model, data, result, kee.count_macs(model).cumulative_macs)


"""
## Patience (PABEE)

A second `EarlyExitModel` over the same layers (no copy of the weights) with
`criterion="patience"`: a sample leaves when `patience` exits in a row
predict the same class. `calibrate` picks the patience for the same target;
`confidence_floor=False` keeps it pure PABEE (with the default per-exit
confidence floors, patience 1 would be max_prob itself).
"""


def calibrated_patience(model, data) -> dict:
    pabee = kee.EarlyExitModel(model.inputs, model.outputs, criterion="patience")
    calibration = kee.calibrate(
        pabee,
        data.x_val,
        data.y_val,
        max_accuracy_drop=MAX_ACCURACY_DROP,
        confidence_floor=False,
        apply=True,
    )
    print(calibration)
    result = pabee.predict_early(data.x_test)
    return gated_figures(pabee, data, result, kee.count_macs(pabee).cumulative_macs)


"""
## Int8 on LiteRT

`to_tflite` writes one int8 segment per exit: int8 kernels for the
embedding lookup, projections, attention, layer norms and feed-forward.
The token ids stay int32 inputs (only float tensors are quantized); the
carried hidden states are int8 and the padding mask bool. Two kinds of op
stay float32: the mask's cast to float for the exits' pooling and the
negated mean inside each `LayerNormalization` (TFLite has no int8 `NEG`).
LiteRT runs them (the export warns and names them), hence `micro=False`:
this bundle is meant for LiteRT (Android).

The int8 ranges are calibrated on unpadded sequences of the same task:
Keras' attention mask sets masked scores to -1e9, and padding in the
calibration data would stretch the scores' int8 scale until every score
rounds to 0 (see `demo_text`). The gated interpreter runs segment 1,
compares the int8 confidence with the int8 threshold, and runs the next
segment only for the samples still in play.
"""


def export_and_run(model, data, directory: str, calibration_samples: int = 500):
    unpadded, _, _ = demo_text.make_sequences(
        calibration_samples, seed=SEED + 1, min_length=demo_text.MAX_LENGTH
    )
    bundle = kee.export.to_tflite(
        model,
        directory,
        representative_data=unpadded,
        quantization="int8",
        calibration_samples=calibration_samples,
        micro=False,
        verbose=0,
    )
    interpreter = kee.runtime.GatedInterpreter(bundle)
    return bundle, interpreter.predict(data.x_test)


def main() -> None:
    keras.utils.set_random_seed(SEED)
    print(f"backend: {keras.backend.backend()}")
    data = load_data()
    print(
        f"train {len(data.y_train)}, val {len(data.y_val)}, test {len(data.y_test)}; "
        f"long-range share {data.hard_train.mean():.2f}"
    )
    model = demo_text.text_encoder()
    macs = kee.count_macs(model)
    print(
        "cumulative MACs per exit:", ", ".join(f"{m:,}" for m in macs.cumulative_macs)
    )
    train(model, data)

    print("\nPer-exit test accuracy:")
    for name, logits in zip(model.exit_names, model.predict(data.x_test, verbose=0)):
        correct = np.argmax(logits, axis=1) == data.y_test
        print(f"{name:>7}: {accuracy_by_kind(correct, data.hard_test)}")

    print("\nProfile on the validation split:")
    print(kee.profile(model, data.x_val, data.y_val))

    print("\nmax_prob, calibrated:")
    for key, value in calibrated_max_prob(model, data).items():
        print(f"  {key}: {value}")
    print("\npatience, calibrated:")
    for key, value in calibrated_patience(model, data).items():
        print(f"  {key}: {value}")

    print("\nInt8 bundle on LiteRT (max_prob thresholds):")
    keras_result = model.predict_early(data.x_test)
    bundle, result = export_and_run(model, data, os.path.join(OUTPUT_DIR, "int8"))
    for key, value in gated_figures(model, data, result, macs.cumulative_macs).items():
        print(f"  {key}: {value}")
    same_exit = np.mean(result.exit_indices == keras_result.exit_indices)
    same_class = np.mean(result.classes == keras_result.classes)
    size = sum(
        os.path.getsize(os.path.join(bundle, f))
        for f in os.listdir(bundle)
        if f.endswith(".tflite")
    )
    print(
        f"  agreement with the float Keras model: same exit {same_exit:.4f}, "
        f"same class {same_class:.4f}; bundle {size:,} bytes in {bundle}"
    )


if __name__ == "__main__":
    main()
