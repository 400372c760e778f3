"""The per-sample result of gated inference, shared by Keras
(`EarlyExitModel.predict_early`) and the runtimes."""

from dataclasses import dataclass

import numpy as np


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
