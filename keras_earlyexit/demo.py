"""Demo data and a reference model: scikit-learn's digits (no download) and
a small multi-exit CNN, shared by the examples, tests and benchmarks."""

from dataclasses import dataclass

import keras
import numpy as np

from keras_earlyexit.layers import ExitBranch
from keras_earlyexit.models import EarlyExitModel


@dataclass
class Splits:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits(
    seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2
) -> Splits:
    """Digits as `(n, 8, 8, 1)` float32 images in [0, 1] and int labels,
    split at random (stratified) into train, validation and test."""
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    data = _load()
    x = (data.images / 16.0)[..., None].astype("float32")
    y = data.target.astype("int64")
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest,
        y_rest,
        test_size=val_fraction / (1 - test_fraction),
        random_state=seed,
        stratify=y_rest,
    )
    return Splits(x_train, y_train, x_val, y_val, x_test, y_test)


def digits_cnn(
    num_classes: int = 10, width: int = 16, **model_kwargs
) -> EarlyExitModel:
    """A 3-exit CNN for 8x8 images: each conv block is followed by an exit;
    shallow exits pool to a 2x2 grid to keep coarse position."""
    inputs = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name="conv_1")(
        inputs
    )
    exit_1 = ExitBranch(num_classes, pooled_size=2, name="exit_1")(x)
    x = keras.layers.Conv2D(
        2 * width, 3, padding="same", activation="relu", name="conv_2"
    )(x)
    x = keras.layers.MaxPooling2D(2, name="pool_2")(x)
    exit_2 = ExitBranch(num_classes, pooled_size=2, name="exit_2")(x)
    x = keras.layers.Conv2D(
        4 * width, 3, padding="same", activation="relu", name="conv_3"
    )(x)
    x = keras.layers.Conv2D(
        4 * width, 3, padding="same", activation="relu", name="conv_4"
    )(x)
    final = ExitBranch(
        num_classes, hidden_units=4 * width, pooled_size=2, name="final"
    )(x)
    return EarlyExitModel(
        inputs, [exit_1, exit_2, final], name="digits_cnn", **model_kwargs
    )
