"""Fake-quantized layers that simulate TFLite's int8 scheme in Keras 3.

TFLite int8 (the scheme `to_tflite(..., quantization="int8")` produces):
- weights of `CONV_2D` and `DEPTHWISE_CONV_2D`: int8, symmetric, one scale
  per output channel, range [-127, 127] (scale = max|w| / 127); a
  `SeparableConv2D` is a `DEPTHWISE_CONV_2D` and a 1x1 `CONV_2D`, with an
  int8 tensor between them;
- weights of `FULLY_CONNECTED`: int8, symmetric, one scale for the tensor
  (the converter's quantization-aware path takes no per-channel range on a
  `Dense` kernel: it transposes the kernel and refuses the axis);
- activations: int8, asymmetric, one scale and zero point per tensor, the
  range nudged so that 0.0 is exact;
- softmax and confidence outputs: the fixed range [0, 255/256] (scale 1/256,
  zero point -128) of the int8 softmax kernel.

Every layer here computes the same thing with
`keras.quantizers.fake_quant_with_min_max_vars` (float in, float out, the
value rounded to the int8 grid; straight-through gradients). On the
TensorFlow backend it lowers to `tf.quantization.fake_quant_*`, whose ranges
the TFLite converter takes as the int8 parameters of the tensors.
"""

import keras
from keras import ops

from keras_earlyexit.gate import ExitGate
from keras_earlyexit.layers import ExitBranch

_PACKAGE = "keras_earlyexit"

# The int8 softmax kernel's output grid: scale 1/256, zero point -128.
CONFIDENCE_RANGE = (0.0, 255.0 / 256.0)

# Activations that TFLite fuses into CONV_2D / FULLY_CONNECTED, so that the
# one range after them is the op's output range.
FUSED_ACTIVATIONS = ("linear", "relu", "relu6")


def activation_name(activation) -> str:
    """The serialized name of a Keras activation (None is `"linear"`)."""
    if activation is None:
        return "linear"
    name = keras.activations.serialize(activation)
    return name if isinstance(name, str) else str(name)


def fake_quant_weights(kernel, axis: int | None = None):
    """Symmetric int8 fake quantization of a kernel (range [-127, 127]).

    Args:
        kernel: weight tensor.
        axis: channel axis for one scale per channel, or None for one
            scale for the whole tensor.

    Returns:
        The kernel rounded to the int8 grid, as floats.
    """
    if axis is None:
        bound = ops.max(ops.abs(kernel))  # ()
    else:
        axis = axis % len(kernel.shape)
        others = tuple(i for i in range(len(kernel.shape)) if i != axis)
        bound = ops.max(ops.abs(kernel), axis=others)  # (channels,)
    # The range follows the weights but is not trained through: the
    # gradient reaches the weights straight through the rounding only.
    bound = ops.maximum(ops.stop_gradient(bound), 1e-8)
    return keras.quantizers.fake_quant_with_min_max_vars(
        kernel, -bound, bound, num_bits=8, narrow_range=True, axis=axis
    )


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ActivationQuantizer(keras.layers.Layer):
    """Per-tensor asymmetric int8 fake quantization with a tracked range.

    The range is a moving average of each training batch's min and max
    (widened to hold 0.0), as in TensorFlow's quantization-aware training;
    it is the int8 scale and zero point the exported tensor gets.

    Args:
        momentum: weight of the old range in the moving average, in [0, 1).

    Call arguments:
        inputs: float tensor.
        training: update the range from this batch.
        update: False to use the range without updating it (a second use of
            the same range, e.g. at the start of the next exit segment).

    Returns:
        `inputs` rounded to the int8 grid of the current range.

    Example:

    ```python
    quantizer = ActivationQuantizer(name="conv_1_quant")
    y = quantizer(keras.layers.Conv2D(8, 3, activation="relu")(x))
    ```
    """

    def __init__(self, momentum: float = 0.99, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"momentum must be in [0, 1). Received: {momentum!r}")
        self.momentum = float(momentum)
        # Set by `quantize_aware` while it measures initial ranges: running
        # min/max over all batches, as post-training calibration does.
        self.calibrating = False
        self.range_min = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="range_min"
        )
        self.range_max = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="range_max"
        )
        self.observed = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="observed"
        )
        self.built = True

    @property
    def initialized(self) -> bool:
        """Whether the range was ever measured (calibration or training)."""
        return bool(ops.convert_to_numpy(self.observed) > 0)

    def call(self, inputs, training=None, update=True):
        low = ops.convert_to_tensor(self.range_min)
        high = ops.convert_to_tensor(self.range_max)
        if update and (training or self.calibrating):
            x = ops.stop_gradient(ops.cast(inputs, "float32"))
            batch_low = ops.minimum(ops.min(x), 0.0)
            batch_high = ops.maximum(ops.max(x), 0.0)
            seen = ops.cast(ops.greater(self.observed, 0.0), "float32")
            if self.calibrating:
                keep_low = ops.minimum(low, batch_low)
                keep_high = ops.maximum(high, batch_high)
            else:
                m = self.momentum
                keep_low = m * low + (1.0 - m) * batch_low
                keep_high = m * high + (1.0 - m) * batch_high
            # The first batch sets the range; later ones move it.
            low = seen * keep_low + (1.0 - seen) * batch_low
            high = seen * keep_high + (1.0 - seen) * batch_high
            self.range_min.assign(low)
            self.range_max.assign(high)
            self.observed.assign(1.0)
        return keras.quantizers.fake_quant_with_min_max_vars(
            inputs, low, high, num_bits=8, narrow_range=False
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config["momentum"] = self.momentum
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QuantizedConv1D(keras.layers.Conv1D):
    """`Conv1D` whose kernel is fake-quantized per output channel."""

    def convolution_op(self, inputs, kernel):
        return super().convolution_op(inputs, fake_quant_weights(kernel, axis=-1))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QuantizedConv2D(keras.layers.Conv2D):
    """`Conv2D` whose kernel is fake-quantized per output channel."""

    def convolution_op(self, inputs, kernel):
        return super().convolution_op(inputs, fake_quant_weights(kernel, axis=-1))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QuantizedDepthwiseConv2D(keras.layers.DepthwiseConv2D):
    """`DepthwiseConv2D` whose kernel is fake-quantized per output channel
    (TFLite's channel `c * depth_multiplier + m`)."""

    def call(self, inputs):
        outputs = _quantized_depthwise(self, inputs, self.kernel)
        return _bias_and_activation(self, outputs)


def _quantized_depthwise(layer, inputs, kernel):
    """`layer`'s depthwise convolution with `kernel` (h, w, channels,
    multiplier) fake-quantized per output channel `c * multiplier + m`."""
    h, w, channels, multiplier = kernel.shape
    flat = ops.reshape(kernel, (h, w, channels * multiplier))
    kernel = ops.reshape(fake_quant_weights(flat, axis=-1), kernel.shape)
    return ops.depthwise_conv(
        inputs,
        kernel,
        strides=layer.strides,
        padding=layer.padding,
        dilation_rate=layer.dilation_rate,
        data_format=layer.data_format,
    )


def _bias_and_activation(layer, outputs):
    """A convolution's bias and activation, as the float layer adds them."""
    if layer.use_bias:
        shape = [1] * len(outputs.shape)
        shape[-1 if layer.data_format == "channels_last" else 1] = -1
        outputs = ops.add(outputs, ops.reshape(layer.bias, shape))
    if layer.activation is not None:
        outputs = layer.activation(outputs)
    return outputs


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QuantizedSeparableConv2D(keras.layers.SeparableConv2D):
    """`SeparableConv2D` as the TFLite converter lowers it: a
    `DEPTHWISE_CONV_2D` (kernel per channel, no bias, no activation) whose
    int8 output has a range of its own, then a 1x1 `CONV_2D` (kernel per
    output channel, with the bias and the fused activation).

    Args:
        momentum: of the tracked range between the two convolutions (see
            `ActivationQuantizer`).
        **kwargs: the arguments of `SeparableConv2D`.
    """

    def __init__(self, *args, momentum: float = 0.99, **kwargs):
        super().__init__(*args, **kwargs)
        self.momentum = float(momentum)
        self.depthwise_quantizer = ActivationQuantizer(momentum, name="depthwise_quant")

    def quantizers(self) -> list[ActivationQuantizer]:
        """The range this layer tracks inside it."""
        return [self.depthwise_quantizer]

    def call(self, inputs, training=None):
        x = _quantized_depthwise(self, inputs, self.depthwise_kernel)
        x = self.depthwise_quantizer(x, training=training)
        outputs = ops.conv(
            x,
            fake_quant_weights(self.pointwise_kernel, axis=-1),
            strides=1,
            padding="valid",
            data_format=self.data_format,
        )
        return _bias_and_activation(self, outputs)

    def get_config(self):
        config = super().get_config()
        config["momentum"] = self.momentum
        return config


def quantized_dense(layer: keras.layers.Dense, x):
    """What TFLite's int8 `FULLY_CONNECTED` computes for a `Dense` layer:
    the kernel fake-quantized per tensor, bias and fused activation in
    float (the int32 bias is exact enough to leave unrounded)."""
    y = ops.matmul(x, fake_quant_weights(layer.kernel))  # (batch, units)
    if layer.bias is not None:
        y = ops.add(y, layer.bias)
    return layer.activation(y) if layer.activation is not None else y


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QuantizedDense(keras.layers.Dense):
    """`Dense` whose kernel is fake-quantized per tensor."""

    def call(self, inputs, training=None):
        return quantized_dense(self, inputs)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QuantizedExitBranch(ExitBranch):
    """`ExitBranch` with its `Dense` kernels fake-quantized and a tracked
    int8 range on the pooled features (global average pooling is TFLite's
    `MEAN`, which has its own output range), on each hidden layer's output
    and on the logits. Same weights and configuration as `ExitBranch`.

    Args:
        momentum: of the tracked ranges (see `ActivationQuantizer`).
        **kwargs: the arguments of `ExitBranch`.
    """

    def __init__(self, *args, momentum: float = 0.99, **kwargs):
        super().__init__(*args, **kwargs)
        for layer in self.hidden_layers:
            name = activation_name(layer.activation)
            if name not in FUSED_ACTIVATIONS:
                raise ValueError(
                    f"ExitBranch '{self.name}' uses activation {name!r}, which "
                    "TFLite does not fuse into FULLY_CONNECTED; quantize_aware "
                    f"supports {', '.join(FUSED_ACTIVATIONS)} in exit heads."
                )
        self.momentum = float(momentum)
        self.pooled_quantizer = ActivationQuantizer(momentum, name="pooled_quant")
        self.hidden_quantizers = [
            ActivationQuantizer(momentum, name=f"hidden_{i}_quant")
            for i in range(len(self.hidden_layers))
        ]
        self.logits_quantizer = ActivationQuantizer(momentum, name="logits_quant")

    def _mean_pooled(self, rank: int) -> bool:
        # Global average pooling is a MEAN with its own range; max pooling
        # and windowed average pooling keep their input's range.
        return rank > 2 and self.pooling == "avg" and self.pooled_size == 1

    def build(self, input_shape):
        super().build(input_shape)
        self.input_rank = len(input_shape)

    def quantizers(self) -> list[ActivationQuantizer]:
        """The ranges this head uses."""
        pooled = [self.pooled_quantizer] if self._mean_pooled(self.input_rank) else []
        return [*pooled, *self.hidden_quantizers, self.logits_quantizer]

    def call(self, inputs, padding_mask=None, mask=None, training=None):
        if padding_mask is None:
            padding_mask = mask
        if padding_mask is not None:
            self._check_mask(inputs.shape, padding_mask.shape)
        x = self._pool(inputs, padding_mask)  # (batch, features)
        if self._mean_pooled(len(inputs.shape)):
            x = self.pooled_quantizer(x, training=training)
        for layer, quantizer in zip(self.hidden_layers, self.hidden_quantizers):
            x = quantizer(quantized_dense(layer, x), training=training)
        if self.dropout_layer is not None:
            x = self.dropout_layer(x, training=training)
        logits = quantized_dense(self.classifier, x)  # (batch, num_classes)
        return self.logits_quantizer(logits, training=training)

    def get_config(self):
        config = super().get_config()
        config["momentum"] = self.momentum
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QuantizedExitGate(ExitGate):
    """`ExitGate` whose confidence lies on the int8 softmax grid (scale
    1/256, zero point -128, at most 255/256), as in the exported segment:
    the Keras model then takes the same exit decisions as the int8 model."""

    def call(self, logits):
        confidence = super().call(logits)  # (batch,)
        low, high = CONFIDENCE_RANGE
        return keras.quantizers.fake_quant_with_min_max_vars(
            confidence, low, high, num_bits=8, narrow_range=False
        )
