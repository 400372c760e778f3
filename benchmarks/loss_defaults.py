"""Which EarlyExitLoss settings train the best exits on digits.

Trains the demo 3-exit CNN with several weight schemes and options, over a
few seeds and data splits, and reports each exit's test accuracy. The
defaults of `EarlyExitLoss` are chosen from this table.

    KERAS_BACKEND=tensorflow .venv/bin/python benchmarks/loss_defaults.py

Writes benchmarks/results/loss_defaults.{json,md}.
"""

import argparse
import json
from pathlib import Path

import keras
import numpy as np

import keras_earlyexit as kee
from keras_earlyexit import demo

RESULTS = Path(__file__).parent / "results"
CONFIGS = {
    "uniform": {},
    "linear": {"weights": "linear"},
    "sqrt": {"weights": "sqrt"},
    "geometric": {"weights": "geometric"},
    "inverse": {"weights": "inverse"},
    "uniform + distillation 0.5": {"distillation_weight": 0.5},
    "uniform + label smoothing 0.1": {"label_smoothing": 0.1},
    "uniform + entropy penalty 0.1": {"entropy_penalty": 0.1},
}


def train(options: dict, seed: int, epochs: int) -> list[float]:
    data = demo.load_digits(seed=seed)
    keras.utils.set_random_seed(seed)
    model = demo.digits_cnn()
    model.compile(
        keras.optimizers.Adam(3e-3), kee.EarlyExitLoss(**options), metrics=["accuracy"]
    )
    model.fit(data.x_train, data.y_train, epochs=epochs, batch_size=32, verbose=0)
    result = model.evaluate(data.x_test, data.y_test, verbose=0, return_dict=True)
    return [result[f"{name}_accuracy"] for name in model.exit_names]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    rows = []
    for label, options in CONFIGS.items():
        runs = np.array([train(options, s, args.epochs) for s in range(args.seeds)])
        mean = runs.mean(axis=0)
        rows.append(
            {
                "config": label,
                "options": options,
                "accuracy": mean.tolist(),
                "mean_over_exits": float(mean.mean()),
            }
        )
        print(
            f"{label:>32}: "
            + " ".join(f"{a:.4f}" for a in mean)
            + f"  mean {mean.mean():.4f}",
            flush=True,
        )
    RESULTS.mkdir(exist_ok=True)
    meta = {
        "backend": keras.backend.backend(),
        "seeds": args.seeds,
        "epochs": args.epochs,
        "rows": rows,
    }
    (RESULTS / "loss_defaults.json").write_text(json.dumps(meta, indent=2) + "\n")
    lines = [
        f"Digits test accuracy per exit, mean of {args.seeds} seeds/splits, "
        f"{args.epochs} epochs, backend {keras.backend.backend()}.",
        "",
        "| loss | exit_1 | exit_2 | final | mean |",
        "|---|---|---|---|---|",
    ] + [
        f"| {r['config']} | "
        + " | ".join(f"{a:.4f}" for a in r["accuracy"])
        + f" | {r['mean_over_exits']:.4f} |"
        for r in rows
    ]
    (RESULTS / "loss_defaults.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
