"""Evaluation: MACs per exit, profiles of accuracy against compute,
threshold calibration, learned exit policies and exit placement."""

from keras_earlyexit.evaluation.calibrate import CalibrationResult, calibrate
from keras_earlyexit.evaluation.macs import LayerMacs, MacsReport, count_macs
from keras_earlyexit.evaluation.placement import (
    CandidateExit,
    ExitPlacement,
    suggest_exits,
)
from keras_earlyexit.evaluation.policy import ExitPolicyResult, fit_exit_policy
from keras_earlyexit.evaluation.profile import ProfileReport, SweepPoint, profile

__all__ = [
    "CalibrationResult",
    "CandidateExit",
    "ExitPlacement",
    "ExitPolicyResult",
    "LayerMacs",
    "MacsReport",
    "ProfileReport",
    "SweepPoint",
    "calibrate",
    "count_macs",
    "fit_exit_policy",
    "profile",
    "suggest_exits",
]
