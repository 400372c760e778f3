"""Evaluation: MACs per exit, profiles of accuracy against compute, and
threshold calibration."""

from keras_earlyexit.evaluation.calibrate import CalibrationResult, calibrate
from keras_earlyexit.evaluation.macs import LayerMacs, MacsReport, count_macs
from keras_earlyexit.evaluation.profile import ProfileReport, SweepPoint, profile

__all__ = [
    "CalibrationResult",
    "LayerMacs",
    "MacsReport",
    "ProfileReport",
    "SweepPoint",
    "calibrate",
    "count_macs",
    "profile",
]
