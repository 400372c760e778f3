"""Wall time of gated inference (`predict_early`) against full `predict`.

Loads the calibrated 4-exit signal model and its test split written by
`exit_savings.py`, then, in one subprocess per backend (TensorFlow, JAX,
PyTorch), times `model.predict` (every segment, every exit) and
`model.predict_early` (segments run one after another; samples that exit
are not computed further) at the model's calibrated thresholds. Each figure
is the best of several repeats after a warm-up run; batch size 256.

Run: `python benchmarks/predict_early_speed.py` (all backends) or
`KERAS_BACKEND=jax python benchmarks/predict_early_speed.py --one`.
Writes `benchmarks/results/predict_early_speed.{md,json}`.
"""

import json
import os
import subprocess
import sys
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MODEL = os.path.join(RESULTS, "signals_calibrated.keras")
DATA = os.path.join(RESULTS, "signals_test.npz")
BACKENDS = ("tensorflow", "jax", "torch")
REPEATS = 5
BATCH_SIZE = 256


def best_time(fn) -> float:
    fn()  # warm-up: tracing / compilation
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def one_backend() -> dict:
    import keras
    import numpy as np

    import keras_earlyexit as kee

    model = keras.saving.load_model(MODEL)
    with np.load(DATA) as data:
        x, y = data["x"], data["y"]
    full = best_time(lambda: model.predict(x, batch_size=BATCH_SIZE, verbose=0))
    early = best_time(lambda: model.predict_early(x, batch_size=BATCH_SIZE))
    result = model.predict_early(x, batch_size=BATCH_SIZE)
    macs = kee.count_macs(model)
    shares = result.exit_counts(model.num_exits) / len(x)
    average = float(np.asarray(macs.cumulative_macs)[result.exit_indices].mean())
    return {
        "backend": keras.backend.backend(),
        "samples": len(x),
        "thresholds": [round(t, 4) for t in model.thresholds],
        "predict_s": round(full, 4),
        "predict_early_s": round(early, 4),
        "speedup": round(full / early, 2),
        "mac_speedup": round(macs.total_macs / average, 2),
        "exit_shares": [round(float(s), 4) for s in shares],
        "accuracy": float(np.mean(result.classes == y)),
    }


def main() -> None:
    if "--one" in sys.argv:
        print(json.dumps(one_backend()))
        return
    if not os.path.exists(MODEL):
        sys.exit(f"{MODEL} not found: run benchmarks/exit_savings.py first.")
    rows = []
    for backend in BACKENDS:
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--one"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1])
    with open(os.path.join(RESULTS, "predict_early_speed.json"), "w") as f:
        json.dump(rows, f, indent=2)
    lines = [
        f"{rows[0]['samples']} test samples of the calibrated 4-exit signal CNN, "
        f"batch size {BATCH_SIZE}, best of {REPEATS} after a warm-up; CPU "
        f"({os.cpu_count()} cores).",
        "",
        "| backend | predict (s) | predict_early (s) | wall-time speed-up | "
        "MAC speed-up | exit shares | accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['backend']} | {r['predict_s']:.3f} | {r['predict_early_s']:.3f} | "
            f"{r['speedup']:.2f}x | {r['mac_speedup']:.2f}x | {r['exit_shares']} | "
            f"{r['accuracy']:.4f} |"
        )
    text = "\n".join(lines) + "\n"
    with open(os.path.join(RESULTS, "predict_early_speed.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
