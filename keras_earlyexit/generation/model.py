"""A causal transformer language model with exits after chosen layers."""

import math
from collections.abc import Sequence

import keras
from keras import ops

from keras_earlyexit.losses import EarlyExitLoss

_PACKAGE = "keras_earlyexit"
HEADS = ("shared", "separate")


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1. Received: {value!r}")
    return value


def causal_attention(q, k, v, query_positions):
    """Scaled dot-product attention where a query at position p sees keys at
    positions <= p.

    Args:
        q: `(batch, queries, heads, head_dim)`.
        k, v: `(batch, keys, heads, head_dim)`, key i at position i.
        query_positions: `(queries,)` int positions of the queries.

    Returns:
        `(batch, queries, heads, head_dim)`.
    """
    head_dim = q.shape[-1]
    scores = ops.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
    key_positions = ops.arange(ops.shape(k)[1], dtype="int32")  # (keys,)
    visible = key_positions[None, :] <= query_positions[:, None]  # (queries, keys)
    scores = ops.where(visible[None, None], scores, -1e9)  # (b, heads, q, keys)
    weights = ops.softmax(scores, axis=-1)
    return ops.einsum("bhqk,bkhd->bqhd", weights, v)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class TokenAndPositionEmbedding(keras.layers.Layer):
    """Token embedding plus a learned absolute position embedding.

    Args:
        vocab_size: number of token ids.
        max_length: number of positions (the context length).
        d_model: embedding width.

    Call arguments:
        token_ids: int `(batch, seq)`.
        start: position of the first token (decoding with a cache).

    Returns:
        `(batch, seq, d_model)`.
    """

    def __init__(self, vocab_size: int, max_length: int, d_model: int, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = _check_positive_int(vocab_size, "vocab_size")
        self.max_length = _check_positive_int(max_length, "max_length")
        self.d_model = _check_positive_int(d_model, "d_model")
        self.token = keras.layers.Embedding(vocab_size, d_model, name="token")
        self.position = keras.layers.Embedding(max_length, d_model, name="position")

    def build(self, input_shape):
        self.token.build(input_shape)
        self.position.build(input_shape)

    def call(self, token_ids, start=0):
        positions = start + ops.arange(ops.shape(token_ids)[1], dtype="int32")
        return self.token(token_ids) + self.position(positions)[None]

    def compute_output_shape(self, input_shape):
        return (*input_shape, self.d_model)

    def get_config(self):
        config = super().get_config()
        config.update(
            vocab_size=self.vocab_size,
            max_length=self.max_length,
            d_model=self.d_model,
        )
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class CausalBlock(keras.layers.Layer):
    """Pre-norm transformer decoder block: causal self-attention and an MLP,
    each in a residual branch.

    Besides `call` (a whole sequence), it decodes with a key/value cache
    (`call_cached`) and computes the keys and values of a hidden state
    without running the block (`key_values`, for CALM state propagation).

    Args:
        d_model: width of the residual stream.
        num_heads: attention heads; must divide `d_model`.
        mlp_dim: hidden width of the MLP.

    Call arguments:
        x: `(batch, seq, d_model)`.

    Returns:
        `(batch, seq, d_model)`.
    """

    def __init__(self, d_model: int, num_heads: int, mlp_dim: int, **kwargs):
        super().__init__(**kwargs)
        self.d_model = _check_positive_int(d_model, "d_model")
        self.num_heads = _check_positive_int(num_heads, "num_heads")
        self.mlp_dim = _check_positive_int(mlp_dim, "mlp_dim")
        if d_model % num_heads:
            raise ValueError(
                f"num_heads must divide d_model. Received: d_model={d_model}, "
                f"num_heads={num_heads}"
            )
        self.head_dim = d_model // num_heads
        self.norm_1 = keras.layers.LayerNormalization(epsilon=1e-5, name="norm_1")
        self.qkv = keras.layers.Dense(3 * d_model, name="qkv")
        self.attention_out = keras.layers.Dense(d_model, name="attention_out")
        self.norm_2 = keras.layers.LayerNormalization(epsilon=1e-5, name="norm_2")
        self.mlp_in = keras.layers.Dense(mlp_dim, activation="gelu", name="mlp_in")
        self.mlp_out = keras.layers.Dense(d_model, name="mlp_out")

    def build(self, input_shape):
        shape = (None, None, self.d_model)
        for layer in (self.norm_1, self.qkv, self.norm_2, self.mlp_in):
            layer.build(shape)
        self.attention_out.build(shape)
        self.mlp_out.build((None, None, self.mlp_dim))

    def _split_heads(self, x):
        batch, seq = ops.shape(x)[0], ops.shape(x)[1]
        return ops.reshape(x, (batch, seq, self.num_heads, self.head_dim))

    def key_values(self, x):
        """Keys and values `(batch, seq, heads, head_dim)` of hidden states
        `x` `(batch, seq, d_model)`."""
        _, k, v = self._qkv(x)
        return k, v

    def _qkv(self, x):
        qkv = self.qkv.call(self.norm_1.call(x))  # (batch, seq, 3 * d_model)
        q, k, v = ops.split(qkv, 3, axis=-1)
        return self._split_heads(q), self._split_heads(k), self._split_heads(v)

    def _finish(self, x, attended):
        batch, seq = ops.shape(x)[0], ops.shape(x)[1]
        attended = ops.reshape(attended, (batch, seq, self.d_model))
        x = x + self.attention_out.call(attended)
        return x + self.mlp_out.call(self.mlp_in.call(self.norm_2.call(x)))

    def call(self, x):
        q, k, v = self._qkv(x)
        positions = ops.arange(ops.shape(x)[1], dtype="int32")
        return self._finish(x, causal_attention(q, k, v, positions))

    def call_cached(self, x, k_cache, v_cache, start):
        """Runs the block on tokens at positions `start, start + 1, ...`.

        Args:
            x: `(batch, seq, d_model)`.
            k_cache, v_cache: `(batch, max_length, heads, head_dim)`; entries
                before `start` hold the earlier tokens' keys and values.
            start: int scalar, position of `x`'s first token.

        Returns:
            `(y, k_cache, v_cache)` with the new keys and values written at
            `start, ..., start + seq - 1`. Entries after those may hold stale
            values; causal masking hides them until they are rewritten.
        """
        q, k, v = self._qkv(x)
        k_cache = ops.slice_update(k_cache, (0, start, 0, 0), k)
        v_cache = ops.slice_update(v_cache, (0, start, 0, 0), v)
        positions = start + ops.arange(ops.shape(x)[1], dtype="int32")
        attended = causal_attention(q, k_cache, v_cache, positions)
        return self._finish(x, attended), k_cache, v_cache

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            d_model=self.d_model, num_heads=self.num_heads, mlp_dim=self.mlp_dim
        )
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class EarlyExitCausalLM(keras.Model):
    """Causal transformer language model with exits after chosen layers.

    Every exit is a LayerNormalization followed by an LM head: one head
    shared by all exits (`head="shared"`, as in LayerSkip) or one per exit
    (`head="separate"`). The model outputs every exit's next-token logits,
    shallow to deep, the final exit last. Train it with `EarlyExitLoss` on
    next-token prediction; `kee.generation.generate` decodes with it.

    Args:
        vocab_size: number of token ids.
        max_length: context length (positions).
        num_layers: transformer blocks.
        exit_layers: 1-based block indices after which a non-final exit
            reads the residual stream, e.g. `(1, 2)`; the final exit after
            block `num_layers` is always added.
        d_model: residual width.
        num_heads: attention heads.
        mlp_dim: MLP hidden width (default `4 * d_model`).
        head: `"shared"` or `"separate"`.
        exit_dropout: in training, the share of tokens that leave at a
            random non-final exit: their residual stream passes the later
            blocks unchanged, as under `"early_exit"` decoding with state
            propagation, so the later blocks learn to attend to such
            tokens. 0.0 (default) trains every token through every block.
        seed: seed of the `exit_dropout` draws.
        **kwargs: passed to `keras.Model` (e.g. `name`).

    Call arguments:
        token_ids: int `(batch, seq)` with `seq <= max_length`.

    Returns:
        List of logits `(batch, seq, vocab_size)`, one per exit; position i
        predicts token i + 1.

    Example:

    ```python
    model = EarlyExitCausalLM(vocab_size=32, max_length=64, num_layers=4,
                              exit_layers=(1, 2), d_model=64, num_heads=4)
    model.compile("adam", kee.EarlyExitLoss())
    x, y, mask = next_token_data(sequences, pad_id=0)
    model.fit(x, y, sample_weight=mask, epochs=5)
    ```

    Reference:
        [Elhoushi et al., 2024](https://arxiv.org/abs/2404.16710) (LayerSkip);
        [Schuster et al., 2022](https://arxiv.org/abs/2207.07061) (CALM).
    """

    def __init__(
        self,
        vocab_size: int,
        max_length: int,
        num_layers: int,
        exit_layers: Sequence[int],
        d_model: int = 64,
        num_heads: int = 4,
        mlp_dim: int | None = None,
        head: str = "shared",
        exit_dropout: float = 0.0,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vocab_size = _check_positive_int(vocab_size, "vocab_size")
        self.max_length = _check_positive_int(max_length, "max_length")
        self.num_layers = _check_positive_int(num_layers, "num_layers")
        self.d_model = _check_positive_int(d_model, "d_model")
        self.num_heads = _check_positive_int(num_heads, "num_heads")
        self.mlp_dim = _check_positive_int(mlp_dim or 4 * d_model, "mlp_dim")
        exit_layers = [int(k) for k in exit_layers]
        if sorted(set(exit_layers)) != exit_layers or not all(
            1 <= k < num_layers for k in exit_layers
        ):
            raise ValueError(
                "exit_layers must be increasing block indices in [1, "
                f"{num_layers - 1}] (the final exit after block {num_layers} "
                f"is added). Received: {exit_layers}"
            )
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}. Received: {head!r}")
        if not 0.0 <= exit_dropout < 1.0:
            raise ValueError(
                f"exit_dropout must be in [0, 1). Received: {exit_dropout!r}"
            )
        self.exit_layers = exit_layers
        self.head = head
        self.exit_dropout = float(exit_dropout)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.embedding = TokenAndPositionEmbedding(
            vocab_size, max_length, d_model, name="embedding"
        )
        self.blocks = [
            CausalBlock(d_model, num_heads, self.mlp_dim, name=f"block_{i + 1}")
            for i in range(num_layers)
        ]
        self.exit_norms = [
            keras.layers.LayerNormalization(epsilon=1e-5, name=f"exit_{k}_norm")
            for k in self.exit_depths
        ]
        num_heads_out = 1 if head == "shared" else self.num_exits
        self.heads = [
            keras.layers.Dense(vocab_size, use_bias=False, name=f"lm_head_{i + 1}")
            for i in range(num_heads_out)
        ]
        self.build((None, None))

    @property
    def exit_depths(self) -> list[int]:
        """Blocks computed before each exit, shallow to deep."""
        return [*self.exit_layers, self.num_layers]

    @property
    def num_exits(self) -> int:
        return len(self.exit_layers) + 1

    @property
    def outputs(self):
        """One symbolic entry per exit (read by `ExitCurriculum`)."""
        return [
            keras.KerasTensor((None, None, self.vocab_size)) for _ in self.exit_depths
        ]

    def build(self, input_shape):
        self.embedding.build((None, None))
        for block in self.blocks:
            block.build((None, None, self.d_model))
        for norm in self.exit_norms:
            norm.build((None, None, self.d_model))
        for head in self.heads:
            head.build((None, None, self.d_model))
        self.built = True

    def exit_logits(self, k: int, hidden, fast: bool = False):
        """Logits of exit `k` (0-based) from the residual stream after its
        block."""
        head = self.heads[0 if self.head == "shared" else k]
        if fast:  # decoding: skip the Keras call machinery
            return head.call(self.exit_norms[k].call(hidden))
        return head(self.exit_norms[k](hidden))

    def call(self, token_ids, training=None):
        if token_ids.shape[1] is not None and token_ids.shape[1] > self.max_length:
            raise ValueError(
                f"Sequences of length {token_ids.shape[1]} exceed the model's "
                f"context max_length={self.max_length}."
            )
        x = self.embedding(token_ids)
        depth = self._token_depths(ops.shape(token_ids), training)
        logits = []
        for i, block in enumerate(self.blocks):
            x = block(x) if depth is None else ops.where(depth > i, block(x), x)
            if i + 1 in self.exit_depths:
                logits.append(self.exit_logits(len(logits), x))
        return logits

    def _token_depths(self, shape, training):
        """`(batch, seq, 1)` blocks each token runs in an `exit_dropout`
        training step (None otherwise): the full depth, or with probability
        `exit_dropout` the depth of a uniformly drawn non-final exit."""
        if not training or self.exit_dropout == 0.0 or not self.exit_layers:
            return None
        shape = (shape[0], shape[1], 1)
        leaves = keras.random.uniform(shape, seed=self.seed_generator)
        which = keras.random.randint(
            shape, 0, len(self.exit_layers), seed=self.seed_generator
        )
        exit_depth = ops.take(ops.convert_to_tensor(self.exit_layers, "int32"), which)
        return ops.where(leaves < self.exit_dropout, exit_depth, self.num_layers)

    def compile(self, optimizer="rmsprop", loss=None, **kwargs):
        """Like `keras.Model.compile`; `loss` is an `EarlyExitLoss` (default
        `EarlyExitLoss()`), applied to every position's next-token logits."""
        if loss is None:
            loss = EarlyExitLoss()
        if not isinstance(loss, EarlyExitLoss):
            raise ValueError(
                "EarlyExitCausalLM trains all exits with one EarlyExitLoss; "
                f"received loss={loss!r}. Use loss=kee.EarlyExitLoss(...)."
            )
        super().compile(optimizer=optimizer, loss=None, **kwargs)
        self.loss = loss

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        # Positions become samples: (batch, seq, vocab) -> (batch * seq, vocab),
        # labels and the padding mask (batch, seq) -> (batch * seq,).
        logits = [ops.reshape(z, (-1, self.vocab_size)) for z in y_pred]
        labels = ops.reshape(y, (-1,))
        if sample_weight is not None:
            sample_weight = ops.reshape(ops.cast(sample_weight, "float32"), (-1,))
        losses = [self.loss(labels, logits, sample_weight)]
        losses += [self._aggregate_additional_loss(v) for v in self.losses]
        return ops.sum(ops.stack(losses)) if len(losses) > 1 else losses[0]

    def get_compile_config(self):
        config = super().get_compile_config()
        if config:
            config["loss"] = keras.saving.serialize_keras_object(self.loss)
        return config

    def compile_from_config(self, config):
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.optimizer is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    def get_config(self):
        return {
            "name": self.name,
            "vocab_size": self.vocab_size,
            "max_length": self.max_length,
            "num_layers": self.num_layers,
            "exit_layers": list(self.exit_layers),
            "d_model": self.d_model,
            "num_heads": self.num_heads,
            "mlp_dim": self.mlp_dim,
            "head": self.head,
            "exit_dropout": self.exit_dropout,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def next_token_data(sequences, pad_id: int = 0, length: int | None = None):
    """Inputs, next-token labels and a padding mask from token sequences.

    Args:
        sequences: iterable of int sequences (lists or arrays) of any
            lengths >= 2.
        pad_id: id written into padding positions.
        length: padded input length (default: longest sequence - 1).

    Returns:
        `(x, y, mask)` NumPy arrays `(n, length)`: `x[i, t]` is token t,
        `y[i, t]` token t + 1, and `mask` is 1.0 where `y` is a real token
        and 0.0 on padding (pass it as `sample_weight`).
    """
    import numpy as np

    sequences = [np.asarray(s, dtype="int32").ravel() for s in sequences]
    if not sequences or any(len(s) < 2 for s in sequences):
        raise ValueError("next_token_data needs sequences of at least 2 tokens.")
    length = length or max(len(s) for s in sequences) - 1
    x = np.full((len(sequences), length), pad_id, "int32")
    y = np.full((len(sequences), length), pad_id, "int32")
    mask = np.zeros((len(sequences), length), "float32")
    for i, s in enumerate(sequences):
        n = min(len(s) - 1, length)
        x[i, :n], y[i, :n], mask[i, :n] = s[:n], s[1 : n + 1], 1.0
    return x, y, mask
