"""`calibrate`: per-exit thresholds for an accuracy target, a compute budget
or a risk guarantee."""

import math
import numbers
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from keras_earlyexit.evaluation import _data, guarantees
from keras_earlyexit.gate import check_patience
from keras_earlyexit.inference import select_exits

_MIN_SAMPLES = 10
GUARANTEES = ("high_probability", "expectation")


@dataclass
class CalibrationResult:
    """Thresholds found by `calibrate` and what they are expected to give.

    Attributes:
        thresholds: one per non-final exit; apply with
            `model.set_thresholds(result.thresholds)` or `result.apply(model)`.
        expected_accuracy: accuracy of gated inference on the validation data.
        expected_macs: average MACs per sample on the validation data.
        expected_share: `expected_macs` as a fraction of the full model's MACs.
        exit_shares: fraction of validation samples leaving at each exit.
        final_accuracy: accuracy of the final exit alone.
        full_macs: MACs of the full model (every segment).
        target: `"max_accuracy_drop"`, `"macs_budget"` or `"risk"`.
        target_value: the value asked for.
        bound: the guarded quantity of the chosen thresholds: the upper
            confidence bound of the accuracy drop, of the MACs share, or of
            the disagreement rate with the final exit (risk); with
            `guarantee="expectation"`, the adjusted risk of conformal risk
            control.
        delta: the bounds hold with probability >= 1 - delta.
        guarantee: `"high_probability"`, `"expectation"`, or None for the
            guard of `max_accuracy_drop` / `macs_budget` (see `calibrate`).
        guard: whether that guard was on (`calibrate`'s `guard`).
        temperatures: per exit, when temperature scaling was fitted (else
            None: the gates' temperatures are kept).
        shared_threshold: the best single threshold for all exits under the
            same target and guard (None for `risk`), for comparison.
        shared_macs: average MACs of `shared_threshold` on the validation data.
        num_samples: validation samples used.
        patience: for a `criterion="patience"` model, the patience chosen
            (the thresholds are then its confidence floors); else None.
    """

    thresholds: list[float]
    expected_accuracy: float
    expected_macs: float
    expected_share: float
    exit_shares: list[float]
    final_accuracy: float
    full_macs: int
    target: str
    target_value: float
    bound: float
    delta: float
    temperatures: list[float] | None = None
    shared_threshold: float | None = None
    shared_macs: float | None = None
    num_samples: int = 0
    patience: int | None = None
    guarantee: str | None = None
    guard: bool = True

    def apply(self, model):
        """Sets the model's thresholds (and fitted temperatures, and
        patience); returns it. All are gate weights, so they are saved with
        the model."""
        if self.temperatures is not None:
            model.set_temperatures(self.temperatures)
        if self.patience is not None:
            model.set_patience(self.patience)
        model.set_thresholds(self.thresholds)
        return model

    def __str__(self) -> str:
        lines = [
            f"Calibrated for {self.target}={self.target_value} "
            f"on {self.num_samples} samples (delta={self.delta})",
        ]
        if self.patience is not None:
            lines.append(f"  patience:          {self.patience}")
        lines += [
            f"  thresholds:        [{', '.join(f'{t:.4f}' for t in self.thresholds)}]",
        ]
        if self.temperatures is not None:
            temps = ", ".join(f"{t:.3f}" for t in self.temperatures)
            lines.append(f"  temperatures:      [{temps}]")
        lines += [
            f"  expected accuracy: {self.expected_accuracy:.4f} "
            f"(final exit {self.final_accuracy:.4f})",
            "  expected MACs:     "
            + macs_text(self.expected_macs, self.expected_share, self.full_macs),
            f"  exit shares:       {percentages(self.exit_shares)}",
            f"  guarded bound:     {self.bound:.4f}",
            "  promise:           "
            + promise(
                self.target, self.target_value, self.delta, self.guarantee, self.guard
            ),
        ]
        if self.shared_threshold is not None:
            lines.append(
                f"  one shared threshold {self.shared_threshold:.4f} would cost "
                f"{self.shared_macs:,.0f} MACs per sample"
            )
        return "\n".join(lines)


def macs_text(macs: float, share: float, full_macs: int) -> str:
    """Average MACs per sample, as a share of the full model's and as a
    reduction: "32,227 MACs per sample = 7.2% of 447,616 (13.96x fewer)"."""
    return (
        f"{macs:,.0f} MACs per sample = {share:.1%} of {full_macs:,} "
        f"({1 / max(share, 1e-12):.2f}x fewer)"
    )


def percentages(shares) -> str:
    """Shares as comma-separated percentages: "70.2%, 23.0%, 6.8%"."""
    return ", ".join(f"{s:.1%}" for s in shares)


def promise(
    target: str,
    value: float,
    delta: float,
    guarantee: str | None = None,
    guard: bool = True,
    data: str = "validation data",
) -> str:
    """What thresholds calibrated for `target=value` promise, in words.

    Args:
        target: `"max_accuracy_drop"`, `"macs_budget"` or `"risk"`.
        value: the value asked for.
        delta: failure probability of the bounds.
        guarantee: `calibrate`'s `guarantee` (None, `"high_probability"` or
            `"expectation"`).
        guard: `calibrate`'s `guard`.
        data: what the thresholds were calibrated on, in words.

    Returns:
        One sentence, e.g. for `guarantee="high_probability"`: "with
        probability >= 0.9 over the draw of the validation data, the
        accuracy drop on new data is <= 0.01 (finite-sample guarantee)".
    """
    quantity = {
        "max_accuracy_drop": "the accuracy drop",
        "macs_budget": "the average MACs share",
        "risk": "the disagreement rate with the final exit",
    }[target]
    certain = f"with probability >= {1 - delta:g} over the draw of the {data}, "
    if guarantee == "expectation":
        return (
            f"averaged over draws of the {data}, {quantity} on new data is <= "
            f"{value:g} (expectation guarantee, conformal risk control)"
        )
    if guarantee == "high_probability":
        return (
            f"{certain}{quantity} on new data is <= {value:g} (finite-sample guarantee)"
        )
    if target == "risk":
        return f"{certain}{quantity} on new data is <= {value:g} (Learn then Test)"
    if guard:
        return (
            f"the upper confidence bound (level {1 - delta:g}) of {quantity} on "
            f"the {data} is <= {value:g} (approximate: a normal bound on the "
            "data the search also saw)"
        )
    return f"{quantity} on the {data} is <= {value:g} (no guard)"


def calibrate(
    model,
    x_val,
    y_val,
    max_accuracy_drop: float | None = None,
    macs_budget: float | None = None,
    risk: float | None = None,
    delta: float = 0.1,
    temperature_scaling: bool = False,
    guard: bool = True,
    risk_bound: str = "binomial",
    search_fraction: float = 0.5,
    num_candidates: int = 256,
    seed: int = 0,
    apply: bool = False,
    batch_size: int = 256,
    verbose: int = 0,
    reference_model=None,
    patience: int | Iterable[int] | None = None,
    confidence_floor: bool = True,
    guarantee: str | None = None,
    per_exit: bool = False,
    match_reference: bool = False,
) -> CalibrationResult:
    """Per-exit thresholds for one target, found on validation data.

    Give exactly one target:

    - `max_accuracy_drop`: least average MACs whose accuracy is at most this
      much (absolute, e.g. 0.01 = 1 point) below the final exit's.
    - `macs_budget`: best accuracy whose average MACs are at most this
      fraction of the full model's (e.g. 0.25).
    - `risk`: least average MACs whose rate of disagreement with the final
      exit's prediction is <= `risk` with probability >= 1 - `delta` over the
      draw of the validation data (distribution-free, Learn-then-Test).

    Search: the candidates of each exit are its confidences on the
    validation data (quantiles of them beyond `num_candidates`). Starting
    points are the best single shared threshold and the minimizers of
    `objective + lambda * constraint` over a grid of multipliers; from each,
    coordinate descent moves one exit's threshold at a time to its best
    feasible candidate until no move helps. On the validation data the
    result is thus never worse than one shared threshold, and usually
    spends fewer MACs.

    Guarding against overfitting the validation set: with `guard=True`
    (default), the constraint of `max_accuracy_drop` / `macs_budget` is
    checked on the one-sided upper confidence bound, at level `1 - delta`,
    of the drop / MACs share (mean plus a normal quantile times its standard
    error, variance add-one smoothed so a perfect score still has a margin),
    not on the raw validation value. Small validation sets thus get
    conservative thresholds instead of promises that do not hold on new data.
    `risk` is guarded by construction: the validation data is split once at
    random; the first part (`search_fraction`) orders a fixed sequence of
    per-exit threshold settings from cautious to aggressive (and fits
    temperatures); the second part tests them in that order with a binomial
    (Clopper-Pearson) or Hoeffding p-value and keeps the last one certified
    before the first failure (fixed-sequence testing controls the error at
    `delta`; Angelopoulos et al., 2021).

    Finite-sample guarantees (`guarantee`), for `max_accuracy_drop` and
    `risk`. The guard above is a normal approximation on the data the search
    also saw, so its promise is approximate (in `benchmarks/guarantees.py`
    it failed in 11 of 40 calibrations at `delta=0.1` on the signals CNN,
    7 of 40 on digits). With a guarantee, settings are
    taken along a *path* fixed before the data that certify them is seen,
    from cautious to aggressive: by default one shared threshold from 1 down
    to 0 (a fixed grid), certified on all the validation data; with
    `per_exit=True`, per-exit settings ordered on a `search_fraction` part
    (the least MACs for each trade-off against the drop there, no exit's
    threshold rising along the path) and certified on the rest. Per-sample
    losses are the accuracy drop against the final exit (1, 0 or -1), or
    the disagreement with it for `risk`.

    - `"high_probability"`: with probability >= 1 - `delta` over the draw
      of the validation data, the accuracy drop on new data is <=
      `max_accuracy_drop`. Each setting is tested with a betting p-value
      (Waudby-Smith & Ramdas; binomial for `risk`) in path order; the last
      one certified before the first failure is kept.
    - `"expectation"`: conformal risk control; averaged over validation
      draws, the drop (or disagreement rate) on new data is <= the target.
      A single calibration may overshoot; it saves more. It bounds the
      rate of answers lost (final exit right, exit wrong), so answers an
      earlier exit gains are not credited. Needs at least `1 / target - 1`
      certifying samples to let any sample leave.

    A finite-sample promise of 1 point at `delta=0.1` needs about 230
    certifying samples even when no answer is lost: use a few thousand
    validation samples (`evaluation.guarantees`).

    A `criterion="patience"` model (PABEE) is calibrated in its patience p
    and, per non-final exit, its confidence floor (the threshold). Each
    candidate p is searched as above, with the samples whose streak at an
    exit is below p held back there; the p kept is the one with the fewest
    average MACs meeting the target (for `macs_budget`: the best accuracy).
    For `risk`, each p is certified at `delta / len(candidates)` (Bonferroni),
    so the p kept holds at `delta`. With `confidence_floor=False`, floors stay
    0.0 (patience alone, as in PABEE) and only p is chosen; `risk` then tests
    the candidates from the largest p down on all the validation data
    (fixed-sequence testing, no split) and keeps the cheapest certified.

    Args:
        model: an `EarlyExitModel` (its gates' criterion is used), or an
            exported artifact: a `kee.runtime.GatedInterpreter` /
            `FusedInterpreter`, or the path of a bundle or fused `.tflite`
            file. An artifact is calibrated on the confidences its runtime
            produces, on the int8 grid for int8 models, with the same search
            and guard (`evaluation.artifact`).
        x_val: validation input array(s), not used for training.
        y_val: labels, int `(n,)` or one-hot `(n, num_classes)`.
        max_accuracy_drop: target in [0, 1).
        macs_budget: target in (0, 1].
        risk: target in (0, 1).
        delta: failure probability of the bounds, in (0, 1).
        temperature_scaling: fit one softmax temperature per exit on the
            validation negative log-likelihood (on the search part for
            `risk`) before searching thresholds. Not for learned gates
            (`criterion="learned"`): refit their policy with
            `kee.fit_exit_policy` instead.
        guard: use the upper confidence bound (see above) for
            `max_accuracy_drop` and `macs_budget`.
        risk_bound: `"binomial"` or `"hoeffding"`.
        search_fraction: part of the validation data that orders the
            settings for `risk`, for `per_exit=True`, and that fits the
            temperatures with a `guarantee`.
        num_candidates: candidate thresholds per exit.
        seed: seed of the split (`risk`, `guarantee`) and of the betting
            order.
        apply: also set the thresholds (and temperatures) on `model`.
        batch_size: batch size of `model.predict`.
        verbose: 1 shows progress.
        reference_model: for an artifact only, the float `EarlyExitModel`
            it was exported from: the result then reports how often both
            take the same exit and class.
        match_reference: for an artifact with `reference_model`, choose
            among the thresholds that meet the target (same guard) those
            whose exit decisions on the validation data agree most with
            the float model gated by its own thresholds (ties: the fewest
            MACs, or the best accuracy for `macs_budget`). The device then
            leaves where the validated Keras model leaves, instead of
            wherever the int8 confidences allow the most savings. Not with
            `risk`, a `guarantee` or a patience artifact.
        patience: for a `criterion="patience"` model, the patience values
            to try: an int, a list of ints, or None (default) for every p
            in `[1, num_exits]`.
        confidence_floor: for a patience model, also calibrate the
            per-exit confidence floors (default); False keeps them at 0.0.
        guarantee: None (default: the guard for `max_accuracy_drop` and
            `macs_budget`, Learn then Test for `risk`),
            `"high_probability"` or `"expectation"` (see above; not for
            `macs_budget`).
        per_exit: with a `guarantee`, per-exit thresholds on a
            `search_fraction` split instead of one shared threshold
            certified on all the data (better with many thousands of
            samples; with fewer, the shared path keeps more MACs saved).

    Returns:
        `CalibrationResult` with `.thresholds`, `.expected_accuracy`,
        `.expected_macs` (per sample), `.exit_shares`, `.patience` (patience
        models) and `.apply(model)`.

    Example:

    ```python
    result = kee.calibrate(model, x_val, y_val, max_accuracy_drop=0.01)
    model.set_thresholds(result.thresholds)
    model.save("calibrated.keras")  # thresholds are saved with the model

    # A criterion="patience" model: p in 2..4, and confidence floors.
    result = kee.calibrate(pabee, x_val, y_val, risk=0.05, patience=[2, 3, 4])
    result.apply(pabee)  # sets the patience and the floors
    ```

    Reference:
        [Angelopoulos et al., 2021](https://arxiv.org/abs/2110.01052)
        (Learn then Test).
    """
    targets = {
        "max_accuracy_drop": max_accuracy_drop,
        "macs_budget": macs_budget,
        "risk": risk,
    }
    given = {k: v for k, v in targets.items() if v is not None}
    if len(given) != 1:
        raise ValueError(
            "Give exactly one target: max_accuracy_drop, macs_budget or risk. "
            f"Received: {given or 'none'}."
        )
    ((target, value),) = given.items()
    value = _check_target(target, value)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1). Received: {delta}")
    if risk_bound not in ("binomial", "hoeffding"):
        raise ValueError(
            f"risk_bound must be 'binomial' or 'hoeffding'. Received: {risk_bound!r}"
        )
    if not 0.0 < search_fraction < 1.0:
        raise ValueError(
            f"search_fraction must be in (0, 1). Received: {search_fraction}"
        )
    check_guarantee(guarantee, target)
    if per_exit and guarantee is None:
        raise ValueError(
            "per_exit=True chooses the path of a guarantee; without one the "
            "search is per exit already. Pass guarantee='high_probability' "
            "or 'expectation', or drop per_exit."
        )
    from keras_earlyexit.evaluation import artifact

    search = dict(
        delta=delta,
        guard=guard,
        risk_bound=risk_bound,
        search_fraction=search_fraction,
        num_candidates=num_candidates,
        seed=seed,
    )
    if guarantee is not None:
        search.update(guarantee=guarantee, per_exit=per_exit)
    if artifact.is_artifact(model):
        return artifact.calibrate_artifact(
            model,
            x_val,
            y_val,
            target,
            value,
            reference_model=reference_model,
            match_reference=match_reference,
            temperature_scaling=temperature_scaling,
            apply=apply,
            verbose=verbose,
            patience=patience,
            confidence_floor=confidence_floor,
            **search,
        )
    if reference_model is not None or match_reference:
        raise ValueError(
            "reference_model and match_reference are for calibrating an "
            "exported artifact (a GatedInterpreter or a bundle / fused file "
            "path); a Keras model is its own reference."
        )
    _data.check_model(model)
    if temperature_scaling:
        _check_temperature_scaling(model)
    patience_values = _patience_values(model, patience, confidence_floor)
    if (
        guarantee is not None
        and patience_values is not None
        and (len(patience_values) > 1 or not confidence_floor)
    ):
        raise ValueError(
            f"guarantee={guarantee!r} certifies one search; choosing among "
            f"patience values {patience_values} afterwards would void it. Pass "
            "one patience (patience=p) with confidence_floor=True, or "
            "guarantee=None."
        )
    if patience_values is not None and temperature_scaling and not confidence_floor:
        raise ValueError(
            "temperature_scaling=True changes only the confidences the floors "
            "compare with; with confidence_floor=False there are none. Drop "
            "one of the two."
        )
    n = _data.num_samples(model, x_val)
    if n < _MIN_SAMPLES:
        raise ValueError(
            f"calibrate received {n} validation samples; thresholds fitted on "
            f"fewer than {_MIN_SAMPLES} mean nothing. Use a few hundred or more."
        )
    data = _data.exit_outputs(model, x_val, y_val, batch_size, verbose)
    temperatures_of = model if temperature_scaling else None
    if patience_values is None:
        result = calibrate_outputs(
            data, target, value, temperatures_of, verbose, **search
        )
    elif confidence_floor:
        result = _calibrate_patience(
            data, patience_values, target, value, temperatures_of, verbose, **search
        )
    else:
        result = _calibrate_patience_only(
            data, patience_values, target, value, **search
        )
    if apply:
        result.apply(model)
    return result


def check_guarantee(guarantee: str | None, target: str) -> None:
    """Refuses an unknown `guarantee`, or one for `macs_budget` (which the
    guard keeps: the MACs of a setting are no per-sample loss to certify)."""
    if guarantee is not None and guarantee not in GUARANTEES:
        raise ValueError(
            "guarantee must be None, 'high_probability' or 'expectation'. "
            f"Received: {guarantee!r}"
        )
    if guarantee is not None and target == "macs_budget":
        raise ValueError(
            f"guarantee={guarantee!r} does not apply to macs_budget, which "
            "guard=True keeps. Drop guarantee, or give max_accuracy_drop."
        )


def _check_temperature_scaling(model) -> None:
    """Refuses temperature scaling for learned gates: their policy's
    weights were fitted to features of the logits at the gate's current
    temperature, so a new temperature would feed them other features."""
    learned = [k for k, g in enumerate(model.gates) if g.criterion == "learned"]
    if learned:
        raise ValueError(
            "temperature_scaling=True does not apply to learned gates (criterion="
            f"'learned', exits {learned}): their exit policy reads features of "
            "the raw logits and was fitted at the gates' current temperature, "
            "so a new temperature would invalidate the fit. To recalibrate the "
            "policy, refit it with kee.fit_exit_policy on other samples, then "
            "calibrate without temperature_scaling."
        )


def _patience_values(model, patience, confidence_floor) -> list[int] | None:
    """The checked patience candidates of a patience model (None for
    another model, which takes neither argument)."""
    if getattr(model, "criterion", None) != "patience":
        if patience is not None or not confidence_floor:
            raise ValueError(
                "patience and confidence_floor apply to models with "
                "criterion='patience'; this model's criterion is "
                f"{getattr(model, 'criterion', None)!r}."
            )
        return None
    if patience is None:
        return list(range(1, model.num_exits + 1))
    if isinstance(patience, numbers.Integral) and not isinstance(patience, bool):
        values = [patience]
    elif isinstance(patience, Iterable) and not isinstance(patience, (str, bytes)):
        values = list(patience)
    else:
        values = [patience]  # refused below, with check_patience's message
    if not values:
        raise ValueError(
            "patience must be an int, a non-empty list of ints or None (every "
            f"patience in [1, {model.num_exits}]). Received an empty list."
        )
    return sorted({check_patience(p, model.num_exits) for p in values})


def _calibrate_patience(
    data, patience_values, target, value, temperatures_of, verbose, **search
) -> CalibrationResult:
    """`calibrate_outputs` for each patience (samples held back by their
    streak, see `_data.ExitOutputs`); keeps the cheapest result meeting the
    target (best accuracy for `macs_budget`). For `risk` each is certified
    at `delta / len(patience_values)`, so the choice holds at `delta`."""
    delta = search["delta"]
    each = dict(search)
    if target == "risk":
        each["delta"] = delta / len(patience_values)
    found, failures = [], []
    for p in patience_values:
        try:
            result = calibrate_outputs(
                data.with_patience(p), target, value, temperatures_of, verbose, **each
            )
        except ValueError as e:
            failures.append(f"patience={p}: {e}")
            continue
        result.patience, result.delta = p, delta
        found.append(result)
    if not found:
        raise ValueError(
            f"No patience in {patience_values} reaches {target}={value} on this "
            "validation data. " + " ".join(failures)
        )
    return min(found, key=_patience_rank(target))


def _patience_rank(target: str) -> Callable:
    if target == "macs_budget":
        return lambda r: (-r.expected_accuracy, r.expected_macs, r.patience)
    return lambda r: (r.expected_macs, -r.expected_accuracy, r.patience)


def _calibrate_patience_only(
    data,
    patience_values,
    target,
    value,
    delta,
    guard,
    risk_bound,
    search_fraction,
    num_candidates,
    seed,
) -> CalibrationResult:
    """Patience alone (every floor 0.0): the best p meeting the target.

    `max_accuracy_drop` / `macs_budget` are checked on the same guarded
    bounds as the threshold search. `risk` tests the candidates in a fixed
    order, largest p (most cautious) first, on all the validation data, and
    stops at the first that is not certified (fixed-sequence testing
    controls the error at `delta`); the cheapest certified one is kept.
    """
    n = len(data.labels)
    num_early = data.num_exits - 1
    floors = (0.0,) * num_early
    results = []
    if target == "risk":
        for p in sorted(patience_values, reverse=True):
            stats = _Stats(data.with_patience(p), 0.0)(floors)
            errors = int(round(stats.disagreement * n))
            if _p_value(errors, n, value, risk_bound) > delta:
                break
            results.append((p, _risk_upper_bound(errors, n, delta, risk_bound)))
        if not results:
            p = max(patience_values)
            errors = int(
                round(_Stats(data.with_patience(p), 0.0)(floors).disagreement * n)
            )
            reachable = _risk_upper_bound(errors, n, delta, risk_bound)
            raise ValueError(
                f"risk={value} cannot be certified with delta={delta} from {n} "
                f"samples: the most cautious patience ({p}) certifies at best "
                f"risk={reachable:.4f}. Use risk >= {reachable:.4f}, more "
                "validation data, or a larger delta."
            )
    else:
        z = statistics.NormalDist().inv_cdf(1.0 - delta) if guard else 0.0
        bounds = {}
        for p in patience_values:
            s = _Stats(data.with_patience(p), z)(floors)
            bounds[p] = s.drop_bound if target == "max_accuracy_drop" else s.share_bound
        results = [(p, b) for p, b in bounds.items() if b <= value + 1e-12]
        if not results:
            what = "upper confidence bound of the " if guard else ""
            quantity = (
                "accuracy drop" if target == "max_accuracy_drop" else "MACs share"
            )
            best = min(bounds.values())
            raise ValueError(
                f"{target}={value} is not reachable with patience alone on this "
                f"validation data: the smallest {what}{quantity} over patience "
                f"{patience_values} is {best:.4f}. Use {target} >= {best:.4f}, "
                "or confidence_floor=True" + (", or guard=False" if guard else "") + "."
            )
    candidates = []
    for p, bound in results:
        gated = data.with_patience(p)
        accuracy, macs, _, exits = gated.simulate(floors)
        full = float(gated.cumulative_macs[-1])
        candidates.append(
            CalibrationResult(
                thresholds=list(floors),
                expected_accuracy=accuracy,
                expected_macs=macs,
                expected_share=macs / full,
                exit_shares=[
                    float(s) for s in np.bincount(exits, minlength=data.num_exits) / n
                ],
                final_accuracy=float(data.correct[:, -1].mean()),
                full_macs=int(full),
                target=target,
                target_value=value,
                bound=float(bound),
                delta=delta,
                num_samples=n,
                patience=p,
                guard=guard,
            )
        )
    return min(candidates, key=_patience_rank(target))


def calibrate_outputs(
    data: "_data.ExitOutputs",
    target: str,
    value: float,
    temperatures_of=None,
    verbose: int = 0,
    delta: float = 0.1,
    guard: bool = True,
    risk_bound: str = "binomial",
    search_fraction: float = 0.5,
    num_candidates: int = 256,
    seed: int = 0,
    guarantee: str | None = None,
    per_exit: bool = False,
    reference_exits: np.ndarray | None = None,
    reference_thresholds: list[float] | None = None,
) -> CalibrationResult:
    """The search and guard of `calibrate` on every exit's outputs, from a
    Keras model or an exported artifact (arguments checked by `calibrate`).

    `temperatures_of` is the model whose gates' criterion fitted
    temperatures go through (None: no temperature scaling).
    `reference_exits` (per sample, the exit another model takes; guarded
    search only): the search then prefers the feasible thresholds whose
    exits agree most with them (`calibrate`'s `match_reference`), starting
    also from `reference_thresholds` (that model's own), so the result
    agrees at least as well as they do whenever they meet the target.
    """
    n = len(data.labels)
    z = statistics.NormalDist().inv_cdf(1.0 - delta) if guard else 0.0
    search = test = data
    explicit = guarantee is not None
    # A guarantee on one shared threshold needs no search part: its path is
    # fixed in advance (unless temperatures are fitted first).
    split = (target == "risk" and not explicit) or (
        explicit and (per_exit or temperatures_of is not None)
    )
    if split:
        rows = np.random.default_rng(seed).permutation(n)
        cut = int(round(search_fraction * n))
        if cut < 1 or cut >= n:
            raise ValueError(
                f"{target} with guarantee={guarantee!r} needs both parts of the "
                f"split non-empty; {n} samples with search_fraction="
                f"{search_fraction} leave one empty."
            )
        search, test = data.subset(rows[:cut]), data.subset(rows[cut:])
    temperatures = None
    if temperatures_of is not None:
        temperatures = [
            fit_temperature(logits, search.labels) for logits in search.logits
        ]
        data = data.with_temperatures(temperatures_of, temperatures)
        search = search.with_temperatures(temperatures_of, temperatures)
        if split:
            test = test.with_temperatures(temperatures_of, temperatures)
    full = float(data.cumulative_macs[-1])
    candidates = _candidates(search.confidences, num_candidates)
    final_accuracy = float(data.correct[:, -1].mean())
    shared = shared_macs = None

    certify = dict(
        target=target,
        value=value,
        delta=delta,
        bound=risk_bound,
        guarantee=guarantee or "high_probability",
        seed=seed,
    )
    if explicit and not per_exit:
        thresholds, bound = _choose(
            _shared_path(data.num_exits - 1), test, split=split, **certify
        )
        shared, shared_macs = float(thresholds[0]), data.simulate(thresholds)[1]
    elif target == "risk" or explicit:
        # Without a guarantee, risk keeps its plain, coarser path.
        thresholds, bound = _learn_then_test(
            search, test, candidates, verbose=verbose, fine=explicit, **certify
        )
        if explicit:
            shared, shared_macs = _shared_certified(
                data, test, data.num_exits - 1, certify
            )
    else:
        stats = _Stats(search, z, reference_exits)
        if target == "max_accuracy_drop":
            objective = lambda s: s.share - 1e-6 * s.accuracy  # noqa: E731
            constraint = lambda s: s.drop_bound  # noqa: E731
        else:
            objective = lambda s: -s.accuracy + 1e-6 * s.share  # noqa: E731
            constraint = lambda s: s.share_bound  # noqa: E731
        if reference_exits is not None:
            # Agreement first; the target's own objective breaks ties.
            saving = objective
            objective = lambda s: s.reference_disagreement + 1e-6 * saving(s)  # noqa: E731
        feasible = lambda s: constraint(s) <= value + 1e-12  # noqa: E731
        progbar = _progbar(1, verbose)
        starts = _lagrangian_starts(stats, candidates, objective, constraint)
        if reference_thresholds is not None:
            starts.append(tuple(float(t) for t in reference_thresholds))
        found = search_thresholds(stats, candidates, feasible, objective, starts)
        if progbar is not None:
            progbar.add(1)
        if found is None:
            raise ValueError(_unreachable(target, value, stats, candidates, guard))
        thresholds, shared = found
        if shared is not None:
            shared_macs = stats(shared).share * full
            shared = float(shared[0])
        bound = constraint(stats(thresholds))

    thresholds = [float(t) for t in thresholds]
    accuracy, macs, _, exits = data.simulate(thresholds)
    result = CalibrationResult(
        thresholds=thresholds,
        expected_accuracy=accuracy,
        expected_macs=macs,
        expected_share=macs / full,
        exit_shares=[
            float(s) for s in np.bincount(exits, minlength=data.num_exits) / n
        ],
        final_accuracy=final_accuracy,
        full_macs=int(full),
        target=target,
        target_value=value,
        bound=float(bound),
        delta=delta,
        temperatures=None if temperatures is None else [float(t) for t in temperatures],
        shared_threshold=shared,
        shared_macs=shared_macs,
        num_samples=n,
        guarantee=guarantee,
        guard=guard,
    )
    return result


def _check_target(target: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{target} must be a number. Received: {value!r}") from None
    ranges = {
        "max_accuracy_drop": (0.0 <= value < 1.0, "[0, 1) (0.01 = one point)"),
        "macs_budget": (0.0 < value <= 1.0, "(0, 1] (a fraction of full-model MACs)"),
        "risk": (0.0 < value < 1.0, "(0, 1) (a rate of disagreement)"),
    }
    ok, allowed = ranges[target]
    if not ok:
        raise ValueError(f"{target} must be in {allowed}. Received: {value}")
    return value


class _Stats:
    """Simulated gated inference on one data set, with guarded bounds,
    vectorized over the candidate thresholds of one exit."""

    @dataclass
    class Result:
        accuracy: np.ndarray
        share: np.ndarray  # average MACs / full MACs
        disagreement: np.ndarray
        drop_bound: np.ndarray
        share_bound: np.ndarray
        reference_disagreement: np.ndarray  # 0 without reference exits

    def __init__(
        self,
        data: "_data.ExitOutputs",
        z: float,
        reference_exits: np.ndarray | None = None,
    ):
        self.data = data
        self.z = z
        self.reference_exits = reference_exits
        self.rows = np.arange(len(data.labels))
        self.share_of_exit = data.cumulative_macs / data.cumulative_macs[-1]
        self.final_correct = data.correct[:, -1].astype(np.float64)

    def __call__(self, thresholds) -> "_Stats.Result":
        thresholds = [float(t) for t in thresholds]
        result = self.along(thresholds, 0, np.asarray(thresholds[:1]))
        return self.Result(*(float(v[0]) for v in vars(result).values()))

    def along(self, thresholds, k: int, values: np.ndarray) -> "_Stats.Result":
        """Statistics for `thresholds` with exit k's replaced by each value."""
        conf = self.data.confidences
        early = list(thresholds[:k]) + [2.0] + list(thresholds[k + 1 :])
        without_k = select_exits(conf, early)  # (n,) exit if k never takes it
        before = without_k < k
        # The gate rule (`gate_passes`), for every candidate at once.
        passes = (conf[:, k][None, :] >= values[:, None].astype(np.float32)) & (
            values[:, None] < 1.0
        )  # (c, n)
        open_at_k = ~before & passes  # (c, n)
        exits = np.where(open_at_k, k, without_k[None, :])  # (c, n)
        correct = self.data.correct[self.rows[None, :], exits]  # (c, n)
        share = self.share_of_exit[exits]  # (c, n)
        drop = self.final_correct[None, :] - correct  # (c, n) in {-1, 0, 1}
        agree = self.data.agrees[self.rows[None, :], exits]  # (c, n)
        reference = (
            np.zeros(len(values))
            if self.reference_exits is None
            else (exits != self.reference_exits[None, :]).mean(axis=1)
        )
        return self.Result(
            accuracy=correct.mean(axis=1),
            share=share.mean(axis=1),
            disagreement=1.0 - agree.mean(axis=1),
            drop_bound=_upper_bound(drop, self.z),
            share_bound=_upper_bound(share, self.z),
            reference_disagreement=reference,
        )


def _upper_bound(values: np.ndarray, z: float) -> np.ndarray:
    """Row means plus `z` standard errors; add-one smoothing of the second
    moment keeps a margin when every value agrees."""
    n = values.shape[-1]
    mean = values.mean(axis=-1)
    if z == 0.0:
        return mean
    second = (np.sum(values**2, axis=-1) + 1.0) / (n + 1.0)
    return mean + z * np.sqrt(np.maximum(second - mean**2, 0.0) / n)


# The largest float32 below 1: lets only saturated confidences (exactly 1.0
# in float32) leave, since a threshold of 1.0 lets no sample leave.
_SATURATED = float(np.nextafter(np.float32(1.0), np.float32(0.0)))


def _candidates(confidences: np.ndarray, num: int) -> list[np.ndarray]:
    """Per non-final exit: its distinct confidences (quantiles of them when
    there are more than `num`), plus 0, "saturated only" and 1 (none)."""
    columns = []
    for c in confidences[:, :-1].T:
        values = np.unique(c)
        if len(values) > num:
            values = np.quantile(c, np.linspace(0.0, 1.0, num))
        extra = [0.0, _SATURATED, 1.0]
        columns.append(np.unique(np.concatenate([values, extra]).clip(0, 1)))
    return columns


def _lagrangian_starts(stats, candidates, objective, constraint, passes=3) -> list:
    """Settings minimizing `objective + lam * constraint` for a grid of
    multipliers, by coordinate descent: points on the trade-off curve that
    single-exit moves under a hard constraint cannot reach."""
    starts = []
    for lam in np.geomspace(1e-2, 1e4, 25):
        current = [1.0] * len(candidates)
        for _ in range(passes):
            for k, values in enumerate(candidates):
                s = stats.along(current, k, values)
                current[k] = float(
                    values[np.argmin(objective(s) + lam * constraint(s))]
                )
        starts.append(tuple(current))
    return starts


def search_thresholds(
    stats: "_Stats",
    candidates: list[np.ndarray],
    feasible: Callable,
    cost: Callable,
    starts: list | None = None,
    max_passes: int = 10,
):
    """Best feasible per-exit thresholds.

    Starts from the best feasible shared threshold, from "every threshold 1"
    and from `starts` (e.g. Lagrangian solutions), then moves one exit's
    threshold at a time to the candidate of lowest cost that stays feasible,
    until a pass changes nothing.

    Returns:
        `(thresholds, best shared thresholds or None)`, or None if nothing
        is feasible.
    """
    num_early = len(candidates)
    best_shared, best_shared_cost = None, np.inf
    for t in np.unique(np.concatenate(candidates)):
        s = stats((float(t),) * num_early)
        if feasible(s) and cost(s) < best_shared_cost:
            best_shared, best_shared_cost = (float(t),) * num_early, cost(s)
    options = [best_shared, (1.0,) * num_early, *(starts or [])]
    options = [o for o in dict.fromkeys(o for o in options if o is not None)]
    options = [o for o in options if feasible(stats(o))]
    if not options:
        return None
    best, best_cost = None, np.inf
    for start in sorted(options, key=lambda o: cost(stats(o)))[:4]:
        current, current_cost = list(start), cost(stats(start))
        for _ in range(max_passes):
            changed = False
            for k, values in enumerate(candidates):
                s = stats.along(current, k, values)
                costs = np.where(feasible(s), cost(s), np.inf)
                i = int(np.argmin(costs))
                if costs[i] < current_cost - 1e-15:
                    current[k], current_cost, changed = float(values[i]), costs[i], True
            if not changed:
                break
        if current_cost < best_cost:
            best, best_cost = current, current_cost
    return best, best_shared


def _progbar(total: int, verbose: int):
    if not verbose:
        return None
    import keras

    return keras.utils.Progbar(total, unit_name="search")


def _unreachable(target, value, stats, candidates, guard) -> str:
    num_early = len(candidates)
    what = "upper confidence bound of " if guard else ""
    if target == "max_accuracy_drop":
        best = min(
            stats((float(t),) * num_early).drop_bound
            for t in np.unique(np.concatenate(candidates))
        )
        return (
            f"max_accuracy_drop={value} is not reachable on this validation data: "
            f"the smallest {what}the accuracy drop found is {best:.4f}. Use "
            f"max_accuracy_drop >= {best:.4f}, more validation data"
            + (", or guard=False" if guard else "")
            + "."
        )
    cheapest = stats((0.0,) * num_early).share_bound
    return (
        f"macs_budget={value} is not reachable: the cheapest setting (every "
        f"sample leaves at the first exit) needs {cheapest:.4f} of the full "
        f"model's MACs ({what}the average). Use macs_budget >= {cheapest:.4f}, "
        "or add an earlier, cheaper exit."
    )


def _learn_then_test(
    search,
    test,
    candidates,
    value,
    delta,
    bound,
    verbose,
    target="risk",
    guarantee="high_probability",
    seed=0,
    fine=True,
):
    """Settings ordered on `search`, chosen on `test`: fixed-sequence
    testing (high probability) or conformal risk control (expectation).

    Returns:
        `(thresholds, bound)`: the chosen setting and its certified bound.
    """
    if fine:
        sequence = _fine_path(search, candidates, target)
    else:
        sequence = _risk_path(search, candidates, value, verbose)
    return _choose(sequence, test, target, value, delta, bound, guarantee, seed)


def _risk_path(search, candidates, risk, verbose, levels=21) -> list:
    """No early exit, then the least MACs on `search` whose disagreement
    with the final exit is at most each of `levels` values in [0, risk]."""
    num_early = len(candidates)
    stats = _Stats(search, 0.0)
    objective = lambda s: s.share + 1e-6 * s.disagreement  # noqa: E731
    starts = _lagrangian_starts(stats, candidates, objective, lambda s: s.disagreement)
    progbar = _progbar(levels, verbose)
    sequence = [(1.0,) * num_early]
    for level in np.linspace(0.0, risk, levels):
        found = search_thresholds(
            stats,
            candidates,
            lambda s, level=level: s.disagreement <= level + 1e-12,
            objective,
            starts,
            max_passes=4,
        )
        if found is not None and tuple(found[0]) not in sequence:
            sequence.append(tuple(found[0]))
        if progbar is not None:
            progbar.add(1)
    return sequence


def _fine_path(search, candidates, target) -> list:
    """No early exit, then the minimizers on `search` of `MACs share +
    lambda * (accuracy drop, or disagreement for risk)` for decreasing
    multipliers (cautious to aggressive, `_lagrangian_starts`), with
    settings in between (`_between`): more before the first, which the
    search part often rates as free while new data does not, and which a
    fixed-sequence test would otherwise meet at once."""
    num_early = len(candidates)
    stats = _Stats(search, 0.0)
    if target == "risk":
        quantity = lambda s: s.disagreement  # noqa: E731
    else:
        quantity = lambda s: s.drop_bound  # noqa: E731  (z=0: the mean drop)
    objective = lambda s: s.share + 1e-6 * quantity(s)  # noqa: E731
    solutions = _lagrangian_starts(stats, candidates, objective, quantity)
    solutions = sorted(set(solutions), key=lambda t: -stats(t).share)
    # No exit's threshold rises along the path: samples only move to
    # earlier exits, so the risk grows smoothly.
    solutions = np.minimum.accumulate(np.array(solutions), axis=0)
    sequence = [(1.0,) * num_early]
    sequence += [tuple(map(float, t)) for t in solutions if min(t) < 1.0]
    path = [sequence[0]]
    for k in range(1, len(sequence)):
        steps = 10 if k == 1 else 4
        path += [*_between(search, sequence[k - 1], sequence[k], steps), sequence[k]]
    return list(dict.fromkeys(path))


def _between(search, a, b, steps: int) -> list:
    """`steps - 1` settings from `a` to `b`: at each exit, the share of
    `search` samples whose confidence reaches the threshold (that exit
    alone) moves evenly from `a`'s to `b`'s."""
    conf = search.confidences[:, : len(a)]
    share = lambda t: np.mean(conf >= np.float32(t), axis=0) * (np.asarray(t) < 1)  # noqa: E731
    start, end = share(a), share(b)
    settings = []
    for step in np.arange(1, steps) / steps:
        wanted = start + step * (end - start)  # (exits,)
        settings.append(
            tuple(
                float(np.quantile(conf[:, k], 1.0 - f, method="higher"))
                if f > 0
                else 1.0
                for k, f in enumerate(wanted)
            )
        )
    return settings


def _losses(data, thresholds, target) -> np.ndarray:
    """Per sample: disagreement with the final exit (risk), or accuracy
    drop against it (1, 0 or -1)."""
    exits = data.simulate(thresholds)[3]
    rows = np.arange(len(exits))
    if target == "risk":
        return 1.0 - data.agrees[rows, exits]
    return data.correct[:, -1].astype(np.float64) - data.correct[rows, exits]


def _choose(sequence, test, target, value, delta, bound, guarantee, seed, split=True):
    """The setting of `sequence` (row 0: no early exit) kept by the
    guarantee on `test` (the part after the search split, or all the
    validation data), and its bound; a ValueError saying what can be
    certified when no other setting is."""
    losses = np.stack([_losses(test, t, target) for t in sequence])  # (m, n)
    n = losses.shape[1]
    quantity = "risk" if target == "risk" else "max_accuracy_drop"
    where = (
        f"{n} test samples (the part of the validation data after the search split)"
        if split
        else f"{n} validation samples"
    )
    if guarantee == "expectation":
        needed = guarantees.min_samples_for_expectation(value)
        if n < needed:
            raise ValueError(
                f"{quantity}={value} with guarantee='expectation' needs at "
                f"least {needed} test samples to let any sample leave early; "
                f"received {where}. Use more validation data"
                + (" or a smaller search_fraction." if split else ".")
            )
        j, adjusted = guarantees.conformal_risk_control(losses, value)
        if j == 0:
            reachable = float(adjusted[1]) if len(adjusted) > 1 else None
            raise ValueError(_uncertified(quantity, value, guarantee, where, reachable))
        return list(sequence[j]), float(adjusted[j])
    if target == "risk":
        errors = losses.sum(axis=1).round().astype(int)
        p = np.array([_p_value(int(e), n, value, bound) for e in errors])
        j = guarantees.fixed_sequence(p, delta)
        if j < 0:
            reachable = _risk_upper_bound(int(errors[0]), n, delta, bound)
            raise ValueError(
                f"risk={value} cannot be certified with delta={delta} from "
                f"{where}: the most cautious setting certifies at best "
                f"risk={reachable:.4f}. Use risk >= {reachable:.4f}, more "
                "validation data, or a larger delta."
            )
        return list(sequence[j]), _risk_upper_bound(int(errors[j]), n, delta, bound)
    # Row 0 lets no sample leave: its drop is 0, known without a test.
    p = guarantees.betting_p_values(losses[1:], value, delta, seed)
    j = guarantees.fixed_sequence(p, delta) + 1
    if j == 0:
        reachable = (
            float(guarantees.betting_upper_bound(losses[1], delta, seed)[0])
            if len(losses) > 1
            else None
        )
        raise ValueError(_uncertified(quantity, value, guarantee, where, reachable))
    return list(sequence[j]), float(
        guarantees.betting_upper_bound(losses[j], delta, seed)[0]
    )


def _uncertified(quantity, value, guarantee, where, reachable) -> str:
    what = (
        f"the most cautious setting that lets samples leave certifies at best "
        f"{quantity}={reachable:.4f}. Use {quantity} >= {reachable:.4f}, "
        if reachable is not None
        else "no setting lets a sample leave early. Use "
    )
    other = "'expectation'" if guarantee == "high_probability" else "None"
    return (
        f"{quantity}={value} cannot be certified with guarantee={guarantee!r} "
        f"from {where}: {what}more validation data, or guarantee={other}."
    )


def _shared_path(num_early: int) -> list:
    """One shared threshold from 1 (no early exit) down to 0 on a fixed
    grid, finest near 1 where max-prob confidences gather."""
    grid = np.concatenate([1.0 - np.geomspace(1e-5, 1.0, 512), [_SATURATED]])
    return [(1.0,) * num_early] + [
        (float(t),) * num_early for t in np.unique(grid)[::-1]
    ]


def _shared_certified(data, test, num_early: int, certify: dict):
    """One shared threshold under the same guarantee, for comparison,
    chosen on `test` along `_shared_path`. Returns `(threshold, average
    MACs on data)`, or `(None, None)` when nothing is certified."""
    try:
        thresholds, _ = _choose(_shared_path(num_early), test, **certify)
    except ValueError:
        return None, None
    return float(thresholds[0]), data.simulate(thresholds)[1]


def _p_value(errors: int, n: int, risk: float, bound: str) -> float:
    """p-value of "true disagreement rate > risk" given `errors` of `n`."""
    if bound == "hoeffding":
        gap = risk - errors / n
        return 1.0 if gap <= 0 else math.exp(-2.0 * n * gap * gap)
    return _binomial_cdf(errors, n, risk)


def _binomial_cdf(k: int, n: int, p: float) -> float:
    """P[Binomial(n, p) <= k], summed in log space."""
    if k >= n:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [
        math.lgamma(n + 1)
        - math.lgamma(i + 1)
        - math.lgamma(n - i + 1)
        + i * log_p
        + (n - i) * log_q
        for i in range(k + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def _risk_upper_bound(errors: int, n: int, delta: float, bound: str) -> float:
    """Smallest risk certified by `errors` of `n` at level `delta`."""
    lo, hi = errors / n, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if mid > 0 and _p_value(errors, n, mid, bound) <= delta:
            hi = mid
        else:
            lo = mid
    return hi


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Softmax temperature minimizing the negative log-likelihood
    (golden-section search over log T in [log 0.05, log 20])."""
    logits = logits.astype(np.float64)

    def nll(log_t: float) -> float:
        scaled = logits / math.exp(log_t)  # (n, classes)
        scaled -= scaled.max(axis=1, keepdims=True)
        log_probs = scaled - np.log(np.exp(scaled).sum(axis=1, keepdims=True))
        return float(-log_probs[np.arange(len(labels)), labels].mean())

    lo, hi = math.log(0.05), math.log(20.0)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(b)
    return float(math.exp((lo + hi) / 2))
