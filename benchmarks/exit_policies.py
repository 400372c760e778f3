"""Learned exit policies against max_prob calibration at <= 1 point.

The 4-exit digits and signals CNNs of `exit_savings.py` (same data, seed and
training; the trained models are shared with `guarantees.py`) are measured
on the test split at a target drop of at most 1 point against the final
exit, thresholds chosen on the validation split only:

- `max_prob (today)`: `kee.calibrate(model, x_val, y_val,
  max_accuracy_drop=0.01)` on the max_prob gates, all validation samples;
- `one shared threshold`: the best single threshold of the same search;
- `max_prob, calibration half`: the same on the second half of the
  validation split only (what the learned policies calibrate on);
- `learned (correct)` / `learned (agrees_with_final)`: the same model with
  `criterion="learned"` gates, `kee.fit_exit_policy(..., target=...,
  validation_split=0.5)` on the first half of the validation split, then
  `kee.calibrate` on the second half, measured with `predict_early`. Exits
  that fail the fit's sample rule keep the starting policy (monotone in the
  top-1 probability: max_prob);
- `oracle`: each test sample leaves at its first correct exit (it knows the
  label: a loose bound);
- `ceiling`: a learned policy fitted and thresholded on the test split
  itself for a drop of at most 1 point there, without the guard (no
  promise: about the most a policy over these features could save on that
  split), and max_prob thresholded there likewise.

Gap to the oracle closed: (MACs of today - MACs of the method) / (MACs of
today - MACs of the oracle).

Kept promise: the population is the validation and test splits together.
`REPEATS` times, a calibration set of the validation split's size is drawn
from it at random (without replacement); max_prob is calibrated on all of
it, a learned policy fitted on its first half and calibrated on the second;
the drop is measured on the samples not drawn (new data). Failure: a drop
above 1 point there.

Run: `KERAS_BACKEND=jax python benchmarks/exit_policies.py` (about 6
minutes on 2 cores with the trained models of `guarantees.py` in
`results/`, a few more without). Writes
`benchmarks/results/exit_policies.{md,json}`.
"""

import json
import os
import sys
import time
import warnings

import keras
import numpy as np

import keras_earlyexit as kee
from keras_earlyexit.evaluation import _data
from keras_earlyexit.evaluation.calibrate import calibrate_outputs
from keras_earlyexit.evaluation.policy import (
    MIN_PER_LABEL,
    MIN_SAMPLES,
    fit_exit_policy,
    logistic_regression,
    policy_features,
)
from keras_earlyexit.gate import INITIAL_POLICY_BIAS, INITIAL_POLICY_WEIGHTS

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import exit_savings  # noqa: E402  (data, models and training)
import guarantees  # noqa: E402  (the trained models, cached)

RESULTS = exit_savings.RESULTS
MAX_DROP = 0.01
TARGETS = ("correct", "agrees_with_final")
REPEATS = 20


def _labels(outputs, target: str) -> np.ndarray:
    return outputs.correct if target == "correct" else outputs.agrees


def fittable(outputs, target: str) -> list[int]:
    """Non-final exits with enough samples of each target value to fit
    (the rule of `fit_exit_policy`)."""
    labels = _labels(outputs, target)
    n = len(labels)
    return [
        k
        for k in range(labels.shape[1] - 1)
        if n >= MIN_SAMPLES
        and min(labels[:, k].sum(), n - labels[:, k].sum()) >= MIN_PER_LABEL
    ]


def scores(features: list, policies: dict) -> np.ndarray:
    """`(n, exits)` learned scores, as the gates compute them: the fitted
    policy where there is one, else the starting one; 1 at the final exit."""
    columns = []
    for k, f in enumerate(features):
        w, b = policies.get(k, (np.array(INITIAL_POLICY_WEIGHTS), INITIAL_POLICY_BIAS))
        columns.append(1.0 / (1.0 + np.exp(-(f @ w + b))))
    columns.append(np.ones(len(features[0])))
    return np.stack(columns, axis=1).astype(np.float32)


def fit_policies(features: list, outputs, target: str) -> dict:
    labels = _labels(outputs, target)
    return {
        k: logistic_regression(features[k], labels[:, k], 1e-2)
        for k in fittable(outputs, target)
    }


def with_confidences(outputs, confidences) -> _data.ExitOutputs:
    return _data.ExitOutputs(
        outputs.logits,
        confidences,
        outputs.correct,
        outputs.agrees,
        outputs.labels,
        outputs.cumulative_macs,
    )


def calibrated(outputs, guard: bool = True):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return calibrate_outputs(outputs, "max_accuracy_drop", MAX_DROP, guard=guard)


def figures(outputs, thresholds, exits=None, accuracy=None) -> dict:
    """Drop, MACs and exit shares of `thresholds` on `outputs`: simulated,
    or of the `exits` and `accuracy` a real run gave."""
    if exits is None:
        accuracy, _, _, exits = outputs.simulate(thresholds)
    macs = float(outputs.cumulative_macs[exits].mean())
    final = float(outputs.correct[:, -1].mean())
    return {
        "thresholds": [round(float(t), 4) for t in thresholds],
        "accuracy": accuracy,
        "drop_points": round(100 * (final - accuracy), 2),
        "average_macs": macs,
        "speedup": round(float(outputs.cumulative_macs[-1]) / macs, 2),
        "exit_shares": [
            round(float(s), 4)
            for s in np.bincount(exits, minlength=outputs.num_exits) / len(exits)
        ],
    }


def learned_on_model(model, data, target: str, test) -> dict:
    """The product path: learned gates on the model's layers, fitted on the
    first half of the validation split, calibrated on the second, run
    with `predict_early` on the test split."""
    learned = kee.EarlyExitModel(
        model.inputs, model.outputs, criterion="learned", name=f"learned_{target}"
    )
    half = len(data.y_val) - len(data.y_val) // 2
    fit_part = _data.exit_outputs(
        model,
        data.x_val[:half],
        data.y_val[:half],
        cumulative_macs=test.cumulative_macs,
    )
    exits = fittable(fit_part, target)
    result = fit_exit_policy(
        learned,
        data.x_val,
        data.y_val,
        target=target,
        validation_split=0.5,
        exits=exits,
    )
    calibration = kee.calibrate(
        learned, *result.validation_data, max_accuracy_drop=MAX_DROP
    )
    prediction = learned.predict_early(data.x_test, calibration.thresholds)
    accuracy = float(np.mean(prediction.classes == data.y_test))
    return {
        **figures(test, calibration.thresholds, prediction.exit_indices, accuracy),
        "fitted_exits": exits,
        "weights": [[round(float(v), 3) for v in w] for w in result.weights],
        "biases": [round(b, 3) for b in result.biases],
    }


def promise(population, features: list) -> dict:
    """Repeated calibrations on random draws; drops on the samples left."""
    rng = np.random.default_rng(1)
    n = len(population.labels)
    draw = n // 2
    base = with_confidences(population, population.confidences)
    runs = {"max_prob (today)": [], "one shared threshold": []}
    runs.update({f"learned ({t})": [] for t in TARGETS})
    for _ in range(REPEATS):
        rows = rng.permutation(n)
        drawn, rest = rows[:draw], rows[draw:]
        fit, cal = drawn[: draw // 2], drawn[draw // 2 :]
        today = calibrated(base.subset(drawn))
        new = base.subset(rest)
        runs["max_prob (today)"].append(figures(new, today.thresholds))
        shared = [today.shared_threshold] * (population.num_exits - 1)
        runs["one shared threshold"].append(figures(new, shared))
        for target in TARGETS:
            policies = fit_policies(
                [f[fit] for f in features], population.subset(fit), target
            )
            learned = with_confidences(population, scores(features, policies))
            result = calibrated(learned.subset(cal))
            runs[f"learned ({target})"].append(
                figures(learned.subset(rest), result.thresholds)
            )
    summary = {}
    for method, results in runs.items():
        drops = np.array([r["drop_points"] for r in results])
        summary[method] = {
            "draws": REPEATS,
            "draw_size": draw,
            "failures": int(np.sum(drops > 100 * MAX_DROP + 1e-9)),
            "mean_drop_points": round(float(drops.mean()), 3),
            "max_drop_points": round(float(drops.max()), 2),
            "mean_speedup": round(float(np.mean([r["speedup"] for r in results])), 2),
        }
    return summary


def run(name: str) -> dict:
    start = time.time()
    data = exit_savings.load(name)
    model = guarantees.trained(name, data)
    val = _data.exit_outputs(model, data.x_val, data.y_val)
    test = _data.exit_outputs(model, data.x_test, data.y_test)
    right = np.concatenate([test.correct[:, :-1], np.ones_like(test.correct[:, :1])], 1)
    oracle_macs = float(test.cumulative_macs[np.argmax(right, axis=1)].mean())
    full = float(test.cumulative_macs[-1])

    methods = {}
    today = calibrated(val)
    methods["max_prob (today)"] = figures(test, today.thresholds)
    methods["one shared threshold"] = figures(
        test, [today.shared_threshold] * (test.num_exits - 1)
    )
    half = len(val.labels) - len(val.labels) // 2
    second = calibrated(val.subset(np.arange(half, len(val.labels))))
    methods["max_prob, calibration half"] = figures(test, second.thresholds)
    for target in TARGETS:
        methods[f"learned ({target})"] = learned_on_model(model, data, target, test)

    features = [policy_features(test.logits[k]) for k in range(test.num_exits - 1)]
    ceiling = {"max_prob": figures(test, calibrated(test, guard=False).thresholds)}
    for target in TARGETS:
        learned = with_confidences(
            test, scores(features, fit_policies(features, test, target))
        )
        thresholds = calibrated(learned, guard=False).thresholds
        ceiling[f"learned ({target})"] = figures(learned, thresholds)

    today_macs = methods["max_prob (today)"]["average_macs"]
    for entry in methods.values():
        entry["vs_today"] = round(today_macs / entry["average_macs"], 3)
        entry["gap_closed"] = round(
            (today_macs - entry["average_macs"]) / (today_macs - oracle_macs), 3
        )
        entry["vs_oracle_macs"] = round(entry["average_macs"] / oracle_macs, 2)

    population = guarantees._concat(val, test)
    population_features = [
        policy_features(population.logits[k]) for k in range(test.num_exits - 1)
    ]
    return {
        "dataset": name,
        "samples": {"val": len(val.labels), "test": len(test.labels)},
        "full_macs": full,
        "final_accuracy_test": float(test.correct[:, -1].mean()),
        "oracle_test": {
            "average_macs": oracle_macs,
            "speedup": round(full / oracle_macs, 2),
        },
        "methods": methods,
        "ceiling": ceiling,
        "promise": promise(population, population_features),
        "seconds": round(time.time() - start, 1),
    }


def markdown(results: list[dict]) -> str:
    lines = [
        f"Backend `{keras.backend.backend()}`. Target: accuracy drop <= "
        f"{MAX_DROP * 100:.0f} point against the final exit "
        "(`calibrate(max_accuracy_drop=0.01)`, its default guard). Thresholds "
        "(and policies) from the validation split only; figures on the test "
        "split. Learned policies: fitted on the first half of the validation "
        "split, calibrated on the second. Promise: "
        f"{REPEATS} random draws of the validation split's size from "
        "validation + test; drop measured on the samples not drawn.",
        "",
        "| data set | method | test drop (pt) | avg MACs | speed-up | vs today "
        "| gap to oracle closed | MACs / oracle's | exit shares | promise: "
        "failures | mean drop (pt) | mean speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for method, e in r["methods"].items():
            p = r["promise"].get(method)
            kept = (
                f"{p['failures']}/{p['draws']} (n={p['draw_size']}) | "
                f"{p['mean_drop_points']:.2f} | {p['mean_speedup']:.2f}x"
                if p
                else "- | - | -"
            )
            lines.append(
                f"| {r['dataset']} | {method} | {e['drop_points']:+.2f} | "
                f"{e['average_macs']:,.0f} | {e['speedup']:.2f}x | "
                f"{e['vs_today']:.2f} | {e['gap_closed']:.0%} | "
                f"{e['vs_oracle_macs']:.2f} | {e['exit_shares']} | {kept} |"
            )
        o = r["oracle_test"]
        lines.append(
            f"| {r['dataset']} | oracle | | {o['average_macs']:,.0f} | "
            f"{o['speedup']:.2f}x | | | 1.00 | | | | |"
        )
    lines += [
        "",
        "Ceiling: thresholds (and policies) fitted on the test split itself "
        "for <= 1 point there, without the guard (no promise).",
        "",
        "| data set | method | test drop (pt) | speed-up |",
        "|---|---|---|---|",
    ]
    for r in results:
        for method, e in r["ceiling"].items():
            lines.append(
                f"| {r['dataset']} | {method} | {e['drop_points']:+.2f} | "
                f"{e['speedup']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def main(names=("digits", "signals")) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "exit_policies.json")
    previous = {}
    if os.path.exists(path):
        with open(path) as f:
            previous = {r["dataset"]: r for r in json.load(f)["results"]}
    for name in names:
        previous[name] = run(name)
        print(json.dumps(previous[name], indent=1))
    results = [previous[n] for n in ("digits", "signals") if n in previous]
    with open(path, "w") as f:
        json.dump({"backend": keras.backend.backend(), "results": results}, f, indent=2)
    text = markdown(results)
    with open(os.path.join(RESULTS, "exit_policies.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main(tuple(sys.argv[1:]) or ("digits", "signals"))
