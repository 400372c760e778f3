"""keras-earlyexit: early-exit networks on Keras 3, from training to device.

Names load on first use (PEP 562), so `keras_earlyexit.runtime` runs on a
device host without Keras or a backend: only the Keras-side names import
Keras. Where Keras is already imported, the Keras side loads at once, so
that its layers, loss and model are registered before a `.keras` file that
uses them is loaded.
"""

import importlib
import sys

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "attach_exits": "keras_earlyexit.attach",
    "calibrate": "keras_earlyexit.evaluation",
    "count_macs": "keras_earlyexit.evaluation",
    "profile": "keras_earlyexit.evaluation",
    "EarlyExitPrediction": "keras_earlyexit.runtime.prediction",
    "ExitBranch": "keras_earlyexit.layers",
    "ExitGate": "keras_earlyexit.gate",
    "EarlyExitLoss": "keras_earlyexit.losses",
    "ExitCurriculum": "keras_earlyexit.losses",
    "exit_weights": "keras_earlyexit.losses",
    "fit_exit_policy": "keras_earlyexit.evaluation",
    "EarlyExitModel": "keras_earlyexit.models",
    "quantize_aware": "keras_earlyexit.quantization",
    "suggest_exits": "keras_earlyexit.evaluation",
}
_SUBPACKAGES = ("export", "generation", "quantization", "runtime")

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"keras_earlyexit.{name}")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'keras_earlyexit' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS) + list(_SUBPACKAGES))


def register_keras_objects() -> None:
    """Imports the Keras side, registering its layers, loss and model for
    `keras.saving.load_model` (done at import where Keras is loaded)."""
    for module in sorted(set(_EXPORTS.values())):
        importlib.import_module(module)


if "keras" in sys.modules:
    register_keras_objects()
