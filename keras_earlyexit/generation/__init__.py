"""Token-level early exit for causal language models.

`EarlyExitCausalLM` is a causal transformer with exits after chosen layers,
trained with `EarlyExitLoss` on next-token prediction.
"""

from keras_earlyexit.generation.model import (
    CausalBlock,
    EarlyExitCausalLM,
    TokenAndPositionEmbedding,
    next_token_data,
)

__all__ = [
    "CausalBlock",
    "EarlyExitCausalLM",
    "TokenAndPositionEmbedding",
    "next_token_data",
]
