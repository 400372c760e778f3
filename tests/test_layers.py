import math

import keras
import numpy as np
import pytest
from keras import ops

import keras_earlyexit as kee
from keras_earlyexit import criteria


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize(
    "shape, kwargs",
    [
        ((12,), {}),
        ((12,), {"hidden_units": [8, 6], "dropout": 0.2}),
        ((10, 5), {}),
        ((10, 5), {"pooling": "max", "pooled_size": 2}),
        ((6, 6, 4), {}),
        ((6, 6, 4), {"pooled_size": 2, "hidden_units": 8}),
        ((7, 5, 4), {"pooled_size": 2, "pooling": "max"}),
    ],
)
def test_exit_branch_shapes_training_and_save(tmp_path, shape, kwargs):
    inputs = keras.Input(shape)
    logits = kee.ExitBranch(3, name="exit", **kwargs)(inputs)
    assert tuple(logits.shape) == (None, 3)
    model = keras.Model(inputs, logits)
    x = np.random.default_rng(0).normal(size=(16, *shape)).astype("float32")
    y = np.arange(16) % 3
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=1, verbose=0)
    eager = ops.convert_to_numpy(model(x))
    assert eager.shape == (16, 3)
    path = tmp_path / "branch.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), eager, atol=1e-5)
    layer = model.get_layer("exit")
    clone = kee.ExitBranch.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


def test_exit_branch_pools_like_numpy():
    x = np.random.default_rng(1).normal(size=(2, 4, 4, 3)).astype("float32")
    layer = kee.ExitBranch(2, pooled_size=2)
    layer.build(x.shape)
    kernel = np.random.default_rng(2).normal(size=(12, 2)).astype("float32")
    layer.classifier.set_weights([kernel, np.zeros(2, "float32")])
    pooled = x.reshape(2, 2, 2, 2, 2, 3).mean(axis=(2, 4)).reshape(2, 12)
    np.testing.assert_allclose(
        ops.convert_to_numpy(layer(x)), pooled @ kernel, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_classes": 1}, "num_classes"),
        ({"num_classes": 3, "hidden_units": [0]}, "hidden_units"),
        ({"num_classes": 3, "pooling": "median"}, "pooling"),
        ({"num_classes": 3, "dropout": 1.5}, "dropout"),
        ({"num_classes": 3, "pooled_size": 0}, "pooled_size"),
    ],
)
def test_exit_branch_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kee.ExitBranch(**kwargs)


def test_exit_branch_rejects_rank_5():
    with pytest.raises(ValueError, match="rank 2, 3 or 4"):
        kee.ExitBranch(3)(keras.Input((2, 2, 2, 2)))


def _numpy_confidence(z, criterion, temperature=1.0):
    p = _softmax(z / temperature)
    if criterion in ("max_prob", "patience"):  # patience: top-1, the floor's
        return p.max(-1)
    if criterion == "margin":
        s = np.sort(p, -1)
        return s[:, -1] - s[:, -2]
    h = -(p * np.log(p)).sum(-1)
    return 1 - h / math.log(z.shape[-1])


# The learned gate's score is checked against NumPy in tests/test_policy.py.
@pytest.mark.parametrize("criterion", [c for c in criteria.CRITERIA if c != "learned"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_gate_matches_numpy(criterion, temperature):
    z = np.random.default_rng(3).normal(size=(32, 5)).astype("float32") * 3
    gate = kee.ExitGate(criterion, threshold=0.5, temperature=temperature)
    got = ops.convert_to_numpy(gate(z))
    assert got.shape == (32,)
    assert np.all((got >= 0) & (got <= 1))
    np.testing.assert_allclose(
        got, _numpy_confidence(z, criterion, temperature), atol=1e-5
    )


def test_margin_is_zero_on_a_tie():
    z = np.array([[2.0, 2.0, 0.0], [3.0, 1.0, 0.0]], "float32")
    got = ops.convert_to_numpy(kee.ExitGate("margin")(z))
    assert got[0] == 0.0 and got[1] > 0.5


def test_gate_state_is_saved_and_settable():
    gate = kee.ExitGate("entropy", threshold=0.7, temperature=1.5)
    assert gate.threshold == pytest.approx(0.7)
    gate.threshold = 0.25
    gate.temperature = 2.0
    clone = kee.ExitGate.from_config(gate.get_config())
    assert clone.criterion == "entropy"
    assert clone.threshold == pytest.approx(0.25)
    assert clone.temperature == pytest.approx(2.0)
    assert len(gate.non_trainable_weights) == 2 and not gate.trainable_weights


@pytest.mark.parametrize("threshold", [-0.1, 1.2, float("nan"), "high"])
def test_gate_rejects_threshold_outside_unit_interval(threshold):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        kee.ExitGate(threshold=threshold)


def test_gate_rejects_unknown_criterion_and_bad_temperature():
    with pytest.raises(ValueError, match="Unknown confidence criterion 'top5'"):
        kee.ExitGate("top5")
    with pytest.raises(ValueError, match="temperature"):
        kee.ExitGate(temperature=0.0)
