"""
Title: Early-exit text generation: CALM-style exits and self-speculative decoding
Description: Train a small causal LM with exits on generated text, then decode
with per-token early exit and with self-speculative drafting.

Run: `KERAS_BACKEND=jax python examples/generate_text.py` (any backend).
"""

import keras

import keras_earlyexit as kee
from keras_earlyexit.generation import (
    EarlyExitCausalLM,
    calibrate,
    generate,
    next_token_data,
)
from keras_earlyexit.generation.corpus import (
    VOCABULARY,
    decode,
    encode,
    grammar_corpus,
)

"""
## Settings and data

The corpus comes from a small probabilistic grammar (no download). Some
tokens follow from the word before ("once upon a ..."), some need a word
further back (a copied food, an animal's sound after an adverb), and some
need the document's earlier sentences: a story keeps its animal, names and
food. Free choices are Zipf-skewed, as word choices in text are, so that
greedy decoding has a clear most likely token. Shallow exits can handle
the first kind.
"""

CONTEXT = 48
EPOCHS = 10

keras.utils.set_random_seed(0)
documents = grammar_corpus(500, CONTEXT + 1, seed=0)
x, y, mask = next_token_data(documents, length=CONTEXT)
print(decode(documents[0]))

"""
## A causal LM with exits

Four transformer blocks; exits after blocks 1 and 2 share the final LM head
(each after its own LayerNormalization), as in LayerSkip. `EarlyExitLoss`
trains every exit on next-token prediction at every position; the padding
mask goes in as `sample_weight`. `ExitCurriculum("gradual")` switches the
shallow exits on one after another.

`exit_dropout=0.3` lets 30% of the training tokens leave at a random exit:
their state passes the later blocks unchanged, as it does when a token
exits early during decoding (state propagation). The later blocks learn to
attend to such tokens; without it, early-exit decoding agrees less with
full decoding at the same thresholds.
"""

model = EarlyExitCausalLM(
    len(VOCABULARY),
    CONTEXT,
    num_layers=4,
    exit_layers=(1, 2),
    d_model=64,
    exit_dropout=0.3,
    seed=0,
)
model.compile(keras.optimizers.Adam(3e-3), kee.EarlyExitLoss())
model.fit(
    x,
    y,
    sample_weight=mask,
    epochs=EPOCHS,
    batch_size=32,
    callbacks=[kee.ExitCurriculum("gradual", duration=4)],
    verbose=2,
)

"""
## Full, early-exit and self-speculative decoding

`calibrate` picks per-exit confidence thresholds for 95% token agreement
with full greedy decoding: the agreement's lower confidence bound over the
calibration prompts must reach it, which takes about a hundred prompts or
more. Self-speculative decoding drafts with exit 1 and verifies with the
whole model; its output is the full model's.
"""

prompts = [d[:10] for d in grammar_corpus(150, 10, seed=1)]
cal = calibrate(model, prompts, 24, min_agreement=0.95)
print(
    f"thresholds {[round(t, 3) for t in cal.thresholds]}: agreement "
    f"{cal.expected_agreement:.1%} (lower bound {cal.agreement_bound:.1%}), "
    f"{cal.expected_layers_per_token:.2f} blocks per token (of 4)"
)

prompt = encode("<bos> the dog barks . ann likes soup and bob likes")
full = generate(model, prompt, 24)
early = generate(model, prompt, 24, "early_exit", thresholds=cal.thresholds)
speculative = generate(model, prompt, 24, "self_speculative", draft_exit=0)

print("prompt:         ", decode(prompt))
print("full:           ", decode(full.tokens))
print("early exit:     ", decode(early.tokens))
print("  exit per token", early.exit_indices.tolist())
print("self-speculative", decode(speculative.tokens))
print("  accepted      ", speculative.accepted.tolist())
print("identical to full:", bool((speculative.tokens == full.tokens).all()))
