"""keras-earlyexit: early-exit networks on Keras 3, from training to device."""

from keras_earlyexit import export, runtime  # noqa: F401  (kee.export, kee.runtime)
from keras_earlyexit.attach import attach_exits
from keras_earlyexit.evaluation import calibrate, count_macs, profile
from keras_earlyexit.inference import EarlyExitPrediction
from keras_earlyexit.layers import ExitBranch, ExitGate
from keras_earlyexit.losses import EarlyExitLoss, ExitCurriculum, exit_weights
from keras_earlyexit.models import EarlyExitModel

__version__ = "0.1.0"

__all__ = [
    "attach_exits",
    "calibrate",
    "count_macs",
    "EarlyExitLoss",
    "EarlyExitModel",
    "EarlyExitPrediction",
    "ExitBranch",
    "ExitCurriculum",
    "ExitGate",
    "exit_weights",
    "profile",
]
