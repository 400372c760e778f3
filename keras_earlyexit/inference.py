"""Gated inference in Keras: segments run one after another and only the
samples that have not exited go deeper."""

from dataclasses import dataclass

import keras
import numpy as np
from keras import ops


@dataclass
class EarlyExitPrediction:
    """Per-sample result of gated inference.

    Attributes:
        classes: `(n,)` int predicted class.
        exit_indices: `(n,)` int, 0-based index of the exit taken.
        confidences: `(n,)` float confidence at the exit taken.
    """

    classes: np.ndarray
    exit_indices: np.ndarray
    confidences: np.ndarray

    def __iter__(self):  # allows `classes, exits, conf = result`
        return iter((self.classes, self.exit_indices, self.confidences))

    def exit_counts(self, num_exits: int) -> np.ndarray:
        """How many samples left at each exit."""
        return np.bincount(self.exit_indices, minlength=num_exits)


def select_exits(confidences: np.ndarray, thresholds) -> np.ndarray:
    """Exit each sample takes given all exits' confidences `(n, exits)`:
    the first whose confidence reaches its threshold, else the last."""
    n, num_exits = confidences.shape
    passes = confidences[:, :-1] >= np.asarray(thresholds, dtype=np.float32)
    passes = np.concatenate([passes, np.ones((n, 1), bool)], axis=1)
    return np.argmax(passes, axis=1)


def predict_early(model, x, thresholds, batch_size: int = 256) -> EarlyExitPrediction:
    """Runs `model`'s segments with per-sample exits; see
    `EarlyExitModel.predict_early`."""
    segments = model.segments()
    thresholds = list(thresholds) + [0.0]  # the final exit takes the rest
    x = _check_inputs(model, x)
    n = len(x[0])
    classes = np.zeros(n, np.int64)
    exit_indices = np.zeros(n, np.int64)
    confidences = np.zeros(n, np.float32)
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(start + batch_size, n))
        names = [t.name for t in segments[0].inputs]
        carry = {name: ops.convert_to_tensor(v[rows]) for name, v in zip(names, x)}
        for k, segment in enumerate(segments):
            out = segment(carry, training=False)
            conf = ops.convert_to_numpy(out["confidence"]).astype(np.float32)
            leave = conf >= thresholds[k]
            if k == len(segments) - 1:
                leave[:] = True
            if leave.any():
                logits = ops.convert_to_numpy(out["logits"])[leave]
                done = rows[leave]
                classes[done] = np.argmax(logits, axis=-1)
                exit_indices[done] = k
                confidences[done] = conf[leave]
            stay = np.flatnonzero(~leave)
            if stay.size == 0:
                break
            rows = rows[stay]
            keep = ops.convert_to_tensor(stay)
            carry = {
                t.name: ops.take(out[t.name], keep, axis=0)
                for t in segments[k + 1].inputs
            }
    return EarlyExitPrediction(classes, exit_indices, confidences)


def _check_inputs(model, x) -> list[np.ndarray]:
    arrays = [np.asarray(v) for v in keras.tree.flatten(x)]
    expected = keras.tree.flatten(model.inputs)
    if len(arrays) != len(expected):
        raise ValueError(
            f"The model takes {len(expected)} input(s); received {len(arrays)}."
        )
    for a, t in zip(arrays, expected):
        if a.ndim == 0 or len(a) == 0:
            raise ValueError("predict_early received no samples (empty input).")
        if tuple(a.shape[1:]) != tuple(t.shape[1:]) and None not in t.shape[1:]:
            raise ValueError(
                f"Input '{t.name}' expects samples of shape {tuple(t.shape[1:])}; "
                f"received an array of shape {a.shape}."
            )
    if len({len(a) for a in arrays}) > 1:
        raise ValueError("All inputs must have the same number of samples.")
    return [
        a.astype(t.dtype) if a.dtype != t.dtype else a for a, t in zip(arrays, expected)
    ]
