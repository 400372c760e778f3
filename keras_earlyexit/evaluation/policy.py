"""`fit_exit_policy`: the logistic exit policies of learned gates.

A gate with `criterion="learned"` scores each sample with
`sigmoid(bias + sum_i w_i f_i)` over the features of its exit's logits
(`criteria.POLICY_FEATURES`: top-1 probability and its margin over the
top-2, largest logit and its margin over the second). `fit_exit_policy`
fits `w` and the bias of every non-final gate by L2-regularized logistic
regression (Newton's method with a line search, in NumPy: deterministic)
to predict whether the exit's answer is right, or agrees with the final
exit. `calibrate` then thresholds the score as it thresholds any confidence.

The fit and the calibration must see different samples: a policy fitted on
the samples that calibrate its thresholds looks better there than it is,
and the calibrated promise would not hold. Fit on one split and calibrate
on another (`validation_split` leaves one out for this).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np
from keras import ops

from keras_earlyexit import criteria
from keras_earlyexit.evaluation import _data

TARGETS = ("correct", "agrees_with_final")
# The rule for fitting one exit's policy: at least MIN_SAMPLES samples,
# and MIN_PER_LABEL of each value of the target (e.g. at least 20 samples
# the exit gets wrong): 5 weights and a bias from fewer say little.
MIN_SAMPLES = 100
MIN_PER_LABEL = 20
_MAX_NEWTON_STEPS = 100


@dataclass
class ExitPolicyResult:
    """The policies `fit_exit_policy` fitted, and on what.

    Attributes:
        target: `"correct"` or `"agrees_with_final"`: what the score
            predicts.
        exits: indices of the exits whose gates were fitted.
        weights: per fitted exit, one weight per feature of `features`.
        biases: per fitted exit, the bias.
        features: names of the features, `criteria.POLICY_FEATURES`.
        num_samples: samples the policies were fitted on.
        positives: per fitted exit, how many of them the target holds for.
        log_loss: per fitted exit, the mean log loss of the fitted score on
            those samples.
        validation_data: `(x, y)` left out of the fit by `validation_split`
            (for `kee.calibrate`), or None.
    """

    target: str
    exits: list[int]
    weights: list[np.ndarray]
    biases: list[float]
    features: tuple[str, ...]
    num_samples: int
    positives: list[int]
    log_loss: list[float]
    validation_data: tuple | None = None

    def apply(self, model):
        """Sets these policies on `model`'s gates (e.g. on a copy of the
        model the policies were fitted on); returns it."""
        _check_learned(model)
        for k, weights, bias in zip(self.exits, self.weights, self.biases):
            model.gates[k].set_policy(weights, bias)
        return model

    def __str__(self) -> str:
        head = " | ".join(self.features)
        lines = [
            f"Exit policies fitted for target={self.target!r} on "
            f"{self.num_samples} samples",
            f"| exit | positives | log loss | bias | {head} |",
            "|---" * (4 + len(self.features)) + "|",
        ]
        for k, w, b, pos, loss in zip(
            self.exits, self.weights, self.biases, self.positives, self.log_loss
        ):
            weights = " | ".join(f"{v:+.3f}" for v in w)
            lines.append(f"| {k} | {pos} | {loss:.4f} | {b:+.3f} | {weights} |")
        return "\n".join(lines)


def fit_exit_policy(
    model,
    x,
    y,
    target: str = "correct",
    validation_split: float = 0.0,
    exits: Sequence[int] | None = None,
    l2: float = 1e-2,
    batch_size: int = 256,
    verbose: int = 0,
) -> ExitPolicyResult:
    """Fits the exit policies of a model's learned gates.

    For each non-final exit k, logistic regression on the features of exit
    k's logits (`criteria.POLICY_FEATURES`, computed by the gate's own code
    at its temperature) predicts `target`: `"correct"` (exit k predicts the
    label) or `"agrees_with_final"` (exit k predicts what the final exit
    predicts: no labels needed beyond `y`'s shape, the promise of
    `calibrate(risk=...)`). The gates' weights and bias are set; their
    thresholds are left alone: calibrate them next, on other samples.

    The objective is the mean log loss plus `l2 / 2` times the squared
    weights of the standardized features (the bias is not penalized). It is
    strictly convex, and Newton's method with a backtracking line search
    finds its minimum: the same data gives the same policy on every backend.

    Needs, at each fitted exit, at least `MIN_SAMPLES` (100) samples and at
    least `MIN_PER_LABEL` (20) samples of each target value (e.g. 20 the
    exit gets wrong and 20 it gets right). A deep exit that is rarely wrong
    needs many samples: leave it out with `exits` (its gate keeps its
    policy, by default the monotone function of the top-1 probability).

    Use different samples for the fit and for `calibrate`, or calibrate's
    promise does not hold: e.g. fit on `x_fit` and calibrate on `x_cal`, or
    pass `validation_split` and calibrate on `result.validation_data`.

    Args:
        model: an `EarlyExitModel` with `criterion="learned"`.
        x: input array(s), not used for training the model.
        y: labels, int `(n,)` or one-hot `(n, num_classes)`.
        target: `"correct"` or `"agrees_with_final"`.
        validation_split: fraction of the samples, taken from the end of
            `x` and `y` as in `keras.Model.fit`, left out of the fit and
            returned as `result.validation_data` for `calibrate`; 0.0 fits
            on all of them.
        exits: indices of the non-final exits to fit (default: all).
        l2: strength of the L2 penalty, > 0.
        batch_size: batch size of `model.predict`.
        verbose: 1 shows progress.

    Returns:
        `ExitPolicyResult`; the model's gates hold the fitted policies.

    Raises:
        ValueError: a model whose gates are not learned, an unknown target,
            too few samples at a fitted exit (the message says how many are
            needed), or bad arguments.

    Example:

    ```python
    model = kee.EarlyExitModel(inputs, exits, criterion="learned")
    model.fit(x_train, y_train, epochs=10)
    kee.fit_exit_policy(model, x_fit, y_fit)  # x_fit: not x_cal
    kee.calibrate(model, x_cal, y_cal, max_accuracy_drop=0.01, apply=True)

    # Or one validation set, split: the last 50% calibrates.
    result = kee.fit_exit_policy(model, x_val, y_val, validation_split=0.5)
    kee.calibrate(model, *result.validation_data, max_accuracy_drop=0.01)
    ```

    Reference:
        [Ilhan et al., 2023](https://arxiv.org/abs/2301.07099) (EENet:
        learned exit scheduling).
    """
    _data.check_model(model)
    _check_learned(model)
    if target not in TARGETS:
        raise ValueError(
            f"target must be one of {', '.join(map(repr, TARGETS))}. "
            f"Received: {target!r}"
        )
    if not (isinstance(l2, (int, float)) and math.isfinite(l2) and l2 > 0):
        raise ValueError(
            f"l2 must be a number > 0 (the penalty keeps the fit unique). "
            f"Received: {l2!r}"
        )
    exits = _check_exits(model, exits)
    n = _data.num_samples(model, x)
    x_fit, y_fit, validation_data = x, y, None
    if validation_split:
        if not (
            isinstance(validation_split, (int, float)) and 0 < validation_split < 1
        ):
            raise ValueError(
                "validation_split must be a fraction in (0, 1), or 0.0 to fit "
                f"on every sample. Received: {validation_split!r}"
            )
        cut = n - int(round(validation_split * n))
        x_fit, y_fit = _rows(x, slice(0, cut)), _rows(y, slice(0, cut))
        validation_data = (_rows(x, slice(cut, n)), _rows(y, slice(cut, n)))
    data = _data.exit_outputs(
        model,
        x_fit,
        y_fit,
        batch_size,
        verbose,
        cumulative_macs=np.zeros(len(model.gates)),
    )
    labels = data.correct if target == "correct" else data.agrees  # (n, exits)
    _check_counts(model, labels, exits, target)

    weights, biases, positives, losses = [], [], [], []
    for k in exits:
        gate = model.gates[k]
        features = policy_features(data.logits[k], gate.temperature)  # (n, F)
        w, b = logistic_regression(features, labels[:, k], l2)
        weights.append(w)
        biases.append(b)
        positives.append(int(labels[:, k].sum()))
        losses.append(_log_loss(features @ w + b, labels[:, k]))
    result = ExitPolicyResult(
        target=target,
        exits=exits,
        weights=weights,
        biases=biases,
        features=criteria.POLICY_FEATURES,
        num_samples=len(data.labels),
        positives=positives,
        log_loss=losses,
        validation_data=validation_data,
    )
    result.apply(model)
    return result


def policy_features(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """`(n, features)` float64 values of `criteria.POLICY_FEATURES` for
    `(n, classes)` logits, computed by the gates' own code."""
    columns = criteria.policy_features(
        ops.convert_to_tensor(np.asarray(logits, np.float32)), float(temperature)
    )
    return np.stack(
        [np.asarray(ops.convert_to_numpy(c), np.float64) for c in columns], axis=1
    )


def logistic_regression(
    features: np.ndarray, labels: np.ndarray, l2: float
) -> tuple[np.ndarray, float]:
    """Weights and bias minimizing the mean log loss plus `l2 / 2 * |w|^2`
    on standardized features, mapped back to the raw features.

    Args:
        features: `(n, features)` array.
        labels: `(n,)` bools (or 0/1).
        l2: penalty strength, > 0.

    Returns:
        `(weights (features,), bias)` such that `features @ weights + bias`
        is the fitted log-odds.
    """
    features = np.asarray(features, np.float64)  # (n, F)
    labels = np.asarray(labels, np.float64)  # (n,)
    n, f = features.shape
    mean = features.mean(axis=0)  # (F,)
    scale = features.std(axis=0)  # (F,)
    # A constant feature carries nothing; its standardized column is 0 and
    # the penalty keeps its weight at 0.
    scale[scale < 1e-12] = 1.0
    design = np.concatenate(
        [(features - mean) / scale, np.ones((n, 1))], axis=1
    )  # (n, F + 1)
    penalty = np.full(f + 1, float(l2))
    penalty[-1] = 0.0  # the bias is free

    def objective(theta):
        z = design @ theta  # (n,)
        return float(np.mean(np.logaddexp(0.0, z) - labels * z)) + 0.5 * float(
            penalty @ theta**2
        )

    theta = np.zeros(f + 1)
    value = objective(theta)
    for _ in range(_MAX_NEWTON_STEPS):
        p = _sigmoid(design @ theta)  # (n,)
        gradient = design.T @ (p - labels) / n + penalty * theta  # (F + 1,)
        hessian = (design * (p * (1.0 - p))[:, None]).T @ design / n  # (F+1, F+1)
        step = np.linalg.solve(hessian + np.diag(penalty), gradient)
        decrement = float(gradient @ step)
        if decrement < 1e-20:
            break
        size = 1.0
        while size > 1e-10:
            candidate = theta - size * step
            new_value = objective(candidate)
            if new_value <= value - 1e-4 * size * decrement:
                break
            size *= 0.5
        else:
            break
        theta, value = candidate, new_value
    weights = theta[:f] / scale
    bias = theta[f] - float(weights @ mean)
    return weights.astype(np.float32), float(bias)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _log_loss(z: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.logaddexp(0.0, z) - labels * z))


def _rows(values, rows: slice):
    return keras.tree.map_structure(lambda v: v[rows], values)


def _check_learned(model) -> None:
    criterion = getattr(model, "criterion", None)
    if criterion != "learned" or any(g.policy is None for g in model.gates):
        raise ValueError(
            "fit_exit_policy fits the gates of a model built with "
            f"criterion='learned'; this model's criterion is {criterion!r}. "
            "Rebuild it on the same layers, which keeps the trained weights: "
            "kee.EarlyExitModel(model.inputs, model.outputs, "
            "criterion='learned')."
        )


def _check_exits(model, exits) -> list[int]:
    early = list(range(model.num_exits - 1))
    if exits is None:
        return early
    if isinstance(exits, (str, bytes)) or not isinstance(exits, Sequence):
        raise ValueError(
            f"exits must be a list of non-final exit indices in {early}. "
            f"Received: {exits!r}"
        )
    checked = []
    for k in exits:
        if (
            isinstance(k, bool)
            or not isinstance(k, (int, np.integer))
            or k not in early
        ):
            raise ValueError(
                f"exits must hold indices of non-final exits, in {early} (the "
                f"final exit takes every sample left and has no policy). "
                f"Received: {list(exits)!r}"
            )
        if int(k) not in checked:
            checked.append(int(k))
    if not checked:
        raise ValueError(f"exits is empty; give at least one of {early}.")
    return sorted(checked)


def _check_counts(model, labels: np.ndarray, exits: list[int], target: str) -> None:
    n = len(labels)
    what = {
        "correct": ("right", "wrong"),
        "agrees_with_final": ("agreeing with the final exit", "disagreeing"),
    }[target]
    for k in exits:
        counts = {what[0]: int(labels[:, k].sum()), what[1]: int((~labels[:, k]).sum())}
        label, fewest = min(counts.items(), key=lambda item: item[1])
        if n >= MIN_SAMPLES and fewest >= MIN_PER_LABEL:
            continue
        need = MIN_SAMPLES
        if fewest:
            need = max(need, math.ceil(MIN_PER_LABEL * n / fewest))
        amount = (
            f"about {need} samples at this exit's rate"
            if fewest
            else f"samples {label} there"
        )
        name = model.exit_names[k]
        raise ValueError(
            f"Too few samples to fit the policy of exit {k} ('{name}') for "
            f"target={target!r}: {n} samples, {fewest} of them {label}. A fit "
            f"needs at least {MIN_SAMPLES} samples and {MIN_PER_LABEL} of each "
            f"target value at every fitted exit: pass {amount}, or leave this "
            f"exit out with exits=[...] (its gate keeps its current policy)."
        )
