import keras
import numpy as np
import pytest
from _segments import chain_segments
from keras import ops

import keras_earlyexit as kee


def test_sequential_backbone_keeps_its_classifier(rng):
    backbone = keras.Sequential(
        [
            keras.Input((20,)),
            keras.layers.Dense(32, activation="relu", name="d1"),
            keras.layers.Dense(32, activation="relu", name="d2"),
            keras.layers.Dense(3, name="logits"),
        ]
    )
    model = kee.attach_exits(backbone, ["d2", "d1"], 3)
    assert model.exit_names == ["exit_1", "exit_2", "logits"]
    x = rng.normal(size=(8, 20)).astype("float32")
    np.testing.assert_allclose(
        model.predict(x, verbose=0)[-1],
        backbone.predict(x, verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )
    model.compile("adam", kee.EarlyExitLoss())
    model.fit(x, np.arange(8) % 3, epochs=1, verbose=0)


def test_functional_cnn_gets_a_new_final_exit(rng):
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="c1")(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu", name="c2")(x)
    backbone = keras.Model(inputs, x)
    model = kee.attach_exits(backbone, ["c1"], 10, exit_kwargs={"pooled_size": 2})
    assert model.exit_names == ["exit_1", "final"]
    assert model.get_layer("final").pooled_size == 2


def test_mobilenetv2_with_skip_connections(rng):
    backbone = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10
    )
    # block_2_add and block_4_add feed later residual adds.
    model = kee.attach_exits(backbone, ["block_2_add", "block_4_add"], 10)
    assert model.num_exits == 3
    x = rng.random((2, 32, 32, 3)).astype("float32")
    full = model.predict(x, verbose=0)
    # The softmax classifier was replaced by its logits, same weights.
    np.testing.assert_allclose(
        ops.convert_to_numpy(ops.softmax(full[-1])),
        backbone.predict(x, verbose=0),
        rtol=1e-4,
        atol=1e-6,
    )
    for got, expected in zip(chain_segments(model, x), full):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_exit_layers_not_found():
    backbone = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="out")])
    with pytest.raises(ValueError, match=r"Layers \['missing'\] are not in backbone"):
        kee.attach_exits(backbone, ["missing"], 3)
    with pytest.raises(ValueError, match="exit_layers is empty"):
        kee.attach_exits(backbone, [], 3)
    with pytest.raises(ValueError, match="final='backbone' needs"):
        kee.attach_exits(backbone, ["out"], 5, final="backbone")
