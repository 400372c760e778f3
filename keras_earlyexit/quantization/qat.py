"""`quantize_aware`: an `EarlyExitModel` rebuilt with int8 fake quantization,
for quantization-aware fine-tuning on any backend and int8 export with the
ranges it learned."""

import warnings

import keras
import numpy as np
from keras import ops

from keras_earlyexit import graph
from keras_earlyexit.layers import ExitBranch
from keras_earlyexit.models import EarlyExitModel
from keras_earlyexit.quantization.layers import (
    FUSED_ACTIVATIONS,
    ActivationQuantizer,
    QuantizedConv1D,
    QuantizedConv2D,
    QuantizedDense,
    QuantizedDepthwiseConv2D,
    QuantizedExitBranch,
    QuantizedExitGate,
    QuantizedSeparableConv2D,
    activation_name,
)

_PACKAGE = "keras_earlyexit"

# Layers with a kernel: rebuilt as their fake-quantized subclass.
_WEIGHTED = {
    keras.layers.Conv1D: QuantizedConv1D,
    keras.layers.Conv2D: QuantizedConv2D,
    keras.layers.DepthwiseConv2D: QuantizedDepthwiseConv2D,
    keras.layers.Dense: QuantizedDense,
    keras.layers.SeparableConv2D: QuantizedSeparableConv2D,
    ExitBranch: QuantizedExitBranch,
}
# Layers whose int8 output keeps its input's scale and zero point (the
# TFLite kernels require it): no range of their own.
_SAME_RANGE = (
    keras.layers.MaxPooling1D,
    keras.layers.MaxPooling2D,
    keras.layers.AveragePooling1D,
    keras.layers.AveragePooling2D,
    keras.layers.GlobalMaxPooling1D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.Reshape,
    keras.layers.Flatten,
    keras.layers.Dropout,
    keras.layers.ZeroPadding1D,
    keras.layers.ZeroPadding2D,
    keras.layers.Identity,
)
# Layers kept as they are, followed by a tracked output range.
_OWN_RANGE = (
    keras.layers.Add,
    keras.layers.Concatenate,
    keras.layers.GlobalAveragePooling1D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.Activation,
    keras.layers.ReLU,
)


# Layers a following BatchNormalization folds into (as the converter folds
# it): the axis of their kernel that holds the output channels.
_FOLDABLE = (
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv2D,
    keras.layers.Dense,
)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QuantizedEarlyExitModel(EarlyExitModel):
    """An `EarlyExitModel` built by `quantize_aware`: fake-quantized layers,
    tracked activation ranges and gates on the int8 confidence grid.

    Fine-tune it like any `EarlyExitModel` (`compile` with an
    `EarlyExitLoss`, `fit`), optionally distilling from the float model
    (`compile(..., teacher=model)`); `to_tflite(..., quantization="int8")`
    exports it with the ranges it tracked.
    """

    def __init__(self, inputs, outputs, name=None, **kwargs):
        super().__init__(inputs, outputs, name=name, **kwargs)
        gates = [
            QuantizedExitGate(
                gate.criterion,
                threshold=gate.threshold,
                temperature=gate.temperature,
                patience=gate.patience if gate.criterion == "patience" else None,
                name=gate.name,
            )
            for gate in self.gates
        ]
        self.gates.clear()  # untracks the float gates
        self.gates = gates

    def compile(
        self,
        optimizer="rmsprop",
        loss=None,
        teacher: EarlyExitModel | None = None,
        distillation_weight: float = 1.0,
        distillation_temperature: float = 1.0,
        **kwargs,
    ):
        """Like `EarlyExitModel.compile`, with an optional float teacher.

        Fine-tuning moves the exits' confidences, so the exits that samples
        take drift away from the float model's even where accuracy holds.
        With `teacher` (the float model that `quantize_aware` took), each
        exit also learns the teacher's same exit (knowledge distillation):

        ```
        loss = (1 - a) * L(y, z) + a * mean_k T^2 KL(softmax(t_k / T) ||
                                                     softmax(z_k / T))
        ```

        where `L` is `loss` (an `EarlyExitLoss`), `z_k` and `t_k` are exit
        k's logits in the quantization-aware model and in the teacher,
        `a = distillation_weight` and `T = distillation_temperature`. The
        teacher runs in inference mode and is not trained. It is not saved
        with the model: a reloaded model compiles without it.

        Args:
            optimizer: as in `keras.Model.compile`.
            loss: an `EarlyExitLoss` (default `EarlyExitLoss()`).
            teacher: None, or an `EarlyExitModel` with the same inputs,
                number of exits and classes (usually the float model).
            distillation_weight: share of the teacher term, in [0, 1].
                The default 1.0 learns from the teacher only (the labels
                given to `fit` are then not used): the int8 model keeps
                the float model's exits and accuracy. On the digits CNN
                (`benchmarks/qat.py`, seed 0), int8 exit decisions agreed
                with the float model's on 99.4% of test samples with 1.0,
                98.1% with 0.5 and 94.7% without a teacher.
            distillation_temperature: softening of both distributions,
                > 0; 1.0 matches the probabilities the gates read.
            **kwargs: as in `EarlyExitModel.compile`.

        Example:

        ```python
        qat = kee.quantize_aware(model, representative_data=x_val)
        qat.compile("adam", kee.EarlyExitLoss(), teacher=model)
        ```

        Reference:
            [Hinton et al., 2015](https://arxiv.org/abs/1503.02531)
            (knowledge distillation).
        """
        if teacher is not None:
            _check_teacher(self, teacher)
        if not 0.0 <= float(distillation_weight) <= 1.0:
            raise ValueError(
                f"distillation_weight must be in [0, 1]. Received: "
                f"{distillation_weight!r}"
            )
        if not float(distillation_temperature) > 0.0:
            raise ValueError(
                "distillation_temperature must be > 0. Received: "
                f"{distillation_temperature!r}"
            )
        super().compile(optimizer=optimizer, loss=loss, **kwargs)
        self._hidden.teacher = teacher
        self._hidden.distillation = ExitDistillation(
            temperature=float(distillation_temperature), name="exit_distillation"
        )
        self._hidden.distillation_weight = float(distillation_weight)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        teacher = getattr(self._hidden, "teacher", None)
        if teacher is None:
            return super().compute_loss(x, y, y_pred, sample_weight, training)
        a = self._hidden.distillation_weight
        targets = [ops.stop_gradient(t) for t in teacher(x, training=False)]
        loss = (1.0 - a) * self.loss(y, list(y_pred), sample_weight)
        loss = loss + a * self._hidden.distillation(
            targets, list(y_pred), sample_weight
        )
        losses = [loss] + [self._aggregate_additional_loss(v) for v in self.losses]
        return ops.sum(ops.stack(losses)) if len(losses) > 1 else loss

    def segments(self) -> list[keras.Model]:
        """Per-exit segment models, as `EarlyExitModel.segments`.

        A carry leaves its segment through a range and enters the next one
        through the same range (a shared `ActivationQuantizer`), so the carry
        is named after the layer before its range (`conv_1`, not
        `conv_1_quant`, which names a layer of the next segment).
        """
        if self._hidden.segments is None:
            plans = graph.plan_segments(keras.tree.flatten(self.inputs), self.outputs)
            _rename_carries(plans)
            self._hidden.segments = [
                graph.build_segment(plan, gate, name=f"segment_{k + 1}")
                for k, (plan, gate) in enumerate(zip(plans, self.gates))
            ]
        return self._hidden.segments

    def quantizers(self) -> list[ActivationQuantizer]:
        """Every tracked activation range of the model."""
        found = []
        for layer in self.layers:
            if isinstance(layer, ActivationQuantizer):
                found.append(layer)
            elif isinstance(layer, (QuantizedExitBranch, QuantizedSeparableConv2D)):
                found.extend(layer.quantizers())
        return found

    def for_export(self, quantization: str):
        """The model `to_tflite` converts for `quantization`.

        `"int8"`: this model; its fake-quantization ops carry the tracked
        ranges into the converter. Other modes keep activations in float and
        have no use for int8 ranges: a warning says they are dropped, and the
        float `EarlyExitModel` with the fine-tuned weights is converted.
        """
        if quantization == "int8":
            unset = [q.name for q in self.quantizers() if not q.initialized]
            if unset:
                raise ValueError(
                    "The quantization-aware model has activation ranges that "
                    f"were never measured ({', '.join(unset[:5])}): pass "
                    "representative_data to quantize_aware, or fine-tune it "
                    "with fit, before exporting to int8."
                )
            return self
        warnings.warn(
            f"Exporting a quantization-aware model with quantization="
            f"{quantization!r}: activations stay in float, so the learned int8 "
            "ranges are dropped and the float model with the fine-tuned "
            "weights is converted. Use quantization='int8' to export with the "
            "learned ranges.",
            stacklevel=3,
        )
        return self.float_model()

    def float_model(self) -> EarlyExitModel:
        """The same network without fake quantization (fine-tuned weights,
        gates with their thresholds, temperatures and policies), as a plain
        `EarlyExitModel`."""
        return _rebuild(self, _dequantized_layer, quantizers=False)

    def get_config(self):
        return super().get_config()


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ExitDistillation(keras.losses.Loss):
    """Knowledge distillation exit by exit, from a teacher's exit logits.

    Formula:

    ```
    loss = mean_k T^2 * sum_c p_kc * (log p_kc - log q_kc)
    p_k = softmax(t_k / T), q_k = softmax(z_k / T)
    ```

    Args:
        temperature: softening T of both distributions, > 0.
        reduction, name, dtype: as in `keras.losses.Loss`.

    Call arguments:
        y_true: the teacher's logits, one `(batch, classes)` tensor per exit.
        y_pred: the student's logits, as many exits.

    Returns:
        The reduced loss (per sample with `reduction=None`).

    Example:

    ```python
    loss = ExitDistillation(temperature=1.0)
    loss(teacher(x), student(x))
    ```

    Reference:
        [Hinton et al., 2015](https://arxiv.org/abs/1503.02531).
    """

    def __init__(
        self,
        temperature: float = 1.0,
        reduction="sum_over_batch_size",
        name: str = "exit_distillation",
        dtype=None,
    ):
        if not float(temperature) > 0.0:
            raise ValueError(f"temperature must be > 0. Received: {temperature!r}")
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.temperature = float(temperature)

    def call(self, y_true, y_pred):
        t = self.temperature
        total = 0.0
        for teacher, student in zip(y_true, y_pred):
            log_p = ops.log_softmax(teacher / t, axis=-1)  # (batch, classes)
            log_q = ops.log_softmax(student / t, axis=-1)  # (batch, classes)
            total = total + ops.sum(ops.exp(log_p) * (log_p - log_q), axis=-1)
        return total * (t**2 / len(y_pred))  # (batch,)

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}


def _check_teacher(model, teacher) -> None:
    if not isinstance(teacher, EarlyExitModel):
        raise ValueError(
            "teacher must be an EarlyExitModel (the float model given to "
            f"quantize_aware); received a {type(teacher).__name__}."
        )
    if isinstance(teacher, QuantizedEarlyExitModel):
        raise ValueError(
            f"teacher '{teacher.name}' is quantization-aware; distil from the "
            "float model (the one given to quantize_aware, or float_model())."
        )
    shapes = [tuple(t.shape[1:]) for t in keras.tree.flatten(model.inputs)]
    theirs = [tuple(t.shape[1:]) for t in keras.tree.flatten(teacher.inputs)]
    if shapes != theirs:
        raise ValueError(
            f"teacher '{teacher.name}' takes inputs of shape {theirs}; the "
            f"quantization-aware model takes {shapes}."
        )
    classes = [t.shape[-1] for t in model.outputs]
    if [t.shape[-1] for t in teacher.outputs] != classes:
        raise ValueError(
            f"teacher '{teacher.name}' has {teacher.num_exits} exits of "
            f"{teacher.outputs[0].shape[-1]} classes; the quantization-aware "
            f"model has {model.num_exits} exits of {classes[0]} classes. "
            "Each exit learns from the teacher's exit at the same position."
        )


def _rename_carries(plans: list) -> None:
    """Renames carries whose name is also a layer name in a segment that
    reads them (the range shared across the boundary)."""
    names = plans[0].names
    taken = set(graph.RESERVED_NAMES) | set(names.values())
    for k, plan in enumerate(plans[1:], start=1):
        layers = {node.operation.name for node in plan.nodes}
        for t in plan.inputs:
            name = names[id(t)]
            if name not in layers:
                continue
            base = name.removesuffix("_quant")
            new, i = base, 1
            while new in taken or new in layers:
                i += 1
                new = f"{base}_{i}"
            taken.add(new)
            names[id(t)] = new


def quantize_aware(
    model: EarlyExitModel,
    representative_data=None,
    momentum: float = 0.99,
    batch_size: int = 256,
) -> QuantizedEarlyExitModel:
    """Rebuilds an `EarlyExitModel` for quantization-aware training.

    The copy has the same exits, gates (thresholds, temperatures, patience,
    learned exit policies) and weights (the original is left untouched),
    with TFLite's int8 scheme simulated in `keras.ops` on every backend:
    kernels of `Conv1D`, `Conv2D` and `DepthwiseConv2D` fake-quantized per
    output channel, `Dense` kernels per tensor, symmetric; `SeparableConv2D`
    as TFLite runs it (a depthwise and a 1x1 convolution, both kernels per
    channel, with an int8 tensor between them); activations per
    tensor, asymmetric, with ranges tracked during `fit` (moving averages
    of batch min/max); confidences on the int8 softmax grid. Fine-tune it
    with `compile` and `fit`, then export with
    `kee.export.to_tflite(qat_model, ..., quantization="int8")`: the
    converter takes the tracked ranges as the int8 scales and zero points,
    so the int8 model computes what the fake-quant model computes.

    What the converter fuses is fused here too. A `BatchNormalization`
    right after a convolution or `Dense` with linear activation folds into
    its kernel and bias with the moving statistics (inference mode), and
    the folded kernel is the one fake-quantized and fine-tuned: the
    quantization-aware model, and its `float_model()`, have no
    `BatchNormalization` layer. A ReLU or ReLU6 right after such a layer
    is fused into it, so only the ReLU's output has a range.

    Args:
        model: a trained `EarlyExitModel`.
        representative_data: model inputs to measure the initial ranges on
            (min/max over all samples, as post-training calibration does).
            Without it, the first training batch sets them.
        momentum: of the tracked ranges, in [0, 1); the range moves by
            `1 - momentum` of the way to each batch's range.
        batch_size: batch size for measuring the initial ranges.

    Returns:
        A `QuantizedEarlyExitModel` (an `EarlyExitModel`), not compiled.

    Raises:
        ValueError: for a layer type that cannot be fake-quantized (named
            in the message), or a model that is not an `EarlyExitModel`.

    Example:

    ```python
    qat = kee.quantize_aware(model, representative_data=x_val)
    # teacher=model keeps the float model's exit decisions (see compile).
    qat.compile(keras.optimizers.Adam(3e-4), kee.EarlyExitLoss(),
                teacher=model)
    qat.fit(x_train, y_train, epochs=5)
    bundle = kee.export.to_tflite(qat, "bundle", representative_data=x_val)
    kee.calibrate(bundle, x_val, y_val, max_accuracy_drop=0.01).apply(bundle)
    ```

    Reference:
        [Jacob et al., 2018](https://arxiv.org/abs/1712.05877) (integer-
        arithmetic-only inference and quantization-aware training).
    """
    if not isinstance(model, EarlyExitModel):
        raise ValueError(
            "quantize_aware takes an EarlyExitModel; received a "
            f"{type(model).__name__}. Build one with kee.EarlyExitModel or "
            "kee.attach_exits."
        )
    if isinstance(model, QuantizedEarlyExitModel):
        raise ValueError(
            f"Model '{model.name}' is already quantization-aware; fine-tune it "
            "as it is, or call quantize_aware on its float_model()."
        )
    if not 0.0 <= float(momentum) < 1.0:
        raise ValueError(f"momentum must be in [0, 1). Received: {momentum!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1. Received: {batch_size!r}")
    for tensor in keras.tree.flatten(model.inputs):
        if "float" not in str(tensor.dtype):
            raise ValueError(
                f"Input '{tensor.name}' has dtype {tensor.dtype}; quantize_aware "
                "takes models with float inputs (int8 export quantizes them)."
            )

    def quantized_layer(layer):
        return _quantized_layer(layer, momentum)

    folds, fused = _fusions(model)
    qat = _rebuild(
        model,
        quantized_layer,
        quantizers=True,
        momentum=momentum,
        folds=folds,
        fused=fused,
    )
    if representative_data is not None:
        _measure_ranges(qat, representative_data, batch_size)
    return qat


def _unsupported(layer, why: str = "") -> ValueError:
    return ValueError(
        f"quantize_aware cannot fake-quantize layer '{layer.name}' "
        f"({type(layer).__name__}){why}. Supported: Conv1D, Conv2D, "
        "DepthwiseConv2D, SeparableConv2D, Dense, ExitBranch (activations "
        "linear, relu, relu6), Add, Concatenate, ReLU, Activation (relu, "
        "relu6), pooling, Reshape, Flatten, Dropout, ZeroPadding, and "
        "BatchNormalization where it folds into the layer before it."
    )


def _quantized_layer(layer, momentum: float):
    """(the copy of `layer` in the fake-quant model, the kind of range of its
    output: `"own"`, `"same"` as its input, or `"inside"` the layer)."""
    for base, quantized in _WEIGHTED.items():
        if type(layer) is base:
            if getattr(layer, "quantization_mode", None):
                raise _unsupported(layer, " (already quantized by Keras)")
            if base is ExitBranch:
                config = dict(layer.get_config(), momentum=momentum)
                return quantized.from_config(config), "inside"
            config = layer.get_config()
            if base is keras.layers.SeparableConv2D:  # a range inside
                config["momentum"] = momentum
            name = activation_name(layer.activation)
            if name not in FUSED_ACTIVATIONS:
                raise _unsupported(
                    layer, f": activation {name!r} is not fused by TFLite int8"
                )
            if getattr(layer, "groups", 1) != 1:
                raise _unsupported(layer, ": grouped convolution")
            return quantized.from_config(config), "own"
    if isinstance(layer, keras.layers.BatchNormalization):
        raise _unsupported(
            layer,
            ": a BatchNormalization folds only into a Conv1D, Conv2D, "
            "DepthwiseConv2D, SeparableConv2D or Dense right before it, with "
            "linear activation, channels last, and an output nothing else "
            "reads; move the activation after the normalization",
        )
    if isinstance(layer, _SAME_RANGE):
        return layer.__class__.from_config(layer.get_config()), "same"
    if type(layer) in _OWN_RANGE:
        if isinstance(layer, keras.layers.Activation):
            name = activation_name(layer.activation)
            if name not in ("relu", "relu6"):
                raise _unsupported(layer, f": activation {name!r}")
        if isinstance(layer, keras.layers.ReLU) and (
            layer.negative_slope != 0 or layer.threshold != 0
        ):
            raise _unsupported(layer, ": leaky or thresholded ReLU")
        return layer.__class__.from_config(layer.get_config()), "own"
    raise _unsupported(layer)


def _dequantized_layer(layer):
    for base, quantized in _WEIGHTED.items():
        if type(layer) is quantized:
            config = layer.get_config()
            config.pop("momentum", None)
            return base.from_config(config), "inside"
    return layer.__class__.from_config(layer.get_config()), "inside"


def _rebuild(
    model,
    convert,
    quantizers: bool,
    momentum: float = 0.99,
    folds: dict | None = None,
    fused: set = frozenset(),
):
    """Copies `model`'s graph layer by layer through `convert`, with weights,
    gates (thresholds, temperatures, patience, learned policies).

    With `quantizers`, a tracked range follows every model input and every
    layer with a range of its own; a tensor that a later exit segment reads
    (a carry) is fake-quantized again with the same range where that segment
    reads it, so each exported segment's int8 input gets exactly the
    previous segment's output parameters.

    `folds` maps the id of each `BatchNormalization` node folded away to the
    layer it folds into (see `_fusions`): that layer is rebuilt with the
    folded kernel and bias, and the normalization's output is its output.
    The outputs in `fused` (a fused ReLU follows) get no range.
    """
    folds = folds or {}
    folded_into = {id(layer): bn for bn, layer in folds.values()}
    inputs = keras.tree.flatten(model.inputs)
    outputs = list(model.outputs)
    segment_of = {}
    for k, plan in enumerate(graph.plan_segments(inputs, outputs)):
        for node in plan.nodes:
            segment_of[id(node)] = k
    tensors, range_of, produced_in = {}, {}, {}
    new_inputs = []
    for t in inputs:
        new = keras.Input(shape=t.shape[1:], dtype=t.dtype, name=t.name)
        new_inputs.append(new)
        tensors[id(t)] = new
        produced_in[id(t)] = 0
        if quantizers:
            q = ActivationQuantizer(momentum, name=f"{t.name}_quant")
            tensors[id(t)] = q(new)
            range_of[id(t)] = q
    copies, pairs = {}, []
    for node in graph.nodes_between(inputs, outputs):
        layer = node.operation
        if isinstance(layer, ActivationQuantizer) and not quantizers:
            for old, arg in zip(node.outputs, node.input_tensors):
                tensors[id(old)] = tensors[id(arg)]
                produced_in[id(old)] = segment_of[id(node)]
            continue
        if id(node) in folds:
            (old,), (arg,) = node.outputs, node.input_tensors
            tensors[id(old)] = tensors[id(arg)]
            produced_in[id(old)] = produced_in[id(arg)]
            if id(arg) in range_of:
                range_of[id(old)] = range_of[id(arg)]
            continue
        if id(layer) not in copies:
            copies[id(layer)] = convert(
                _with_bias(layer) if id(layer) in folded_into else layer
            )
            pairs.append((layer, copies[id(layer)][0]))
        new_layer, kind = copies[id(layer)]
        k = segment_of[id(node)]
        local = dict(tensors)
        for t in node.input_tensors:
            if id(t) in range_of and produced_in[id(t)] < k:
                local[id(t)] = range_of[id(t)](tensors[id(t)], update=False)
        args, kwargs = node.arguments.fill_in(local)
        results = keras.tree.flatten(new_layer(*args, **kwargs))
        for old, new in zip(node.outputs, results):
            produced_in[id(old)] = k
            if quantizers and kind == "own" and id(old) not in fused:
                q = ActivationQuantizer(momentum, name=f"{layer.name}_quant")
                new = q(new)
                range_of[id(old)] = q
            elif kind == "same" and id(node.input_tensors[0]) in range_of:
                range_of[id(old)] = range_of[id(node.input_tensors[0])]
            tensors[id(old)] = new
    cls = QuantizedEarlyExitModel if quantizers else EarlyExitModel
    rebuilt = cls(
        new_inputs if len(new_inputs) > 1 else new_inputs[0],
        [tensors[id(t)] for t in outputs],
        name=model.name,
        criterion=model.criterion,
        thresholds=model.thresholds,
        **({"patience": model.patience} if model.criterion == "patience" else {}),
    )
    rebuilt.set_temperatures([gate.temperature for gate in model.gates])
    for gate, new_gate in zip(model.gates, rebuilt.gates):
        if gate.policy is not None:  # a learned gate's fitted policy
            new_gate.set_policy(*gate.policy)
    for old, new in pairs:
        _copy_weights(old, new)
        if id(old) in folded_into:
            _fold_batch_norm(old, folded_into[id(old)], new)
    return rebuilt


def _fusions(model) -> tuple[dict, set]:
    """What the converter fuses into a layer with a kernel, which
    `quantize_aware` therefore leaves without a range of its own.

    Returns:
        `folds`: the `BatchNormalization` calls that fold into the layer
        before them, `{id(normalization node): (normalization, layer)}`;
        one folds when it normalizes the channel axis of the output of a
        `Conv1D`, `Conv2D`, `DepthwiseConv2D`, `SeparableConv2D` or `Dense`
        with linear activation, channels last, that nothing else reads and
        that is called once. Any other normalization stays in the graph,
        and `quantize_aware` refuses it by name.
        `fused`: ids of the outputs of such layers (after a folded
        normalization, if any) that only a ReLU or ReLU6 reads: TFLite
        fuses the activation, so only its output has an int8 range.
    """
    inputs = keras.tree.flatten(model.inputs)
    nodes = graph.nodes_between(inputs, list(model.outputs))
    readers, calls = {}, {}
    for node in nodes:
        calls[id(node.operation)] = calls.get(id(node.operation), 0) + 1
        for t in node.input_tensors:
            readers.setdefault(id(t), []).append(node)
    for t in model.outputs:
        readers.setdefault(id(t), []).append(None)

    def only_reader(tensor):
        found = readers.get(id(tensor), [])
        return found[0] if len(found) == 1 else None

    def fusable(layer) -> bool:
        return (
            type(layer) in _FOLDABLE
            and calls[id(layer)] == 1
            and activation_name(layer.activation) == "linear"
            and getattr(layer, "data_format", "channels_last") == "channels_last"
        )

    folds = {}
    for node in nodes:
        bn = node.operation
        if type(bn) is not keras.layers.BatchNormalization or len(node.outputs) != 1:
            continue
        (x,) = node.input_tensors
        producer = x._keras_history.operation
        if (
            fusable(producer)
            and calls[id(bn)] == 1
            and only_reader(x) is node
            and bn.axis in (-1, len(x.shape) - 1)
            and not bn.synchronized
        ):
            folds[id(node)] = (bn, producer)
    fused = set()
    for node in nodes:
        if not fusable(node.operation):
            continue
        (out,) = node.outputs
        reader = only_reader(out)
        if reader is not None and id(reader) in folds:
            reader = only_reader(reader.outputs[0])
        if reader is not None and _fused_activation(reader.operation):
            fused.add(id(out))
    return folds, fused


def _fused_activation(layer) -> bool:
    """Whether TFLite fuses `layer` into the CONV_2D, DEPTHWISE_CONV_2D or
    FULLY_CONNECTED before it (RELU and RELU6)."""
    if type(layer) is keras.layers.ReLU:
        return (
            layer.negative_slope == 0
            and layer.threshold == 0
            and layer.max_value in (None, 6.0)
        )
    if type(layer) is keras.layers.Activation:
        return activation_name(layer.activation) in ("relu", "relu6")
    return False


def _with_bias(layer):
    """A copy of `layer` with a bias (the normalization folds into one)."""
    return layer.__class__.from_config(dict(layer.get_config(), use_bias=True))


def _fold_batch_norm(layer, bn, target) -> None:
    """Sets `target`'s kernel and bias to `layer` followed by `bn` in
    inference mode: per output channel c, with f = gamma / sqrt(var + eps),
    kernel[..., c] * f and (bias - mean) * f + beta, as the converter folds
    it."""
    variance = np.asarray(bn.moving_variance.numpy(), np.float64)
    factor = 1.0 / np.sqrt(variance + bn.epsilon)
    if bn.scale:
        factor = factor * np.asarray(bn.gamma.numpy(), np.float64)
    shift = -np.asarray(bn.moving_mean.numpy(), np.float64) * factor
    if bn.center:
        shift = shift + np.asarray(bn.beta.numpy(), np.float64)
    if layer.use_bias:
        shift = shift + np.asarray(layer.bias.numpy(), np.float64) * factor
    if isinstance(layer, keras.layers.SeparableConv2D):
        kernel = target.pointwise_kernel
    else:
        kernel = target.kernel
    values = np.asarray(kernel.numpy(), np.float64)
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        # Output channel c * multiplier + m is kernel[..., c, m].
        factor = factor.reshape(values.shape[-2:])
    kernel.assign((values * factor).astype(np.float32))
    target.bias.assign(shift.astype(np.float32))


def _copy_weights(source, target) -> None:
    """Copies variables by path, so that extra range variables on one side
    (a quantized exit head) are skipped. Values go through NumPy: the two
    models never share a buffer (JAX donates them to compiled steps)."""
    values = {v.path.split("/", 1)[-1]: v for v in source.weights}
    for variable in target.weights:
        key = variable.path.split("/", 1)[-1]
        if key in values:
            variable.assign(np.array(values[key].numpy()))


def _measure_ranges(model: QuantizedEarlyExitModel, data, batch_size: int) -> None:
    """Initial ranges: min and max over `data`, with weights and earlier
    ranges already fake-quantized, as post-training calibration measures."""
    quantizers = model.quantizers()
    arrays = keras.tree.flatten(data)
    n = len(arrays[0])
    for q in quantizers:
        q.calibrating = True
    try:
        for start in range(0, n, batch_size):
            batch = [np.asarray(a[start : start + batch_size]) for a in arrays]
            model(batch if len(batch) > 1 else batch[0], training=False)
    finally:
        for q in quantizers:
            q.calibrating = False
