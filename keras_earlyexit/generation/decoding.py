"""Greedy decoding with a key/value cache: full, CALM-style early exit and
LayerSkip-style self-speculative decoding."""

import contextlib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np
from keras import ops

from keras_earlyexit.criteria import confidence

STRATEGIES = ("full", "early_exit", "self_speculative")


@dataclass
class GenerationResult:
    """Tokens from `generate` and how each was produced.

    Attributes:
        tokens: `(n,)` int, the generated tokens (prompt excluded).
        exit_indices: `(n,)` int, 0-based exit whose logits chose each token
            (`"self_speculative"`: the draft exit for accepted drafts, the
            final exit for the token the verification pass adds).
        accepted: `(n,)` int, `"self_speculative"` only (else None): drafted
            tokens accepted by the verification pass that produced each token.
        layer_evaluations: transformer blocks run over all tokens fed during
            decoding (block x token; prompt processing excluded).
        forward_passes: sequential model calls after the prompt.
        strategy: the strategy used.
    """

    tokens: np.ndarray
    exit_indices: np.ndarray
    accepted: np.ndarray | None
    layer_evaluations: int
    forward_passes: int
    strategy: str

    @property
    def layers_per_token(self) -> float:
        """Average blocks run per generated token; the first token comes
        from the prompt pass and counts as the full depth."""
        return self.layer_evaluations / len(self.tokens)


class _Decoder:
    """Compiled pieces of one model's cached decoding.

    `run(first, last)` feeds tokens (or, from a later segment on, hidden
    states) through segments `first..last` (segment s: the blocks between
    exit s-1 and exit s) and returns the hidden states, exit `last`'s greedy
    tokens and confidences, and the updated caches of those blocks.
    TensorFlow and JAX compile each piece once per input length; model
    weights enter JAX's compiled code as constants, so a decoder is
    rebuilt when the weights change.
    """

    def __init__(self, model):
        self.model = model
        self.backend = keras.backend.backend()
        depths = model.exit_depths
        self.segment_blocks = [
            range(a, b) for a, b in zip([0, *depths[:-1]], depths)
        ]  # block indices per segment
        self.weights = self._weight_values()
        self._compiled = {}

    def _weight_values(self) -> list:
        return [v.value for v in self.model.weights]

    def is_current(self) -> bool:
        if self.backend != "jax":
            return True  # TensorFlow and torch read variables at call time
        return all(a is b for a, b in zip(self.weights, self._weight_values()))

    def empty_caches(self) -> list:
        model = self.model
        block = model.blocks[0]
        shape = (1, model.max_length, block.num_heads, block.head_dim)
        zeros = ops.zeros(shape, dtype=model.compute_dtype)
        return [(zeros, zeros) for _ in model.blocks]

    def _compile(self, key, fn):
        if key not in self._compiled:
            if self.backend == "jax":
                import jax

                fn = jax.jit(fn)
            elif self.backend == "tensorflow":
                import tensorflow as tf

                fn = tf.function(fn, autograph=False)
            self._compiled[key] = fn
        return self._compiled[key]

    def _blocks(self, first: int, last: int) -> list[int]:
        return [j for s in range(first, last + 1) for j in self.segment_blocks[s]]

    def run(self, first: int, last: int, x, start: int, caches: list):
        """Runs segments `first..last` on `x` at positions `start...`;
        returns `(hidden, tokens (t,), confidences (t,))` and writes the
        blocks' caches into `caches`."""
        blocks = self._blocks(first, last)
        model = self.model

        def fn(x, start, block_caches):
            if first == 0:
                x = model.embedding.call(x, start)
            new_caches = []
            for j, (k, v) in zip(blocks, block_caches):
                x, k, v = model.blocks[j].call_cached(x, k, v, start)
                new_caches.append((k, v))
            logits = model.exit_logits(last, x, fast=True)[0]  # (t, vocab)
            tokens = ops.argmax(logits, axis=-1)  # (t,)
            return x, tokens, confidence(logits), new_caches

        fn = self._compile(("run", first, last), fn)
        start = ops.convert_to_tensor(np.int32(start))
        x, tokens, conf, new_caches = fn(x, start, [caches[j] for j in blocks])
        for j, cache in zip(blocks, new_caches):
            caches[j] = cache
        return x, ops.convert_to_numpy(tokens), ops.convert_to_numpy(conf)

    def early_exit_step(self, token: int, start: int, caches: list, thresholds):
        """One CALM step in one compiled call: segments run until an exit's
        confidence passes its threshold (`ops.cond` skips the rest), and
        the skipped blocks cache keys and values of that exit's hidden
        state. Returns `(token, exit index)` and updates `caches`."""
        model = self.model
        last = len(self.segment_blocks) - 1

        def from_segment(s, x, start, caches, thresholds):
            caches = list(caches)
            for j in self.segment_blocks[s]:
                x, k, v = model.blocks[j].call_cached(x, *caches[j], start)
                caches[j] = (k, v)
            logits = model.exit_logits(s, x, fast=True)[0]  # (1, vocab)
            token = ops.cast(ops.argmax(logits, axis=-1)[0], "int32")
            if s == last:
                return token, ops.convert_to_tensor(s, "int32"), caches

            def leave():
                propagated = list(caches)
                for j in self._blocks(s + 1, last):
                    k_new, v_new = model.blocks[j].key_values(x)
                    k, v = caches[j]
                    propagated[j] = (
                        ops.slice_update(k, (0, start, 0, 0), k_new),
                        ops.slice_update(v, (0, start, 0, 0), v_new),
                    )
                return token, ops.convert_to_tensor(s, "int32"), propagated

            # The gate rule of `gate_passes`: never at a threshold of 1.0.
            threshold = thresholds[s]
            passes = ops.logical_and(
                threshold < 1.0, confidence(logits)[0] >= threshold
            )
            return ops.cond(
                passes,
                leave,
                lambda: from_segment(s + 1, x, start, caches, thresholds),
            )

        def fn(token, start, caches, thresholds):
            x = model.embedding.call(token, start)
            return from_segment(0, x, start, caches, thresholds)

        fn = self._compile(("early_exit",), fn)
        token, exit_index, new_caches = fn(
            _token_array([token]),
            ops.convert_to_tensor(np.int32(start)),
            list(caches),
            ops.convert_to_tensor(np.asarray(thresholds, np.float32)),
        )
        caches[:] = new_caches
        return int(ops.convert_to_numpy(token)), int(ops.convert_to_numpy(exit_index))

    def draft(self, draft_exit: int, token: int, start: int, count: int, caches):
        """Drafts `count` tokens greedily with segments `0..draft_exit` in one
        compiled call, feeding `token` at `start` first; returns the drafts
        `(count,)` and the hidden states of all `count + 1` fed tokens."""
        blocks = self._blocks(0, draft_exit)
        model = self.model

        def fn(token, start, block_caches):
            block_caches = list(block_caches)
            drafts, hidden = [], []
            for i in range(count + 1):
                x = model.embedding.call(token, start + i)  # (1, 1, d_model)
                for n, j in enumerate(blocks):
                    k, v = block_caches[n]
                    x, k, v = model.blocks[j].call_cached(x, k, v, start + i)
                    block_caches[n] = (k, v)
                hidden.append(x)
                if i < count:
                    logits = model.exit_logits(draft_exit, x, fast=True)
                    token = ops.cast(ops.argmax(logits, axis=-1), "int32")  # (1, 1)
                    drafts.append(token[0])
            return ops.concatenate(drafts), ops.concatenate(hidden, 1), block_caches

        fn = self._compile(("draft", draft_exit, count), fn)
        start = ops.convert_to_tensor(np.int32(start))
        drafts, hidden, new_caches = fn(
            _token_array([token]), start, [caches[j] for j in blocks]
        )
        for j, cache in zip(blocks, new_caches):
            caches[j] = cache
        return ops.convert_to_numpy(drafts).tolist(), hidden


_decoders: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def decoder_for(model) -> _Decoder:
    decoder = _decoders.get(model)
    if decoder is None or not decoder.is_current():
        decoder = _decoders[model] = _Decoder(model)
    return decoder


@contextlib.contextmanager
def _no_grad():
    if keras.backend.backend() == "torch":
        import torch

        with torch.no_grad():
            yield
    else:
        yield


def _token_array(tokens: Sequence[int]):
    return ops.convert_to_tensor(np.asarray(tokens, np.int32)[None, :])


def generate(
    model,
    token_ids,
    max_new_tokens: int,
    strategy: str = "full",
    thresholds: Sequence[float] | None = None,
    draft_exit: int = 0,
    num_draft: int = 4,
) -> GenerationResult:
    """Greedy decoding with an early-exit causal LM and a key/value cache.

    Strategies:
    - `"full"`: every token runs the whole model (the baseline).
    - `"early_exit"` (CALM): each token leaves at the first non-final exit
      whose confidence (max softmax probability) reaches its threshold;
      the skipped blocks cache keys and values computed from the exit's
      hidden state (state propagation), so later tokens attend to it.
      Thresholds come from `kee.generation.calibrate`.
    - `"self_speculative"` (LayerSkip): exit `draft_exit` drafts
      `num_draft` tokens one by one, the remaining blocks verify all of
      them in one pass (reusing the draft's hidden states and caches), and
      the longest prefix that agrees with the final exit is kept, plus the
      final exit's next token. The output equals `"full"` decoding.

    Args:
        model: an `EarlyExitCausalLM` with at least one non-final exit.
        token_ids: the prompt, a non-empty sequence of token ids
            (shape `(n,)` or `(1, n)`).
        max_new_tokens: tokens to generate, >= 1; the prompt plus these
            must fit the model's context (`max_length`).
        strategy: `"full"`, `"early_exit"` or `"self_speculative"`.
        thresholds: `"early_exit"` only; one per non-final exit.
        draft_exit: `"self_speculative"` only; 0-based non-final exit that
            drafts.
        num_draft: `"self_speculative"` only; tokens drafted per step.

    Returns:
        `GenerationResult` with `.tokens`, `.exit_indices`, `.accepted`
        (self-speculative) and `.layers_per_token`.

    Example:

    ```python
    full = kee.generation.generate(model, prompt, 20)
    fast = kee.generation.generate(model, prompt, 20, "self_speculative")
    assert (full.tokens == fast.tokens).all()
    ```

    Reference:
        [Schuster et al., 2022](https://arxiv.org/abs/2207.07061) (CALM);
        [Elhoushi et al., 2024](https://arxiv.org/abs/2404.16710) (LayerSkip).
    """
    prompt = check_generation_args(model, token_ids, max_new_tokens, strategy)
    if strategy == "early_exit":
        thresholds = _check_thresholds(model, thresholds)
    if strategy == "self_speculative":
        draft_exit, num_draft = _check_draft(model, draft_exit, num_draft)
    decoder = decoder_for(model)
    with _no_grad():
        caches = decoder.empty_caches()
        first = _prefill(decoder, prompt, caches)
        state = (decoder, first, len(prompt), max_new_tokens, caches)
        if strategy == "self_speculative":
            return _self_speculative(*state, draft_exit, num_draft)
        return _stepwise(*state, thresholds)


def _prefill(decoder: _Decoder, prompt: np.ndarray, caches: list) -> int:
    """Runs the prompt through the whole model; returns the first new
    token. Compiling backends see the prompt padded to the context length
    (one shape): the padding's cache entries are overwritten before any
    query can see them."""
    n = len(prompt)
    if decoder.backend in ("jax", "tensorflow"):
        prompt = np.pad(prompt, (0, decoder.model.max_length - n))
    last = len(decoder.segment_blocks) - 1
    _, tokens, _ = decoder.run(0, last, _token_array(prompt), 0, caches)
    return int(tokens[n - 1])


def _stepwise(decoder, first, prompt_length, max_new_tokens, caches, thresholds):
    """`"full"` (thresholds None) and `"early_exit"` decoding."""
    model = decoder.model
    last = model.num_exits - 1
    depths = model.exit_depths
    tokens, exits = [first], [last]
    layer_evaluations, passes = depths[-1], 0
    position = prompt_length
    while len(tokens) < max_new_tokens:
        if thresholds is None:
            x = _token_array([tokens[-1]])
            _, step_tokens, _ = decoder.run(0, last, x, position, caches)
            exit_index = last
            token = int(step_tokens[0])
        else:
            token, exit_index = decoder.early_exit_step(
                tokens[-1], position, caches, thresholds
            )
        passes += 1
        layer_evaluations += depths[exit_index]
        tokens.append(token)
        exits.append(exit_index)
        position += 1
    return GenerationResult(
        np.asarray(tokens),
        np.asarray(exits),
        None,
        layer_evaluations,
        passes,
        "full" if thresholds is None else "early_exit",
    )


def _self_speculative(
    decoder, first, prompt_length, max_new_tokens, caches, draft_exit, num_draft
):
    model = decoder.model
    last = model.num_exits - 1
    depths = model.exit_depths
    tokens, exits, accepted = [first], [last], [0]
    layer_evaluations, passes = depths[-1], 0
    position = prompt_length  # position of tokens[-1], not yet fed
    while len(tokens) < max_new_tokens:
        # Drafts past max_new_tokens are cut at the end; a fixed count keeps
        # one compiled shape; fewer near the end of the context (at least one:
        # the loop stops before the last position).
        count = min(num_draft, model.max_length - 1 - position)
        drafts, hidden = decoder.draft(draft_exit, tokens[-1], position, count, caches)
        _, verified, _ = decoder.run(draft_exit + 1, last, hidden, position, caches)
        passes += 2
        layer_evaluations += (count + 1) * depths[-1]
        agree = 0
        while agree < count and drafts[agree] == int(verified[agree]):
            agree += 1
        new = drafts[:agree] + [int(verified[agree])]
        tokens += new
        exits += [draft_exit] * agree + [last]
        accepted += [agree] * len(new)
        position += len(new)
    n = max_new_tokens
    return GenerationResult(
        np.asarray(tokens[:n]),
        np.asarray(exits[:n]),
        np.asarray(accepted[:n]),
        layer_evaluations,
        passes,
        "self_speculative",
    )


def check_generation_args(model, token_ids, max_new_tokens, strategy) -> np.ndarray:
    """Checks the model, prompt, length and strategy; returns the prompt as
    a 1-D int32 array."""
    from keras_earlyexit.generation.model import EarlyExitCausalLM

    if not isinstance(model, EarlyExitCausalLM):
        raise TypeError(
            "generate needs an EarlyExitCausalLM (a causal LM with exits). "
            f"Received: {type(model).__name__}"
        )
    if model.num_exits < 2:
        raise ValueError(
            "The model has no exits besides the final one (exit_layers is "
            "empty): early exit and self-speculative decoding need one. "
            "Build it with exit_layers=(k, ...)."
        )
    if strategy not in STRATEGIES:
        raise ValueError(
            f"Unknown strategy {strategy!r}. Use one of "
            f"{', '.join(map(repr, STRATEGIES))}."
        )
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, (int, np.integer))
        or max_new_tokens < 1
    ):
        raise ValueError(
            f"max_new_tokens must be an int >= 1. Received: {max_new_tokens!r}"
        )
    prompt = np.asarray(token_ids)
    if prompt.ndim == 2 and prompt.shape[0] == 1:
        prompt = prompt[0]
    if prompt.ndim != 1 or prompt.size == 0:
        raise ValueError(
            "token_ids must be one non-empty prompt of shape (n,) or (1, n). "
            f"Received shape {prompt.shape}."
        )
    if not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(f"token_ids must be integers. Received dtype {prompt.dtype}.")
    bad = np.flatnonzero((prompt < 0) | (prompt >= model.vocab_size))
    if bad.size:
        raise ValueError(
            f"Token id {int(prompt[bad[0]])} at position {int(bad[0])} is "
            f"outside the vocabulary [0, {model.vocab_size - 1}]."
        )
    if len(prompt) > model.max_length:
        raise ValueError(
            f"The prompt has {len(prompt)} tokens, more than the model's "
            f"context max_length={model.max_length}. Shorten the prompt."
        )
    if len(prompt) + max_new_tokens > model.max_length:
        raise ValueError(
            f"The prompt ({len(prompt)} tokens) plus max_new_tokens="
            f"{max_new_tokens} exceeds the context max_length="
            f"{model.max_length}. Use max_new_tokens <= "
            f"{model.max_length - len(prompt)}."
        )
    return prompt.astype(np.int32)


def _check_thresholds(model, thresholds) -> list[float]:
    if thresholds is None:
        raise ValueError(
            "strategy='early_exit' needs thresholds, one per non-final exit: "
            "thresholds=kee.generation.calibrate(model, prompts, ...).thresholds"
        )
    thresholds = [float(t) for t in thresholds]
    if len(thresholds) != model.num_exits - 1:
        raise ValueError(
            f"Expected {model.num_exits - 1} thresholds (one per non-final "
            f"exit); received {len(thresholds)}."
        )
    if not all(0.0 <= t <= 1.0 for t in thresholds):
        raise ValueError(f"Thresholds must lie in [0, 1]. Received: {thresholds}")
    return thresholds


def _check_draft(model, draft_exit, num_draft) -> tuple[int, int]:
    valid = range(model.num_exits - 1)
    if isinstance(draft_exit, bool) or draft_exit not in valid:
        raise ValueError(
            f"draft_exit={draft_exit!r} is not a non-final exit of the model; "
            f"use a 0-based exit index in {list(valid)} (exits after blocks "
            f"{model.exit_layers})."
        )
    if isinstance(num_draft, bool) or not isinstance(num_draft, int) or num_draft < 1:
        raise ValueError(f"num_draft must be an int >= 1. Received: {num_draft!r}")
    return int(draft_exit), num_draft
