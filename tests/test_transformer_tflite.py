"""A small transformer encoder through `to_tflite`: integer token ids in
every mode, int8 segments on LiteRT against Keras, the TFLite Micro op
check (GELU blocks it; the ReLU variant runs on TFLite Micro, bundle and
fused file), a padding-mask input with a sequence length fixed at export,
and the runtimes' errors for bad token inputs."""

import os

import keras
import numpy as np
import pytest
from keras import ops

import keras_earlyexit as kee
from keras_earlyexit.export import flatbuffer
from keras_earlyexit.export.micro import TFLM_BUILTINS, resolver_method
from keras_earlyexit.runtime import FusedInterpreter, GatedInterpreter

SEQ, DIM, VOCAB, CLASSES = 16, 16, 32, 4


class _Positions(keras.layers.Layer):
    """Adds a learned position embedding (one weight row per position)."""

    def build(self, input_shape):
        self.table = self.add_weight(
            shape=tuple(input_shape[1:]), initializer="random_normal", name="table"
        )

    def call(self, x):
        return x + self.table


def _block(x, activation: str, name: str):
    attended = keras.layers.MultiHeadAttention(2, 8, name=f"{name}_attention")(x, x)
    x = keras.layers.LayerNormalization(name=f"{name}_norm_1")(x + attended)
    h = keras.layers.Dense(2 * DIM, activation=activation, name=f"{name}_ff_1")(x)
    h = keras.layers.Dense(DIM, name=f"{name}_ff_2")(h)
    return keras.layers.LayerNormalization(name=f"{name}_norm_2")(x + h)


def encoder(activation: str, dtype: str = "int32") -> kee.EarlyExitModel:
    """Embedding and positions, two encoder blocks (multi-head attention,
    layer norm, feed-forward), an exit after each: sequence length 16,
    width 16."""
    tokens = keras.Input((SEQ,), dtype=dtype, name="tokens")
    x = keras.layers.Embedding(VOCAB, DIM, name="embedding")(tokens)
    x = _block(_Positions(name="positions")(x), activation, "block_1")
    exit_1 = kee.ExitBranch(CLASSES, name="exit_1")(x)
    x = _block(x, activation, "block_2")
    final = kee.ExitBranch(CLASSES, name="final")(x)
    return kee.EarlyExitModel(tokens, [exit_1, final], name=f"encoder_{activation}")


def first_marker_task(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random token ids; the class is the first "marker" id (0 to 3) in
    reading order (0 if none): it needs positions and attention."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, VOCAB, size=(n, SEQ)).astype("int32")
    marker = x < CLASSES
    y = np.where(marker.any(1), x[np.arange(n), marker.argmax(1)], 0)
    return x, y


@pytest.fixture(scope="module")
def task():
    x, y = first_marker_task(1200, seed=0)
    return x[:1000], y[:1000], x[1000:]


def _trained(activation: str, task) -> kee.EarlyExitModel:
    keras.utils.set_random_seed(0)
    model = encoder(activation)
    model.compile(keras.optimizers.Adam(3e-3), kee.EarlyExitLoss())
    x, y, _ = task
    model.fit(x, y, epochs=6, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="module")
def gelu_model(task):
    return _trained("gelu", task)


@pytest.fixture(scope="module")
def relu_model(task):
    return _trained("relu", task)


@pytest.fixture(scope="module")
def gelu_bundle(gelu_model, task, tmp_path_factory) -> str:
    """Int8 segments for LiteRT (micro=False: GELU has no TFLite Micro
    kernel)."""
    path = str(tmp_path_factory.mktemp("encoder") / "gelu_int8")
    return kee.export.to_tflite(
        gelu_model, path, representative_data=task[0][:200], verbose=0, micro=False
    )


@pytest.fixture(scope="module")
def relu_exports(relu_model, task, tmp_path_factory) -> tuple[str, str]:
    """The ReLU variant, int8 for TFLite Micro: bundle and fused file."""
    root = tmp_path_factory.mktemp("encoder_micro")
    common = dict(representative_data=task[0][:200], verbose=0)
    return (
        kee.export.to_tflite(relu_model, str(root / "bundle"), **common),
        kee.export.to_tflite(relu_model, str(root / "f.tflite"), fused=True, **common),
    )


def _per_exit_classes(target, x, backend="litert") -> np.ndarray:
    """`(n, 2)`: the classes of both exits, by sending every sample out at
    exit 0 (threshold 0), then none (threshold 1)."""
    return np.stack(
        [
            GatedInterpreter(target, backend, thresholds=[t]).predict(x).classes
            for t in (0.0, 1.0)
        ],
        axis=1,
    )


def _keras_classes(model, x) -> np.ndarray:
    return np.stack([np.argmax(z, -1) for z in model.predict(x, verbose=0)], axis=1)


def test_int8_encoder_runs_on_litert_and_agrees_with_keras(
    gelu_model, gelu_bundle, task
):
    manifest = kee.export.read_manifest(gelu_bundle)
    (tokens,) = manifest.segments[0].inputs
    assert (tokens.name, tokens.shape, tokens.dtype) == ("tokens", [1, SEQ], "int32")
    assert tokens.value_range == [0, VOCAB - 1] and not tokens.quantized
    for segment in manifest.segments:  # every float tensor is int8
        for t in segment.outputs + segment.inputs[segment.index == 0 :]:
            assert t.dtype == "int8" and t.quantized
    with open(os.path.join(gelu_bundle, "segment_1.tflite"), "rb") as f:
        names = {op.name for op in flatbuffer.list_ops(f.read())}
    for op in ("GATHER", "BATCH_MATMUL", "SOFTMAX", "GELU", "FULLY_CONNECTED"):
        assert op in names
    x = task[2]
    differ = np.sum(
        _per_exit_classes(gelu_bundle, x) != _keras_classes(gelu_model, x), 0
    )
    # Bars count samples (integers): no float rounding at the bar. Over
    # training seeds 0-19 (TensorFlow, 200 test samples), classes that
    # differ from Keras per exit: 0-3 and 0-4 (mean 1.1 and 1.2). Bar: 10
    # (95% agree).
    assert np.all(differ <= 10), differ
    # Gated at the median confidence of exit 1: both exits are taken.
    confidences = GatedInterpreter(gelu_bundle, thresholds=[0.0]).predict(x).confidences
    threshold = float(np.median(confidences))
    gated = GatedInterpreter(gelu_bundle, thresholds=[threshold]).predict(x)
    expected = gelu_model.predict_early(x, thresholds=[threshold])
    assert np.all(np.bincount(gated.exit_indices, minlength=2) > 0)
    # Over seeds 0-19, of 200: classes differ 0-4 (mean 1.2), exits 1-6
    # (mean 3.0). Bars: 10 and 14 (95% and 93% agree).
    assert np.sum(gated.classes != expected.classes) <= 10
    assert np.sum(gated.exit_indices != expected.exit_indices) <= 14


def test_gelu_blocks_tflite_micro_naming_the_op_and_layer(gelu_model, task, tmp_path):
    target = tmp_path / "micro"
    with pytest.raises(kee.export.UnsupportedOpError) as error:
        kee.export.to_tflite(
            gelu_model, str(target), representative_data=task[0][:50], verbose=0
        )
    message = str(error.value)
    for part in ("GELU", "'block_1_ff_1'", "activation='relu'", "micro=False"):
        assert part in message, message
    assert not os.path.exists(target)


def test_ids_that_reach_the_embedding_through_an_op_block_tflite_micro(tmp_path):
    """The runtimes cannot check ids computed inside the model, so Keras's
    wrap of negative ids stays: a SELECT, which TFLite Micro lacks. The
    export names it; LiteRT runs it."""
    keras.utils.set_random_seed(0)
    tokens = keras.Input((SEQ,), dtype="int32", name="tokens")
    clipped = ops.minimum(tokens, VOCAB - 1)
    x = keras.layers.Embedding(VOCAB, DIM, name="embedding")(clipped)
    exit_1 = kee.ExitBranch(CLASSES, name="exit_1")(x)
    x = keras.layers.Dense(DIM, activation="relu")(x)
    model = kee.EarlyExitModel(tokens, [exit_1, kee.ExitBranch(CLASSES)(x)])
    ids = first_marker_task(20, seed=1)[0]
    with pytest.raises(kee.export.UnsupportedOpError) as error:
        kee.export.to_tflite(
            model, str(tmp_path / "m"), representative_data=ids, verbose=0
        )
    for part in ("op SELECT (", "'embedding'", "straight from a model input"):
        assert part in str(error.value), str(error.value)
    bundle = kee.export.to_tflite(
        model, str(tmp_path / "m"), representative_data=ids, verbose=0, micro=False
    )
    assert kee.export.read_manifest(bundle).segments[0].inputs[0].value_range is None
    expected = np.argmax(model.predict(ids, verbose=0)[0], -1)
    result = GatedInterpreter(bundle, thresholds=[0.0]).predict(ids)
    assert np.mean(result.classes == expected) >= 0.9


def test_relu_variant_runs_on_tflite_micro(relu_model, relu_exports, task):
    bundle, path = relu_exports
    for segment in kee.export.read_manifest(bundle).segments:
        assert segment.arena_bytes > 0
        with open(os.path.join(bundle, segment.file), "rb") as f:
            names = {op.name for op in flatbuffer.list_ops(f.read())}
        assert all(resolver_method(name) in TFLM_BUILTINS for name in names)
        # The ids feed the embedding's GATHER directly: Keras's wrap of
        # negative ids (LESS, SELECT) is gone, the runtimes check the range.
        assert not names & {"SELECT", "SELECT_V2", "LESS"}
    x = task[2]
    micro = _per_exit_classes(bundle, x, "micro")
    # Over seeds 0-19, of 200 per exit: 0-3 and 0-4 differ (mean 0.9 and
    # 1.7). Bar: 10.
    differ = np.sum(micro != _keras_classes(relu_model, x), 0)
    assert np.all(differ <= 10), differ
    # TFLite Micro's reference kernels round a few int8 ops otherwise than
    # LiteRT's: over seeds 0-19, 0-3 of the 400 classes differ (mean 1.4).
    # Bar: 12 (97% agree).
    assert np.sum(micro != _per_exit_classes(bundle, x, "litert")) <= 12
    # The fused file runs the same segments: the same classes, exits and
    # confidences as the bundle, on TFLite Micro and LiteRT.
    for backend in ("micro", "litert"):
        expected = GatedInterpreter(bundle, backend).predict(x)
        fused = FusedInterpreter(path, backend).predict(x)
        np.testing.assert_array_equal(fused.classes, expected.classes)
        np.testing.assert_array_equal(fused.exit_indices, expected.exit_indices)
        np.testing.assert_array_equal(fused.confidences, expected.confidences)


@pytest.mark.parametrize("mode", ["float32", "float16", "dynamic"])
def test_int64_ids_export_as_int32_in_float_modes(mode, task, tmp_path):
    keras.utils.set_random_seed(0)
    model = encoder("relu", dtype="int64")
    model.set_thresholds([0.3])
    bundle = kee.export.to_tflite(
        model, str(tmp_path / mode), quantization=mode, verbose=0
    )
    (tokens,) = kee.export.read_manifest(bundle).segments[0].inputs
    assert (tokens.dtype, tokens.value_range) == ("int32", [0, VOCAB - 1])
    x = task[2][:60].astype("int64")
    result = GatedInterpreter(bundle).predict(x)
    np.testing.assert_array_equal(
        result.classes, GatedInterpreter(bundle).predict(x.astype("int16")).classes
    )
    if mode == "float32":
        expected = model.predict_early(x)
        np.testing.assert_array_equal(result.exit_indices, expected.exit_indices)
        np.testing.assert_array_equal(result.classes, expected.classes)


def _masked_model(mask_dtype: str = "int32") -> kee.EarlyExitModel:
    """Token ids and a padding mask (1 = token), both of open length; the
    mask is read again after the first exit, so it is carried from segment
    1 to segment 2 as it is."""
    tokens = keras.Input((None,), dtype="int32", name="token_ids")
    mask = keras.Input((None,), dtype=mask_dtype, name="padding_mask")
    keep = ops.expand_dims(ops.cast(mask, "float32"), -1)
    x = keras.layers.Embedding(VOCAB, DIM, name="embedding")(tokens) * keep
    x = _block(x, "relu", "block_1")
    exit_1 = kee.ExitBranch(CLASSES, name="exit_1")(x)
    x = keras.layers.Dense(DIM, activation="relu", name="dense")(x)
    x = x * ops.expand_dims(ops.cast(mask, "float32"), -1)
    final = kee.ExitBranch(CLASSES, name="final")(x)
    return kee.EarlyExitModel([tokens, mask], [exit_1, final])


def test_padding_mask_input_and_sequence_length_fixed_at_export(task, tmp_path):
    keras.utils.set_random_seed(0)
    model = _masked_model()
    ids = task[2][:120]
    lengths = np.random.default_rng(0).integers(4, SEQ + 1, (len(ids), 1))
    mask = (np.arange(SEQ)[None] < lengths).astype("int32")
    x = {"token_ids": ids * mask, "padding_mask": mask}
    with pytest.raises(
        ValueError,
        match=r"'token_ids' has shape \(None, None\).*"
        "Pass representative_data",
    ):
        kee.export.to_tflite(model, str(tmp_path / "open"), quantization="float32")
    assert not os.path.exists(tmp_path / "open")
    # Half the samples go on to segment 2 (which reads the carried mask).
    confidences = model.predict_early(x, thresholds=[0.0]).confidences
    model.set_thresholds([float(np.median(confidences))])
    expected = model.predict_early(x)
    assert np.all(np.bincount(expected.exit_indices, minlength=2) > 0)
    for mode in ("float32", "int8"):
        bundle = kee.export.to_tflite(
            model,
            str(tmp_path / mode),
            representative_data=x,
            quantization=mode,
            verbose=0,
            micro=False,
        )
        manifest = kee.export.read_manifest(bundle)
        first, second = (s.inputs for s in manifest.segments)
        assert [(t.name, t.shape, t.dtype) for t in first] == [
            ("token_ids", [1, SEQ], "int32"),
            ("padding_mask", [1, SEQ], "int32"),
        ]
        assert [t.value_range for t in first] == [[0, VOCAB - 1], None]
        assert ("padding_mask", [1, SEQ], "int32") in [
            (t.name, t.shape, t.dtype) for t in second
        ]
        interpreter = GatedInterpreter(bundle)
        result = interpreter.predict(x)
        by_list = interpreter.predict([x["token_ids"], x["padding_mask"]])
        np.testing.assert_array_equal(by_list.classes, result.classes)
        if mode == "float32":
            np.testing.assert_array_equal(result.exit_indices, expected.exit_indices)
            np.testing.assert_array_equal(result.classes, expected.classes)
        else:
            # Untrained, gated at the median: many samples sit at the
            # threshold. Over seeds 0-19, of 120: exits differ 2-13 (mean
            # 5.3), classes 1-10 (mean 5.2). Bars: 18 (85% agree).
            assert np.sum(result.exit_indices != expected.exit_indices) <= 18
            assert np.sum(result.classes != expected.classes) <= 18
        with pytest.raises(
            ValueError, match="exactly 16 tokens.*received sequences of 20"
        ):
            interpreter.predict({k: np.zeros((2, 20), "int32") for k in x})


def test_boolean_padding_mask(task, tmp_path):
    keras.utils.set_random_seed(0)
    model = _masked_model("bool")
    ids = task[2][:40]
    mask = np.arange(SEQ)[None] < np.arange(40)[:, None] % SEQ + 1
    bundle = kee.export.to_tflite(
        model,
        str(tmp_path / "bool"),
        representative_data={"token_ids": ids, "padding_mask": mask},
        quantization="float32",
        verbose=0,
    )
    interpreter = GatedInterpreter(bundle)
    assert interpreter.manifest.segments[0].inputs[1].dtype == "bool"
    logits = model.predict({"token_ids": ids, "padding_mask": mask}, verbose=0)
    for given in (mask, mask.astype("int32")):  # bools, or integers 0 and 1
        for k, thresholds in enumerate(([0.0], [1.0])):  # all out at exit k
            interpreter.set_thresholds(thresholds)
            result = interpreter.predict({"token_ids": ids, "padding_mask": given})
            np.testing.assert_array_equal(result.classes, logits[k].argmax(-1))
    with pytest.raises(ValueError, match="'padding_mask' takes a mask .* other values"):
        interpreter.predict({"token_ids": ids, "padding_mask": mask * 2})
    with pytest.raises(ValueError, match="'padding_mask' takes a mask"):
        interpreter.predict({"token_ids": ids, "padding_mask": mask * 1.0})


def test_bad_token_inputs_are_clear_errors(gelu_bundle, relu_exports, task):
    ids = task[2][:4]
    for interpreter in (
        GatedInterpreter(gelu_bundle),
        FusedInterpreter(relu_exports[1]),
    ):
        with pytest.raises(
            ValueError,
            match=r"'tokens' takes integer ids \(int32\); received dtype float32",
        ):
            interpreter.predict(ids.astype("float32"))
        with pytest.raises(
            ValueError,
            match=r"sequences of exactly 16 tokens \(the model's maximum, fixed at "
            r"export\); received sequences of 17: truncate them to 16",
        ):
            interpreter.predict(np.zeros((4, 17), "int32"))
        with pytest.raises(ValueError, match="received sequences of 8: pad them to 16"):
            interpreter.predict(np.zeros((4, 8), "int32"))
        with pytest.raises(
            ValueError, match=r"expects a batch of samples of shape \(16,\)"
        ):
            interpreter.predict(ids[..., None])
        for bad in (VOCAB, -1):
            outside = ids.copy()
            outside[2, 5] = bad
            with pytest.raises(
                ValueError, match=rf"outside \[0, 31\].*first: {bad} in sample 2"
            ):
                interpreter.predict(outside)
        assert interpreter.predict_one(ids[0]).exit_index in (0, 1)


def test_float_ids_for_an_integer_input_are_refused_at_export(
    gelu_model, task, tmp_path
):
    with pytest.raises(ValueError, match=r"'tokens' is int32 \(e.g. token ids\)"):
        kee.export.to_tflite(
            gelu_model,
            str(tmp_path / "b"),
            representative_data=task[2].astype("float32"),
            verbose=0,
            micro=False,
        )
    assert not os.path.exists(tmp_path / "b")
