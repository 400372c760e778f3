"""Average-MAC savings of calibrated early exits at <= 1 point test drop.

On scikit-learn digits and on a generated 1-D signal task (six waveform
classes with random noise levels; telling an up-chirp from a down-chirp or
a sine needs the receptive field of the deep layers), a 4-exit CNN is
trained with `EarlyExitLoss`. Thresholds are chosen on the validation split
only and measured with real gated inference (`predict_early`) on the test
split, side by side with:

(a) one shared threshold chosen on validation for <= 1 point drop,
(b) the oracle (each test sample leaves at its first correct exit),
(c) a static CNN of the same family, scaled to the same average MACs and
    trained the same way.

Run: `KERAS_BACKEND=jax python benchmarks/exit_savings.py`
Writes `benchmarks/results/exit_savings.{md,json}` and one PNG per data set,
and saves the calibrated signal model and its test data for
`predict_early_speed.py`.
"""

import json
import os
import sys
import time

import keras
import numpy as np

import keras_earlyexit as kee
from keras_earlyexit import demo

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
EPOCHS = {"digits": 40, "signals": 15}
MAX_DROP = 0.01
SEED = 0


def make_signals(n: int, length: int = 128, seed: int = 0):
    """Six classes: sine, square, triangle, sawtooth, up-chirp, down-chirp;
    random frequency, phase, amplitude and noise level per sample."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, length)
    y = rng.integers(0, 6, n)
    freq = rng.uniform(3.0, 8.0, (n, 1))
    phase = rng.uniform(0, 2 * np.pi, (n, 1))
    amp = rng.uniform(0.7, 1.3, (n, 1))
    cycles = freq * t + phase / (2 * np.pi)  # (n, length)
    up = freq * (t + t * t)  # instantaneous frequency f -> 3f
    down = freq * (2 * t - t * t)  # instantaneous frequency 2f -> 0
    waves = {
        0: np.sin(2 * np.pi * cycles),
        1: np.sign(np.sin(2 * np.pi * cycles)),
        2: 2 * np.abs(2 * (cycles % 1) - 1) - 1,
        3: 2 * (cycles % 1) - 1,
        4: np.sin(2 * np.pi * up + phase),
        5: np.sin(2 * np.pi * down + phase),
    }
    x = np.zeros((n, length))
    for c, wave in waves.items():
        x[y == c] = wave[y == c]
    noise = rng.uniform(0.05, 1.0, (n, 1))  # easy and hard samples
    x = amp * x + noise * rng.standard_normal((n, length))
    return x[..., None].astype("float32"), y.astype("int64")


def load(name: str) -> demo.Splits:
    if name == "digits":
        return demo.load_digits(seed=SEED)
    x, y = make_signals(10000, seed=SEED)
    return demo.Splits(
        x[:6000], y[:6000], x[6000:8000], y[6000:8000], x[8000:], y[8000:]
    )


def backbone(name: str, inputs, scale: float = 1.0, exits: bool = True):
    """Five conv layers of growing width; exits after 1, 2 and 3."""
    two_d = name == "digits"
    conv = keras.layers.Conv2D if two_d else keras.layers.Conv1D
    pool = keras.layers.MaxPooling2D if two_d else keras.layers.MaxPooling1D
    kernel = 3 if two_d else 5
    widths = [max(1, int(round(w * scale))) for w in (8, 16, 32, 64, 64)]
    outs = []
    x = inputs
    for i, w in enumerate(widths):
        x = conv(w, kernel, padding="same", activation="relu", name=f"conv_{i + 1}")(x)
        if i in (1, 2) and not two_d or i == 2 and two_d:
            x = pool(2, name=f"pool_{i + 1}")(x)
        if exits and i < 3:
            outs.append(
                kee.ExitBranch(NUM[name], pooled_size=2, name=f"exit_{i + 1}")(x)
            )
    return x, outs


NUM = {"digits": 10, "signals": 6}


def early_exit_model(name: str, shape) -> kee.EarlyExitModel:
    inputs = keras.Input(shape)
    x, outs = backbone(name, inputs)
    final = kee.ExitBranch(NUM[name], hidden_units=64, pooled_size=2, name="final")(x)
    return kee.EarlyExitModel(inputs, [*outs, final], name=f"{name}_4exit")


def static_model(name: str, shape, scale: float) -> keras.Model:
    inputs = keras.Input(shape)
    x, _ = backbone(name, inputs, scale, exits=False)
    hidden = max(2, int(round(64 * scale)))
    logits = kee.ExitBranch(NUM[name], hidden_units=hidden, pooled_size=2)(x)
    return keras.Model(inputs, logits, name=f"{name}_static")


def matched_static(name: str, shape, target_macs: float):
    """The width scale whose static CNN has the closest MACs to the target."""
    lo, hi = 0.02, 1.5
    for _ in range(30):
        mid = (lo + hi) / 2
        macs = kee.count_macs(static_model(name, shape, mid)).total_macs
        lo, hi = (mid, hi) if macs < target_macs else (lo, mid)
    scales = sorted({lo, hi})
    models = [static_model(name, shape, s) for s in scales]
    macs = [kee.count_macs(m).total_macs for m in models]
    i = int(np.argmin([abs(m - target_macs) for m in macs]))
    return models[i], macs[i]


def fit(model, data: demo.Splits, epochs: int, early_exit: bool):
    loss = (
        kee.EarlyExitLoss()
        if early_exit
        else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    model.compile(keras.optimizers.Adam(3e-3), loss)
    model.fit(data.x_train, data.y_train, epochs=epochs, batch_size=64, verbose=0)
    return model


def shared_threshold(model, data: demo.Splits) -> float:
    """The naive choice: one threshold for all exits, the cheapest on the
    validation split within 1 point of the final exit there."""
    report = kee.profile(model, data.x_val, data.y_val)
    target = report.accuracy[-1] - MAX_DROP
    ok = [p for p in report.sweep if p.accuracy >= target - 1e-12]
    return min(ok, key=lambda p: p.average_macs).thresholds[0]


def measure(model, data: demo.Splits, thresholds, cumulative) -> dict:
    """Real gated inference on the test split."""
    result = model.predict_early(data.x_test, thresholds)
    macs = float(np.asarray(cumulative)[result.exit_indices].mean())
    shares = np.bincount(result.exit_indices, minlength=model.num_exits) / len(
        data.y_test
    )
    return {
        "thresholds": [round(float(t), 4) for t in thresholds],
        "accuracy": float(np.mean(result.classes == data.y_test)),
        "average_macs": macs,
        "exit_shares": [round(float(s), 4) for s in shares],
    }


def run(name: str) -> dict:
    keras.utils.set_random_seed(SEED)
    data = load(name)
    shape = data.x_train.shape[1:]
    start = time.time()
    model = fit(early_exit_model(name, shape), data, EPOCHS[name], True)
    macs = kee.count_macs(model)
    full = macs.total_macs
    test = kee.profile(model, data.x_test, data.y_test)
    final_acc = test.accuracy[-1]

    calibrated = kee.calibrate(
        model, data.x_val, data.y_val, max_accuracy_drop=MAX_DROP
    )
    model.set_thresholds(calibrated.thresholds)
    ours = measure(model, data, calibrated.thresholds, macs.cumulative_macs)
    shared = measure(
        model, data, [shared_threshold(model, data)] * 3, macs.cumulative_macs
    )
    static, static_macs = matched_static(name, shape, ours["average_macs"])
    fit(static, data, EPOCHS[name], False)
    static_acc = float(
        np.mean(np.argmax(static.predict(data.x_test, verbose=0), 1) == data.y_test)
    )
    png = os.path.join(RESULTS, f"exit_savings_{name}.png")
    test.plot(png, title=f"{name}: accuracy vs MACs on the test split")
    if name == "signals":
        model.save(os.path.join(RESULTS, "signals_calibrated.keras"))
        np.savez(
            os.path.join(RESULTS, "signals_test.npz"), x=data.x_test, y=data.y_test
        )
    for entry in (ours, shared):
        entry["drop_points"] = round(100 * (final_acc - entry["accuracy"]), 2)
        entry["speedup"] = round(full / entry["average_macs"], 2)
    return {
        "dataset": name,
        "samples": {
            "train": len(data.y_train),
            "val": len(data.y_val),
            "test": len(data.y_test),
        },
        "epochs": EPOCHS[name],
        "full_macs": full,
        "cumulative_macs": macs.cumulative_macs,
        "exit_accuracy_test": [round(a, 4) for a in test.accuracy],
        "final_accuracy_test": final_acc,
        "calibrated": ours,
        "calibrated_expected_val": {
            "accuracy": calibrated.expected_accuracy,
            "average_macs": calibrated.expected_macs,
            "drop_bound": calibrated.bound,
        },
        "shared_threshold": shared,
        "oracle_test": {
            "accuracy": test.oracle_accuracy,
            "average_macs": test.oracle_macs,
            "speedup": round(full / test.oracle_macs, 2),
            "calibrated_over_oracle_macs": round(
                ours["average_macs"] / test.oracle_macs, 2
            ),
        },
        "static_same_macs": {
            "macs": static_macs,
            "accuracy": static_acc,
            "drop_points": round(100 * (final_acc - static_acc), 2),
        },
        "png": os.path.relpath(png, os.path.dirname(RESULTS)),
        "seconds": round(time.time() - start, 1),
    }


def markdown(results: list[dict]) -> str:
    lines = [
        f"Backend `{keras.backend.backend()}`, seed {SEED}. Thresholds chosen on the "
        "validation split only; test figures from `predict_early` on the test "
        "split. Drop = final-exit test accuracy minus gated test accuracy.",
        "",
        "| data set | method | test accuracy | drop (pt) | avg MACs | speed-up | "
        "exit shares |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        full, fa = r["full_macs"], r["final_accuracy_test"]
        rows = [
            ("final exit only", fa, 0.0, full, 1.0, ""),
            (
                "calibrate(max_accuracy_drop=0.01)",
                r["calibrated"]["accuracy"],
                r["calibrated"]["drop_points"],
                r["calibrated"]["average_macs"],
                r["calibrated"]["speedup"],
                r["calibrated"]["exit_shares"],
            ),
            (
                "(a) one shared threshold",
                r["shared_threshold"]["accuracy"],
                r["shared_threshold"]["drop_points"],
                r["shared_threshold"]["average_macs"],
                r["shared_threshold"]["speedup"],
                r["shared_threshold"]["exit_shares"],
            ),
            (
                "(b) oracle",
                r["oracle_test"]["accuracy"],
                round(100 * (fa - r["oracle_test"]["accuracy"]), 2),
                r["oracle_test"]["average_macs"],
                r["oracle_test"]["speedup"],
                "",
            ),
            (
                "(c) static CNN, same MACs",
                r["static_same_macs"]["accuracy"],
                r["static_same_macs"]["drop_points"],
                r["static_same_macs"]["macs"],
                round(full / r["static_same_macs"]["macs"], 2),
                "",
            ),
        ]
        for method, acc, drop, macs, speed, shares in rows:
            lines.append(
                f"| {r['dataset']} | {method} | {acc:.4f} | {drop:+.2f} | "
                f"{macs:,.0f} | {speed:.2f}x | {shares} |"
            )
        lines.append("")
    for r in results:
        lines.append(
            f"- {r['dataset']}: calibrated MACs = "
            f"{r['oracle_test']['calibrated_over_oracle_macs']}x the oracle's; "
            f"PNG `{r['png']}`."
        )
    return "\n".join(lines) + "\n"


def main(names=("digits", "signals")) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "exit_savings.json")
    previous = {}
    if os.path.exists(path):  # keep the other data set's figures
        with open(path) as f:
            previous = {r["dataset"]: r for r in json.load(f)["results"]}
    for name in names:
        previous[name] = run(name)
    results = [previous[n] for n in ("digits", "signals") if n in previous]
    with open(path, "w") as f:
        json.dump({"backend": keras.backend.backend(), "results": results}, f, indent=2)
    text = markdown(results)
    with open(os.path.join(RESULTS, "exit_savings.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main(tuple(sys.argv[1:]) or ("digits", "signals"))
