"""Confidence criteria: logits -> one number in [0, 1] per sample.

Defined once here and used by `ExitGate`, so the Keras model, the exported
TFLite segments and every runtime compare the same number with a threshold.
Only ops that convert to TFLite builtins with int8 kernels are used (no
top-k, no log of a probability).

`"patience"` (PABEE) decides by agreement between consecutive exits, kept
by the loop that runs the segments (`keras_earlyexit.runtime.patience`);
its confidence is the top-1 probability, compared with a confidence floor.

`"learned"` is a logistic exit policy: `sigmoid(bias + sum_i w_i f_i)`
over the `POLICY_FEATURES` of the exit's logits, with weights fitted by
`keras_earlyexit.evaluation.policy.fit_exit_policy` (the predicted chance
that the exit's answer is right). Its features avoid comparisons (whose
bool outputs need a float CAST in int8 graphs): every op has an int8
kernel in TFLite Micro (SUB, MUL, ADD, RELU, MINIMUM, REDUCE_MAX/MIN, SUM,
LOGISTIC), so it runs inside every exported segment.
"""

import math

from keras import ops

CRITERIA = ("max_prob", "margin", "entropy", "patience", "learned")
# Inputs of the learned criterion's logistic score, in weight order: the
# top-1 probability, its margin over the top-2 probability, the largest
# logit and its margin over the second largest (logits divided by the
# temperature). The logits keep what the int8 softmax rounds away near
# saturation (0.996 and 0.9999 are one int8 step apart).
POLICY_FEATURES = ("max_prob", "margin", "max_logit", "logit_margin")
# The top-class indicator of the learned features is 1 at the top-1
# probability and falls to 0 one int8 softmax step (1/256) below it: SUB,
# MUL and RELU, which int8 segments compute exactly, where a comparison's
# bool output would need a float CAST.
_TOP_STEPS = 256.0


def check_criterion(criterion: str) -> str:
    if criterion not in CRITERIA:
        raise ValueError(
            f"Unknown confidence criterion {criterion!r}. "
            f"Use one of {', '.join(map(repr, CRITERIA))}."
        )
    return criterion


def confidence(logits, criterion: str = "max_prob", temperature=1.0, policy=None):
    """Confidence of each sample's prediction, in [0, 1].

    Args:
        logits: `(batch, num_classes)` tensor.
        criterion: `"max_prob"` (top-1 probability), `"margin"` (top-1 minus
            top-2 probability), `"entropy"` (1 - entropy / log(classes)),
            `"patience"` (top-1 probability, the floor of a patience gate)
            or `"learned"` (a logistic score over `POLICY_FEATURES`).
        temperature: logits are divided by it before the softmax.
        policy: for `"learned"` only, `(weights, bias)`: one weight per
            entry of `POLICY_FEATURES` (a `(features,)` tensor) and a
            scalar bias.

    Returns:
        `(batch,)` tensor in [0, 1].
    """
    check_criterion(criterion)
    if criterion == "learned":
        if policy is None:
            raise ValueError(
                "criterion='learned' needs the gate's policy weights: compute "
                "its confidence with the ExitGate (whose weights "
                "kee.fit_exit_policy fits), or pass policy=(weights, bias). "
                "Temperature scaling does not apply to learned gates: the "
                "policy's fit already scales each feature."
            )
        weights, bias = policy
        score = bias
        for i, feature in enumerate(policy_features(logits, temperature)):
            score = score + weights[i] * feature  # (batch,)
        return ops.sigmoid(score)
    logits = logits / temperature  # (batch, classes)
    probs = ops.softmax(logits, axis=-1)  # (batch, classes)
    top1 = ops.max(probs, axis=-1)  # (batch,)
    if criterion in ("max_prob", "patience"):
        score = top1
    elif criterion == "margin":
        score = _margin(probs, top1)
    else:
        score = _entropy_score(logits, probs)
    return ops.clip(score, 0.0, 1.0)


def policy_features(logits, temperature=1.0) -> list:
    """The learned criterion's inputs: one `(batch,)` tensor per entry of
    `POLICY_FEATURES`. A class within 1/256 of the top-1 probability (one
    int8 softmax step) counts, in part, as tied with it: the margins are
    0 on an exact tie, as for the `"margin"` criterion.

    Args:
        logits: `(batch, num_classes)` tensor.
        temperature: logits are divided by it first.

    Returns:
        List of `(batch,)` tensors.
    """
    logits = logits / temperature  # (batch, classes)
    probs = ops.softmax(logits, axis=-1)  # (batch, classes)
    top1 = ops.max(probs, axis=-1)  # (batch,)
    # relu(step - gap) / step rather than relu(1 - gap / step): the int8
    # range of the small difference keeps the step exact. The minimum
    # bounds it to [0, 1] for the int8 calibration, which otherwise gives
    # it a range that rounds the margins below away.
    step = 1.0 / _TOP_STEPS
    gap = top1[:, None] - probs  # (batch, classes)
    is_top = ops.minimum(ops.relu(step - gap) * _TOP_STEPS, 1.0)  # (batch, classes)
    # 1 for one top class, 0 for a tie: a tie has no margin.
    unique = ops.relu(2.0 - ops.sum(is_top, axis=-1))  # (batch,)
    others = 1.0 - is_top  # (batch, classes)
    # Zeroing the top classes leaves the runner-up, in ranges no wider than
    # the values' own (their int8 steps stay as fine).
    top2 = ops.max(probs * others, axis=-1)  # (batch,)
    max_logit = ops.max(logits, axis=-1)  # (batch,)
    above_min = logits - ops.min(logits, axis=-1)[:, None]  # (batch, classes)
    spread = ops.max(above_min, axis=-1)  # (batch,) max - min logit
    second_above_min = ops.max(above_min * others, axis=-1)  # (batch,)
    return [
        top1,
        (top1 - top2) * unique,
        max_logit,
        (spread - second_above_min) * unique,
    ]


def _margin(probs, top1):
    """Top-1 minus top-2 probability, 0 on a tie for first."""
    is_top = ops.cast(probs >= top1[:, None], probs.dtype)  # (batch, classes)
    # Masking the maxima leaves the runner-up; a tie for first means 0.
    top2 = ops.max(probs - 2.0 * is_top, axis=-1)  # (batch,)
    # 1 without a tie, 0 with one: a product rather than a select, since
    # TFLite Micro has no kernel for the SELECT op `where` becomes.
    unique = ops.cast(ops.sum(is_top, axis=-1) < 1.5, probs.dtype)  # (batch,)
    return (top1 - top2) * unique


def _entropy_score(logits, probs):
    """1 - H / log(C), H = -sum(p log p), written without a negation (TFLite
    has no int8 NEG kernel)."""
    num_classes = logits.shape[-1]
    log_probs = ops.log_softmax(logits, axis=-1)  # (batch, classes)
    return 1.0 + ops.sum(probs * log_probs, axis=-1) / math.log(num_classes)
