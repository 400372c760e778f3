"""Quantization-aware training against post-training int8, side by side.

For the digits CNN, a depthwise-separable (MobileNet-style) model of
DepthwiseConv2D and 1x1 Conv2D layers, and one of SeparableConv2D layers
with BatchNormalization and ReLU6 (as MobileNet is usually written), all
trained on scikit-learn digits (no download) with thresholds calibrated on
the float model to lose at most one point on the validation split:
- float: Keras `predict_early` on the test split;
- PTQ int8: `to_tflite(model, quantization="int8")` (post-training
  calibration), run in `kee.runtime.GatedInterpreter` (LiteRT);
- QAT int8: `kee.quantization.quantize_aware(model)`, fine-tuned with `fit`
  and `EarlyExitLoss`, exported with `to_tflite(..., quantization="int8")`,
  with the float thresholds and with thresholds re-calibrated on the
  fake-quant model (whose confidences lie on the int8 grid).
Reported: gated accuracy, exit agreement with the float model, and
agreement of the int8 bundle with the fake-quant Keras model.
Targets (issue): int8 gated accuracy within 0.2 pt of float gated accuracy;
>= 99% agreement of int8 exit decisions with the float model's.

Run:
    KERAS_BACKEND=tensorflow python benchmarks/qat.py
Writes benchmarks/results/qat.md and .json.
"""

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_earlyexit as kee  # noqa: E402
from keras_earlyexit import demo  # noqa: E402
from keras_earlyexit.quantization import quantize_aware  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def separable_cnn(num_classes: int = 10, width: int = 16) -> kee.EarlyExitModel:
    """MobileNet-style: a stem convolution, then depthwise 3x3 + pointwise
    1x1 blocks (ReLU, no batch norm), an exit after the stem and after the
    second block."""
    inputs = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name="stem")(
        inputs
    )
    exit_1 = kee.ExitBranch(num_classes, pooled_size=2, name="exit_1")(x)
    for i, filters in enumerate([2 * width, 2 * width, 4 * width, 4 * width]):
        x = keras.layers.DepthwiseConv2D(
            3, padding="same", activation="relu", name=f"dw_{i + 1}"
        )(x)
        x = keras.layers.Conv2D(filters, 1, activation="relu", name=f"pw_{i + 1}")(x)
        if i == 1:
            x = keras.layers.MaxPooling2D(2, name="pool")(x)
            exit_2 = kee.ExitBranch(num_classes, pooled_size=2, name="exit_2")(x)
    final = kee.ExitBranch(num_classes, pooled_size=2, name="final")(x)
    return kee.EarlyExitModel(inputs, [exit_1, exit_2, final], name="separable_cnn")


def separable_bn_cnn(num_classes: int = 10, width: int = 16) -> kee.EarlyExitModel:
    """MobileNet as it is usually written: convolutions without bias or
    activation, each followed by BatchNormalization and a ReLU6, and
    SeparableConv2D blocks (quantize_aware folds the normalizations and
    splits each separable convolution as the converter does)."""
    layers = keras.layers

    def block(x, layer, name):
        x = layer(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
        return layers.ReLU(6.0, name=f"{name}_relu")(x)

    inputs = keras.Input((8, 8, 1), name="image")
    x = block(
        inputs,
        layers.Conv2D(width, 3, padding="same", use_bias=False, name="stem"),
        "stem",
    )
    exit_1 = kee.ExitBranch(num_classes, pooled_size=2, name="exit_1")(x)
    for i, filters in enumerate([2 * width, 2 * width, 4 * width, 4 * width]):
        x = block(
            x,
            layers.SeparableConv2D(
                filters, 3, padding="same", use_bias=False, name=f"sep_{i + 1}"
            ),
            f"sep_{i + 1}",
        )
        if i == 1:
            x = layers.MaxPooling2D(2, name="pool")(x)
            exit_2 = kee.ExitBranch(num_classes, pooled_size=2, name="exit_2")(x)
    final = kee.ExitBranch(num_classes, pooled_size=2, name="final")(x)
    return kee.EarlyExitModel(inputs, [exit_1, exit_2, final], name="separable_bn_cnn")


MODELS = {
    "digits_cnn": demo.digits_cnn,
    "separable_cnn": separable_cnn,
    "separable_bn_cnn": separable_bn_cnn,
}


def train(name: str, splits, epochs: int) -> kee.EarlyExitModel:
    keras.utils.set_random_seed(0)
    model = MODELS[name]()
    model.compile(keras.optimizers.Adam(3e-3), kee.EarlyExitLoss("linear"))
    model.fit(splits.x_train, splits.y_train, epochs=epochs, batch_size=32, verbose=0)
    calibrate(model, splits)
    return model


def calibrate(model, splits) -> None:
    result = kee.calibrate(model, splits.x_val, splits.y_val, max_accuracy_drop=0.01)
    model.set_thresholds(result.thresholds)


def int8_bundle(model, splits, path: str):
    bundle = kee.export.to_tflite(
        model, path, representative_data=splits.x_val, verbose=0, micro=False
    )
    return kee.runtime.GatedInterpreter(bundle).predict(splits.x_test)


def scores(result, reference, splits) -> dict:
    return {
        "gated_accuracy": float(np.mean(result.classes == splits.y_test)),
        "exit_agreement_with_float": float(
            np.mean(result.exit_indices == reference.exit_indices)
        ),
        "class_agreement_with_float": float(
            np.mean(result.classes == reference.classes)
        ),
        "exit_mix": np.bincount(result.exit_indices, minlength=3).tolist(),
    }


def bench(name: str, splits, args, root: str) -> dict:
    t0 = time.perf_counter()
    model = train(name, splits, args.epochs)
    reference = model.predict_early(splits.x_test)
    run = {
        "model": name,
        "float_thresholds": model.thresholds,
        "float": scores(reference, reference, splits),
        "ptq_int8": scores(
            int8_bundle(model, splits, os.path.join(root, f"{name}_ptq")),
            reference,
            splits,
        ),
    }
    keras.utils.set_random_seed(0)
    qat = quantize_aware(model, representative_data=splits.x_val)
    qat.compile(keras.optimizers.Adam(args.qat_lr), kee.EarlyExitLoss("linear"))
    qat.fit(
        splits.x_train, splits.y_train, epochs=args.qat_epochs, batch_size=32, verbose=0
    )
    for label, recalibrate in (("qat_int8", False), ("qat_int8_recalibrated", True)):
        if recalibrate:
            calibrate(qat, splits)
        fake_quant = qat.predict_early(splits.x_test)
        result = int8_bundle(qat, splits, os.path.join(root, f"{name}_{label}"))
        run[label] = {
            **scores(result, reference, splits),
            "thresholds": qat.thresholds,
            "keras_fake_quant_accuracy": float(
                np.mean(fake_quant.classes == splits.y_test)
            ),
            "exit_agreement_with_fake_quant": float(
                np.mean(result.exit_indices == fake_quant.exit_indices)
            ),
            "class_agreement_with_fake_quant": float(
                np.mean(result.classes == fake_quant.classes)
            ),
        }
    run["seconds"] = time.perf_counter() - t0
    print(json.dumps(run))
    return run


def to_markdown(runs: list[dict], args) -> str:
    lines = [
        f"Digits test split (360 samples); float training {args.epochs} epochs, "
        f"QAT fine-tuning {args.qat_epochs} epochs at lr {args.qat_lr}; "
        "thresholds calibrated on the validation split (max_accuracy_drop=0.01).",
        "Targets: int8 gated accuracy within 0.2 pt of float; int8 exit "
        "decisions >= 99% in agreement with the float model.",
        "",
        "| model | setting | gated acc | vs float (pt) | exit agreement with "
        "float | class agreement with float | int8 vs fake-quant Keras "
        "(exit / class) | exit counts | accuracy target | agreement target |",
        "|---|---|---:|---:|---:|---:|---|---|---|---|",
    ]
    labels = {
        "float": "float (Keras)",
        "ptq_int8": "PTQ int8",
        "qat_int8": "QAT int8, float thresholds",
        "qat_int8_recalibrated": "QAT int8, thresholds calibrated on QAT model",
    }
    for run in runs:
        base = run["float"]["gated_accuracy"]
        for key, label in labels.items():
            r = run[key]
            drop = (r["gated_accuracy"] - base) * 100
            versus = (
                f"{r['exit_agreement_with_fake_quant']:.2%} / "
                f"{r['class_agreement_with_fake_quant']:.2%}"
                if "exit_agreement_with_fake_quant" in r
                else "-"
            )
            met = key == "float" or drop >= -0.2
            agree = key == "float" or r["exit_agreement_with_float"] >= 0.99
            lines.append(
                f"| {run['model']} | {label} | {r['gated_accuracy']:.2%} "
                f"| {drop:+.2f} | {r['exit_agreement_with_float']:.2%} "
                f"| {r['class_agreement_with_float']:.2%} | {versus} "
                f"| {' / '.join(map(str, r['exit_mix']))} "
                f"| {'-' if key == 'float' else ('met' if met else 'missed')} "
                f"| {'-' if key == 'float' else ('met' if agree else 'missed')} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--qat-epochs", type=int, default=5)
    parser.add_argument("--qat-lr", type=float, default=3e-4)
    args = parser.parse_args()
    splits = demo.load_digits(seed=0)
    with tempfile.TemporaryDirectory(prefix="kee-qat-") as root:
        runs = [bench(name, splits, args, root) for name in args.models]
    markdown = to_markdown(runs, args)
    print(markdown)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "qat.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(RESULTS, "qat.json"), "w") as f:
        json.dump({"settings": vars(args), "runs": runs}, f, indent=2)


if __name__ == "__main__":
    main()
