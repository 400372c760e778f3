"""Export: per-exit TFLite segments and their manifest, or one fused gated
`.tflite` file; thresholds rewritten in place with `set_thresholds`.

`to_tflite` imports TensorFlow lazily (only conversion needs it); reading
manifests and inspecting `.tflite` files needs only `ai_edge_litert`.
"""

from keras_earlyexit.export.c_arrays import to_c_arrays
from keras_earlyexit.export.flatbuffer import OpInfo, list_ops
from keras_earlyexit.export.manifest import (
    FORMAT_VERSION,
    QUANTIZATION_MODES,
    BundleError,
    Manifest,
    read_manifest,
)
from keras_earlyexit.export.micro import UnsupportedOpError
from keras_earlyexit.export.tflite import to_tflite
from keras_earlyexit.export.thresholds import set_thresholds

__all__ = [
    "BundleError",
    "FORMAT_VERSION",
    "Manifest",
    "OpInfo",
    "QUANTIZATION_MODES",
    "list_ops",
    "read_manifest",
    "UnsupportedOpError",
    "set_thresholds",
    "to_c_arrays",
    "to_tflite",
]
