"""Confidence criteria: logits -> one number in [0, 1] per sample.

Defined once here and used by `ExitGate`, so the Keras model, the exported
TFLite segments and every runtime compare the same number with a threshold.
Only ops that convert to TFLite builtins with int8 kernels are used (no
top-k, no log of a probability).

`"patience"` (PABEE) decides by agreement between consecutive exits, kept
by the loop that runs the segments (`keras_earlyexit.runtime.patience`);
its confidence is the top-1 probability, compared with a confidence floor.
"""

import math

from keras import ops

CRITERIA = ("max_prob", "margin", "entropy", "patience")


def check_criterion(criterion: str) -> str:
    if criterion not in CRITERIA:
        raise ValueError(
            f"Unknown confidence criterion {criterion!r}. "
            f"Use one of {', '.join(map(repr, CRITERIA))}."
        )
    return criterion


def confidence(logits, criterion: str = "max_prob", temperature=1.0):
    """Confidence of each sample's prediction, in [0, 1].

    Args:
        logits: `(batch, num_classes)` tensor.
        criterion: `"max_prob"` (top-1 probability), `"margin"` (top-1 minus
            top-2 probability), `"entropy"` (1 - entropy / log(classes)) or
            `"patience"` (top-1 probability, the floor of a patience gate).
        temperature: logits are divided by it before the softmax.

    Returns:
        `(batch,)` tensor in [0, 1].
    """
    check_criterion(criterion)
    logits = logits / temperature  # (batch, classes)
    probs = ops.softmax(logits, axis=-1)  # (batch, classes)
    top1 = ops.max(probs, axis=-1)  # (batch,)
    if criterion in ("max_prob", "patience"):
        score = top1
    elif criterion == "margin":
        is_top = ops.cast(probs >= top1[:, None], probs.dtype)  # (batch, classes)
        # Masking the maxima leaves the runner-up; a tie for first means 0.
        top2 = ops.max(probs - 2.0 * is_top, axis=-1)  # (batch,)
        # 1 without a tie, 0 with one: a product rather than a select, since
        # TFLite Micro has no kernel for the SELECT op `where` becomes.
        unique = ops.cast(ops.sum(is_top, axis=-1) < 1.5, probs.dtype)  # (batch,)
        score = (top1 - top2) * unique
    else:
        num_classes = logits.shape[-1]
        log_probs = ops.log_softmax(logits, axis=-1)  # (batch, classes)
        # 1 - H / log(C) with H = -sum(p log p), written without a negation
        # (TFLite has no int8 NEG kernel).
        score = 1.0 + ops.sum(probs * log_probs, axis=-1) / math.log(num_classes)
    return ops.clip(score, 0.0, 1.0)
