"""MAC savings and kept promises of calibrate's guarantees, side by side.

The 4-exit digits and signals CNNs of `exit_savings.py` (same data, seed and
training) are calibrated on the validation split for a drop of at most 1
point against the final exit, and measured on the test split:

- `approximate`: today's `calibrate(max_accuracy_drop=0.01)` (the guard: a
  normal-approximation upper bound on the data the search also used);
- `high_probability`: `guarantee="high_probability"`: one shared threshold
  along a fixed path, betting p-values and fixed-sequence testing on all
  the validation data (a finite-sample promise at delta = 0.1);
- `expectation`: `guarantee="expectation"`: the same path, conformal risk
  control (E[drop] <= 1 point);
- `..., per exit`: `per_exit=True`: per-exit thresholds, the path ordered
  on half of the validation data and certified on the other half;

plus one shared threshold under the same guarantee (the approximate one:
the best shared threshold of calibrate's search) and the oracle (each
sample leaves at its first correct exit).

Kept promise: the population is the validation and test splits together
(their every exit's outputs); calibration sets of `DRAW` samples are drawn
from it with replacement `REPEATS` times, each calibrated, and its drop
measured on the whole population (its true drop). Failure rate: the share
of draws whose true drop exceeds 1 point (a high-probability promise
allows delta = 10%); for the expectation promise the mean drop counts.

Run: `KERAS_BACKEND=jax python benchmarks/guarantees.py` (trains both
models, or reuses `results/guarantees_{digits,signals}.keras`; about 20
minutes on 2 cores). Writes `benchmarks/results/guarantees.{md,json}`.
"""

import os
import sys
import time

import keras
import numpy as np

import keras_earlyexit as kee
from keras_earlyexit.evaluation import _data
from keras_earlyexit.evaluation.calibrate import calibrate_outputs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _promise  # noqa: E402  (figures, promise summary)
import _results  # noqa: E402  (results files)
import exit_savings  # noqa: E402  (same models, data and training)

RESULTS = exit_savings.RESULTS
MAX_DROP = 0.01
DELTA = 0.1
# Method -> calibrate arguments.
METHODS = {
    "approximate": {},
    "high_probability": {"guarantee": "high_probability"},
    "expectation": {"guarantee": "expectation"},
    "high_probability, per exit": {"guarantee": "high_probability", "per_exit": True},
    "expectation, per exit": {"guarantee": "expectation", "per_exit": True},
}
REPEATS = 40
DRAW = {"digits": 720, "signals": 2000}


def trained(name: str, data) -> kee.EarlyExitModel:
    path = os.path.join(RESULTS, f"guarantees_{name}.keras")
    if os.path.exists(path):
        return keras.saving.load_model(path)
    keras.utils.set_random_seed(exit_savings.SEED)
    model = exit_savings.early_exit_model(name, data.x_train.shape[1:])
    exit_savings.fit(model, data, exit_savings.EPOCHS[name], True)
    model.save(path)
    return model


def promise(population, arguments: dict, draw: int) -> dict:
    """Repeated calibrations on draws from the population; true drops and
    MACs measured on the whole population."""
    rng = np.random.default_rng(1)
    final = float(population.correct[:, -1].mean())
    full = float(population.cumulative_macs[-1])
    drops, speedups, errors = [], [], 0
    for _ in range(REPEATS):
        rows = rng.integers(0, len(population.labels), draw)
        try:
            result = calibrate_outputs(
                population.subset(rows),
                "max_accuracy_drop",
                MAX_DROP,
                delta=DELTA,
                **arguments,
            )
        except ValueError:
            errors += 1  # nothing certified: no early exit, no broken promise
            drops.append(0.0)
            speedups.append(1.0)
            continue
        accuracy, macs, _, _ = population.simulate(result.thresholds)
        drops.append(final - accuracy)
        speedups.append(full / macs)
    return {
        **_promise.summary(drops, speedups, draw, MAX_DROP),
        "nothing_certified": errors,
    }


def run(name: str) -> dict:
    start = time.time()
    data = exit_savings.load(name)
    model = trained(name, data)
    val = _data.exit_outputs(model, data.x_val, data.y_val)
    test = _data.exit_outputs(model, data.x_test, data.y_test)
    full = float(test.cumulative_macs[-1])
    methods = {}
    for method, arguments in METHODS.items():
        try:
            result = calibrate_outputs(
                val, "max_accuracy_drop", MAX_DROP, delta=DELTA, **arguments
            )
        except ValueError as e:  # nothing certified: no sample leaves early
            methods[method] = {
                "per_exit": _promise.figures(test, [1.0] * (test.num_exits - 1)),
                "bound": None,
                "error": str(e),
            }
            continue
        entry = {
            "per_exit": _promise.figures(test, result.thresholds),
            "bound": round(result.bound, 4),
        }
        if result.shared_threshold is not None:
            shared = [result.shared_threshold] * (test.num_exits - 1)
            entry["shared"] = _promise.figures(test, shared)
        methods[method] = entry
    today = methods["approximate"]["per_exit"]["speedup"]
    for entry in methods.values():
        entry["vs_today"] = round(entry["per_exit"]["speedup"] / today, 3)
    population = _promise.concat(val, test)
    for method, arguments in METHODS.items():
        methods[method]["promise"] = promise(population, arguments, DRAW[name])
    return {
        "dataset": name,
        "samples": {"val": len(val.labels), "test": len(test.labels)},
        "full_macs": full,
        "final_accuracy_test": float(test.correct[:, -1].mean()),
        "oracle_test": _promise.oracle(test),
        "methods": methods,
        "seconds": round(time.time() - start, 1),
    }


def markdown(results: list[dict]) -> str:
    lines = [
        f"Backend `{keras.backend.backend()}`. Target: accuracy drop <= "
        f"{MAX_DROP * 100:.0f} point against the final exit, delta = {DELTA}. "
        "Thresholds from the validation split, figures on the test split "
        "(simulated gated inference, equal to `predict_early`). Promise: "
        f"{REPEATS} calibrations on draws (with replacement) from validation + "
        "test, true drop on all of it.",
        "",
        "| data set | guarantee | thresholds | test drop (pt) | speed-up | "
        "vs today | shared threshold: drop, speed-up | failures | mean drop "
        "(pt) | mean speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for method, e in r["methods"].items():
            p, shared = e["per_exit"], e.get("shared")
            shared_text = (
                f"{shared['drop_points']:+.2f}, {shared['speedup']:.2f}x"
                if shared
                else "-"
            )
            lines.append(
                f"| {r['dataset']} | {method} | {p['thresholds']} | "
                f"{p['drop_points']:+.2f} | {p['speedup']:.2f}x | "
                f"{e['vs_today']:.2f} | {shared_text} | "
                f"{_promise.cells(e['promise'])} |"
            )
        lines.append(
            f"| {r['dataset']} | oracle | | | {r['oracle_test']['speedup']:.2f}x "
            "| | | | | |"
        )
    return "\n".join(lines) + "\n"


def main(names=("digits", "signals")) -> None:
    _results.write_merged(
        "guarantees", run, markdown, RESULTS, names, ("digits", "signals"), "dataset"
    )


if __name__ == "__main__":
    main(tuple(sys.argv[1:]) or ("digits", "signals"))
