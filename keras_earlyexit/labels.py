"""Class labels, checked once for every entry point: `profile`,
`calibrate` and the command line (which checks them before any work).
NumPy only, so the runtime side of the command line needs no Keras."""

import numpy as np


def check_labels(y, n: int, num_classes: int, what: str = "y") -> np.ndarray:
    """Sparse int labels `(n,)` from sparse, column or one-hot labels.

    Args:
        y: int labels `(n,)` or `(n, 1)`, or one-hot / soft labels
            `(n, num_classes)` (non-negative rows summing to 1).
        n: number of samples the labels must match.
        num_classes: classes of the model; labels must be in
            `0..num_classes - 1`.
        what: the labels' name in error messages.

    Returns:
        `(n,)` int64 labels.

    Raises:
        ValueError: naming the problem (shape, count, dtype, range, a row
            that is not one-hot) and the fix.
    """
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim == 2:
        if y.shape[1] != num_classes:
            raise ValueError(
                f"{what} looks one-hot with {y.shape[1]} columns, but the model "
                f"has {num_classes} classes. Pass int labels of shape (n,) or "
                f"one-hot labels of shape (n, {num_classes})."
            )
        _check_one_hot(y, what)
        y = np.argmax(y, axis=1)
    if y.ndim != 1:
        raise ValueError(
            f"{what} must hold one label per sample, shape (n,) or one-hot "
            f"(n, {num_classes}); received shape {y.shape}."
        )
    if len(y) != n:
        raise ValueError(
            f"{what} has {len(y)} labels but x has {n} samples; they must match."
        )
    if y.dtype.kind not in "iuf" or not np.all(np.isfinite(y) & (y == np.round(y))):
        raise ValueError(
            f"{what} must hold integer class labels 0..{num_classes - 1}; "
            f"received dtype {y.dtype}"
            + (f" (e.g. {y.flat[0].item()!r})" if y.size else "")
            + ". Map class names to indices first."
        )
    y = y.astype(np.int64)
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"{what} holds labels in [{y.min()}, {y.max()}], but the model has "
            f"{num_classes} classes (labels 0..{num_classes - 1})."
        )
    return y


def _check_one_hot(y: np.ndarray, what: str) -> None:
    if y.dtype.kind not in "iufb":
        raise ValueError(
            f"{what} looks one-hot but holds dtype {y.dtype}; one-hot labels "
            "are numbers."
        )
    y = y.astype(np.float64)
    sums = y.sum(axis=1)
    bad = ~(np.isfinite(sums) & (y.min(axis=1) >= 0) & (np.abs(sums - 1.0) < 1e-3))
    if bad.any():
        first = int(np.argmax(bad))
        raise ValueError(
            f"{what} looks one-hot, but {int(bad.sum())} row(s) are not "
            f"non-negative with sum 1 (first: row {first}, sum {sums[first]:g}). "
            "Pass int labels of shape (n,) or valid one-hot rows."
        )
