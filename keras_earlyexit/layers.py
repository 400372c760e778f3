"""`ExitBranch`: the classifier head of an exit (features -> logits)."""

from collections.abc import Sequence

import keras
import numpy as np
from keras import ops

_PACKAGE = "keras_earlyexit"
POOLINGS = ("avg", "max", "first")


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ExitBranch(keras.layers.Layer):
    """Classifier head of an early exit.

    Pools what needs pooling (average or max over the sequence axis of
    rank-3 features and the spatial axes of rank-4 features, globally or to
    a small grid that keeps coarse position, as SDN's feature reduction
    does; or the first token of a sequence), then runs optional hidden
    `Dense` layers and a linear classifier. Returns logits.

    On token sequences with padding, global `"avg"` and `"max"` pooling
    count only the valid tokens. The padding mask comes from Keras masking
    (e.g. `Embedding(mask_zero=True)` upstream) or from the `padding_mask`
    call argument (as keras-hub backbones pass it); an explicit
    `padding_mask` takes precedence. A row with no valid token pools to 0.
    The masked pooling is written with multiplies and adds only (no
    boolean select), so it converts to int8 TFLite builtins.

    Args:
        num_classes: number of classes (>= 2).
        hidden_units: int or list of ints, sizes of hidden `Dense` layers
            before the classifier. Default: none (a linear probe, as in SDN
            and BranchyNet's smallest heads).
        activation: activation of the hidden layers.
        dropout: dropout rate before the classifier.
        pooling: `"avg"` or `"max"`, for rank-3 and rank-4 inputs, or
            `"first"`: the first token of a sequence (rank 3 only), e.g. the
            `[CLS]` token of BERT-like encoders (DeeBERT, PABEE).
        pooled_size: pool each sequence / spatial axis to this many bins and
            flatten; 1 (default) is global pooling. Shallow exits see
            features that still lack position invariance, and 2 often
            makes them much more accurate for little compute. Padding masks
            need global pooling (1).
        data_format: `"channels_last"` or `"channels_first"`; default
            `keras.config.image_data_format()`.
        kernel_initializer: initializer of the `Dense` kernels.

    Call arguments:
        inputs: features of shape `(batch, units)`, `(batch, steps, channels)`
            or `(batch, height, width, channels)` (channels last).
        padding_mask: optional `(batch, steps)` mask of rank-3 `inputs`,
            int or bool: 1/True for valid tokens, 0/False for padding.
        mask: the Keras mask of `inputs`, passed by Keras itself.
        training: whether dropout is active.

    Returns:
        Logits of shape `(batch, num_classes)`.

    Example:

    ```python
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(16, 3, activation="relu")(inputs)
    logits = ExitBranch(10, hidden_units=32, name="exit_1")(x)

    tokens = keras.Input((16,), dtype="int32")
    padding_mask = keras.Input((16,), dtype="int32")
    h = keras.layers.Embedding(100, 8)(tokens)
    logits = ExitBranch(2, name="exit_2")(h, padding_mask=padding_mask)
    ```

    Reference:
        [Teerapittayanon et al., 2016](https://arxiv.org/abs/1709.01686)
        (BranchyNet).
    """

    def __init__(
        self,
        num_classes: int,
        hidden_units: int | Sequence[int] | None = None,
        activation="relu",
        dropout: float = 0.0,
        pooling: str = "avg",
        pooled_size: int = 1,
        data_format: str | None = None,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(
                f"num_classes must be an int >= 2. Received: {num_classes!r}"
            )
        if hidden_units is None:
            hidden_units = []
        elif isinstance(hidden_units, int):
            hidden_units = [hidden_units]
        hidden_units = list(hidden_units)
        if any(not isinstance(u, int) or u < 1 for u in hidden_units):
            raise ValueError(
                "hidden_units must be a positive int or a list of them. "
                f"Received: {hidden_units!r}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1). Received: {dropout}")
        if pooling not in POOLINGS:
            raise ValueError(
                f"pooling must be one of {POOLINGS}. Received: {pooling!r}"
            )
        if not isinstance(pooled_size, int) or pooled_size < 1:
            raise ValueError(
                f"pooled_size must be an int >= 1. Received: {pooled_size!r}"
            )
        if pooling == "first" and pooled_size != 1:
            raise ValueError(
                "pooling='first' takes one token; pooled_size must be 1. "
                f"Received: pooled_size={pooled_size}"
            )
        data_format = data_format or keras.config.image_data_format()
        if data_format not in ("channels_last", "channels_first"):
            raise ValueError(
                "data_format must be 'channels_last' or 'channels_first'. "
                f"Received: {data_format!r}"
            )
        self.num_classes = num_classes
        self.hidden_units = hidden_units
        self.activation = keras.activations.get(activation)
        self.dropout = dropout
        self.pooling = pooling
        self.pooled_size = pooled_size
        self.data_format = data_format
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.hidden_layers = [
            keras.layers.Dense(
                units,
                activation=self.activation,
                kernel_initializer=self.kernel_initializer,
                name=f"hidden_{i}",
            )
            for i, units in enumerate(hidden_units)
        ]
        self.dropout_layer = keras.layers.Dropout(dropout) if dropout else None
        self.classifier = keras.layers.Dense(
            num_classes,
            kernel_initializer=self.kernel_initializer,
            name="classifier",
        )

    def _pool_axes(self, rank: int) -> tuple[int, ...]:
        if rank == 2:
            return ()
        if self.data_format == "channels_last":
            return tuple(range(1, rank - 1))
        return tuple(range(2, rank))

    def build(self, input_shape):
        rank = len(input_shape)
        if rank not in (2, 3, 4):
            raise ValueError(
                f"ExitBranch '{self.name}' takes features of rank 2, 3 or 4 "
                f"(dense, sequence or image). Received shape {input_shape}. "
                "Flatten or pool the features first, or attach the exit to "
                "another layer."
            )
        if self.pooling == "first" and rank != 3:
            raise ValueError(
                f"ExitBranch '{self.name}' has pooling='first', which takes the "
                "first token of a sequence of shape (batch, steps, channels); "
                f"received features of rank {rank} (shape {input_shape}). Use "
                "pooling='avg' or 'max' for these features."
            )
        channel_axis = -1 if self.data_format == "channels_last" else 1
        units = input_shape[channel_axis] if rank > 2 else input_shape[-1]
        if rank > 2 and self.pooled_size > 1:
            dims = [input_shape[a] for a in self._pool_axes(rank)]
            if any(d is None or d < self.pooled_size for d in dims):
                raise ValueError(
                    f"ExitBranch '{self.name}' cannot pool axes of size {dims} "
                    f"to {self.pooled_size} bins; pooled_size > 1 needs known "
                    "sizes at least that large. Use pooled_size=1."
                )
            units *= self.pooled_size ** len(dims)
        for layer in self.hidden_layers:
            layer.build((None, units))
            units = layer.units
        self.classifier.build((None, units))

    def _check_mask(self, input_shape, mask_shape) -> None:
        """Raises unless a padding mask of `mask_shape` fits features of
        `input_shape`: rank-3 features, global pooling, `(batch, steps)`."""
        input_shape, mask_shape = tuple(input_shape), tuple(mask_shape)
        if len(input_shape) != 3:
            raise ValueError(
                f"ExitBranch '{self.name}' received a padding mask of shape "
                f"{mask_shape} with features of shape {input_shape}; masks "
                "apply to token sequences of shape (batch, steps, channels). "
                "Drop the mask, or attach the exit to a sequence output."
            )
        seq_axis = 1 if self.data_format == "channels_last" else 2
        expected = (input_shape[0], input_shape[seq_axis])
        if len(mask_shape) != 2 or any(
            a is not None and b is not None and a != b
            for a, b in zip(mask_shape, expected)
        ):
            raise ValueError(
                f"ExitBranch '{self.name}' received a padding mask of shape "
                f"{mask_shape} for features of shape {input_shape}; the mask "
                f"must have shape (batch, steps) = {expected}, one entry per "
                "token (1/True where the token is valid, 0/False for "
                "padding). Pass the backbone's (batch, sequence_length) "
                "padding mask, not an attention mask or a mask with a channel "
                "axis."
            )
        if self.pooled_size > 1:
            raise ValueError(
                f"ExitBranch '{self.name}' has pooled_size="
                f"{self.pooled_size}, which pools padding tokens into fixed "
                "bins; masked sequences need pooled_size=1 (global pooling "
                "over the valid tokens) or pooling='first'."
            )

    def _pool(self, x, mask=None):
        """Pooled features `(batch, features)`; `mask` `(batch, steps)`
        selects the valid tokens of rank-3 `x` (global pooling only)."""
        axes = self._pool_axes(len(x.shape))
        if not axes:
            return x
        if self.pooling == "first":
            return x[:, 0] if axes == (1,) else x[:, :, 0]  # (batch, channels)
        if mask is not None:
            return self._masked_pool(x, mask)
        if self.pooled_size == 1:
            pool = ops.mean if self.pooling == "avg" else ops.max
            return pool(x, axis=axes)  # (batch, channels)
        # Windows of stride dim // bins that together cover the whole axis.
        strides = [x.shape[a] // self.pooled_size for a in axes]
        sizes = [x.shape[a] - (self.pooled_size - 1) * s for a, s in zip(axes, strides)]
        pool = ops.average_pool if self.pooling == "avg" else ops.max_pool
        x = pool(
            x,
            tuple(sizes),
            tuple(strides),
            padding="valid",
            data_format=self.data_format,
        )
        return ops.reshape(x, (-1, int(np.prod(x.shape[1:]))))  # (batch, bins*ch)

    def _masked_pool(self, x, mask):
        """Average or max over the valid tokens of `x` `(batch, steps, ch)`.

        Multiplies and adds only (TFLite Micro has no SELECT, and a boolean
        tensor has no int8 kernels), and no large constant: an int8 tensor
        holding one would lose the features' resolution.
        """
        axis = 1 if self.data_format == "channels_last" else 2
        m = ops.expand_dims(ops.cast(mask, x.dtype), -1 if axis == 1 else 1)
        if self.pooling == "avg":
            # mean(x*m) / max(mean(m), 1/steps) = sum(x*m) / max(sum(m), 1);
            # means keep the int8 range of x.
            steps = x.shape[axis] or ops.shape(x)[axis]
            floor = 1.0 / ops.cast(steps, x.dtype)
            valid = ops.maximum(ops.mean(m, axis=axis), floor)  # (batch, 1)
            return ops.mean(x * m, axis=axis) / valid  # (batch, channels)
        # Padding takes the sequence's smallest value, which cannot win the
        # max; a row with no valid token gives 0.
        lowest = ops.min(x, axis=axis, keepdims=True)  # (batch, 1, channels)
        filled = lowest + (x - lowest) * m  # (batch, steps, channels)
        any_valid = ops.max(m, axis=axis)  # (batch, 1)
        return ops.max(filled, axis=axis) * any_valid  # (batch, channels)

    def call(self, inputs, padding_mask=None, mask=None, training=None):
        if padding_mask is None:
            padding_mask = mask
        if padding_mask is not None:
            self._check_mask(inputs.shape, padding_mask.shape)
        x = self._pool(inputs, padding_mask)
        for layer in self.hidden_layers:
            x = layer(x)  # (batch, units)
        if self.dropout_layer is not None:
            x = self.dropout_layer(x, training=training)
        return self.classifier(x)  # (batch, num_classes)

    def compute_mask(self, inputs, mask=None):
        # Logits have no steps left to mask.
        return None

    def compute_output_spec(self, inputs, padding_mask=None, mask=None, training=None):
        # Bad masks are refused when the graph is built, not first at run.
        if padding_mask is None:
            padding_mask = mask
        if padding_mask is not None:
            self._check_mask(inputs.shape, padding_mask.shape)
        return keras.KerasTensor(
            self.compute_output_shape(inputs.shape), dtype=self.compute_dtype
        )

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_classes": self.num_classes,
                "hidden_units": self.hidden_units,
                "activation": keras.activations.serialize(self.activation),
                "dropout": self.dropout,
                "pooling": self.pooling,
                "pooled_size": self.pooled_size,
                "data_format": self.data_format,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
            }
        )
        return config
