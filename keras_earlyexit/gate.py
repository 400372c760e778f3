"""`ExitGate`: an exit's confidence (logits -> one number per sample) and
the threshold it must reach."""

import keras
from keras import ops

from keras_earlyexit import criteria

_PACKAGE = "keras_earlyexit"


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

    Args:
        criterion: `"max_prob"`, `"margin"` or `"entropy"` (see
            `keras_earlyexit.criteria.confidence`).
        threshold: float in [0, 1]; 1.0 means no sample leaves here.
        temperature: float > 0 dividing the logits before the softmax (set
            by calibration).

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
    ```
    """

    def __init__(
        self,
        criterion: str = "max_prob",
        threshold: float = 0.9,
        temperature: float = 1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.criterion = criteria.check_criterion(criterion)
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
        return config
