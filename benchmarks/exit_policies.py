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
- `learned (no_worse_than_final, simulated)`: the same protocol, simulated
  (as `calibrate` simulates), for a target `fit_exit_policy` does not
  offer: exit k is right or the final exit is wrong too, i.e. leaving at k
  costs nothing against the final exit, which is what the drop counts;
- `oracle`: each test sample leaves at its first correct exit (it knows the
  label: a loose bound).

At a promise that holds (`GUARANTEES`, delta = 0.1, `calibrate`'s default
path: one shared threshold along a fixed grid, certified on all the
calibration data), side by side with the rows above:

- `max_prob, <guarantee>`: `kee.calibrate(..., guarantee=...)` on the
  max_prob gates, all validation samples;
- `max_prob, calibration half, <guarantee>`: the same on the second half
  only (the data the learned policies certify on);
- `learned (<target>), <guarantee>`: the learned policies above (same fit),
  calibrated with the guarantee on the second half, run with
  `predict_early`.

A guarantee that certifies nothing but no early exit (too few samples for
1 point) counts as no early exit (speed-up 1x, drop 0) and is reported as
uncertified. `vs max_prob, same guarantee`: the speed-up over that of
max_prob on all the validation data under the same guarantee (the
approximate guard: today's), on the test split and as the ratio of the
promise's mean speed-ups: the fair comparison at a kept promise.

Ceilings (is 1.3x reachable at all?): thresholds fitted on the test split
itself for a drop of at most 1 point there, without the guard (no
promise), for policies fitted on the test split too (in-sample: about the
most a policy of that kind could save there) or on the validation split;
per feature set (`FEATURE_SETS`: today's exported features, richer
features of the exit's own logits, the earlier exits' outputs), target
and model (logistic regression, a 16-unit MLP); max_prob thresholded there
likewise; and the oracle that leaves at the first exit no worse than the
final one (zero drop).

Gap to the oracle closed: (MACs of today - MACs of the method) / (MACs of
today - MACs of the oracle).

Kept promise: the population is the validation and test splits together.
`REPEATS` times, a calibration set of the validation split's size is drawn
from it at random (without replacement); max_prob is calibrated on all of
it, a learned policy fitted on its first half and calibrated on the second;
the drop is measured on the samples not drawn (new data). Failure: a drop
above 1 point there.

Run: `KERAS_BACKEND=jax python benchmarks/exit_policies.py` (about 13
minutes on 2 cores with the trained models of `guarantees.py` in
`results/`, a few more without). Writes
`benchmarks/results/exit_policies.{md,json}`.
"""

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
import _promise  # noqa: E402  (figures, promise summary)
import _results  # noqa: E402  (results files)
import exit_savings  # noqa: E402  (data, models and training)
import guarantees  # noqa: E402  (the trained models, cached)

RESULTS = exit_savings.RESULTS
MAX_DROP = 0.01
TARGETS = ("correct", "agrees_with_final")
# Measured here only (not a target of `fit_exit_policy`): leaving at exit k
# costs nothing against the final exit, what the drop promise counts
# (exit k right, or the final exit wrong too).
NO_WORSE = "no_worse_than_final"
STUDY_TARGETS = (*TARGETS, NO_WORSE)
REPEATS = 20
# calibrate's finite-sample guarantees, at its default delta.
GUARANTEES = ("high_probability", "expectation")
DELTA = 0.1
# Feature sets of the ceiling study, per non-final exit k; only `exported`
# runs in today's exported gates (`criteria.POLICY_FEATURES`).
FEATURE_SETS = {
    "exported": "criteria.POLICY_FEATURES of exit k",
    "own top-3": "+ exit k's top-3 probabilities and logits, entropy score",
    "exported + earlier exits": "+ per earlier exit j: its top-1 probability, "
    "whether it predicts exit k's class, its probability of that class",
    "all": "both additions",
}


def _labels(outputs, target: str) -> np.ndarray:
    if target == NO_WORSE:
        return outputs.correct | ~outputs.correct[:, -1:]
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


def certified(outputs, guarantee: str) -> list[float] | None:
    """Thresholds `calibrate` certifies with `guarantee` on `outputs`, or
    None when only no early exit is certified."""
    try:
        return calibrate_outputs(
            outputs, "max_accuracy_drop", MAX_DROP, delta=DELTA, guarantee=guarantee
        ).thresholds
    except ValueError:
        return None


def guaranteed_figures(outputs, thresholds) -> dict:
    """`_promise.figures` of certified thresholds; no early exit (and
    `uncertified`) for None."""
    if thresholds is None:
        return {
            **_promise.figures(outputs, [1.0] * (outputs.num_exits - 1)),
            "uncertified": True,
        }
    return _promise.figures(outputs, thresholds)


def learned_on_model(model, data, target: str, test) -> dict:
    """The product path: learned gates on the model's layers, fitted on the
    first half of the validation split, calibrated on the second (the
    approximate guard, then each of `GUARANTEES`), run with `predict_early`
    on the test split. Returns the rows by method."""
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
    policy = {
        "fitted_exits": exits,
        "weights": [[round(float(v), 3) for v in w] for w in result.weights],
        "biases": [round(b, 3) for b in result.biases],
    }
    rows = {}
    for guarantee in (None, *GUARANTEES):
        extra = {}
        try:
            thresholds = kee.calibrate(
                learned,
                *result.validation_data,
                max_accuracy_drop=MAX_DROP,
                delta=DELTA,
                guarantee=guarantee,
            ).thresholds
        except ValueError as e:
            if guarantee is None:
                raise
            thresholds = [1.0] * (test.num_exits - 1)
            extra = {"uncertified": True, "error": str(e)}
        prediction = learned.predict_early(data.x_test, thresholds)
        accuracy = float(np.mean(prediction.classes == data.y_test))
        rows[_method(target, guarantee)] = {
            **_promise.figures(test, thresholds, prediction.exit_indices, accuracy),
            **extra,
            **policy,
        }
    return rows


def promise(population, features: list) -> dict:
    """Repeated calibrations on random draws; drops on the samples left."""
    rng = np.random.default_rng(1)
    n = len(population.labels)
    draw = n // 2
    base = with_confidences(population, population.confidences)
    runs = {"max_prob (today)": [], "one shared threshold": []}
    runs.update({_method(t): [] for t in STUDY_TARGETS})
    for guarantee in GUARANTEES:
        runs.update({m: [] for m in _guaranteed_methods(guarantee)})
    for _ in range(REPEATS):
        rows = rng.permutation(n)
        drawn, rest = rows[:draw], rows[draw:]
        fit, cal = drawn[: draw // 2], drawn[draw // 2 :]
        today = calibrated(base.subset(drawn))
        new = base.subset(rest)
        runs["max_prob (today)"].append(_promise.figures(new, today.thresholds))
        shared = [today.shared_threshold] * (population.num_exits - 1)
        runs["one shared threshold"].append(_promise.figures(new, shared))
        scored = {}
        for target in STUDY_TARGETS:
            policies = fit_policies(
                [f[fit] for f in features], population.subset(fit), target
            )
            learned = with_confidences(population, scores(features, policies))
            scored[target] = learned
            result = calibrated(learned.subset(cal))
            runs[_method(target)].append(
                _promise.figures(learned.subset(rest), result.thresholds)
            )
        for guarantee in GUARANTEES:
            parts = {
                _max_prob(guarantee): (base, drawn),
                _max_prob(guarantee, half=True): (base, cal),
                **{_method(t, guarantee): (scored[t], cal) for t in TARGETS},
            }
            for method, (outputs, part) in parts.items():
                thresholds = certified(outputs.subset(part), guarantee)
                runs[method].append(
                    guaranteed_figures(outputs.subset(rest), thresholds)
                )
    summaries = {}
    for method, results in runs.items():
        summaries[method] = _promise.summary(
            [r["drop_points"] / 100 for r in results],
            [r["speedup"] for r in results],
            draw,
            MAX_DROP,
        )
        if any("uncertified" in r for r in results):
            summaries[method]["nothing_certified"] = sum(
                "uncertified" in r for r in results
            )
    return summaries


def _method(target: str, guarantee: str | None = None) -> str:
    simulated = ", simulated" if target == NO_WORSE else ""
    return f"learned ({target}{simulated})" + (f", {guarantee}" if guarantee else "")


def _max_prob(guarantee: str, half: bool = False) -> str:
    return f"max_prob, {'calibration half, ' if half else ''}{guarantee}"


def _guaranteed_methods(guarantee: str) -> list[str]:
    return [
        _max_prob(guarantee),
        _max_prob(guarantee, half=True),
        *(_method(t, guarantee) for t in TARGETS),
    ]


def _same_guarantee(method: str) -> str:
    """The max_prob method on all the validation data under `method`'s
    guarantee (today's for the approximate guard)."""
    for guarantee in GUARANTEES:
        if method.endswith(f", {guarantee}"):
            return _max_prob(guarantee)
    return "max_prob (today)"


def study_features(logits: np.ndarray, k: int, kind: str) -> np.ndarray:
    """`(n, F)` features of exit k for one of `FEATURE_SETS`."""
    own = policy_features(logits[k])  # (n, 4)
    if kind in ("own top-3", "all"):
        probs = _softmax(logits[k])  # (n, C)
        entropy = 1.0 + np.sum(probs * np.log(probs + 1e-12), axis=1) / np.log(
            probs.shape[1]
        )  # (n,)
        own = np.concatenate(
            [
                own,
                -np.sort(-probs, axis=1)[:, :3],
                -np.sort(-logits[k], axis=1)[:, :3],
                entropy[:, None],
            ],
            axis=1,
        )  # (n, 11)
    if kind in ("exported", "own top-3"):
        return own
    rows = np.arange(logits.shape[1])
    classes = np.argmax(logits[k], axis=1)  # (n,)
    earlier = []
    for j in range(k):
        probs = _softmax(logits[j])  # (n, C)
        earlier += [
            probs.max(axis=1),
            (np.argmax(probs, axis=1) == classes).astype(np.float64),
            probs[rows, classes],
        ]
    return np.concatenate([own, np.stack(earlier, axis=1)], 1) if earlier else own


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def study_scores(fit, apply, kind: str, target: str, model: str) -> np.ndarray:
    """`(n, exits)` scores on `apply` of policies fitted on `fit`: logistic
    regression or a 16-unit MLP, at every non-final exit where both target
    values occur (else its top-1 probability); 1 at the final exit."""
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    labels = _labels(fit, target)
    columns = []
    for k in range(fit.num_exits - 1):
        x_fit = study_features(fit.logits, k, kind)
        x_apply = study_features(apply.logits, k, kind)
        y = labels[:, k]
        if y.all() or not y.any():
            columns.append(_softmax(apply.logits[k]).max(axis=1))
        elif model == "logistic":
            w, b = logistic_regression(x_fit, y, 1e-2)
            columns.append(1.0 / (1.0 + np.exp(-(x_apply @ w + b))))
        else:
            scaler = StandardScaler().fit(x_fit)
            mlp = MLPClassifier((16,), alpha=1e-2, max_iter=2000, random_state=0).fit(
                scaler.transform(x_fit), y
            )
            columns.append(mlp.predict_proba(scaler.transform(x_apply))[:, 1])
    columns.append(np.ones(len(apply.labels)))
    return np.stack(columns, axis=1).astype(np.float32)


def ceilings(val, test) -> dict:
    """Speed-ups at <= 1 point on the test split, thresholds fitted there
    without the guard (no promise): policies fitted on the test split too
    (`in_sample`, the most a policy of this kind could save there) or on
    the validation split (`fit_on_val`: what carries over to new data)."""
    rows = {"max_prob": {}}
    threshold = calibrated(test, guard=False).thresholds
    rows["max_prob"] = {
        "in_sample": _promise.figures(test, threshold)["speedup"],
        "fit_on_val": _promise.figures(test, threshold)["speedup"],
    }
    settings = [(f, t, "logistic") for f in FEATURE_SETS for t in STUDY_TARGETS]
    settings += [("all", t, "mlp") for t in STUDY_TARGETS]
    for kind, target, model in settings:
        entry = {}
        for protocol, fit in (("in_sample", test), ("fit_on_val", val)):
            learned = with_confidences(
                test, study_scores(fit, test, kind, target, model)
            )
            thresholds = calibrated(learned, guard=False).thresholds
            entry[protocol] = _promise.figures(learned, thresholds)["speedup"]
        rows[f"{kind} | {target} | {model}"] = entry
    c = test.correct
    harmless = np.concatenate([c[:, :-1] | ~c[:, -1:], np.ones_like(c[:, :1])], 1)
    macs = float(test.cumulative_macs[np.argmax(harmless, axis=1)].mean())
    return {
        "rows": rows,
        "oracle_no_worse_than_final": round(float(test.cumulative_macs[-1]) / macs, 2),
    }


def run(name: str) -> dict:
    start = time.time()
    data = exit_savings.load(name)
    model = guarantees.trained(name, data)
    val = _data.exit_outputs(model, data.x_val, data.y_val)
    test = _data.exit_outputs(model, data.x_test, data.y_test)
    oracle = _promise.oracle(test)
    oracle_macs = oracle["average_macs"]
    full = float(test.cumulative_macs[-1])

    methods = {}
    today = calibrated(val)
    methods["max_prob (today)"] = _promise.figures(test, today.thresholds)
    methods["one shared threshold"] = _promise.figures(
        test, [today.shared_threshold] * (test.num_exits - 1)
    )
    half = len(val.labels) - len(val.labels) // 2
    second = calibrated(val.subset(np.arange(half, len(val.labels))))
    methods["max_prob, calibration half"] = _promise.figures(test, second.thresholds)
    guaranteed = {}
    for guarantee in GUARANTEES:
        guaranteed[_max_prob(guarantee)] = guaranteed_figures(
            test, certified(val, guarantee)
        )
        guaranteed[_max_prob(guarantee, half=True)] = guaranteed_figures(
            test,
            certified(val.subset(np.arange(half, len(val.labels))), guarantee),
        )
    for target in TARGETS:
        rows = learned_on_model(model, data, target, test)
        methods[_method(target)] = rows.pop(_method(target))
        guaranteed.update(rows)
    # The same protocol, simulated, for the target fit_exit_policy lacks.
    fit_part, cal_part = (
        val.subset(np.arange(half)),
        val.subset(np.arange(half, len(val.labels))),
    )
    features = {
        part: [policy_features(o.logits[k]) for k in range(test.num_exits - 1)]
        for part, o in (("fit", fit_part), ("cal", cal_part), ("test", test))
    }
    policies = fit_policies(features["fit"], fit_part, NO_WORSE)
    result = calibrated(with_confidences(cal_part, scores(features["cal"], policies)))
    methods[_method(NO_WORSE)] = _promise.figures(
        with_confidences(test, scores(features["test"], policies)),
        result.thresholds,
    )
    for guarantee in GUARANTEES:
        methods.update({m: guaranteed[m] for m in _guaranteed_methods(guarantee)})

    today_macs = methods["max_prob (today)"]["average_macs"]
    for entry in methods.values():
        entry["vs_today"] = round(today_macs / entry["average_macs"], 3)
        entry["gap_closed"] = round(
            (today_macs - entry["average_macs"]) / (today_macs - oracle_macs), 3
        )
        entry["vs_oracle_macs"] = round(entry["average_macs"] / oracle_macs, 2)

    population = _promise.concat(val, test)
    population_features = [
        policy_features(population.logits[k]) for k in range(test.num_exits - 1)
    ]
    return {
        "dataset": name,
        "samples": {"val": len(val.labels), "test": len(test.labels)},
        "full_macs": full,
        "final_accuracy_test": float(test.correct[:, -1].mean()),
        "oracle_test": oracle,
        "methods": methods,
        "ceilings": ceilings(val, test),
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
        "validation + test; drop measured on the samples not drawn. Rows "
        "`..., high_probability` / `..., expectation`: "
        f"`calibrate(max_accuracy_drop=0.01, guarantee=...)` at delta = {DELTA} "
        "(one shared threshold, certified on the calibration data); "
        "`uncertified`: nothing but no early exit certified (counted as "
        "no early exit). `vs max_prob, same guarantee`: speed-up over "
        "max_prob's on all the validation data under the same guarantee "
        "(the approximate guard: today's), on the test split and of the "
        "promise's mean speed-ups. The expectation guarantee promises the "
        "mean drop (<= 1 point), not each draw's: its failures are shown for "
        "comparison. On digits the drop of a draw is measured on 360 "
        "samples (one sample: 0.28 point).",
        "",
        "| data set | method | test drop (pt) | avg MACs | speed-up | vs today "
        "| vs max_prob, same guarantee: test, promise "
        "| gap to oracle closed | MACs / oracle's | exit shares | promise: "
        "failures | mean drop (pt) | mean speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for method, e in r["methods"].items():
            p = r["promise"].get(method)
            kept = _promise.cells(p)
            if p and p.get("nothing_certified"):
                kept = kept.replace(")", f"; {p['nothing_certified']} uncertified)", 1)
            base = _same_guarantee(method)
            ratio = f"{e['speedup'] / r['methods'][base]['speedup']:.2f}"
            if p and base in r["promise"]:
                ratio += (
                    f", {p['mean_speedup'] / r['promise'][base]['mean_speedup']:.2f}"
                )
            uncertified = " (uncertified)" if e.get("uncertified") else ""
            lines.append(
                f"| {r['dataset']} | {method} | {e['drop_points']:+.2f}"
                f"{uncertified} | "
                f"{e['average_macs']:,.0f} | {e['speedup']:.2f}x | "
                f"{e['vs_today']:.2f} | {ratio} | {e['gap_closed']:.0%} | "
                f"{e['vs_oracle_macs']:.2f} | {e['exit_shares']} | {kept} |"
            )
        o = r["oracle_test"]
        lines.append(
            f"| {r['dataset']} | oracle | | {o['average_macs']:,.0f} | "
            f"{o['speedup']:.2f}x | | | | 1.00 | | | | |"
        )
    lines += [
        "",
        "Ceilings: speed-up at <= 1 point on the test split, thresholds "
        "fitted there without the guard (no promise), policies fitted on the "
        "test split itself (in-sample: about the most such a policy could "
        "save there) or on the validation split (fit on val). Ratios: to "
        "max_prob thresholded the same way, and to today's test speed-up "
        "(its promise-keeping thresholds from the validation split). "
        f"Target `{NO_WORSE}`: exit k right, or the final exit wrong too. "
        "Features: "
        + "; ".join(f"`{k}`: {v}" for k, v in FEATURE_SETS.items())
        + ". A policy fitted where every sample has one target value keeps "
        "the top-1 probability.",
        "",
        "| data set | features | target | model | in-sample | vs max_prob "
        "| vs today | fit on val | vs max_prob | vs today |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows = r["ceilings"]["rows"]
        base, today = rows["max_prob"], r["methods"]["max_prob (today)"]["speedup"]
        for name, e in rows.items():
            kind, target, model = (name.split(" | ") + ["-", "-"])[:3]
            cells = " | ".join(
                f"{e[p]:.2f}x | {e[p] / base[p]:.2f} | {e[p] / today:.2f}"
                for p in ("in_sample", "fit_on_val")
            )
            lines.append(f"| {r['dataset']} | {kind} | {target} | {model} | {cells} |")
        lines.append(
            f"| {r['dataset']} | oracle: first exit no worse than the final | "
            f"| | {r['ceilings']['oracle_no_worse_than_final']:.2f}x | | | | | |"
        )
    return "\n".join(lines) + "\n"


def main(names=("digits", "signals")) -> None:
    _results.write_merged(
        "exit_policies", run, markdown, RESULTS, names, ("digits", "signals"), "dataset"
    )


if __name__ == "__main__":
    main(tuple(sys.argv[1:]) or ("digits", "signals"))
