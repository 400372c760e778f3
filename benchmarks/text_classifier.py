"""Early exit on a transformer encoder: MAC savings at <= 1 point test drop.

Task: `keras_earlyexit.demo_text`, generated token sequences (16-32 tokens,
padded), 4 classes. 75% of the samples are *local* (a class marker, and
whether `SHIFT` stands right before it), 25% *long-range* (the order of two
bigrams at least a third of the sequence apart); its module docstring
says what makes samples easy or hard and what keeps shortcuts out.

Model: `demo_text.text_encoder()`, 6 pre-norm encoder layers (width 32, 4
heads, ReLU feed-forward 64), an exit after every layer (masked average
pooling, one hidden layer), trained once with `EarlyExitLoss` (seed 0).
Thresholds are chosen on the validation split only; every figure below is
measured with real gated inference (`predict_early`) on the test split:

- max_prob: `calibrate(max_accuracy_drop=0.01)`;
- patience alone (PABEE: floors 0): `calibrate(..., confidence_floor=False)`
  on a `criterion="patience"` model over the same layers picks p in [1, 6]
  for the same target;
- patience with confidence floors: p in [2, 6] and per-exit floors
  (p = 1 with floors is max_prob itself);
- the oracle (each test sample leaves at its first correct exit; it knows
  the label, so it is a loose bound);
- static encoders with fewer layers (the layer counts just below and above
  the max_prob model's average MACs), trained separately with the same
  recipe and data.

Drop = final-exit test accuracy minus the method's test accuracy. Target:
>= 2.5x fewer MACs than the full model at <= 1 point drop.

Run: `KERAS_BACKEND=jax python benchmarks/text_classifier.py` (12 minutes
on 2 shared, busy cores: 630 CPU-seconds). Writes
`benchmarks/results/text_classifier.{md,json}`.
"""

import json
import math
import os
import time

import keras
import numpy as np

import keras_earlyexit as kee
from keras_earlyexit import demo_text

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
COMMAND = "KERAS_BACKEND=jax python benchmarks/text_classifier.py"
SIZES = (16000, 2000, 2000)  # train, val, test
EPOCHS = 20
BATCH_SIZE = 128
LEARNING_RATE = 3e-3
MAX_DROP = 0.01
TARGET_SPEEDUP = 2.5
SEED = 0


def fit(model, data, early_exit: bool):
    loss = (
        kee.EarlyExitLoss()
        if early_exit
        else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    model.compile(keras.optimizers.Adam(LEARNING_RATE), loss)
    model.fit(
        data.x_train, data.y_train, epochs=EPOCHS, batch_size=BATCH_SIZE, verbose=0
    )
    return model


def by_kind(correct: np.ndarray, hard: np.ndarray) -> dict:
    return {
        "all": round(float(correct.mean()), 4),
        "local": round(float(correct[~hard].mean()), 4),
        "long_range": round(float(correct[hard].mean()), 4),
    }


def measure(model, data, cumulative, final_accuracy: float, full: int) -> dict:
    """Real gated inference on the test split with the model's own gates."""
    result = model.predict_early(data.x_test)
    correct = result.classes == data.y_test
    macs = float(np.asarray(cumulative)[result.exit_indices].mean())
    hard = data.hard_test

    def shares(rows):
        counts = np.bincount(result.exit_indices[rows], minlength=model.num_exits)
        return [round(float(s), 4) for s in counts / max(1, rows.sum())]

    return {
        "thresholds": [round(float(t), 4) for t in model.thresholds],
        "patience": model.patience,
        "accuracy": by_kind(correct, hard),
        "drop_points": round(100 * (final_accuracy - correct.mean()), 2),
        "average_macs": macs,
        "speedup": round(full / macs, 2),
        "exit_shares": {
            "all": shares(np.ones_like(hard)),
            "local": shares(~hard),
            "long_range": shares(hard),
        },
    }


def expected(calibration) -> dict:
    return {
        "accuracy": round(calibration.expected_accuracy, 4),
        "average_macs": calibration.expected_macs,
        "drop_bound": round(calibration.bound, 4),
    }


def static_baselines(data, target_macs: float, full: int, final_accuracy: float):
    """Static encoders with the layer counts around `target_macs`, each
    trained with the same recipe."""
    per_layer = full / 6
    layers = sorted(
        {
            min(5, max(1, math.floor(target_macs / per_layer))),
            min(5, max(1, math.ceil(target_macs / per_layer))),
        }
    )
    rows = []
    for num_layers in layers:
        keras.utils.set_random_seed(SEED)
        model = fit(demo_text.static_encoder(num_layers), data, early_exit=False)
        macs = kee.count_macs(model).total_macs
        logits = model.predict(data.x_test, verbose=0)
        correct = np.argmax(logits, axis=1) == data.y_test
        rows.append(
            {
                "layers": num_layers,
                "macs": macs,
                "speedup": round(full / macs, 2),
                "accuracy": by_kind(correct, data.hard_test),
                "drop_points": round(100 * (final_accuracy - correct.mean()), 2),
            }
        )
    return rows


def run() -> dict:
    keras.utils.set_random_seed(SEED)
    data = demo_text.load_sequences(SIZES, seed=SEED)
    start = time.time()
    model = fit(demo_text.text_encoder(), data, early_exit=True)
    train_seconds = time.time() - start
    macs = kee.count_macs(model)
    full = macs.total_macs
    test = kee.profile(model, data.x_test, data.y_test)
    final_accuracy = test.accuracy[-1]
    logits = model.predict(data.x_test, verbose=0)
    exit_accuracy = [
        by_kind(np.argmax(z, axis=1) == data.y_test, data.hard_test) for z in logits
    ]

    max_prob = kee.calibrate(
        model, data.x_val, data.y_val, max_accuracy_drop=MAX_DROP, apply=True
    )
    methods = {
        "max_prob": {
            **measure(model, data, macs.cumulative_macs, final_accuracy, full),
            "expected_val": expected(max_prob),
        }
    }
    pabee = kee.EarlyExitModel(model.inputs, model.outputs, criterion="patience")
    settings = {
        "patience_alone": {"confidence_floor": False},
        "patience_floor": {"patience": range(2, pabee.num_exits + 1)},
    }
    for key, kwargs in settings.items():
        calibration = kee.calibrate(
            pabee,
            data.x_val,
            data.y_val,
            max_accuracy_drop=MAX_DROP,
            apply=True,
            **kwargs,
        )
        methods[key] = {
            **measure(pabee, data, macs.cumulative_macs, final_accuracy, full),
            "expected_val": expected(calibration),
        }
    statics = static_baselines(
        data, methods["max_prob"]["average_macs"], full, final_accuracy
    )
    met = {
        key: bool(m["speedup"] >= TARGET_SPEEDUP and m["drop_points"] <= 100 * MAX_DROP)
        for key, m in methods.items()
    }
    return {
        "backend": keras.backend.backend(),
        "command": COMMAND,
        "seed": SEED,
        "samples": dict(zip(("train", "val", "test"), SIZES)),
        "long_range_share_test": round(float(data.hard_test.mean()), 4),
        "epochs": EPOCHS,
        "train_seconds": round(train_seconds, 1),
        "full_macs": full,
        "cumulative_macs": macs.cumulative_macs,
        "exit_accuracy_test": exit_accuracy,
        "final_accuracy_test": final_accuracy,
        "methods": methods,
        "oracle_test": {
            "accuracy": round(test.oracle_accuracy, 4),
            "average_macs": test.oracle_macs,
            "speedup": round(full / test.oracle_macs, 2),
        },
        "static": statics,
        "target": {
            "speedup": TARGET_SPEEDUP,
            "max_drop_points": 100 * MAX_DROP,
            "met": met,
        },
        "seconds": round(time.time() - start, 1),
    }


LABELS = {
    "max_prob": "max_prob, calibrate(max_accuracy_drop=0.01)",
    "patience_alone": "patience alone (PABEE), calibrated",
    "patience_floor": "patience >= 2 + floors, calibrated",
}


def markdown(r: dict) -> str:
    fa = r["final_accuracy_test"]
    full = r["full_macs"]
    lines = [
        f"Command: `{r['command']}` (backend `{r['backend']}`, seed {r['seed']}, "
        f"{r['seconds']:.0f} s, training {r['train_seconds']:.0f} s). "
        f"Data: {r['samples']['train']} / {r['samples']['val']} / "
        f"{r['samples']['test']} generated sequences (train / val / test), "
        f"{r['long_range_share_test']:.0%} long-range in test. Thresholds and "
        "patience chosen on the validation split only; test figures from "
        "`predict_early` on the test split. Drop = final-exit test accuracy "
        "minus the method's.",
        "",
        "| method | test accuracy | local | long-range | drop (pt) | avg MACs | "
        "MAC reduction | exit shares |",
        "|---|---|---|---|---|---|---|---|",
    ]
    final = r["exit_accuracy_test"][-1]
    rows = [("full model (final exit)", final, 0.0, full, 1.0, "")]
    for key, label in LABELS.items():
        m = r["methods"][key]
        if m["patience"] is not None:
            label += f" (p={m['patience']})"
        rows.append(
            (
                label,
                m["accuracy"],
                m["drop_points"],
                m["average_macs"],
                m["speedup"],
                m["exit_shares"]["all"],
            )
        )
    o = r["oracle_test"]
    rows.append(
        (
            "oracle (first correct exit, else the final; knows the label)",
            {"all": o["accuracy"], "local": math.nan, "long_range": math.nan},
            round(100 * (fa - o["accuracy"]), 2),
            o["average_macs"],
            o["speedup"],
            "",
        )
    )
    for s in r["static"]:
        rows.append(
            (
                f"static encoder, {s['layers']} layer(s)",
                s["accuracy"],
                s["drop_points"],
                s["macs"],
                s["speedup"],
                "",
            )
        )
    for label, acc, drop, macs, speed, shares in rows:
        kinds = " | ".join(
            "" if math.isnan(acc[k]) else f"{acc[k]:.4f}"
            for k in ("all", "local", "long_range")
        )
        lines.append(
            f"| {label} | {kinds} | {drop:+.2f} | {macs:,.0f} | {speed:.2f}x | "
            f"{shares} |"
        )
    lines += [
        "",
        "Test accuracy per exit (cumulative MACs):",
        "",
        "| exit | MACs | all | local | long-range |",
        "|---|---|---|---|---|",
    ]
    for k, (acc, macs) in enumerate(zip(r["exit_accuracy_test"], r["cumulative_macs"])):
        lines.append(
            f"| {k + 1} | {macs:,} | {acc['all']:.4f} | {acc['local']:.4f} | "
            f"{acc['long_range']:.4f} |"
        )
    lines += ["", "Exit shares per kind of sample (test):", ""]
    for key, label in LABELS.items():
        shares = r["methods"][key]["exit_shares"]
        lines.append(
            f"- {label}: local {shares['local']}, long-range {shares['long_range']}"
        )
    ee = r["methods"]["max_prob"]
    lines += ["", "Static encoders against max_prob early exit (test):", ""]
    for st in r["static"]:
        better = (
            "above" if st["accuracy"]["all"] > ee["accuracy"]["all"] else "not above"
        )
        lines.append(
            f"- {st['layers']} layer(s), {st['macs']:,} MACs: accuracy "
            f"{st['accuracy']['all']:.4f}, {better} early exit's "
            f"{ee['accuracy']['all']:.4f} at {ee['average_macs']:,.0f} average MACs."
        )
    target = r["target"]
    verdict = ", ".join(
        f"{LABELS[k].split(',')[0]}: {'met' if ok else 'not met'}"
        for k, ok in target["met"].items()
    )
    lines += [
        "",
        f"Target >= {target['speedup']}x fewer MACs at <= "
        f"{target['max_drop_points']:.0f} pt drop on test: {verdict}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    os.makedirs(RESULTS, exist_ok=True)
    result = run()
    with open(os.path.join(RESULTS, "text_classifier.json"), "w") as f:
        json.dump(result, f, indent=2)
    text = markdown(result)
    with open(os.path.join(RESULTS, "text_classifier.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
