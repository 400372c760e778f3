"""Shared by profile and calibrate: checked inputs, all exits' logits once,
and the NumPy simulation of gated inference."""

from dataclasses import dataclass

import numpy as np
from keras import ops

from keras_earlyexit import criteria, inference
from keras_earlyexit.inference import select_exits


@dataclass
class ExitOutputs:
    """Every exit's outputs on a data set, for simulating thresholds.

    Attributes:
        logits: `(exits, n, classes)` float32.
        confidences: `(n, exits)` confidences from the model's gates.
        correct: `(n, exits)` bool, exit k predicts the label.
        agrees: `(n, exits)` bool, exit k predicts what the final exit does.
        labels: `(n,)` int labels.
        cumulative_macs: `(exits,)` MACs to reach each exit.
    """

    logits: np.ndarray
    confidences: np.ndarray
    correct: np.ndarray
    agrees: np.ndarray
    labels: np.ndarray
    cumulative_macs: np.ndarray

    @property
    def num_exits(self) -> int:
        return self.confidences.shape[1]

    def subset(self, rows: np.ndarray) -> "ExitOutputs":
        return ExitOutputs(
            self.logits[:, rows],
            self.confidences[rows],
            self.correct[rows],
            self.agrees[rows],
            self.labels[rows],
            self.cumulative_macs,
        )

    def with_temperatures(self, model, temperatures) -> "ExitOutputs":
        confidences = gate_confidences(model, self.logits, temperatures)
        return ExitOutputs(
            self.logits,
            confidences,
            self.correct,
            self.agrees,
            self.labels,
            self.cumulative_macs,
        )

    def simulate(self, thresholds) -> tuple[float, float, float, np.ndarray]:
        """Accuracy, average MACs, agreement with the final exit, and exit
        taken per sample, for one setting of thresholds."""
        exits = select_exits(self.confidences, thresholds)
        rows = np.arange(len(exits))
        return (
            float(self.correct[rows, exits].mean()),
            float(self.cumulative_macs[exits].mean()),
            float(self.agrees[rows, exits].mean()),
            exits,
        )


def check_model(model) -> None:
    if not hasattr(model, "segments") or not hasattr(model, "gates"):
        raise TypeError(
            "Expected a kee.EarlyExitModel (a model with exits and gates); "
            f"received {type(model).__name__}. Build one with "
            "kee.EarlyExitModel(inputs, [exit_1, ..., final]) or "
            "kee.attach_exits(backbone, ...)."
        )


def check_labels(y, n: int, num_classes: int, what: str = "y") -> np.ndarray:
    """Sparse int labels `(n,)` from sparse or one-hot labels, or an error."""
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
    if not np.issubdtype(y.dtype, np.number) or np.any(np.asarray(y) != np.round(y)):
        raise ValueError(f"{what} must hold integer class labels; received {y.dtype}.")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(
            f"{what} holds labels in [{y.min()}, {y.max()}], but the model has "
            f"{num_classes} classes (labels 0..{num_classes - 1})."
        )
    return y


def num_samples(model, x) -> int:
    return len(inference.check_inputs(model, x)[0])


def gate_confidences(model, logits: np.ndarray, temperatures=None) -> np.ndarray:
    """`(n, exits)` confidences by each exit's gate criterion; with
    `temperatures`, those replace the gates' own."""
    columns = []
    for k, gate in enumerate(model.gates):
        if temperatures is None:
            conf = gate(ops.convert_to_tensor(logits[k]))
        else:
            conf = criteria.confidence(
                ops.convert_to_tensor(logits[k]), gate.criterion, float(temperatures[k])
            )
        columns.append(ops.convert_to_numpy(conf).astype(np.float32))
    return np.stack(columns, axis=1)


def exit_outputs(
    model, x, y, batch_size: int = 256, verbose: int = 0, cumulative_macs=None
) -> ExitOutputs:
    """Runs the model once (all exits) and gathers what simulation needs."""
    check_model(model)
    n = num_samples(model, x)
    labels = check_labels(y, n, model.num_classes)
    if cumulative_macs is None:
        from keras_earlyexit.evaluation.macs import count_macs

        cumulative_macs = count_macs(model).cumulative_macs
    outputs = model.predict(x, batch_size=batch_size, verbose=verbose)
    logits = np.stack([np.asarray(o, np.float32) for o in outputs])  # (E, n, C)
    predictions = np.argmax(logits, axis=-1).T  # (n, E)
    return ExitOutputs(
        logits=logits,
        confidences=gate_confidences(model, logits),
        correct=predictions == labels[:, None],
        agrees=predictions == predictions[:, -1:],
        labels=labels,
        cumulative_macs=np.asarray(cumulative_macs, np.float64),
    )
