"""Runtime: the gated early-exit loop over a TFLite bundle (LiteRT or
TFLite Micro). Imports no TensorFlow."""

from keras_earlyexit.runtime.gated import (
    BACKENDS,
    GatedInterpreter,
    RuntimeStats,
    SampleResult,
    dequantize,
    quantize,
    requantize,
)

__all__ = [
    "BACKENDS",
    "GatedInterpreter",
    "RuntimeStats",
    "SampleResult",
    "dequantize",
    "quantize",
    "requantize",
]
