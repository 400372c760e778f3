"""Finite-sample guarantees for early-exit thresholds.

A sample's loss under a setting of thresholds is its accuracy drop against
the final exit: 1 when the final exit is right and the exit taken is
wrong, -1 for the reverse, 0 otherwise. The mean loss over new data is the
setting's accuracy drop. Both guarantees choose along a *path*: settings
ordered from cautious to aggressive, fixed before the losses tested here
are seen (on another part of the data, or without data, e.g. one shared
threshold from 1 down to 0). Row 0 of a path lets no sample leave early,
so its losses are all 0.

- High probability (`fixed_sequence` over `betting_p_values`): with
  probability >= 1 - delta over the draw of the calibration data, the
  chosen setting's accuracy drop on new data is <= target. Each setting is
  tested with a betting p-value (Waudby-Smith & Ramdas), valid for losses
  in [-1, 1] at every sample size, that adapts to their variance (most
  samples lose 0); settings are tested in path order and the last one
  certified before the first failure is kept (fixed-sequence testing: no
  correction for the number of settings).
- Expectation (`conformal_risk_control`): the accuracy drop averaged over
  calibration draws and new samples is <= target (Angelopoulos et al.,
  conformal risk control). Tighter than a high-probability promise, but a
  single calibration can overshoot the target.

Numpy only; shapes are `(settings, samples)`.
"""

import math

import numpy as np

# Largest bet as a fraction of the capital a loss of 1 could take. Power on
# generated {-1, 0, 1} losses (drop 0.3-0.5 pt, target 1 pt, 400 and 2,000
# samples) rose from 0.5 to 0.9 and was flat beyond.
_MAX_BET = 0.9


def _check_losses(losses) -> np.ndarray:
    losses = np.asarray(losses, np.float64)
    if losses.ndim == 1:
        losses = losses[None, :]
    if losses.ndim != 2 or losses.shape[1] == 0:
        raise ValueError(
            "losses must be (samples,) or (settings, samples) with at least one "
            f"sample. Received shape {np.shape(losses)}."
        )
    if not np.all(np.isfinite(losses)) or losses.min() < -1 or losses.max() > 1:
        raise ValueError("losses must be finite and in [-1, 1].")
    return losses


def _check_unit(name: str, value: float, low: float, high: float) -> float:
    value = float(value)
    if not low < value < high:
        raise ValueError(f"{name} must be in ({low}, {high}). Received: {value}")
    return value


def betting_p_values(
    losses, target: float, delta: float = 0.1, seed: int = 0
) -> np.ndarray:
    """p-values of "the mean loss exceeds `target`", one per setting.

    Bets against the null with the hedged-capital martingale of
    Waudby-Smith & Ramdas on `x = (loss + 1) / 2` in [0, 1]: the capital
    `K_t = prod_i (1 + lam_i (m - x_i))`, `m = (target + 1) / 2`, has
    expectation <= 1 while the true mean is >= `target`, so by Ville's
    inequality `1 / max_t K_t` is a valid p-value at any sample size. The
    bets `lam_i` use only the samples before i (predictable plug-in tuned
    for `delta` and the sample size, as the paper recommends for a fixed
    sample size); the samples are visited in one order drawn from `seed`,
    the same for every setting.

    Args:
        losses: `(samples,)` or `(settings, samples)`, values in [-1, 1].
        target: the mean loss to certify against, in (-1, 1).
        delta: the level the bets are tuned for, in (0, 1).
        seed: seed of the visiting order.

    Returns:
        `(settings,)` p-values in (0, 1].

    Example:

    ```python
    losses = np.zeros(2000)
    losses[:5] = 1  # 5 samples lose their right answer
    betting_p_values(losses, target=0.01)  # well below 0.1: certified
    ```

    Reference:
        [Waudby-Smith & Ramdas, 2023](https://arxiv.org/abs/2010.09686).
    """
    losses = _check_losses(losses)
    target = _check_unit("target", target, -1.0, 1.0)
    delta = _check_unit("delta", delta, 0.0, 1.0)
    n = losses.shape[1]
    order = np.random.default_rng(seed).permutation(n)
    x = (losses[:, order] + 1.0) / 2.0  # (settings, n) in [0, 1]
    m = (target + 1.0) / 2.0
    t = np.arange(1, n + 1)
    mean = (0.5 + np.cumsum(x, axis=1)) / (t + 1)  # (settings, n)
    var = (0.25 + np.cumsum((x - mean) ** 2, axis=1)) / (t + 1)  # (settings, n)
    var_before = np.concatenate([np.full((len(x), 1), 0.25), var[:, :-1]], axis=1)
    bets = np.minimum(
        np.sqrt(2.0 * math.log(1.0 / delta) / (n * var_before)), _MAX_BET / (1.0 - m)
    )  # (settings, n)
    log_capital = np.cumsum(np.log1p(bets * (m - x)), axis=1)  # (settings, n)
    return np.exp(-np.maximum(log_capital.max(axis=1), 0.0))


def betting_upper_bound(
    losses, delta: float = 0.1, seed: int = 0, tolerance: float = 1e-5
) -> np.ndarray:
    """Upper confidence bounds of the mean loss at level `1 - delta`: per
    setting, the smallest target that `betting_p_values` certifies.

    Args:
        losses: `(samples,)` or `(settings, samples)`, values in [-1, 1].
        delta: failure probability, in (0, 1).
        seed: seed of the visiting order.
        tolerance: precision of the bisection.

    Returns:
        `(settings,)` bounds in [-1, 1].
    """
    losses = _check_losses(losses)
    lo = np.full(len(losses), -1.0)
    hi = np.ones(len(losses))
    while np.max(hi - lo) > tolerance:
        mid = (lo + hi) / 2
        certified = np.array(
            [
                betting_p_values(row, m, delta, seed)[0] <= delta
                for row, m in zip(losses, mid)
            ]
        )
        hi = np.where(certified, mid, hi)
        lo = np.where(certified, lo, mid)
    return hi


def fixed_sequence(p_values, delta: float) -> int:
    """Index of the last setting certified before the first failure.

    Settings are tested in order at level `delta` each; testing stops at
    the first p-value above `delta`. The probability that any kept setting
    is wrongly certified is <= delta, however many settings there are
    (Learn then Test; Angelopoulos et al., 2021).

    Args:
        p_values: `(settings,)`, in path order.
        delta: failure probability, in (0, 1).

    Returns:
        The index of the last certified setting, or -1 if the first fails.
    """
    delta = _check_unit("delta", delta, 0.0, 1.0)
    failed = np.flatnonzero(np.asarray(p_values) > delta)
    return int(failed[0] if len(failed) else len(p_values)) - 1


def conformal_risk_control(
    losses, target: float, max_loss: float = 1.0
) -> tuple[int, np.ndarray]:
    """The most aggressive setting of a path whose expected loss is <= target.

    The losses are first made monotone along the path (each sample keeps
    the worst loss of the settings up to there), an upper bound of the
    original ones, as conformal risk control needs; then the last setting
    with `(n * mean + max_loss) / (n + 1) <= target` is chosen. Averaged
    over calibration draws, its loss on a new sample is <= target.

    Args:
        losses: `(settings, samples)` in path order, values <= `max_loss`;
            row 0 (the most cautious setting) must be <= target on every
            sample (no early exit: 0).
        target: the expected loss allowed.
        max_loss: the largest loss possible.

    Returns:
        `(index, adjusted)`: the chosen setting (0 when no other qualifies)
        and, per setting, the adjusted risk `(n * mean + max_loss) / (n + 1)`.

    Reference:
        [Angelopoulos et al., 2022](https://arxiv.org/abs/2208.02814)
        (conformal risk control).
    """
    losses = np.asarray(losses, np.float64)
    if losses.ndim != 2 or losses.size == 0:
        raise ValueError(
            f"losses must be (settings, samples). Received shape {losses.shape}."
        )
    if losses.max() > max_loss:
        raise ValueError(f"losses must be <= max_loss={max_loss}.")
    if losses[0].max() > target:
        raise ValueError(
            "Row 0 of the path must be a setting whose loss is <= target on "
            "every sample (e.g. no early exit, loss 0)."
        )
    n = losses.shape[1]
    monotone = np.maximum.accumulate(losses, axis=0)  # (settings, n)
    adjusted = (monotone.sum(axis=1) + max_loss) / (n + 1)  # (settings,)
    ok = np.flatnonzero(adjusted <= target)
    return int(ok[-1] if len(ok) else 0), adjusted


def min_samples_for_expectation(target: float, max_loss: float = 1.0) -> int:
    """Samples conformal risk control needs before any setting other than
    row 0 can qualify: `(0 + max_loss) / (n + 1) <= target`."""
    return max(1, math.ceil(max_loss / target - 1.0 - 1e-12))
