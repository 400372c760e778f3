"""Average-MAC savings of calibrated early exits at <= 1 point test drop.

On scikit-learn digits and on a generated 1-D event task, a 4-exit CNN is
trained with `EarlyExitLoss`. Thresholds are chosen on the validation split
only and measured with real gated inference (`predict_early`) on the test
split, side by side with:

(a) one shared threshold chosen on validation for <= 1 point drop,
(b) the oracle (each test sample leaves at its first correct exit; it knows
    the label, so it is a loose lower bound on MACs),
(c) a static CNN of the same family with the calibrated network's average
    MACs, trained the same way. For the events, two are trained: the
    backbone truncated after 4 conv layers (width scaled to the MACs) and
    the full-depth backbone made narrower; the table shows the better one.

Events: each signal (256 steps, drift and noise) holds two short motifs out
of four shapes; the class is the ordered pair (first, second): 12 classes.
In 75% of the samples the motifs are 6-10 steps apart, a local pattern that
the first exits see; in 10% they are 20-48 steps apart and in 15% 64-160
steps apart, where only the last conv layers' receptive field (204 steps)
covers both. Exits pool globally, so no exit can read the order from
coarse position.

Run: `KERAS_BACKEND=jax python benchmarks/exit_savings.py` (about 8 minutes
on 2 cores; `... exit_savings.py signals` runs one data set)
Writes `benchmarks/results/exit_savings.{md,json}` and one PNG per data set,
and saves the calibrated signal model and its test data for
`predict_early_speed.py`.
"""

import os
import sys
import time

import keras
import numpy as np

import keras_earlyexit as kee
from keras_earlyexit import demo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _results  # noqa: E402  (results files)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
EPOCHS = {"digits": 40, "signals": 15}
MAX_DROP = 0.01
SEED = 0


MOTIF_LEN = 7
TIERS = {  # share of samples, range of the distance between the two motifs
    "easy": (0.75, 6, 10),
    "medium": (0.1, 20, 48),
    "hard": (0.15, 64, 160),
}


def motifs() -> np.ndarray:
    """Four 7-step shapes: positive bump, negative bump, fast oscillation,
    doublet."""
    t = np.arange(MOTIF_LEN) - MOTIF_LEN // 2
    g = np.exp(-0.5 * (t / 1.5) ** 2)
    return np.stack([g, -g, 1.6 * np.sin(np.pi * t / 2) * g, -t / 1.5 * 1.4 * g])


def make_signals(n: int, length: int = 256, seed: int = 0):
    """Two motifs at random places; the class is their ordered pair. Returns
    signals `(n, length, 1)`, labels and the difficulty tier (0, 1, 2)."""
    rng = np.random.default_rng(seed)
    shapes = motifs()
    pairs = [(a, b) for a in range(4) for b in range(4) if a != b]
    y = rng.integers(0, len(pairs), n)
    shares, lo, hi = (np.array(v) for v in zip(*TIERS.values()))
    tier = np.searchsorted(np.cumsum(shares), rng.uniform(size=n), side="right")
    gap = rng.integers(lo[tier], hi[tier] + 1)
    start = rng.integers(0, length - gap - MOTIF_LEN + 1)
    amp = rng.uniform(0.8, 1.3, (n, 2))
    x = np.zeros((n, length))
    for i, (a, b) in enumerate(np.asarray(pairs)[y]):
        j = start[i] + gap[i]
        x[i, start[i] : start[i] + MOTIF_LEN] += amp[i, 0] * shapes[a]
        x[i, j : j + MOTIF_LEN] += amp[i, 1] * shapes[b]
    t = np.linspace(0.0, 1.0, length)
    cycles = rng.uniform(0.2, 2.0, (n, 1)) * t + rng.uniform(0, 1, (n, 1))
    drift = rng.uniform(0.0, 0.5, (n, 1)) * np.sin(2 * np.pi * cycles)
    noise = rng.uniform(0.05, 0.3, (n, 1)) * rng.standard_normal((n, length))
    x = x + drift + noise
    return x[..., None].astype("float32"), y.astype("int64"), tier


SPLIT = (8000, 4000, 4000)  # train, val, test


def load(name: str) -> demo.Splits:
    if name == "digits":
        return demo.load_digits(seed=SEED)
    x, y, _ = make_signals(sum(SPLIT), seed=SEED)
    a, b = SPLIT[0], SPLIT[0] + SPLIT[1]
    return demo.Splits(x[:a], y[:a], x[a:b], y[a:b], x[b:], y[b:])


def test_tiers() -> np.ndarray:
    return make_signals(sum(SPLIT), seed=SEED)[2][SPLIT[0] + SPLIT[1] :]


def backbone(name: str, inputs, scale: float = 1.0, exits: bool = True):
    """Digits: five conv layers of growing width; exits after 1, 2 and 3."""
    if name == "signals":
        return signal_backbone(inputs, scale, exits=exits)
    widths = [max(1, int(round(w * scale))) for w in (8, 16, 32, 64, 64)]
    outs = []
    x = inputs
    for i, w in enumerate(widths):
        x = keras.layers.Conv2D(
            w, 3, padding="same", activation="relu", name=f"conv_{i + 1}"
        )(x)
        if i == 2:
            x = keras.layers.MaxPooling2D(2, name=f"pool_{i + 1}")(x)
        if exits and i < 3:
            outs.append(
                kee.ExitBranch(NUM[name], pooled_size=2, name=f"exit_{i + 1}")(x)
            )
    return x, outs


SIGNAL_WIDTHS = (8, 16, 32, 64, 128, 128)


def signal_backbone(inputs, scale: float = 1.0, depth: int = 6, exits: bool = True):
    """Six conv layers (kernel 5), halving the length after each of the first
    five but the last; exits (global max pooling, one hidden layer) after
    conv 2, 3 and 4. Receptive fields: 14, 32, 68, 140, 204 steps."""
    widths = [max(1, int(round(w * scale))) for w in SIGNAL_WIDTHS[:depth]]
    outs = []
    x = inputs
    for i, w in enumerate(widths):
        x = keras.layers.Conv1D(
            w, 5, padding="same", activation="relu", name=f"conv_{i + 1}"
        )(x)
        if exits and i in (1, 2, 3):
            outs.append(signal_head(name=f"exit_{i}", hidden=32)(x))
        if i < min(4, depth - 1):
            x = keras.layers.MaxPooling1D(2, name=f"pool_{i + 1}")(x)
    return x, outs


def signal_head(hidden: int, name: str | None = None):
    return kee.ExitBranch(NUM["signals"], hidden_units=hidden, pooling="max", name=name)


NUM = {"digits": 10, "signals": 12}


def early_exit_model(name: str, shape) -> kee.EarlyExitModel:
    inputs = keras.Input(shape)
    x, outs = backbone(name, inputs)
    if name == "signals":
        final = signal_head(hidden=64, name="final")(x)
    else:
        final = kee.ExitBranch(NUM[name], hidden_units=64, pooled_size=2, name="final")(
            x
        )
    return kee.EarlyExitModel(inputs, [*outs, final], name=f"{name}_4exit")


def static_model(name: str, shape, scale: float, depth: int = 6) -> keras.Model:
    inputs = keras.Input(shape)
    hidden = max(2, int(round(64 * scale)))
    if name == "signals":
        x, _ = signal_backbone(inputs, scale, depth, exits=False)
        logits = signal_head(hidden)(x)
    else:
        x, _ = backbone(name, inputs, scale, exits=False)
        logits = kee.ExitBranch(NUM[name], hidden_units=hidden, pooled_size=2)(x)
    return keras.Model(inputs, logits, name=f"{name}_static")


def matched_static(name: str, shape, target_macs: float, depth: int = 6):
    """The width scale whose static CNN (of this depth) has the closest MACs
    to the target."""
    lo, hi = 0.02, 4.0
    for _ in range(30):
        mid = (lo + hi) / 2
        macs = kee.count_macs(static_model(name, shape, mid, depth)).total_macs
        lo, hi = (mid, hi) if macs < target_macs else (lo, mid)
    scales = sorted({lo, hi})
    models = [static_model(name, shape, s, depth) for s in scales]
    macs = [kee.count_macs(m).total_macs for m in models]
    i = int(np.argmin([abs(m - target_macs) for m in macs]))
    return models[i], macs[i], scales[i]


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
    statics = []
    for depth in (4, 6) if name == "signals" else (6,):
        static, static_macs, scale = matched_static(
            name, shape, ours["average_macs"], depth
        )
        fit(static, data, EPOCHS[name], False)
        correct = np.argmax(static.predict(data.x_test, verbose=0), 1) == data.y_test
        statics.append(
            {
                "design": "truncated backbone" if depth < 6 else "full depth",
                "conv_layers": depth,
                "width_scale": round(scale, 3),
                "macs": static_macs,
                "accuracy": float(correct.mean()),
                "drop_points": round(100 * (final_acc - correct.mean()), 2),
                "correct": correct,
            }
        )
    best = max(statics, key=lambda r: r["accuracy"])
    png = os.path.join(RESULTS, f"exit_savings_{name}.png")
    test.plot(png, title=f"{name}: accuracy vs MACs on the test split")
    if name == "signals":
        model.save(os.path.join(RESULTS, "signals_calibrated.keras"))
        np.savez(
            os.path.join(RESULTS, "signals_test.npz"), x=data.x_test, y=data.y_test
        )
    if name == "signals":  # accuracy per difficulty tier on the test split
        tiers = test_tiers()
        logits = model.predict(data.x_test, verbose=0)
        gated = model.predict_early(data.x_test, calibrated.thresholds)
        rows = {
            f"exit_{k + 1}": np.argmax(z, 1) == data.y_test
            for k, z in enumerate(logits)
        }
        rows["calibrated"] = gated.classes == data.y_test
        rows["static"] = best["correct"]
        tier_acc = {
            key: {
                tier: round(float(ok[tiers == t].mean()), 4)
                for t, tier in enumerate(TIERS)
            }
            for key, ok in rows.items()
        }
        tier_acc["calibrated_exit_shares"] = {
            tier: [
                round(float(s), 3)
                for s in np.bincount(gated.exit_indices[tiers == t], minlength=4)
                / max(1, np.sum(tiers == t))
            ]
            for t, tier in enumerate(TIERS)
        }
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
        "static_same_macs": {k: v for k, v in best.items() if k != "correct"},
        "static_candidates": [
            {k: v for k, v in r.items() if k != "correct"} for r in statics
        ],
        **({"tier_accuracy_test": tier_acc} if name == "signals" else {}),
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
        ]
        best = r["static_same_macs"]
        for c in r.get("static_candidates", [best]):
            label = "(c) static CNN, same MACs" if c == best else "static CNN, other"
            if "design" in c:
                label += f" ({c['design']}, {c['conv_layers']} conv, width x"
                label += f"{c['width_scale']})"
            rows.append(
                (
                    label,
                    c["accuracy"],
                    c["drop_points"],
                    c["macs"],
                    round(full / c["macs"], 2),
                    "",
                )
            )
        for method, acc, drop, macs, speed, shares in rows:
            lines.append(
                f"| {r['dataset']} | {method} | {acc:.4f} | {drop:+.2f} | "
                f"{macs:,.0f} | {speed:.2f}x | {shares} |"
            )
        lines.append("")
    for r in results:
        lines.append(
            f"- {r['dataset']}: test accuracy per exit "
            f"{r['exit_accuracy_test']} at {r['cumulative_macs']} MACs; "
            f"calibrated MACs = {r['oracle_test']['calibrated_over_oracle_macs']}"
            "x the oracle's (the oracle knows the label: a loose bound); "
            f"PNG `{r['png']}`."
        )
    for r in results:
        if "tier_accuracy_test" not in r:
            continue
        tiers = r["tier_accuracy_test"]
        shares = tiers.pop("calibrated_exit_shares")
        names = list(TIERS)
        lines += [
            "",
            f"{r['dataset']}: test accuracy per difficulty tier (motif distance "
            + ", ".join(
                f"{t} {lo}-{hi} steps, {p:.0%}" for t, (p, lo, hi) in TIERS.items()
            )
            + ").",
            "",
            "| model | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        lines += [
            f"| {key} | " + " | ".join(f"{acc[t]:.4f}" for t in names) + " |"
            for key, acc in tiers.items()
        ]
        lines.append(
            "| calibrated exit shares | "
            + " | ".join(str(shares[t]) for t in names)
            + " |"
        )
        tiers["calibrated_exit_shares"] = shares
    return "\n".join(lines) + "\n"


def main(names=("digits", "signals")) -> None:
    _results.write_merged(
        "exit_savings", run, markdown, RESULTS, names, ("digits", "signals"), "dataset"
    )


if __name__ == "__main__":
    main(tuple(sys.argv[1:]) or ("digits", "signals"))
