"""Runtime: the gated early-exit loop over a TFLite bundle or a fused
gated `.tflite` file (LiteRT or TFLite Micro).

Needs only NumPy and an interpreter (`ai-edge-litert` or `tflite-micro`):
no Keras, no TensorFlow, JAX or PyTorch, so a device host installs
`keras-earlyexit[runtime]` (LiteRT) or `keras-earlyexit[micro]` alone.
Bundles may come from elsewhere: loading checks them (`BundleError`).
"""

from keras_earlyexit.runtime.fused import FusedInterpreter, FusedModelError
from keras_earlyexit.runtime.gated import (
    BACKENDS,
    GatedInterpreter,
    RuntimeStats,
    SampleResult,
    dequantize,
    quantize,
    requantize,
)
from keras_earlyexit.runtime.manifest import BundleError, Manifest, read_manifest
from keras_earlyexit.runtime.prediction import EarlyExitPrediction

__all__ = [
    "BACKENDS",
    "BundleError",
    "EarlyExitPrediction",
    "FusedInterpreter",
    "FusedModelError",
    "GatedInterpreter",
    "Manifest",
    "RuntimeStats",
    "SampleResult",
    "dequantize",
    "quantize",
    "read_manifest",
    "requantize",
]
