"""A generated sequence-classification task (no download) and a small
multi-exit transformer encoder for it, shared by the text example, its
benchmark and the tests.

The task: token sequences of variable length (16 to 32 tokens, padded with
0 at the end), 4 classes. Every sequence starts with a `[CLS]` token; the
rest is filler drawn from 53 tokens, plus the tokens that decide the class:

- *local* samples (75% by default) hold one class marker `M_c`; the class is
  `c`, or `(c + 1) % 4` when the token right before the marker is `SHIFT`
  (30% of them). At most two adjacent tokens decide: one attention step to
  the neighbour is enough.
- *long-range* samples (25%) hold no marker. They hold the two bigrams
  `P_f Q_f` and `Q_f P_f` of one token family `f` in {0, 1}, at least a
  third of the sequence apart, and a lone `P_f` or `Q_f` (at random)
  before the first bigram and after the second, never next to another
  token of the family. The class is `2 f` if `P_f Q_f` comes first, else
  `2 f + 1`. The family narrows the class to two; settling it takes two
  steps: finding each bigram (a token's neighbour) and then comparing the
  positions of two bigrams far apart. The lone tokens make the first and
  the last family token, and the counts of `P_f` and `Q_f`, say nothing
  about the class. What remains of a shortcut is the one every order
  relation has: a bigram near the start is more often the first.

What keeps the other shortcuts out: local samples also carry a bigram of
a family in random order and lone family tokens (60% of them), and `SHIFT`
appears as a distractor away from any marker (30% of all samples), so
neither family tokens nor `SHIFT` alone say anything about the class. No
marker means long-range. Nothing in the generator depends on the model:
the shares are the only knobs, and `hard` marks each sample's kind so that
results can be read per kind.
"""

from dataclasses import dataclass

import keras
import numpy as np
from keras import ops

from keras_earlyexit.demo import Splits
from keras_earlyexit.layers import ExitBranch
from keras_earlyexit.models import EarlyExitModel

PAD, CLS, SHIFT = 0, 1, 6
MARKERS = (2, 3, 4, 5)  # M_0 .. M_3
FAMILIES = ((7, 8), (9, 10))  # (P_0, Q_0), (P_1, Q_1)
FIRST_FILLER = 11
VOCAB_SIZE = 64
NUM_CLASSES = 4
MAX_LENGTH = 32
MIN_LENGTH = 16


@dataclass
class TextSplits(Splits):
    """Token ids `(n, MAX_LENGTH)` int32 and labels per split, plus whether
    each sample is long-range (`hard_*`, bool)."""

    hard_train: np.ndarray
    hard_val: np.ndarray
    hard_test: np.ndarray


def make_sequences(
    n: int,
    seed: int = 0,
    hard_fraction: float = 0.25,
    shift_fraction: float = 0.3,
    max_length: int = MAX_LENGTH,
    min_length: int = MIN_LENGTH,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generates `n` samples of the task described in the module docstring.

    Args:
        n: number of samples.
        seed: seed of the NumPy generator; the same seed gives the same data.
        hard_fraction: share of long-range samples, in [0, 1].
        shift_fraction: share of local samples whose marker follows `SHIFT`.
        max_length: padded length (>= min_length).
        min_length: shortest sequence, `[CLS]` included (>= 8).

    Returns:
        `(tokens, labels, hard)`: int32 `(n, max_length)` padded with 0,
        int64 `(n,)` in [0, 4), bool `(n,)` (long-range samples).

    Example:

    ```python
    tokens, labels, hard = make_sequences(1000, seed=0)
    ```
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1. Received: {n!r}")
    for name, value in (
        ("hard_fraction", hard_fraction),
        ("shift_fraction", shift_fraction),
    ):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1]. Received: {value!r}")
    if not 8 <= min_length <= max_length:
        raise ValueError(
            "Lengths must satisfy 8 <= min_length <= max_length. Received: "
            f"min_length={min_length!r}, max_length={max_length!r}"
        )
    rng = np.random.default_rng(seed)
    tokens = np.zeros((n, max_length), np.int32)
    labels = np.zeros(n, np.int64)
    hard = rng.uniform(size=n) < hard_fraction
    lengths = rng.integers(min_length, max_length + 1, n)
    for i in range(n):
        length = int(lengths[i])
        seq = rng.integers(FIRST_FILLER, VOCAB_SIZE, length)
        seq[0] = CLS
        free = set(range(1, length))  # positions not yet holding a key token
        if hard[i]:
            labels[i] = _place_ordered_bigrams(rng, seq, free)
        else:
            labels[i] = _place_marker(rng, seq, free, shift_fraction)
            if rng.uniform() < 0.6:
                family = FAMILIES[int(rng.integers(len(FAMILIES)))]
                bigram = family if rng.uniform() < 0.5 else family[::-1]
                _put(seq, free, _bigram_start(rng, free), *bigram)
                _place_lone(rng, seq, free, family, int(rng.integers(0, 3)))
        if rng.uniform() < 0.3:
            _place_distractor_shift(rng, seq, free)
        tokens[i, :length] = seq
    return tokens, labels, hard


def _bigram_start(rng, free: set) -> int:
    """A random position p with p and p + 1 free (the sequence is long
    enough for every bigram the generator places)."""
    starts = sorted(p for p in free if p + 1 in free)
    return int(rng.choice(starts))


def _put(seq, free: set, start: int, *tokens_) -> None:
    for offset, token in enumerate(tokens_):
        seq[start + offset] = token
        free.discard(start + offset)


def _place_marker(rng, seq, free: set, shift_fraction: float) -> int:
    """One marker (after SHIFT in `shift_fraction` of cases); its class."""
    c = int(rng.integers(NUM_CLASSES))
    if rng.uniform() < shift_fraction:
        _put(seq, free, _bigram_start(rng, free), SHIFT, MARKERS[c])
        return (c + 1) % NUM_CLASSES
    _put(seq, free, int(rng.choice(sorted(free))), MARKERS[c])
    return c


def _place_ordered_bigrams(rng, seq, free: set) -> int:
    """The bigrams `P Q` and `Q P` of one family, at least a third of the
    sequence apart, with a lone family token before the first and after the
    second (which of `P` / `Q` at random: the first and the last family
    token say nothing about the class); returns the class."""
    length = len(seq)
    gap = max(3, (length - 1) // 3)  # >= 3: the bigrams never touch
    # Room for a lone token (and a gap) before the first and after the second.
    pairs = [(a, b) for a in range(3, length - 1) for b in range(a + gap, length - 3)]
    first, second = pairs[int(rng.integers(len(pairs)))]
    f = int(rng.integers(len(FAMILIES)))
    family = FAMILIES[f]
    p, q = family
    pq_first = bool(rng.uniform() < 0.5)
    _put(seq, free, first, *((p, q) if pq_first else (q, p)))
    _put(seq, free, second, *((q, p) if pq_first else (p, q)))
    before = int(rng.integers(1, first - 1))
    after = int(rng.integers(second + 3, length))
    _put(seq, free, before, family[int(rng.integers(2))])
    _put(seq, free, after, family[int(rng.integers(2))])
    return 2 * f + (0 if pq_first else 1)


def _place_lone(rng, seq, free: set, family, count: int) -> None:
    """`count` family tokens, each with no family token next to it (so they
    form no bigram)."""
    for _ in range(count):
        allowed = sorted(
            i
            for i in free
            if int(seq[i - 1]) not in family
            and (i + 1 >= len(seq) or int(seq[i + 1]) not in family)
        )
        if allowed:
            _put(seq, free, int(rng.choice(allowed)), family[int(rng.integers(2))])


def _place_distractor_shift(rng, seq, free: set) -> None:
    """SHIFT where the next token is no marker, so it changes nothing."""
    markers = set(MARKERS)
    allowed = sorted(
        p for p in free if p + 1 >= len(seq) or int(seq[p + 1]) not in markers
    )
    if allowed:
        _put(seq, free, int(rng.choice(allowed)), SHIFT)


def load_sequences(
    sizes: tuple[int, int, int] = (6000, 2000, 2000),
    seed: int = 0,
    hard_fraction: float = 0.25,
) -> TextSplits:
    """Train, validation and test splits of the task (one draw, cut in
    three), with the long-range flags of each split."""
    if len(sizes) != 3 or any(not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(
            f"sizes must be 3 ints >= 1 (train, val, test). Received: {sizes!r}"
        )
    tokens, labels, hard = make_sequences(sum(sizes), seed, hard_fraction)
    a, b = sizes[0], sizes[0] + sizes[1]
    return TextSplits(
        tokens[:a],
        labels[:a],
        tokens[a:b],
        labels[a:b],
        tokens[b:],
        labels[b:],
        hard[:a],
        hard[a:b],
        hard[b:],
    )


def _encoder_body(
    tokens,
    num_layers: int,
    width: int,
    heads: int,
    ffn_units: int,
    exit_after,
    exit_hidden: int | None,
    dropout: float,
):
    """Token + learned position embeddings, then pre-norm encoder layers
    (MultiHeadAttention, LayerNormalization, ReLU feed-forward). Returns the
    last hidden states, the padding mask and the exits' logits after the
    layers in `exit_after`.

    The padding mask is computed from the ids; the attention (keys) and the
    exits' pooling ignore padding, and segments carry the mask on.

    For int8 export, calibrate with unpadded sequences (`make_sequences(...,
    min_length=MAX_LENGTH)`): Keras' attention mask sets masked scores to
    -1e9, and calibration data with padding gives that tensor an int8 scale
    of about 1e36, which rounds every score to 0 (checked with TF 2.21: the
    int8 model then agreed with 37% of the float model's classes). Without
    padding in calibration, the scale fits the real scores and -1e9
    saturates to the int8 minimum, which the softmax still maps to ~0.
    """
    mask = ops.not_equal(tokens, PAD)  # (batch, steps) bool
    positions = ops.cumsum(ops.ones_like(tokens), axis=1) - 1  # (batch, steps)
    x = keras.layers.Embedding(VOCAB_SIZE, width, name="token_embedding")(tokens)
    x = x + keras.layers.Embedding(MAX_LENGTH, width, name="position_embedding")(
        positions
    )  # (batch, steps, width)
    exits = []
    for i in range(1, num_layers + 1):
        h = keras.layers.LayerNormalization(epsilon=1e-5, name=f"layer_{i}_norm_1")(x)
        h = keras.layers.MultiHeadAttention(
            heads, width // heads, dropout=dropout, name=f"layer_{i}_attention"
        )(h, h, attention_mask=ops.expand_dims(mask, 1))  # (batch, 1, steps)
        x = keras.layers.Add(name=f"layer_{i}_add_1")([x, h])
        h = keras.layers.LayerNormalization(epsilon=1e-5, name=f"layer_{i}_norm_2")(x)
        h = keras.layers.Dense(ffn_units, activation="relu", name=f"layer_{i}_ffn_1")(h)
        h = keras.layers.Dense(width, name=f"layer_{i}_ffn_2")(h)
        x = keras.layers.Add(name=f"layer_{i}_add_2")([x, h])  # (batch, steps, width)
        if i in exit_after and i < num_layers:
            exits.append(
                ExitBranch(NUM_CLASSES, hidden_units=exit_hidden, name=f"exit_{i}")(
                    x, padding_mask=mask
                )
            )
    return x, mask, exits


def text_encoder(
    num_layers: int = 6,
    width: int = 32,
    heads: int = 4,
    ffn_units: int = 64,
    exit_after=None,
    exit_hidden: int | None = 32,
    dropout: float = 0.0,
    **model_kwargs,
) -> EarlyExitModel:
    """A multi-exit transformer encoder for `(batch, MAX_LENGTH)` int32
    token ids: an `ExitBranch` after each layer in `exit_after` (default:
    every layer) and a final exit after the last.

    Only ReLU, `Dense`, `MultiHeadAttention`, `LayerNormalization` and
    embedding lookups: ops that TFLite Micro has kernels for.
    """
    _check_encoder_args(num_layers, width, heads, ffn_units)
    exit_after = set(range(1, num_layers) if exit_after is None else exit_after)
    bad = sorted(
        k for k in exit_after if not (isinstance(k, int) and 1 <= k < num_layers)
    )
    if bad:
        raise ValueError(
            f"exit_after must hold layer numbers in [1, {num_layers - 1}] "
            f"(the final exit follows layer {num_layers}). Received: {bad}"
        )
    tokens = keras.Input((MAX_LENGTH,), dtype="int32", name="tokens")
    x, mask, exits = _encoder_body(
        tokens, num_layers, width, heads, ffn_units, exit_after, exit_hidden, dropout
    )
    final = ExitBranch(NUM_CLASSES, hidden_units=exit_hidden, name="final")(
        x, padding_mask=mask
    )
    return EarlyExitModel(
        tokens, [*exits, final], name=f"text_encoder_{num_layers}", **model_kwargs
    )


def static_encoder(
    num_layers: int,
    width: int = 32,
    heads: int = 4,
    ffn_units: int = 64,
    exit_hidden: int | None = 32,
    dropout: float = 0.0,
) -> keras.Model:
    """The same encoder with one classifier after its last layer (no exits),
    for comparison with early exit at equal compute."""
    _check_encoder_args(num_layers, width, heads, ffn_units)
    tokens = keras.Input((MAX_LENGTH,), dtype="int32", name="tokens")
    x, mask, _ = _encoder_body(
        tokens, num_layers, width, heads, ffn_units, set(), exit_hidden, dropout
    )
    logits = ExitBranch(NUM_CLASSES, hidden_units=exit_hidden, name="final")(
        x, padding_mask=mask
    )
    return keras.Model(tokens, logits, name=f"static_encoder_{num_layers}")


def _check_encoder_args(num_layers, width, heads, ffn_units) -> None:
    for name, value in (
        ("num_layers", num_layers),
        ("width", width),
        ("heads", heads),
        ("ffn_units", ffn_units),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1. Received: {value!r}")
    if width % heads:
        raise ValueError(
            f"width must be a multiple of heads. Received: width={width}, heads={heads}"
        )
