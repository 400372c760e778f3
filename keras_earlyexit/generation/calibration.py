"""Per-token exit thresholds calibrated for agreement with full decoding."""

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from keras import ops

from keras_earlyexit.criteria import confidence
from keras_earlyexit.evaluation.guarantees import betting_upper_bound
from keras_earlyexit.generation.decoding import (
    _no_grad,
    check_generation_args,
    generate,
)

DEFAULT_TOLERANCES = (0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.0)
STRICTER_QUANTILES = (0.25, 0.5, 0.75)


@dataclass
class GenerationCalibration:
    """Thresholds from `calibrate` and what they gave on its prompts.

    Attributes:
        thresholds: one per non-final exit (pass to `generate`).
        expected_agreement: share of generated tokens equal to full greedy
            decoding at the same position.
        expected_layers_per_token: average blocks run per generated token.
        tolerance: per-token disagreement allowed at each exit that chose
            the thresholds.
        agreement_bound: lower confidence bound of the agreement on new
            prompts at level `1 - delta` (None when `delta` is None).
        delta: the bound's failure probability, or None.
    """

    thresholds: list[float]
    expected_agreement: float
    expected_layers_per_token: float
    tolerance: float
    agreement_bound: float | None = None
    delta: float | None = None


def token_agreement(tokens, reference) -> float:
    """Share of positions where two equally long token sequences agree."""
    tokens, reference = np.asarray(tokens), np.asarray(reference)
    return float(np.mean(tokens == reference))


def _threshold(conf: np.ndarray, agree: np.ndarray, tolerance: float) -> float:
    """Lowest threshold whose exiting tokens disagree with the final exit at
    a rate <= tolerance (1.0, no exit, if none)."""
    order = np.argsort(-conf, kind="stable")
    conf, wrong = conf[order], ~agree[order]
    rate = np.cumsum(wrong) / np.arange(1, len(conf) + 1)
    # A threshold admits every token at least as confident: cut only after
    # the last of tied confidences.
    cut = np.append(conf[1:] < conf[:-1], True)
    ok = np.flatnonzero((rate <= tolerance) & cut)
    return float(conf[ok[-1]]) if ok.size else 1.0


def calibrate(
    model,
    prompts: Sequence,
    max_new_tokens: int,
    min_agreement: float = 0.95,
    tolerances: Sequence[float] = DEFAULT_TOLERANCES,
    delta: float | None = 0.1,
) -> GenerationCalibration:
    """Chooses `"early_exit"` thresholds so that decoding agrees with full
    greedy decoding on at least `min_agreement` of the tokens.

    Full greedy decoding runs on every prompt. Along its tokens, each exit's
    confidence and whether its greedy token matches the final exit's are
    recorded. For each tolerance `e`, exit k's threshold is the lowest
    confidence above which at most a share `e` of those tokens disagree;
    stricter candidates raise the zero-tolerance thresholds to quantiles
    (`STRICTER_QUANTILES`) of the confidences they admit.
    Each candidate is then run end to end with `generate(...,
    "early_exit")` (state propagation included, so its effect on later
    tokens counts); the candidate with the fewest layers per token whose
    agreement reaches `min_agreement` wins. If none does, thresholds of 1.0
    (no early exit) are returned, with a warning.

    A token that differs sends the rest of its sequence elsewhere, so
    agreement varies a lot from prompt to prompt. With `delta`, a candidate
    must reach `min_agreement` with its lower confidence bound over prompts
    (a Waudby-Smith-Ramdas betting bound on the mean per-prompt
    disagreement, at `delta` divided by the number of candidates). The
    candidates come from the same prompts, so the bound is a guard rather
    than a proof: hundreds of prompts make it tight.

    Args:
        model: an `EarlyExitCausalLM`.
        prompts: token-id prompts, like those decoding will see.
        max_new_tokens: tokens generated per prompt.
        min_agreement: target share of tokens equal to full decoding, in
            (0, 1].
        tolerances: per-token disagreement rates tried at each exit.
        delta: failure probability of the agreement bound, in (0, 1); None
            compares the mean agreement on the prompts itself.

    Returns:
        `GenerationCalibration` with `.thresholds`, `.expected_agreement`,
        `.agreement_bound` and `.expected_layers_per_token`.

    Example:

    ```python
    cal = kee.generation.calibrate(model, prompts, 32, min_agreement=0.95)
    out = kee.generation.generate(model, prompt, 32, "early_exit",
                                  thresholds=cal.thresholds)
    ```
    """
    if not 0.0 < min_agreement <= 1.0:
        raise ValueError(f"min_agreement must be in (0, 1]. Received: {min_agreement}")
    tolerances = sorted({float(t) for t in tolerances}, reverse=True)
    if not tolerances or not all(0.0 <= t <= 1.0 for t in tolerances):
        raise ValueError(
            f"tolerances must be non-empty rates in [0, 1]. Received: {tolerances}"
        )
    if delta is not None and not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1) or None. Received: {delta}")
    prompts = [check_generation_args(model, p, max_new_tokens, "full") for p in prompts]
    if not prompts:
        raise ValueError("calibrate needs at least one prompt.")
    full = [generate(model, p, max_new_tokens).tokens for p in prompts]
    conf, agree = _exit_statistics(model, prompts, full)
    candidates = list(_candidates(conf, agree, tolerances))
    no_exit = GenerationCalibration(
        [1.0] * (model.num_exits - 1), 1.0, float(model.num_layers), 0.0
    )
    if delta is not None:
        no_exit.agreement_bound, no_exit.delta = 1.0, delta
    best, closest = no_exit, None
    for tolerance, thresholds in candidates:
        runs = [
            generate(model, p, max_new_tokens, "early_exit", thresholds=thresholds)
            for p in prompts
        ]
        agreements = np.array(
            [token_agreement(r.tokens, f) for r, f in zip(runs, full)]
        )
        result = GenerationCalibration(
            thresholds,
            float(np.mean(agreements)),
            float(np.mean([r.layers_per_token for r in runs])),
            tolerance,
        )
        if delta is not None:
            bound = betting_upper_bound(1.0 - agreements, delta / len(candidates))
            result.agreement_bound, result.delta = 1.0 - float(bound[0]), delta
        if _reached(result) >= min_agreement:
            if result.expected_layers_per_token < best.expected_layers_per_token:
                best = result
        elif closest is None or _reached(result) > _reached(closest):
            closest = result
    if best is no_exit and closest is not None:
        warnings.warn(
            f"No early-exit thresholds reached min_agreement={min_agreement} "
            f"on {len(prompts)} prompts (the closest: agreement "
            f"{closest.expected_agreement:.1%}"
            + (
                f", lower bound {closest.agreement_bound:.1%}"
                if delta is not None
                else ""
            )
            + "). Every token will run every block. Calibrate on more "
            "prompts, lower min_agreement, or train the exits longer "
            "(exit_dropout helps state propagation).",
            stacklevel=2,
        )
    return best


def _reached(result: GenerationCalibration) -> float:
    """The agreement a candidate is judged by: its bound, else its mean."""
    if result.agreement_bound is not None:
        return result.agreement_bound
    return result.expected_agreement


def _candidates(conf, agree, tolerances):
    """`(tolerance, thresholds)` to try, least to most cautious: one per
    tolerance, then thresholds above the zero-tolerance ones (at quantiles
    of the confidences they admit), because tokens that leave early change
    the later tokens' context through state propagation, which the
    per-token statistics do not see."""
    exits = range(conf.shape[1])
    for tolerance in tolerances:
        yield tolerance, [_threshold(conf[:, k], agree[:, k], tolerance) for k in exits]
    strict = [_threshold(conf[:, k], agree[:, k], 0.0) for k in exits]
    for q in STRICTER_QUANTILES:
        thresholds = []
        for k, t in zip(exits, strict):
            admitted = conf[conf[:, k] >= t, k]
            thresholds.append(float(np.quantile(admitted, q)) if admitted.size else t)
        yield 0.0, thresholds


def _exit_statistics(model, prompts, full) -> tuple[np.ndarray, np.ndarray]:
    """Per generated token after the first (rows) and non-final exit
    (columns): the exit's confidence, and whether its greedy token equals
    the final exit's, with the full decoding's tokens as context."""
    confs, agrees = [], []
    for prompt, tokens in zip(prompts, full):
        sequence = np.concatenate([prompt, tokens[:-1]])[None].astype(np.int32)
        with _no_grad():
            logits = model(sequence)  # per exit: (1, length, vocab)
        steps = slice(len(prompt), sequence.shape[1])  # positions fed in decoding
        final = ops.convert_to_numpy(ops.argmax(logits[-1][0, steps], axis=-1))
        conf, agree = [], []
        for z in logits[:-1]:
            z = z[0, steps]  # (steps, vocab)
            conf.append(ops.convert_to_numpy(confidence(z)))
            agree.append(ops.convert_to_numpy(ops.argmax(z, axis=-1)) == final)
        confs.append(np.stack(conf, axis=1))
        agrees.append(np.stack(agree, axis=1))
    return np.concatenate(confs).astype(np.float32), np.concatenate(agrees)
