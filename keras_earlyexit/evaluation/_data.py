"""Shared by profile and calibrate: checked inputs, all exits' logits once,
and the NumPy simulation of gated inference."""

from dataclasses import dataclass

import numpy as np
from keras import ops

from keras_earlyexit import criteria, inference
from keras_earlyexit.inference import select_exits
from keras_earlyexit.labels import check_labels
from keras_earlyexit.runtime.patience import streaks as patience_streaks

# The confidence of a sample a patience gate holds back: below every
# threshold in [0, 1], so the threshold search and simulation need no rule
# of their own for patience.
HELD_BACK = -1.0


@dataclass
class ExitOutputs:
    """Every exit's outputs on a data set, for simulating thresholds.

    For a patience model the gate rule also needs each exit's streak: at
    non-final exits where the streak is below `patience`, `confidences`
    holds `HELD_BACK` (-1, reaching no threshold), so that the plain rule
    "first exit whose confidence reaches its threshold" is the patience
    rule (`runtime.patience.patience_passes`).

    Attributes:
        logits: `(exits, n, classes)` float32.
        confidences: `(n, exits)` confidences from the model's gates (held
            back by `patience`, see above).
        correct: `(n, exits)` bool, exit k predicts the label.
        agrees: `(n, exits)` bool, exit k predicts what the final exit does.
        labels: `(n,)` int labels.
        cumulative_macs: `(exits,)` MACs to reach each exit.
        streaks: `(n, exits)` int streaks (`runtime.patience.streaks`), for
            a patience model; else None.
        patience: the patience `confidences` are held back by, or None.
        raw_confidences: `(n, exits)` confidences before holding back (for
            a patience model; else None).
    """

    logits: np.ndarray
    confidences: np.ndarray
    correct: np.ndarray
    agrees: np.ndarray
    labels: np.ndarray
    cumulative_macs: np.ndarray
    streaks: np.ndarray | None = None
    patience: int | None = None
    raw_confidences: np.ndarray | None = None

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
            None if self.streaks is None else self.streaks[rows],
            self.patience,
            None if self.raw_confidences is None else self.raw_confidences[rows],
        )

    def with_temperatures(self, model, temperatures) -> "ExitOutputs":
        confidences = gate_confidences(model, self.logits, temperatures)
        result = ExitOutputs(
            self.logits,
            confidences,
            self.correct,
            self.agrees,
            self.labels,
            self.cumulative_macs,
        )
        if self.streaks is None:
            return result
        result.streaks = self.streaks
        return result.with_patience(self.patience)

    def with_patience(self, patience: int) -> "ExitOutputs":
        """These outputs gated by patience `patience` (a patience model's)."""
        if self.streaks is None:
            raise ValueError("Patience applies only to a patience model's outputs.")
        confidences = (
            self.confidences if self.raw_confidences is None else self.raw_confidences
        )
        held = self.streaks < patience
        held[:, -1] = False  # the final exit takes every sample left
        return ExitOutputs(
            self.logits,
            np.where(held, np.float32(HELD_BACK), confidences),
            self.correct,
            self.agrees,
            self.labels,
            self.cumulative_macs,
            self.streaks,
            int(patience),
            confidences,
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
    """Runs the model once (all exits) and gathers what simulation needs;
    a patience model's outputs are gated by its own patience (see
    `ExitOutputs.with_patience` for another)."""
    check_model(model)
    inputs = inference.check_inputs(model, x)
    labels = check_labels(y, len(inputs[0]), model.num_classes)
    if cumulative_macs is None:
        from keras_earlyexit.evaluation.macs import count_macs, sequence_length_of

        length = sequence_length_of(model, x)
        cumulative_macs = count_macs(model, sequence_length=length).cumulative_macs
    x = inputs[0] if len(inputs) == 1 else inputs
    outputs = model.predict(x, batch_size=batch_size, verbose=verbose)
    logits = np.stack([np.asarray(o, np.float32) for o in outputs])  # (E, n, C)
    predictions = np.argmax(logits, axis=-1).T  # (n, E)
    outputs = ExitOutputs(
        logits=logits,
        confidences=gate_confidences(model, logits),
        correct=predictions == labels[:, None],
        agrees=predictions == predictions[:, -1:],
        labels=labels,
        cumulative_macs=np.asarray(cumulative_macs, np.float64),
    )
    patience = getattr(model, "patience", None)
    if patience is None:
        return outputs
    outputs.streaks = patience_streaks(predictions)
    return outputs.with_patience(patience)
