"""Quantization-aware training against post-training int8, side by side.

Models, trained on scikit-learn digits (no download) from several seeds:
the digits CNN; a depthwise-separable (MobileNet-style) model of
DepthwiseConv2D and 1x1 Conv2D layers with ReLU and no normalization; one
of SeparableConv2D layers with BatchNormalization and ReLU6 (as MobileNet
is usually written); and a narrow MobileNet (width 8) with
BatchNormalization and unbounded ReLU. Float thresholds are calibrated on
the validation split (max_accuracy_drop=0.01). Settings:
- float: Keras `predict_early` on the test split;
- PTQ int8: `to_tflite(model, quantization="int8")` (post-training
  calibration), run in `kee.runtime.GatedInterpreter` (LiteRT);
- QAT int8: `kee.quantize_aware(model)` fine-tuned with `fit` and
  `EarlyExitLoss` on the labels, exported with `to_tflite(...,
  quantization="int8")`;
- QAT + distillation int8: the same, compiled with `teacher=model,
  distillation_weight=1.0`: each exit learns the float model's same exit;
each int8 bundle with the float thresholds (quantized as the manifest
quantizes them), with thresholds calibrated on the bundle itself
(`kee.calibrate(bundle, x_val, y_val, max_accuracy_drop=0.01)`), and with
thresholds calibrated on the bundle to match the float model's exits
(the same call with `reference_model=model, match_reference=True`).
Reported per seed: gated accuracy against float, agreement of exit
decisions and classes with the float model at its thresholds, agreement of
exit decisions with the float model gated by the bundle's thresholds (what
quantization alone moves), and whether
the promise of `max_accuracy_drop` holds on the test split (gated accuracy
at most 1 pt below the same bundle's final exit).
Targets (issue): int8 gated accuracy within 0.2 pt of float gated
accuracy; >= 99% agreement of int8 exit decisions with the float model's;
the promise held.

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


def _normalized_cnn(name, num_classes, width, block_layers, max_value):
    """A stem convolution and four blocks, every convolution without bias
    or activation and followed by BatchNormalization and a ReLU (capped at
    `max_value`); `block_layers(i, filters)` gives block i's convolutions.
    Exits after the stem and after the second block."""
    layers = keras.layers

    def normalized(x, layer):
        x = layers.BatchNormalization(momentum=0.9, name=f"{layer.name}_bn")(layer(x))
        return layers.ReLU(max_value, name=f"{layer.name}_relu")(x)

    inputs = keras.Input((8, 8, 1), name="image")
    stem = layers.Conv2D(width, 3, padding="same", use_bias=False, name="stem")
    x = normalized(inputs, stem)
    exit_1 = kee.ExitBranch(num_classes, pooled_size=2, name="exit_1")(x)
    for i, filters in enumerate([2 * width, 2 * width, 4 * width, 4 * width]):
        for layer in block_layers(i + 1, filters):
            x = normalized(x, layer)
        if i == 1:
            x = layers.MaxPooling2D(2, name="pool")(x)
            exit_2 = kee.ExitBranch(num_classes, pooled_size=2, name="exit_2")(x)
    final = kee.ExitBranch(num_classes, pooled_size=2, name="final")(x)
    return kee.EarlyExitModel(inputs, [exit_1, exit_2, final], name=name)


def separable_bn_cnn(num_classes: int = 10, width: int = 16) -> kee.EarlyExitModel:
    """MobileNet as it is usually written: SeparableConv2D blocks, each
    followed by BatchNormalization and a ReLU6 (quantize_aware folds the
    normalizations and splits each separable convolution as the converter
    does)."""

    def block(i, filters):
        return [
            keras.layers.SeparableConv2D(
                filters, 3, padding="same", use_bias=False, name=f"sep_{i}"
            )
        ]

    return _normalized_cnn("separable_bn_cnn", num_classes, width, block, 6.0)


def mobilenet_relu(num_classes: int = 10, width: int = 8) -> kee.EarlyExitModel:
    """A narrow MobileNet (v1 blocks): each DepthwiseConv2D and 1x1 Conv2D
    followed by BatchNormalization and an unbounded ReLU (no ReLU6 clip)."""

    def block(i, filters):
        return [
            keras.layers.DepthwiseConv2D(
                3, padding="same", use_bias=False, name=f"dw_{i}"
            ),
            keras.layers.Conv2D(filters, 1, use_bias=False, name=f"pw_{i}"),
        ]

    return _normalized_cnn("mobilenet_relu", num_classes, width, block, None)


MODELS = {
    "digits_cnn": demo.digits_cnn,
    "separable_cnn": separable_cnn,
    "separable_bn_cnn": separable_bn_cnn,
    "mobilenet_relu": mobilenet_relu,
}
SETTINGS = {
    "float": "float (Keras)",
    "ptq": "PTQ int8",
    "qat": "QAT int8",
    "qat_distilled": "QAT + distillation int8",
}
TARGET_DROP = 0.01


def train(name: str, splits, epochs: int, seed: int) -> kee.EarlyExitModel:
    keras.utils.set_random_seed(seed)
    model = MODELS[name]()
    model.compile(keras.optimizers.Adam(3e-3), kee.EarlyExitLoss("linear"))
    model.fit(splits.x_train, splits.y_train, epochs=epochs, batch_size=32, verbose=0)
    result = kee.calibrate(
        model, splits.x_val, splits.y_val, max_accuracy_drop=TARGET_DROP
    )
    model.set_thresholds(result.thresholds)
    return model


def scores(result, reference, splits, final=None, same=None) -> dict:
    """Test-split figures of an int8 run `result` against the float model's
    run at its own thresholds (`reference`) and, if given, at the same
    thresholds as `result` (`same`)."""
    accuracy = float(np.mean(result.classes == splits.y_test))
    same = reference if same is None else same
    found = {
        "gated_accuracy": accuracy,
        "exit_agreement_with_float": float(
            np.mean(result.exit_indices == reference.exit_indices)
        ),
        "exit_agreement_same_thresholds": float(
            np.mean(result.exit_indices == same.exit_indices)
        ),
        "class_agreement_with_float": float(
            np.mean(result.classes == reference.classes)
        ),
        "exit_mix": np.bincount(result.exit_indices, minlength=3).tolist(),
    }
    if final is not None:
        found["final_exit_accuracy"] = final
        found["promise_held"] = bool(accuracy >= final - TARGET_DROP - 1e-9)
    return found


def int8_settings(model, splits, path: str, reference, float_model) -> dict:
    """The int8 bundle of `model` (exported from `float_model`, or
    `float_model` itself) with the float thresholds, with thresholds
    calibrated on the bundle, and calibrated to match `float_model`'s
    exits."""
    bundle = kee.export.to_tflite(
        model, path, representative_data=splits.x_val, verbose=0, micro=False
    )
    interpreter = kee.runtime.GatedInterpreter(bundle)
    runs = {
        "float_thresholds": scores(
            interpreter.predict(splits.x_test), reference, splits
        )
    }
    interpreter.set_thresholds([1.0] * (model.num_exits - 1))
    final = interpreter.predict(splits.x_test)
    final_accuracy = float(np.mean(final.classes == splits.y_test))
    matching = dict(reference_model=float_model, match_reference=True)
    for mode, extra in (("calibrated", {}), ("matched", matching)):
        calibration = kee.calibrate(
            bundle, splits.x_val, splits.y_val, max_accuracy_drop=TARGET_DROP, **extra
        )
        calibration.apply(interpreter)
        same = float_model.predict_early(
            splits.x_test, thresholds=calibration.thresholds
        )
        runs[mode] = {
            **scores(
                interpreter.predict(splits.x_test),
                reference,
                splits,
                final_accuracy,
                same,
            ),
            "thresholds": list(calibration.thresholds),
        }
    return runs


def bench(name: str, seed: int, splits, args, root: str) -> dict:
    t0 = time.perf_counter()
    model = train(name, splits, args.epochs, seed)
    reference = model.predict_early(splits.x_test)
    run = {
        "model": name,
        "seed": seed,
        "float_thresholds": model.thresholds,
        "float": scores(reference, reference, splits),
        "ptq": int8_settings(
            model, splits, os.path.join(root, f"{name}_{seed}_ptq"), reference, model
        ),
    }
    for label, teacher in (("qat", None), ("qat_distilled", model)):
        keras.utils.set_random_seed(seed)
        qat = quantize_aware(model, representative_data=splits.x_val)
        qat.compile(
            keras.optimizers.Adam(args.qat_lr),
            kee.EarlyExitLoss("linear"),
            teacher=teacher,
            distillation_weight=1.0,
        )
        qat.fit(
            splits.x_train,
            splits.y_train,
            epochs=args.qat_epochs,
            batch_size=32,
            verbose=0,
        )
        path = os.path.join(root, f"{name}_{seed}_{label}")
        run[label] = int8_settings(qat, splits, path, reference, model)
    run["seconds"] = time.perf_counter() - t0
    print(json.dumps(run))
    return run


def _row(name: str, label: str, runs: list[dict], get) -> str:
    """One markdown row: per seed, `gated vs float (pt)`, exit and class
    agreement, and the targets met in how many seeds."""
    base = [run["float"]["gated_accuracy"] for run in runs]
    found = [get(run) for run in runs]
    drops = [(r["gated_accuracy"] - b) * 100 for r, b in zip(found, base)]
    exits = [r["exit_agreement_with_float"] for r in found]
    same = [r["exit_agreement_same_thresholds"] for r in found]
    classes = [r["class_agreement_with_float"] for r in found]
    n = len(runs)
    accuracy_met = sum(d >= -0.2 - 1e-9 for d in drops)
    agreement_met = sum(e >= 0.99 for e in exits)
    promise = (
        f"{sum(r['promise_held'] for r in found)}/{n}"
        if "promise_held" in found[0]
        else "-"
    )
    is_float = label == SETTINGS["float"]
    cells = [
        " / ".join(f"{r['gated_accuracy']:.2%}" for r in found),
        " / ".join(f"{d:+.2f}" for d in drops),
        " / ".join(f"{e:.2%}" for e in exits),
        " / ".join(f"{e:.2%}" for e in same),
        " / ".join(f"{c:.2%}" for c in classes),
        "-" if is_float else f"{accuracy_met}/{n}",
        "-" if is_float else f"{agreement_met}/{n}",
        promise,
    ]
    return f"| {name} | {label} | " + " | ".join(cells) + " |"


def to_markdown(runs: list[dict], args) -> str:
    seeds = " / ".join(str(s) for s in args.seeds)
    lines = [
        f"Digits test split (360 samples); seeds {seeds} (each value below is "
        f"listed per seed in this order); float training {args.epochs} "
        f"epochs, QAT fine-tuning {args.qat_epochs} epochs at lr "
        f"{args.qat_lr}; float thresholds calibrated on the validation "
        'split (max_accuracy_drop=0.01); "calibrated on the bundle": '
        "`kee.calibrate(bundle, x_val, y_val, max_accuracy_drop=0.01)`; "
        '"to match float": the same with `reference_model=model, '
        "match_reference=True`.",
        "Targets: int8 gated accuracy within 0.2 pt of float (accuracy); "
        "int8 exit decisions >= 99% in agreement with the float model's "
        "(agreement); gated accuracy on the test split at most 1 pt below "
        "the bundle's final exit (promise). Columns give the seeds meeting "
        'each target. "Same, float at these thresholds": exit agreement '
        "with the float model gated by the bundle's thresholds (what "
        "quantization alone moves).",
        "",
        "| model | setting | gated acc | vs float (pt) | exit agreement with "
        "float | same, float at these thresholds | class agreement with "
        "float | accuracy target | agreement target | promise |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in args.models:
        group = [run for run in runs if run["model"] == name]
        lines.append(_row(name, SETTINGS["float"], group, lambda run: run["float"]))
        for key in ("ptq", "qat", "qat_distilled"):
            for mode, suffix in (
                ("float_thresholds", "float thresholds"),
                ("calibrated", "calibrated on the bundle"),
                ("matched", "calibrated on the bundle to match float"),
            ):
                label = f"{SETTINGS[key]}, {suffix}"
                lines.append(
                    _row(name, label, group, lambda run, k=key, m=mode: run[k][m])
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--qat-epochs", type=int, default=5)
    parser.add_argument("--qat-lr", type=float, default=3e-4)
    args = parser.parse_args()
    splits = demo.load_digits(seed=0)
    with tempfile.TemporaryDirectory(prefix="kee-qat-") as root:
        runs = [
            bench(name, seed, splits, args, root)
            for name in args.models
            for seed in args.seeds
        ]
    markdown = to_markdown(runs, args)
    print(markdown)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "qat.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(RESULTS, "qat.json"), "w") as f:
        json.dump({"settings": vars(args), "runs": runs}, f, indent=2)


if __name__ == "__main__":
    main()
