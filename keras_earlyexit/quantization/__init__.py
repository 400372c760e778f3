"""Quantization-aware training: `quantize_aware(model)` rebuilds an
`EarlyExitModel` with TFLite's int8 scheme simulated in `keras.ops`, to
fine-tune on any backend and export with `to_tflite(...,
quantization="int8")`."""

from keras_earlyexit.quantization.layers import (
    ActivationQuantizer,
    QuantizedConv1D,
    QuantizedConv2D,
    QuantizedDense,
    QuantizedDepthwiseConv2D,
    QuantizedExitBranch,
    QuantizedExitGate,
    QuantizedSeparableConv2D,
)
from keras_earlyexit.quantization.qat import (
    ExitDistillation,
    QuantizedEarlyExitModel,
    quantize_aware,
)

__all__ = [
    "ActivationQuantizer",
    "ExitDistillation",
    "QuantizedConv1D",
    "QuantizedConv2D",
    "QuantizedDense",
    "QuantizedDepthwiseConv2D",
    "QuantizedEarlyExitModel",
    "QuantizedExitBranch",
    "QuantizedExitGate",
    "QuantizedSeparableConv2D",
    "quantize_aware",
]
