"""`ExitGate`: an exit's confidence (logits -> one number per sample) and
the threshold it must reach."""

import numbers

import keras
from keras import ops

from keras_earlyexit import criteria

_PACKAGE = "keras_earlyexit"
# Patience of a patience gate built without one: two exits in a row agree.
DEFAULT_PATIENCE = 2


def check_threshold(value, what: str = "threshold") -> float:
    """A float in [0, 1], or a ValueError that says so."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{what} must be a number in [0, 1]. Received: {value!r}"
        ) from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"{what} must be in [0, 1] (a confidence). Received: {value}. "
            "Use 1.0 to let no sample leave at this exit and 0.0 to let "
            "every sample leave."
        )
    return value


def check_patience(value, num_exits: int | None = None) -> int:
    """An int >= 1 (and <= `num_exits` when given), or a ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(
            "patience must be an int >= 1 (the number of exits in a row that "
            f"must agree on the class). Received: patience={value!r}"
        )
    value = int(value)
    if num_exits is not None and value > num_exits:
        raise ValueError(
            f"patience={value} is larger than the number of exits "
            f"({num_exits}): no {value} exits in a row can agree. Use "
            f"1 <= patience <= {num_exits} (patience={num_exits} lets no "
            "sample leave before the final exit)."
        )
    return value


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ExitGate(keras.layers.Layer):
    """Confidence of an exit's prediction, and the threshold it must reach.

    Holds its threshold and a softmax temperature as non-trainable weights,
    so that both are saved with the model and frozen into exported segments.
    A sample leaves at this exit when `threshold < 1.0` and
    `float32(confidence) >= float32(threshold)`: a threshold of 1.0 lets no
    sample leave, even one whose float softmax saturates to exactly 1.0
    (`keras_earlyexit.runtime.manifest.gate_passes`, shared by
    `predict_early`, `profile`, `calibrate` and every runtime).

    With `criterion="patience"` (PABEE, Zhou et al. 2020) a sample leaves
    when the last `patience` exits, this one included, predict the same
    class and its confidence (the top-1 probability) reaches the threshold,
    a confidence floor (0.0: patience alone). The agreement count is kept
    by the loop that runs the segments
    (`keras_earlyexit.runtime.patience.patience_passes`); the gate itself
    computes the confidence only. `patience` is a non-trainable weight too.

    Args:
        criterion: `"max_prob"`, `"margin"`, `"entropy"` or `"patience"`
            (see `keras_earlyexit.criteria.confidence`).
        threshold: float in [0, 1]; 1.0 means no sample leaves here.
            Default 0.9, or 0.0 (no floor) for `"patience"`.
        temperature: float > 0 dividing the logits before the softmax (set
            by calibration).
        patience: for `criterion="patience"` only: how many exits in a row
            must agree, an int >= 1 (default 2). PABEE's patience t is
            `patience = t + 1`.

    Call arguments:
        logits: `(batch, num_classes)` tensor.

    Returns:
        Confidence of shape `(batch,)`, in [0, 1].

    Example:

    ```python
    from keras_earlyexit.runtime.manifest import gate_passes

    gate = ExitGate("margin", threshold=0.6)
    confidence = gate(logits)
    exits_here = gate_passes(confidence, gate.threshold)

    pabee = ExitGate("patience", patience=3)  # 3 exits in a row agree
    ```
    """

    def __init__(
        self,
        criterion: str = "max_prob",
        threshold: float | None = None,
        temperature: float = 1.0,
        patience: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.criterion = criteria.check_criterion(criterion)
        if criterion != "patience" and patience is not None:
            raise ValueError(
                f"patience={patience!r} applies only to criterion='patience'; "
                f"this gate's criterion is {criterion!r}. Pass "
                "criterion='patience' or leave patience unset."
            )
        if threshold is None:
            threshold = 0.0 if criterion == "patience" else 0.9
        threshold = check_threshold(threshold)
        temperature = self._check_temperature(temperature)
        # Scalars that depend on no input shape: created here so that
        # thresholds can be read and set before the gate is ever called.
        self.threshold_variable = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(threshold),
            trainable=False,
            name="threshold",
        )
        self.temperature_variable = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(temperature),
            trainable=False,
            name="temperature",
        )
        self.patience_variable = None
        if criterion == "patience":
            self.patience_variable = self.add_weight(
                shape=(),
                initializer=keras.initializers.Constant(
                    check_patience(DEFAULT_PATIENCE if patience is None else patience)
                ),
                dtype="int32",
                trainable=False,
                name="patience",
            )
        self.built = True

    @staticmethod
    def _check_temperature(value) -> float:
        value = float(value)
        if not value > 0.0:
            raise ValueError(f"temperature must be > 0. Received: {value}")
        return value

    @property
    def threshold(self) -> float:
        return float(ops.convert_to_numpy(self.threshold_variable))

    @threshold.setter
    def threshold(self, value):
        self.threshold_variable.assign(check_threshold(value))

    @property
    def temperature(self) -> float:
        return float(ops.convert_to_numpy(self.temperature_variable))

    @temperature.setter
    def temperature(self, value):
        self.temperature_variable.assign(self._check_temperature(value))

    @property
    def patience(self) -> int | None:
        """Exits in a row that must agree (None unless `"patience"`)."""
        if self.patience_variable is None:
            return None
        return int(ops.convert_to_numpy(self.patience_variable))

    @patience.setter
    def patience(self, value):
        if self.patience_variable is None:
            raise ValueError(
                f"This gate's criterion is {self.criterion!r}; patience "
                "applies only to criterion='patience'."
            )
        self.patience_variable.assign(check_patience(value))

    def call(self, logits):
        temperature = ops.cast(self.temperature_variable, logits.dtype)
        return criteria.confidence(logits, self.criterion, temperature)

    def compute_output_shape(self, input_shape):
        return (input_shape[0],)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "criterion": self.criterion,
                "threshold": self.threshold,
                "temperature": self.temperature,
            }
        )
        if self.patience_variable is not None:
            config["patience"] = self.patience
        return config
