"""`ExitGate`: an exit's confidence (logits -> one number per sample) and
the threshold it must reach."""

import numbers

import keras
import numpy as np
from keras import ops

from keras_earlyexit import criteria

_PACKAGE = "keras_earlyexit"
# Patience of a patience gate built without one: two exits in a row agree.
DEFAULT_PATIENCE = 2
# Policy of a learned gate before fitting: sigmoid(8 * (top-1 - 0.5)), a
# monotone function of the top-1 probability (as max_prob, on another
# scale): weight 8 on top-1, 0 on the other features.
INITIAL_POLICY_WEIGHTS = (8.0, 0.0, 0.0, 0.0)
INITIAL_POLICY_BIAS = -4.0


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


def check_policy(weights, bias) -> tuple[np.ndarray, float]:
    """The weights and bias of a learned gate as float32 numbers, one weight
    per `criteria.POLICY_FEATURES`, all finite; or a ValueError."""
    names = criteria.POLICY_FEATURES
    try:
        weights = np.asarray(weights, dtype=np.float32)
        bias = np.float32(bias)
    except (TypeError, ValueError):
        raise ValueError(
            f"policy_weights must be {len(names)} numbers (one per feature "
            f"{', '.join(names)}) and policy_bias a number. Received: "
            f"{weights!r}, {bias!r}"
        ) from None
    if weights.shape != (len(names),):
        raise ValueError(
            f"policy_weights must hold {len(names)} numbers, one per feature "
            f"({', '.join(names)}). Received shape {weights.shape}."
        )
    if not (np.all(np.isfinite(weights)) and np.isfinite(bias)):
        raise ValueError(
            "policy_weights and policy_bias must be finite. Received: "
            f"{weights.tolist()}, {float(bias)}"
        )
    return weights, float(bias)


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

    With `criterion="learned"` the confidence is a logistic exit policy,
    `sigmoid(policy_bias + sum_i policy_weights[i] * feature_i)` over the
    features `criteria.POLICY_FEATURES` of the temperature-scaled logits
    (top-1 probability and its margin over the top-2, largest logit and its
    margin over the second), fitted by `kee.fit_exit_policy` to predict
    whether this exit's answer is right (or agrees with the final exit).
    The weights and bias are non-trainable weights, so they are saved with
    the model and frozen into each exported segment (ops that TFLite Micro
    runs in int8, ending in LOGISTIC); no runtime needs to know the
    criterion. Temperature scaling does not apply (the fit scales each
    feature). Before fitting,
    the score is `sigmoid(8 * (top1 - 0.5))`: a monotone function of the
    top-1 probability, so a threshold t lets the same samples leave as a
    max_prob threshold of `0.5 + log(t / (1 - t)) / 8` (0.9 ~ 0.775;
    the score stays below 0.982).

    Args:
        criterion: `"max_prob"`, `"margin"`, `"entropy"`, `"patience"` or
            `"learned"` (see `keras_earlyexit.criteria.confidence`).
        threshold: float in [0, 1]; 1.0 means no sample leaves here.
            Default 0.9, or 0.0 (no floor) for `"patience"`.
        temperature: float > 0 dividing the logits before the softmax (set
            by calibration).
        patience: for `criterion="patience"` only: how many exits in a row
            must agree, an int >= 1 (default 2). PABEE's patience t is
            `patience = t + 1`.
        policy_weights: for `criterion="learned"` only: one weight per
            feature of `criteria.POLICY_FEATURES` (default
            `INITIAL_POLICY_WEIGHTS`, monotone in the top-1 probability).
        policy_bias: for `criterion="learned"` only: the bias (default
            `INITIAL_POLICY_BIAS`).

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

    learned = ExitGate("learned")  # weights fitted by kee.fit_exit_policy
    ```
    """

    def __init__(
        self,
        criterion: str = "max_prob",
        threshold: float | None = None,
        temperature: float = 1.0,
        patience: int | None = None,
        policy_weights=None,
        policy_bias: float | None = None,
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
        if criterion != "learned" and (
            policy_weights is not None or policy_bias is not None
        ):
            raise ValueError(
                "policy_weights and policy_bias apply only to "
                f"criterion='learned'; this gate's criterion is {criterion!r}."
            )
        if threshold is None:
            threshold = 0.0 if criterion == "patience" else 0.9
        threshold = check_threshold(threshold)
        temperature = self._check_temperature(temperature)
        # Scalars that depend on no input shape: created here so that
        # thresholds can be read and set before the gate is ever called.
        self.threshold_variable = self._fixed_weight("threshold", threshold)
        self.temperature_variable = self._fixed_weight("temperature", temperature)
        self.patience_variable = None
        if criterion == "patience":
            patience = DEFAULT_PATIENCE if patience is None else patience
            self.patience_variable = self._fixed_weight(
                "patience", check_patience(patience), dtype="int32"
            )
        self.policy_weights_variable = self.policy_bias_variable = None
        if criterion == "learned":
            weights, bias = check_policy(
                INITIAL_POLICY_WEIGHTS if policy_weights is None else policy_weights,
                INITIAL_POLICY_BIAS if policy_bias is None else policy_bias,
            )
            self.policy_weights_variable = self._fixed_weight("policy_weights", weights)
            self.policy_bias_variable = self._fixed_weight("policy_bias", bias)
        self.built = True

    def _fixed_weight(self, name: str, value, dtype: str | None = None):
        """A non-trainable weight holding `value` (a scalar or a vector)."""
        return self.add_weight(
            shape=np.shape(value),
            initializer=keras.initializers.Constant(value),
            dtype=dtype,
            trainable=False,
            name=name,
        )

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

    @property
    def policy(self) -> tuple[np.ndarray, float] | None:
        """`(weights, bias)` of a learned gate (None for other criteria)."""
        if self.policy_weights_variable is None:
            return None
        return (
            np.asarray(ops.convert_to_numpy(self.policy_weights_variable), np.float32),
            float(ops.convert_to_numpy(self.policy_bias_variable)),
        )

    def set_policy(self, weights, bias: float) -> None:
        """Sets a learned gate's policy: one weight per feature of
        `criteria.POLICY_FEATURES`, and the bias."""
        if self.policy_weights_variable is None:
            raise ValueError(
                f"This gate's criterion is {self.criterion!r}; a policy applies "
                "only to criterion='learned'."
            )
        weights, bias = check_policy(weights, bias)
        self.policy_weights_variable.assign(weights)
        self.policy_bias_variable.assign(bias)

    def call(self, logits):
        temperature = ops.cast(self.temperature_variable, logits.dtype)
        policy = None
        if self.policy_weights_variable is not None:
            policy = (
                ops.cast(self.policy_weights_variable, logits.dtype),
                ops.cast(self.policy_bias_variable, logits.dtype),
            )
        return criteria.confidence(logits, self.criterion, temperature, policy)

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
        if self.policy_weights_variable is not None:
            weights, bias = self.policy
            config["policy_weights"] = [float(w) for w in weights]
            config["policy_bias"] = bias
        return config
