"""The patience rule (PABEE): a sample leaves when the last `patience`
exits agree on its class.

Shared by Keras (`predict_early`, `profile`, `calibrate`) and every runtime,
so that all of them take the same exits. A patience gate also has a
confidence floor: its confidence is the exit's top-1 probability and its
threshold the floor (0.0: no floor), compared by `gate_passes`.

PABEE's patience t (the prediction stays unchanged t times) is
`patience = t + 1` here.
"""

import numpy as np

from keras_earlyexit.runtime.manifest import gate_passes


def next_streak(previous_classes, previous_streaks, classes) -> np.ndarray:
    """How many exits in a row, ending at this one, predict each sample's
    class at this exit: one more than before if it agrees with the previous
    exit, else 1. At the first exit pass `previous_streaks` of 0."""
    classes = np.asarray(classes)
    agree = classes == np.asarray(previous_classes)
    return np.where(agree, np.asarray(previous_streaks) + 1, 1).astype(np.int64)


def streaks(classes: np.ndarray) -> np.ndarray:
    """Streak of every exit from all exits' classes `(n, exits)`."""
    classes = np.asarray(classes)
    result = np.ones(classes.shape, np.int64)
    for k in range(1, classes.shape[1]):
        result[:, k] = next_streak(classes[:, k - 1], result[:, k - 1], classes[:, k])
    return result


def patience_passes(streak, patience: int, confidence, threshold: float) -> np.ndarray:
    """Whether samples leave a non-final patience exit: the streak reaches
    `patience` and the confidence passes the floor `threshold`."""
    return (np.asarray(streak) >= patience) & gate_passes(confidence, threshold)
