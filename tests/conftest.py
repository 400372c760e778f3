"""Shared fixtures. The suite runs once per backend: KERAS_BACKEND is set by
the caller (see the Makefile), never here.

Every test starts from the same seeds on every backend (Python, NumPy and
the backend's own generator), and the digits splits are fixed, so a test
gives the same result each run on a given machine."""

import keras
import numpy as np
import pytest

import keras_earlyexit as kee
from keras_earlyexit import demo

if keras.backend.backend() == "torch":
    import torch

    # One thread: the same float reductions on every machine, and on a small
    # shared CPU the tiny ops of these models run far faster than with two.
    torch.set_num_threads(1)


# Modules whose subject does not depend on the Keras backend (the runtimes,
# TFLite files, generated code, file safety) run in the TensorFlow pass of
# `make test` only; conversion from JAX and PyTorch models is covered by
# test_export.py in every pass.
TENSORFLOW_PASS_ONLY = frozenset(
    {
        "test_c_arrays.py",
        "test_calibrate_artifact.py",
        "test_export_safety.py",
        "test_fused.py",
        "test_runtime.py",
        "test_runtime_standalone.py",
        "test_transformer_tflite.py",
    }
)


def pytest_collection_modifyitems(config, items):
    if keras.backend.backend() == "tensorflow":
        return
    skip = pytest.mark.skip(
        reason="backend-independent; runs with KERAS_BACKEND=tensorflow"
    )
    for item in items:
        if item.path.name in TENSORFLOW_PASS_ONLY:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seeded():
    keras.utils.set_random_seed(0)


@pytest.fixture(scope="session")
def digits() -> demo.Splits:
    return demo.load_digits(seed=0)


@pytest.fixture(scope="session")
def trained_digits_model(digits) -> kee.EarlyExitModel:
    """The demo CNN trained on digits (shared: do not modify it in a test;
    clone it or save/load a copy first)."""
    keras.utils.set_random_seed(0)
    model = demo.digits_cnn()
    # Settings pinned so that expectations do not move with library defaults.
    model.compile(
        keras.optimizers.Adam(3e-3),
        kee.EarlyExitLoss(label_smoothing=0.0),
        metrics=["accuracy"],
    )
    model.fit(digits.x_train, digits.y_train, epochs=30, batch_size=32, verbose=0)
    return model


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
