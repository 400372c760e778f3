"""Token-level early exit for causal language models.

`EarlyExitCausalLM` is a causal transformer with exits after chosen layers,
trained with `EarlyExitLoss` on next-token prediction. `generate` decodes
greedily with a key/value cache: `"full"`, CALM-style `"early_exit"` or
LayerSkip-style `"self_speculative"`.
"""

from keras_earlyexit.generation.calibration import GenerationCalibration, calibrate
from keras_earlyexit.generation.decoding import (
    STRATEGIES,
    GenerationResult,
    generate,
)
from keras_earlyexit.generation.model import (
    CausalBlock,
    EarlyExitCausalLM,
    TokenAndPositionEmbedding,
    next_token_data,
)

__all__ = [
    "STRATEGIES",
    "CausalBlock",
    "EarlyExitCausalLM",
    "GenerationCalibration",
    "GenerationResult",
    "calibrate",
    "generate",
    "TokenAndPositionEmbedding",
    "next_token_data",
]
