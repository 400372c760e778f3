"""Runs a model's segments one after another on every sample (no gating)."""

from keras import ops


def chain_segments(model, x) -> list:
    """Each exit's logits, computed segment by segment."""
    segments = model.segments()
    carry = {t.name: x for t in segments[0].inputs}
    logits = []
    for k, segment in enumerate(segments):
        out = segment(carry)
        logits.append(ops.convert_to_numpy(out["logits"]))
        if k + 1 < len(segments):
            carry = {t.name: out[t.name] for t in segments[k + 1].inputs}
    return logits
