"""Exits on token sequences: masked pooling, padding masks carried from
segment to segment, keras-hub backbones and sequence-length limits."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_earlyexit as kee
from keras_earlyexit import graph

STEPS = 6


def _padding_mask(rng, n: int, steps: int, empty_row: bool = True) -> np.ndarray:
    """`(n, steps)` int32 padding masks of random lengths (one row fully
    valid and, if `empty_row`, one fully padded)."""
    lengths = rng.integers(1, steps + 1, n)
    lengths[0] = steps
    if empty_row:
        lengths[1] = 0
    return (np.arange(steps)[None] < lengths[:, None]).astype("int32")


def _numpy_pool(x: np.ndarray, mask: np.ndarray, pooling: str) -> np.ndarray:
    if pooling == "first":
        return x[:, 0]
    rows = []
    for features, valid in zip(x, mask.astype(bool)):
        if not valid.any():
            rows.append(np.zeros(x.shape[-1], x.dtype))
        elif pooling == "avg":
            rows.append(features[valid].mean(axis=0))
        else:
            rows.append(features[valid].max(axis=0))
    return np.stack(rows)


def _chain(model, x: dict) -> tuple[list, list]:
    """Each exit's logits computed segment by segment from the dict `x`,
    and the segments' outputs."""
    carry, logits, outs = dict(x), [], []
    for segment in model.segments():
        out = segment({t.name: carry[t.name] for t in segment.inputs})
        logits.append(ops.convert_to_numpy(out["logits"]))
        outs.append(out)
        carry = out
    return logits, outs


@pytest.mark.parametrize("pooling", ["avg", "max", "first"])
@pytest.mark.parametrize("mask_dtype", ["int32", "bool"])
def test_masked_pooling_matches_numpy(rng, pooling, mask_dtype):
    x = rng.normal(size=(5, STEPS, 4)).astype("float32")
    mask = _padding_mask(rng, 5, STEPS)
    layer = kee.ExitBranch(3, pooling=pooling)
    layer.build(x.shape)
    pooled = layer._pool(ops.convert_to_tensor(x), ops.convert_to_tensor(mask))
    expected = _numpy_pool(x, mask, pooling)
    np.testing.assert_allclose(
        ops.convert_to_numpy(pooled), expected, rtol=1e-5, atol=1e-6
    )
    # Logits read only the valid tokens: padding content does not matter.
    noisy = np.where(mask[..., None] == 1, x, 50.0).astype("float32")
    kernel, bias = layer.classifier.get_weights()
    for features in (x, noisy):
        logits = layer(features, padding_mask=mask.astype(mask_dtype))
        np.testing.assert_allclose(
            ops.convert_to_numpy(logits),
            (expected if pooling != "first" else features[:, 0]) @ kernel + bias,
            rtol=1e-5,
            atol=1e-5,
        )


@pytest.mark.parametrize("pooling", ["avg", "max", "first"])
def test_masked_pooling_channels_first(rng, pooling):
    x = rng.normal(size=(4, STEPS, 3)).astype("float32")
    mask = _padding_mask(rng, 4, STEPS)
    layer = kee.ExitBranch(2, pooling=pooling, data_format="channels_first")
    layer.build((4, 3, STEPS))
    channels_first = ops.convert_to_tensor(np.swapaxes(x, 1, 2))
    pooled = layer._pool(channels_first, ops.convert_to_tensor(mask))
    np.testing.assert_allclose(
        ops.convert_to_numpy(pooled), _numpy_pool(x, mask, pooling), atol=1e-6
    )


def test_keras_mask_equals_explicit_padding_mask(rng):
    tokens = keras.Input((STEPS,), dtype="int32")
    padding_mask = keras.Input((STEPS,), dtype="int32")
    embedding = keras.layers.Embedding(20, 4, mask_zero=True)
    h = embedding(tokens)
    assert h._keras_mask is not None
    branch = kee.ExitBranch(3, pooling="max")
    model = keras.Model(
        [tokens, padding_mask], [branch(h), branch(h, padding_mask=padding_mask)]
    )
    mask = _padding_mask(rng, 8, STEPS, empty_row=False)
    ids = (rng.integers(1, 20, (8, STEPS)) * mask).astype("int32")
    implicit, explicit = (ops.convert_to_numpy(v) for v in model([ids, mask]))
    np.testing.assert_allclose(implicit, explicit, rtol=1e-6, atol=1e-6)
    unmasked = ops.convert_to_numpy(branch(embedding(ids) * 1.0))
    assert np.abs(unmasked - implicit).max() > 1e-4  # the mask took effect


def test_config_is_unchanged_and_masked_model_reloads(tmp_path, rng):
    layer = kee.ExitBranch(3)
    assert set(layer.get_config()) == {
        "name",
        "trainable",
        "dtype",
        "num_classes",
        "hidden_units",
        "activation",
        "dropout",
        "pooling",
        "pooled_size",
        "data_format",
        "kernel_initializer",
    }
    features = keras.Input((STEPS, 4))
    padding_mask = keras.Input((STEPS,), dtype="int32")
    logits = kee.ExitBranch(3, pooling="first", name="exit")(
        features, padding_mask=padding_mask
    )
    model = keras.Model([features, padding_mask], logits)
    x = [rng.normal(size=(4, STEPS, 4)).astype("float32"), _padding_mask(rng, 4, 6)]
    path = tmp_path / "masked.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    assert reloaded.get_layer("exit").pooling == "first"
    np.testing.assert_allclose(
        reloaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )


@pytest.mark.parametrize(
    "features, mask, message",
    [
        ((STEPS, 4), (STEPS - 1,), r"must have shape \(batch, steps\) = \(None, 6\)"),
        ((STEPS, 4), (STEPS, STEPS), r"received a padding mask of shape"),
        ((STEPS, 4), (STEPS, 4), r"not an attention mask or a mask with a channel"),
        ((4,), (STEPS,), r"masks apply to token sequences"),
        ((3, 3, 4), (3,), r"masks apply to token sequences"),
    ],
)
def test_mask_of_wrong_shape_is_refused(features, mask, message):
    with pytest.raises(ValueError, match=message):
        kee.ExitBranch(3)(keras.Input(features), padding_mask=keras.Input(mask))


def test_bad_mask_is_refused_eagerly_too(rng):
    x = rng.normal(size=(2, STEPS, 4)).astype("float32")
    with pytest.raises(ValueError, match=r"mask of shape \(2, 5\)"):
        kee.ExitBranch(3)(x, padding_mask=np.ones((2, STEPS - 1), "int32"))


def test_pooling_arguments_that_cannot_work_are_refused():
    with pytest.raises(
        ValueError, match=r"pooling='first', which takes the first token.*rank 2"
    ):
        kee.ExitBranch(3, pooling="first")(keras.Input((4,)))
    with pytest.raises(ValueError, match=r"received features of rank 4"):
        kee.ExitBranch(3, pooling="first")(keras.Input((4, 4, 2)))
    with pytest.raises(ValueError, match="pooled_size must be 1"):
        kee.ExitBranch(3, pooling="first", pooled_size=2)
    with pytest.raises(ValueError, match=r"masked sequences need pooled_size=1"):
        kee.ExitBranch(3, pooled_size=2)(
            keras.Input((STEPS, 4)), padding_mask=keras.Input((STEPS,))
        )


def _keras_masked_model(residual: bool = False) -> kee.EarlyExitModel:
    """Embedding(mask_zero=True), then attention and pooling whose Keras
    mask has to cross both segment boundaries. With `residual`, the first
    attention's input also feeds a residual Add."""
    tokens = keras.Input((STEPS,), dtype="int32", name="tokens")
    e = keras.layers.Embedding(20, 8, mask_zero=True, name="embed")(tokens)
    h = keras.layers.MultiHeadAttention(2, 4, name="mha_1")(e, e)
    if residual:
        h = keras.layers.Add(name="residual")([e, h])
    h = keras.layers.LayerNormalization(name="ln_1")(h)
    exit_1 = kee.ExitBranch(3, name="exit_1")(h)
    g = keras.layers.Dense(8, name="dense_2")(h)
    g = keras.layers.MultiHeadAttention(2, 4, name="mha_2")(g, g)
    exit_2 = kee.ExitBranch(3, pooling="max", name="exit_2")(g)
    g = keras.layers.Dense(8, name="dense_3")(g)
    g = keras.layers.MultiHeadAttention(2, 4, name="mha_3")(g, g)
    final = kee.ExitBranch(3, name="final")(g)
    return kee.EarlyExitModel(tokens, [exit_1, exit_2, final])


def test_segments_carry_keras_masks(rng):
    model = _keras_masked_model()
    mask = _padding_mask(rng, 10, STEPS, empty_row=False)
    ids = (rng.integers(1, 20, (10, STEPS)) * mask).astype("int32")
    full = [ops.convert_to_numpy(v) for v in model(ids)]
    segments = model.segments()
    assert [t.name for t in segments[1].inputs] == ["ln_1", "ln_1_mask"]
    assert [t.name for t in segments[2].inputs] == ["mha_2", "mha_2_mask"]
    assert all(t.dtype == "int32" for t in segments[2].inputs[1:])
    logits, outs = _chain(model, {"tokens": ids})
    for got, expected in zip(logits, full):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ops.convert_to_numpy(outs[0]["ln_1_mask"]), mask)
    # The carried mask is what the next segment reads.
    hidden = ops.convert_to_numpy(outs[0]["ln_1"])
    unmasked = segments[1]({"ln_1": hidden, "ln_1_mask": np.ones_like(mask)})
    assert np.abs(ops.convert_to_numpy(unmasked["logits"]) - full[1]).max() > 1e-4
    # Half the samples leave at exit 1, the rest at exit 2 or the final one.
    probabilities = np.exp(full[0]) / np.exp(full[0]).sum(-1, keepdims=True)
    half = float(np.median(probabilities.max(-1)))
    for thresholds, exits in (([half, 0.0], {0, 1}), ([half, 1.0], {0, 2})):
        result = model.predict_early(ids, thresholds=thresholds)
        assert set(result.exit_indices) == exits
        expected = [full[k][i].argmax() for i, k in enumerate(result.exit_indices)]
        np.testing.assert_array_equal(result.classes, expected)


def test_keras_masks_that_keras_drops_at_run_time_are_refused():
    # MultiHeadAttention removes the mask of 'embed' when it runs, so the
    # residual Add runs unmasked in the full model (Keras 3.15).
    model = _keras_masked_model(residual=True)
    with pytest.raises(ValueError, match=r"'mha_1' removes the mask from its input"):
        model.segments()
    with pytest.raises(ValueError, match=r"explicit model input"):
        model.predict_early(np.ones((2, STEPS), "int32"))


def test_explicit_padding_mask_input_is_carried(rng):
    """The explicit form of the model above (what the error suggests):
    attention and exits read the padding-mask input, which segments carry
    like any tensor."""
    tokens = keras.Input((STEPS,), dtype="int32", name="token_ids")
    padding_mask = keras.Input((STEPS,), dtype="int32", name="padding_mask")
    attention_mask = padding_mask[:, None, :]  # (batch, 1, steps)
    e = keras.layers.Embedding(20, 8, name="embed")(tokens)
    h = keras.layers.MultiHeadAttention(2, 4, name="mha_1")(
        e, e, attention_mask=attention_mask
    )
    h = keras.layers.LayerNormalization(name="ln_1")(keras.layers.Add()([e, h]))
    exit_1 = kee.ExitBranch(3, name="exit_1")(h, padding_mask=padding_mask)
    g = keras.layers.MultiHeadAttention(2, 4, name="mha_2")(
        h, h, attention_mask=attention_mask
    )
    g = keras.layers.Add(name="residual_2")([h, g])
    final = kee.ExitBranch(3, pooling="max", name="final")(g, padding_mask=padding_mask)
    model = kee.EarlyExitModel(
        {"token_ids": tokens, "padding_mask": padding_mask}, [exit_1, final]
    )
    names = {t.name for t in model.segments()[1].inputs}
    assert "ln_1" in names and "padding_mask" in names
    mask = _padding_mask(rng, 8, STEPS)
    ids = rng.integers(1, 20, (8, STEPS)).astype("int32")
    x = {"token_ids": ids, "padding_mask": mask}
    full = [ops.convert_to_numpy(v) for v in model(x)]
    logits, _ = _chain(model, x)
    for got, expected in zip(logits, full):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # Valid tokens never attend to padding: its content does not matter
    # (rows with at least one valid token).
    repadded = dict(x, token_ids=np.where(mask == 1, ids, 7).astype("int32"))
    valid = mask.any(axis=1)
    for got, expected in zip(_chain(model, repadded)[0], full):
        np.testing.assert_allclose(got[valid], expected[valid], rtol=1e-5, atol=1e-6)


def test_sequences_longer_than_a_fixed_input_are_refused():
    tokens = keras.Input((8,), dtype="int32", name="tokens")
    h = keras.layers.Embedding(20, 4)(tokens)
    model = kee.EarlyExitModel(
        tokens,
        [kee.ExitBranch(2, name="exit_1")(h), kee.ExitBranch(2, name="final")(h)],
    )
    graph.check_sequence_lengths(model, [np.zeros((2, 8), "int32")])
    with pytest.raises(ValueError, match=r"'tokens' takes sequences of 8 steps; "):
        graph.check_sequence_lengths(model, [np.zeros((2, 12), "int32")])
    assert graph.max_sequence_length(model) is None


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="TFLite conversion: TensorFlow"
)
def test_masked_pooling_runs_int8_on_litert_and_micro(rng):
    from ai_edge_litert.interpreter import Interpreter
    from tflite_micro.python.tflite_micro import runtime

    from keras_earlyexit.export.flatbuffer import list_ops
    from keras_earlyexit.export.micro import TFLM_BUILTINS, resolver_method
    from keras_earlyexit.export.tflite import convert_model

    features = keras.Input((STEPS, 4), name="features")
    padding_mask = keras.Input((STEPS,), dtype="int32", name="padding_mask")
    logits = keras.layers.Concatenate()(
        [
            kee.ExitBranch(3, pooling=p, name=p)(features, padding_mask=padding_mask)
            for p in ("avg", "max", "first")
        ]
    )
    model = keras.Model(
        {"features": features, "padding_mask": padding_mask}, {"logits": logits}
    )
    n = 48
    x = rng.uniform(-1, 1, (n, STEPS, 4)).astype("float32")
    mask = _padding_mask(rng, n, STEPS)
    data = convert_model(model, "int8", {"features": x, "padding_mask": mask})
    ops_ = list_ops(data)
    assert all(resolver_method(op.name) in TFLM_BUILTINS for op in ops_), ops_
    assert not any("SELECT" in op.name for op in ops_)
    assert not any("BOOL" in op.input_types + op.output_types for op in ops_)

    litert = Interpreter(model_content=data)
    litert.allocate_tensors()
    micro = runtime.Interpreter.from_bytes(data, arena_size=64 * 1024)
    (feature_in,) = [d for d in litert.get_input_details() if d["dtype"] == np.int8]
    (mask_in,) = [d for d in litert.get_input_details() if d["dtype"] == np.int32]
    (out,) = litert.get_output_details()
    scale, zero = feature_in["quantization"]
    out_scale, out_zero = out["quantization"]
    order = [d["index"] for d in litert.get_input_details()]
    expected = ops.convert_to_numpy(
        model({"features": x, "padding_mask": mask})["logits"]
    )
    steps = {"litert": [], "micro": []}  # |error| in output steps
    for i in range(n):
        q = np.clip(np.round(x[i : i + 1] / scale + zero), -128, 127).astype(np.int8)
        litert.set_tensor(feature_in["index"], q)
        litert.set_tensor(mask_in["index"], mask[i : i + 1])
        litert.invoke()
        micro.set_input(q, order.index(feature_in["index"]))
        micro.set_input(mask[i : i + 1], order.index(mask_in["index"]))
        micro.invoke()
        for name, got in (
            ("litert", litert.get_tensor(out["index"])),
            ("micro", micro.get_output(0)),
        ):
            dequantized = (got[0].astype(np.float32) - out_zero) * out_scale
            steps[name].append(np.abs(dequantized - expected[i]).max() / out_scale)
    # Over seeds 0-5: max 1.2-6.9 steps (LiteRT), 2.3-4.9 (TFLite Micro);
    # mean 0.8-1.3 steps (both), out of 256.
    for name, errors in steps.items():
        assert np.max(errors) <= 10, (name, np.max(errors))
        assert np.mean(errors) <= 2, (name, np.mean(errors))


# keras-hub backbones (optional extra "hub").

HUB_CONFIG = dict(
    vocabulary_size=100,
    num_layers=4,
    num_heads=2,
    hidden_dim=16,
    intermediate_dim=32,
    max_sequence_length=16,
)


@pytest.fixture(scope="module")
def bert_model():
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(**HUB_CONFIG)
    model = kee.attach_exits(
        backbone, ["transformer_layer_2", "transformer_layer_0"], 3
    )
    return model


def _bert_inputs(rng, n: int = 12, steps: int = 16) -> dict:
    mask = _padding_mask(rng, n, steps, empty_row=False)
    ids = (rng.integers(1, 100, (n, steps)) * mask).astype("int32")
    return {"token_ids": ids, "segment_ids": np.zeros_like(ids), "padding_mask": mask}


def test_bert_backbone_exits_pool_valid_tokens_and_segments_carry_the_mask(
    bert_model, rng
):
    model = bert_model
    assert model.exit_names == ["exit_1", "exit_2", "final"]
    assert [t.name for t in keras.tree.flatten(model.inputs)] == [
        "padding_mask",
        "segment_ids",
        "token_ids",
    ]
    for segment in model.segments()[1:]:
        assert "padding_mask" in [t.name for t in segment.inputs]
    x = _bert_inputs(rng)
    full = [ops.convert_to_numpy(v) for v in model(x)]
    repadded = dict(x, token_ids=np.where(x["padding_mask"] == 1, x["token_ids"], 7))
    logits, _ = _chain(model, repadded)
    for got, expected in zip(logits, full):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    result = model.predict_early(x, thresholds=[1.0, 1.0])
    np.testing.assert_array_equal(result.exit_indices, 2)
    np.testing.assert_array_equal(result.classes, full[-1].argmax(-1))


def test_bert_backbone_trains_with_the_early_exit_loss(rng):
    keras_hub = pytest.importorskip("keras_hub")
    backbone = keras_hub.models.BertBackbone(**dict(HUB_CONFIG, num_layers=2))
    model = kee.attach_exits(backbone, ["transformer_layer_0"], 3)
    x = _bert_inputs(rng, n=16)
    y = np.arange(16) % 3
    # Measured on 2 busy cores: tracing the training step on TensorFlow
    # takes ~19 s, 4 eager steps ~3 s; on JAX eager steps are the slower
    # (45 s against 20 s compiled).
    eager = keras.backend.backend() != "jax"
    model.compile(keras.optimizers.Adam(1e-2), kee.EarlyExitLoss(), run_eagerly=eager)
    history = model.fit(x, y, epochs=4, batch_size=16, verbose=0)
    losses = history.history["loss"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_bert_backbone_macs_and_sequence_limit(bert_model):
    with pytest.raises(ValueError, match=r"sequence_length=128"):
        kee.count_macs(bert_model)
    macs = kee.count_macs(bert_model, sequence_length=16)
    assert macs.uncounted == []
    # One encoder layer at T = 16, d = 16, 2 heads of 8, feed-forward 32:
    # Q, K, V, O 4 * 16 * 16 * 16 + QK^T, AV 2 * 16 * 16 * (8 + 8)
    # + feed-forward 2 * 16 * 16 * 32 + two LayerNorms 2 * 16 * 16.
    layer = 16384 + 8192 + 16384 + 512
    embeddings = 16 * 16  # the embeddings' LayerNorm; lookups are free
    head = 16 * 3
    assert macs.segment_macs == [
        embeddings + layer + head,  # embeddings, layer 0, exit 1
        2 * layer + head,  # layers 1 and 2, exit 2
        layer + head,  # layer 3, final exit
    ]
    assert graph.max_sequence_length(bert_model) == 16
    too_long = [np.zeros((2, 20), "int32")] * 3
    with pytest.raises(ValueError, match=r"20 tokens; the model takes at most 16"):
        graph.check_sequence_lengths(bert_model, too_long)
    graph.check_sequence_lengths(bert_model, [np.zeros((2, 16), "int32")] * 3)
    inputs = {t.name: np.ones((2, 20), "int32") for t in bert_model.inputs}
    with pytest.raises(ValueError, match=r"the model takes at most 16"):
        bert_model.predict_early(inputs)


def test_bert_backbone_with_cls_pooling(rng):
    keras_hub = pytest.importorskip("keras_hub")
    backbone = keras_hub.models.BertBackbone(**HUB_CONFIG)
    model = kee.attach_exits(
        backbone, ["transformer_layer_1"], 2, exit_kwargs={"pooling": "first"}
    )
    x = _bert_inputs(rng, n=4)
    sequence = backbone(x)["sequence_output"]
    head = model.get_layer("final")
    expected = head.classifier(sequence[:, 0])
    np.testing.assert_allclose(
        ops.convert_to_numpy(model(x)[-1]),
        ops.convert_to_numpy(expected),
        rtol=1e-5,
        atol=1e-6,
    )
