"""keras-earlyexit: early-exit networks on Keras 3, from training to device."""

from keras_earlyexit.attach import attach_exits
from keras_earlyexit.inference import EarlyExitPrediction
from keras_earlyexit.layers import ExitBranch, ExitGate
from keras_earlyexit.losses import EarlyExitLoss, ExitCurriculum, exit_weights
from keras_earlyexit.models import EarlyExitModel

__version__ = "0.1.0"

__all__ = [
    "attach_exits",
    "EarlyExitLoss",
    "EarlyExitModel",
    "EarlyExitPrediction",
    "ExitBranch",
    "ExitCurriculum",
    "ExitGate",
    "exit_weights",
]
