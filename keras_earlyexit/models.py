"""`EarlyExitModel`: a functional model whose outputs are exit logits."""

import numbers
from collections.abc import Iterable, Sequence

import keras
from keras import ops

from keras_earlyexit import graph, inference
from keras_earlyexit.gate import ExitGate, check_patience, check_threshold
from keras_earlyexit.layers import ExitBranch
from keras_earlyexit.losses import EarlyExitLoss, one_hot_targets

_PACKAGE = "keras_earlyexit"
_SOFTMAX_NAMES = ("softmax", "log_softmax")


def _producer(tensor):
    return tensor._keras_history[0]


def _check_exit_outputs(inputs, outputs) -> list:
    outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
    if len(outputs) < 2:
        raise ValueError(
            f"An EarlyExitModel needs at least 2 exits; received {len(outputs)} "
            "output(s). Add exit heads with ExitBranch (or attach_exits) and "
            "pass all exits' logits, shallow to deep: "
            "EarlyExitModel(inputs, [exit_1, ..., final])."
        )
    classes = set()
    for i, t in enumerate(outputs):
        if not isinstance(t, keras.KerasTensor):
            raise ValueError(
                f"Output {i} is a {type(t).__name__}, not a symbolic Keras "
                "tensor. Build the model with the functional API."
            )
        layer = _producer(t)
        if len(t.shape) != 2 or t.shape[-1] is None or t.shape[-1] < 2:
            raise ValueError(
                f"Output {i} ('{layer.name}') has shape {t.shape}; every exit "
                "must output classifier logits of shape (batch, num_classes) "
                "with num_classes >= 2."
            )
        activation = getattr(layer, "activation", None)
        activation_name = getattr(activation, "__name__", str(activation))
        if activation_name in _SOFTMAX_NAMES or type(layer).__name__ == "Softmax":
            raise ValueError(
                f"Output {i} ('{layer.name}') ends in a softmax; exits must "
                "output logits. Use activation=None on the last layer (the "
                "loss and the gates apply the softmax)."
            )
        classes.add(t.shape[-1])
    if len(classes) > 1:
        raise ValueError(
            "All exits must predict the same classes; received num_classes "
            f"{[t.shape[-1] for t in outputs]}."
        )
    _check_depth_order(inputs, outputs)
    return outputs


def _check_depth_order(inputs, outputs: list) -> None:
    """Raises if an exit branches off the backbone before an exit listed
    ahead of it: segments would then compute the deeper exit first.

    An exit's trunk is what it computes minus its head: the `ExitBranch`
    that outputs it, or else the layer calls no other exit uses. Exits
    whose trunks are not nested (parallel branches) are left as given.
    """
    inputs = keras.tree.flatten(inputs)
    reached = [{id(node) for node in graph.nodes_between(inputs, [t])} for t in outputs]
    trunks = []
    for k, t in enumerate(outputs):
        if isinstance(_producer(t), ExitBranch):
            head = {id(graph.node_of(t))}
        else:
            others = set().union(*(r for j, r in enumerate(reached) if j != k))
            head = reached[k] - others
        trunks.append(reached[k] - head)
    names = [_producer(t).name for t in outputs]
    last = len(outputs) - 1
    # A final exit of plain layers owns its deepest blocks: its trunk says
    # nothing about its depth.
    depth = [len(trunk) for trunk in trunks]
    if not isinstance(_producer(outputs[last]), ExitBranch):
        depth[last] = len(reached[last]) + max(map(len, reached))
    for j in range(1, len(outputs)):
        for i in range(j):
            if trunks[j] < trunks[i] and depth[j] < depth[i]:
                order = sorted(range(len(outputs)), key=depth.__getitem__)
                raise ValueError(
                    f"Exit '{names[j]}' (output {j}) branches off the backbone "
                    f"before exit '{names[i]}' (output {i}). Pass the exits "
                    "shallow to deep, the final classifier last, e.g. "
                    f"{[names[k] for k in order]}."
                )


class _Hidden:
    """Derived state that Keras must not track or save: segment models and
    per-exit metrics (rebuilt by `compile`, so a recompile replaces them)."""

    def __init__(self):
        self.segments = None
        self.exit_metrics: list[tuple] = []  # (metric, exit index, weighted)
        self.metric_specs: dict = {"metrics": None, "weighted_metrics": None}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class EarlyExitModel(keras.Model):
    """A functional model with one output per exit (logits, shallow to deep).

    Trains all exits with one label array and one `EarlyExitLoss` through
    plain `fit`; reports each exit's loss and metrics under the exit's name;
    holds one `ExitGate` per exit (criterion, threshold, temperature), saved
    with the model.

    Args:
        inputs: input tensor(s) of the graph.
        outputs: list of exit logits `(batch, num_classes)`, shallow to deep;
            the last is the final classifier.
        name: model name.
        criterion: criterion of the gates (`"max_prob"`, `"margin"`,
            `"entropy"`, `"patience"` or `"learned"`, see `ExitGate`). The
            policies of `"learned"` gates are fitted by
            `kee.fit_exit_policy`; before that, their score is a monotone
            function of the top-1 probability.
        thresholds: one threshold per non-final exit (default 0.9 each;
            0.0, no confidence floor, for `"patience"`).
        patience: with `criterion="patience"`, how many exits in a row must
            agree on the class before a sample leaves, in
            `[1, num_exits]` (default 2).
        **kwargs: passed to `keras.Model`.

    Example:

    ```python
    model = EarlyExitModel(inputs, [exit_1, exit_2, final])
    model.compile("adam", EarlyExitLoss("linear"), metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=10)
    model.set_thresholds([0.95, 0.9])

    # PABEE: leave when 3 exits in a row agree (with no confidence floor).
    pabee = EarlyExitModel(inputs, exits, criterion="patience", patience=3)

    # Learned exit policies: fit on one split, calibrate on another.
    learned = EarlyExitModel(inputs, exits, criterion="learned")
    kee.fit_exit_policy(learned, x_fit, y_fit)
    kee.calibrate(learned, x_cal, y_cal, max_accuracy_drop=0.01, apply=True)
    ```
    """

    def __init__(self, inputs, outputs, name=None, **kwargs):
        criterion = kwargs.pop("criterion", "max_prob")
        thresholds = kwargs.pop("thresholds", None)
        patience = kwargs.pop("patience", None)
        outputs = _check_exit_outputs(inputs, outputs)
        if patience is not None:
            if criterion != "patience":
                raise ValueError(
                    f"patience={patience!r} applies only to "
                    f"criterion='patience'; received criterion={criterion!r}. "
                    "Pass criterion='patience' or leave patience unset."
                )
            check_patience(patience, len(outputs))
        super().__init__(inputs, outputs, name=name, **kwargs)
        self._hidden = _Hidden()
        self.exit_names = [_producer(t).name for t in outputs]
        self.criterion = criterion
        floor = 0.0 if criterion == "patience" else 0.9
        self.gates = [
            ExitGate(
                criterion,
                threshold=0.0 if k == len(outputs) - 1 else floor,
                patience=patience,
                name=f"{exit_name}_gate",
            )
            for k, exit_name in enumerate(self.exit_names)
        ]
        if thresholds is not None:
            self.set_thresholds(thresholds)

    @property
    def num_exits(self) -> int:
        return len(self.outputs)

    @property
    def num_classes(self) -> int:
        return int(self.outputs[0].shape[-1])

    @property
    def thresholds(self) -> list[float]:
        """One threshold per non-final exit."""
        return [gate.threshold for gate in self.gates[:-1]]

    def set_thresholds(self, thresholds: Sequence[float]) -> None:
        """Sets the gates' thresholds, one per non-final exit, in [0, 1].

        A sample leaves exit k when `threshold_k < 1.0` and its confidence
        reaches `threshold_k` (compared in float32); 1.0 keeps every sample
        (even a saturated confidence of exactly 1.0) and 0.0 lets every
        sample leave. The final exit takes every sample left.
        """
        for gate, value in zip(self.gates, self._check_thresholds(thresholds)):
            gate.threshold = value

    def _check_thresholds(self, thresholds) -> list[float]:
        if isinstance(thresholds, (str, bytes)) or not isinstance(thresholds, Iterable):
            raise ValueError(
                f"thresholds must be a list of {self.num_exits - 1} floats (one "
                f"per non-final exit). Received: {thresholds!r}"
            )
        thresholds = list(thresholds)
        if len(thresholds) != self.num_exits - 1:
            raise ValueError(
                f"Expected {self.num_exits - 1} thresholds (one per non-final "
                f"exit of {self.num_exits}); received {len(thresholds)}. The "
                "final exit takes every remaining sample."
            )
        return [
            check_threshold(t, f"Threshold of exit {k} ('{self.exit_names[k]}')")
            for k, t in enumerate(thresholds)
        ]

    @property
    def patience(self) -> int | None:
        """Exits in a row that must agree before a sample leaves (criterion
        `"patience"`), else None."""
        return self.gates[0].patience

    def set_patience(self, patience: int) -> None:
        """Sets the patience of a `criterion="patience"` model: a sample
        leaves non-final exit k when exits k - patience + 1 to k predict the
        same class (and its confidence reaches exit k's threshold, the
        confidence floor). In `[1, num_exits]`; `num_exits` lets no sample
        leave early. Saved with the model."""
        if self.criterion != "patience":
            raise ValueError(
                f"set_patience applies to criterion='patience' models; this "
                f"model's criterion is {self.criterion!r}."
            )
        patience = check_patience(patience, self.num_exits)
        for gate in self.gates:
            gate.patience = patience

    def set_temperatures(self, temperatures: Sequence[float]) -> None:
        """Sets the gates' softmax temperatures, one per exit."""
        temperatures = list(temperatures)
        if len(temperatures) != self.num_exits:
            raise ValueError(
                f"Expected {self.num_exits} temperatures (one per exit); "
                f"received {len(temperatures)}."
            )
        for gate, value in zip(self.gates, temperatures):
            gate.temperature = value

    def segments(self) -> list[keras.Model]:
        """Per-exit segment models, built once and shared with this model.

        Segment k maps the carry of segment k-1 (segment 0: the model
        inputs) to a dict of its own carry tensors, `"logits"` and
        `"confidence"`.
        """
        if self._hidden.segments is None:
            inputs = keras.tree.flatten(self.inputs)
            plans = graph.plan_segments(inputs, self.outputs)
            self._hidden.segments = [
                graph.build_segment(plan, gate, name=f"segment_{k + 1}")
                for k, (plan, gate) in enumerate(zip(plans, self.gates))
            ]
        return self._hidden.segments

    def predict_early(
        self, x, thresholds=None, batch_size: int = 256, patience: int | None = None
    ):
        """Gated inference with real per-sample exits.

        Runs segment by segment; after each exit, samples whose confidence
        reaches the threshold leave and the batch is compacted, so deeper
        segments compute only the samples still in play. With
        `criterion="patience"`, the loop also keeps each sample's class and
        streak (exits in a row agreeing on it): a sample leaves when its
        streak reaches the patience and its confidence the threshold.

        Args:
            x: input array(s).
            thresholds: one per non-final exit; default `self.thresholds`.
            batch_size: samples entering the first segment at once.
            patience: for a `"patience"` model, overrides `self.patience`
                for this call.

        Returns:
            `EarlyExitPrediction` with NumPy arrays `.classes`,
            `.exit_indices` (0-based) and `.confidences`.
        """
        if thresholds is not None:  # None: the gates' own, read as they run
            thresholds = self._check_thresholds(thresholds)
        if patience is None:
            patience = self.patience
        elif self.criterion != "patience":
            raise ValueError(
                f"patience={patience!r} applies only to criterion='patience' "
                f"models; this model's criterion is {self.criterion!r}."
            )
        else:
            patience = check_patience(patience, self.num_exits)
        if (
            isinstance(batch_size, bool)
            or not isinstance(batch_size, numbers.Integral)
            or batch_size < 1
        ):
            raise ValueError(
                f"batch_size must be an int >= 1. Received: {batch_size!r}"
            )
        return inference.predict_early(self, x, thresholds, int(batch_size), patience)

    # Training: one loss over all exits, per-exit metrics.

    def compile(
        self,
        optimizer="rmsprop",
        loss=None,
        metrics=None,
        weighted_metrics=None,
        **kwargs,
    ):
        """Like `keras.Model.compile`; `loss` is an `EarlyExitLoss`
        (default `EarlyExitLoss()`) and each metric is tracked per exit as
        `{exit name}_{metric name}`."""
        if "loss_weights" in kwargs and kwargs["loss_weights"] is not None:
            raise ValueError(
                "EarlyExitModel takes exit weights from the loss: use "
                "loss=EarlyExitLoss(weights=[...]) instead of loss_weights."
            )
        kwargs.pop("loss_weights", None)
        if loss is None:
            loss = EarlyExitLoss()
        if not isinstance(loss, EarlyExitLoss):
            raise ValueError(
                "EarlyExitModel trains all exits with one EarlyExitLoss; "
                f"received loss={loss!r}. Use loss=kee.EarlyExitLoss(...) "
                "(its options cover weights per exit, label smoothing and "
                "distillation)."
            )
        super().compile(optimizer=optimizer, loss=None, **kwargs)
        self.loss = loss
        self._hidden.metric_specs = {
            "metrics": metrics,
            "weighted_metrics": weighted_metrics,
        }
        # Each exit's own cross-entropy, weighted like the loss.
        exit_metrics = [
            (_exit_loss_metric(name), k, True) for k, name in enumerate(self.exit_names)
        ]
        for specs, weighted in ((metrics, False), (weighted_metrics, True)):
            for spec in specs or []:
                for k, name in enumerate(self.exit_names):
                    exit_metrics.append((_exit_metric(spec, name), k, weighted))
        self._hidden.exit_metrics = exit_metrics

    @property
    def metrics(self):
        return super().metrics + [m for m, _, _ in self._hidden.exit_metrics]

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        losses = [self.loss(y, list(y_pred), sample_weight)]
        losses += [self._aggregate_additional_loss(v) for v in self.losses]
        return ops.sum(ops.stack(losses)) if len(losses) > 1 else losses[0]

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        for metric, k, weighted in self._hidden.exit_metrics:
            metric.update_state(
                y, y_pred[k], sample_weight=sample_weight if weighted else None
            )
        return self.get_metrics_result()

    def get_compile_config(self):
        config = super().get_compile_config()
        if config:
            config["loss"] = keras.saving.serialize_keras_object(self.loss)
            for key, value in self._hidden.metric_specs.items():
                config[key] = keras.saving.serialize_keras_object(value)
        return config

    def compile_from_config(self, config):
        config = _portable_optimizer_config(config)
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.optimizer is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    def get_config(self):
        config = super().get_config()
        config["criterion"] = self.criterion
        if self.criterion == "patience":
            config["patience"] = self.patience
        return config


def _portable_optimizer_config(config):
    """`config` with backend-specific optimizer classes replaced by their
    public `keras.optimizers` names.

    On PyTorch, Keras saves e.g. `keras.src.backend.torch.optimizers.
    torch_adam.Adam`; loaded as such on TensorFlow or JAX, its update step
    calls `torch._foreach_*` on that backend's variables and `fit` fails
    ("expected Tensor ... but got ResourceVariable"). The public class
    resolves to the current backend's implementation, whose variables
    (iterations, moments) are the same, so the optimizer state still loads.
    """
    if isinstance(config, dict):
        module = config.get("module")
        if (
            isinstance(module, str)
            and module.startswith("keras.src.backend.")
            and hasattr(keras.optimizers, str(config.get("class_name")))
        ):
            config = {**config, "module": "keras.optimizers", "registered_name": None}
        return {key: _portable_optimizer_config(v) for key, v in config.items()}
    if isinstance(config, list):
        return [_portable_optimizer_config(v) for v in config]
    return config


def _exit_loss_metric(exit_name: str):
    return keras.metrics.MeanMetricWrapper(
        _exit_cross_entropy, name=f"{exit_name}_loss"
    )


def _exit_metric(spec, exit_name: str):
    """A fresh metric for one exit, named `{exit_name}_{metric name}`."""
    if spec in ("accuracy", "acc"):
        return keras.metrics.MeanMetricWrapper(
            _exit_accuracy, name=f"{exit_name}_accuracy"
        )
    metric = keras.metrics.get(spec)
    if isinstance(metric, keras.metrics.Metric):
        config = metric.get_config()
        config["name"] = f"{exit_name}_{config['name']}"
        return metric.__class__.from_config(config)
    if isinstance(metric, type):
        metric = metric()
        config = metric.get_config()
        config["name"] = f"{exit_name}_{config['name']}"
        return metric.__class__.from_config(config)
    return keras.metrics.MeanMetricWrapper(
        metric, name=f"{exit_name}_{metric.__name__}"
    )


def _exit_cross_entropy(y_true, logits):
    targets = one_hot_targets(y_true, logits.shape[-1])
    return -ops.sum(targets * ops.log_softmax(logits, axis=-1), axis=-1)


def _exit_accuracy(y_true, logits):
    """Accuracy for sparse or one-hot labels."""
    targets = one_hot_targets(y_true, logits.shape[-1])
    return ops.cast(
        ops.argmax(targets, axis=-1) == ops.argmax(logits, axis=-1), "float32"
    )
