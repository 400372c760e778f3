"""Gated inference in Keras: segments run one after another and only the
samples that have not exited go deeper."""

import contextlib
import logging

import keras
import numpy as np

from keras_earlyexit.runtime.manifest import gate_passes
from keras_earlyexit.runtime.prediction import EarlyExitPrediction


def select_exits(confidences: np.ndarray, thresholds) -> np.ndarray:
    """Exit each sample takes given all exits' confidences `(n, exits)`:
    the first whose confidence reaches its threshold, else the last."""
    n, num_exits = confidences.shape
    passes = np.ones((n, num_exits), bool)  # the final exit takes the rest
    for k, threshold in enumerate(thresholds):
        passes[:, k] = gate_passes(confidences[:, k], threshold)
    return np.argmax(passes, axis=1)


def predict_early(model, x, thresholds, batch_size: int = 256) -> EarlyExitPrediction:
    """Runs `model`'s segments with per-sample exits; see
    `EarlyExitModel.predict_early`."""
    segments = model.segments()
    thresholds = list(thresholds) + [0.0]  # the final exit takes the rest
    x = check_inputs(model, x)
    n = len(x[0])
    result = EarlyExitPrediction(
        np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.float32)
    )
    with _quiet_retracing():
        for start in range(0, n, batch_size):
            rows = np.arange(start, min(start + batch_size, n))
            _predict_batch(segments, [v[rows] for v in x], rows, thresholds, result)
    return result


def _predict_batch(segments, x, rows, thresholds, result) -> None:
    """Gated inference on one batch; writes the results of samples `rows`."""
    carry = {t.name: v for t, v in zip(segments[0].inputs, x)}
    for k, segment in enumerate(segments):
        out = _run_segment(segment, carry)
        confidence = out["confidence"].astype(np.float32)
        leave = gate_passes(confidence, thresholds[k])
        if k == len(segments) - 1:
            leave[:] = True
        done = rows[leave]
        result.classes[done] = np.argmax(out["logits"][leave], axis=-1)
        result.exit_indices[done] = k
        result.confidences[done] = confidence[leave]
        stay = np.flatnonzero(~leave)
        if stay.size == 0:
            return
        rows = rows[stay]
        carry = {t.name: out[t.name][stay] for t in segments[k + 1].inputs}


class _RetracingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "tf.function retracing" not in record.getMessage()


@contextlib.contextmanager
def _quiet_retracing():
    """Segments see a few padded batch sizes by design; TensorFlow would
    warn about each new trace."""
    logger, quiet = logging.getLogger("tensorflow"), _RetracingFilter()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _run_segment(segment, carry: dict) -> dict:
    """One compiled segment call. On backends that compile (TensorFlow,
    JAX) the batch is padded to the next power of two, so they see a handful
    of shapes instead of one per number of remaining samples (each new
    shape would be a retrace); eager PyTorch runs the exact batch."""
    n = len(next(iter(carry.values())))
    size = 1 << max(0, n - 1).bit_length()
    if size > n and keras.backend.backend() in ("tensorflow", "jax"):
        carry = {
            name: np.concatenate([v, np.repeat(v[-1:], size - n, axis=0)])
            for name, v in carry.items()
        }
    out = segment.predict_on_batch(carry)
    return {name: np.asarray(v)[:n] for name, v in out.items()}


def check_inputs(model, x) -> list[np.ndarray]:
    """The model's input arrays from `x`, checked: count, sample shape,
    non-empty, equal lengths, dtype and finite values (see `_cast_input`);
    cast to the inputs' dtypes."""
    arrays = [np.asarray(v) for v in keras.tree.flatten(x)]
    expected = keras.tree.flatten(model.inputs)
    if len(arrays) != len(expected):
        raise ValueError(
            f"The model takes {len(expected)} input(s); received {len(arrays)}."
        )
    for a, t in zip(arrays, expected):
        if a.ndim == 0 or len(a) == 0:
            raise ValueError(
                "Received no samples (empty x). Pass at least one sample, and "
                "for profiling or calibration a few hundred."
            )
        if a.ndim != len(t.shape) or any(
            d is not None and d != s for d, s in zip(t.shape[1:], a.shape[1:])
        ):
            raise ValueError(
                f"Input '{t.name}' expects samples of shape {tuple(t.shape[1:])}; "
                f"received an array of shape {a.shape}."
            )
    sizes = {len(a) for a in arrays}
    if len(sizes) > 1:
        raise ValueError(f"All inputs must have the same number of samples: {sizes}.")
    return [_cast_input(a, t) for a, t in zip(arrays, expected)]


def _cast_input(array: np.ndarray, tensor) -> np.ndarray:
    """`array` in the dtype of model input `tensor`, or a ValueError.

    One rule for every entry point: float inputs take float arrays only (an
    integer image on the 0..255 scale, fed to a model trained on [0, 1],
    would run and be silently wrong); integer inputs (token ids) take
    integer arrays whose values fit the input's dtype; no value may be NaN
    or infinite (a NaN logit gives confidence 1.0 and an early exit with a
    meaningless class).
    """
    name = tensor.name
    dtype = keras.backend.standardize_dtype(tensor.dtype)
    kind = array.dtype.kind
    if "float" in dtype:
        if kind != "f":
            raise ValueError(
                f"Input '{name}' is {dtype} but received an array of dtype "
                f"{array.dtype}. Scale and convert it as in training, e.g. "
                "x.astype('float32') / 255 for 8-bit images; integer arrays "
                "are accepted only for integer inputs (token ids)."
            )
        bad = ~np.isfinite(array.reshape(len(array), -1)).all(axis=1)
        if bad.any():
            raise ValueError(
                f"Input '{name}' has {int(bad.sum())} of {len(array)} samples "
                "with NaN or infinite values (first at index "
                f"{int(np.argmax(bad))}). Remove or repair them; no exit can "
                "classify them."
            )
        # bfloat16 has no NumPy dtype; the backend casts float32 itself.
        return array.astype("float32" if dtype == "bfloat16" else dtype, copy=False)
    if "int" in dtype:
        if kind not in "iu":
            raise ValueError(
                f"Input '{name}' is {dtype} (e.g. token ids) but received an "
                f"array of dtype {array.dtype}. Pass integer ids, e.g. "
                f"x.astype('{dtype}')."
            )
        info = np.iinfo(dtype)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise ValueError(
                f"Input '{name}' is {dtype}; received values in "
                f"[{array.min()}, {array.max()}], outside [{info.min}, "
                f"{info.max}]."
            )
        return array.astype(dtype, copy=False)
    if dtype == "bool" and kind != "b":
        raise ValueError(
            f"Input '{name}' is bool; received an array of dtype {array.dtype}."
        )
    return array.astype(dtype, copy=False)
