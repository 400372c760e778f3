"""Training step time: EarlyExitModel + EarlyExitLoss against the same
backbone with only its final classifier and plain cross-entropy.

Each backend runs in its own process; within it the two models train in
alternating rounds on the same data and the ratio of median step times is
reported (this machine is noisy: only ratios measured side by side count).

    .venv/bin/python benchmarks/train_step.py [--rounds 7]

Writes benchmarks/results/train_step.{json,md}.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
BACKENDS = ("tensorflow", "jax", "torch")


def measure(rounds: int, batch_size: int) -> dict:
    import keras
    import numpy as np

    import keras_earlyexit as kee
    from keras_earlyexit import demo

    data = demo.load_digits()
    x, y = data.x_train, data.y_train
    keras.utils.set_random_seed(0)
    early_exit = demo.digits_cnn()
    early_exit.compile(keras.optimizers.Adam(1e-3), kee.EarlyExitLoss("linear"))
    keras.utils.set_random_seed(0)
    # The same backbone and final head, alone: a fresh copy of the graph.
    reference = demo.digits_cnn()
    plain = keras.Model(reference.inputs, reference.outputs[-1])
    plain.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    steps = int(np.ceil(len(x) / batch_size))
    times = {"early_exit": [], "plain": []}
    for model in (early_exit, plain):  # compile and warm up
        model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0)
    for _ in range(rounds):
        for name, model in (("early_exit", early_exit), ("plain", plain)):
            start = time.perf_counter()
            model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0)
            times[name].append((time.perf_counter() - start) / steps)
    median = {k: float(np.median(v)) for k, v in times.items()}
    return {
        "backend": keras.backend.backend(),
        "batch_size": batch_size,
        "steps_per_round": steps,
        "rounds": rounds,
        "early_exit_ms": 1e3 * median["early_exit"],
        "plain_ms": 1e3 * median["plain"],
        "ratio": median["early_exit"] / median["plain"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.rounds, args.batch_size)))
        return
    rows = []
    for backend in BACKENDS:
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--worker",
                backend,
                "--rounds",
                str(args.rounds),
                "--batch-size",
                str(args.batch_size),
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{backend:>10}: early-exit {row['early_exit_ms']:.2f} ms/step, "
            f"plain {row['plain_ms']:.2f} ms/step, ratio {row['ratio']:.2f}x"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_step.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "| backend | early-exit ms/step | final-only ms/step | ratio |",
        "|---|---|---|---|",
    ] + [
        f"| {r['backend']} | {r['early_exit_ms']:.2f} | {r['plain_ms']:.2f} "
        f"| {r['ratio']:.2f}x |"
        for r in rows
    ]
    (RESULTS / "train_step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
