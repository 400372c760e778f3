"""`ExitBranch`: the classifier head of an exit (features -> logits)."""

from collections.abc import Sequence

import keras
import numpy as np
from keras import ops

_PACKAGE = "keras_earlyexit"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ExitBranch(keras.layers.Layer):
    """Classifier head of an early exit.

    Pools what needs pooling (average or max over the sequence axis of
    rank-3 features and the spatial axes of rank-4 features, globally or to
    a small grid that keeps coarse position, as SDN's feature reduction
    does), then runs optional hidden `Dense` layers and a linear
    classifier. Returns logits.

    Args:
        num_classes: number of classes (>= 2).
        hidden_units: int or list of ints, sizes of hidden `Dense` layers
            before the classifier. Default: none (a linear probe, as in SDN
            and BranchyNet's smallest heads).
        activation: activation of the hidden layers.
        dropout: dropout rate before the classifier.
        pooling: `"avg"` or `"max"`, for rank-3 and rank-4 inputs.
        pooled_size: pool each sequence / spatial axis to this many bins and
            flatten; 1 (default) is global pooling. Shallow exits see
            features that still lack position invariance, and 2 often
            makes them much more accurate for little compute.
        data_format: `"channels_last"` or `"channels_first"`; default
            `keras.config.image_data_format()`.
        kernel_initializer: initializer of the `Dense` kernels.

    Call arguments:
        inputs: features of shape `(batch, units)`, `(batch, steps, channels)`
            or `(batch, height, width, channels)` (channels last).
        training: whether dropout is active.

    Returns:
        Logits of shape `(batch, num_classes)`.

    Example:

    ```python
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(16, 3, activation="relu")(inputs)
    logits = ExitBranch(10, hidden_units=32, name="exit_1")(x)
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
        if pooling not in ("avg", "max"):
            raise ValueError(f"pooling must be 'avg' or 'max'. Received: {pooling!r}")
        if not isinstance(pooled_size, int) or pooled_size < 1:
            raise ValueError(
                f"pooled_size must be an int >= 1. Received: {pooled_size!r}"
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

    def _pool(self, x):
        axes = self._pool_axes(len(x.shape))
        if not axes:
            return x
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

    def call(self, inputs, training=None):
        x = self._pool(inputs)
        for layer in self.hidden_layers:
            x = layer(x)  # (batch, units)
        if self.dropout_layer is not None:
            x = self.dropout_layer(x, training=training)
        return self.classifier(x)  # (batch, num_classes)

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
