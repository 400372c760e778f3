"""count_macs against MACs counted by hand from layer shapes."""

import keras
import numpy as np
import pytest

import keras_earlyexit as kee
from keras_earlyexit import demo


def test_digits_cnn_by_hand():
    macs = kee.count_macs(demo.digits_cnn())
    conv_1 = 8 * 8 * 16 * (3 * 3 * 1)
    exit_1 = (2 * 2 * 16) * 10  # 2x2 pooled grid -> classifier
    conv_2 = 8 * 8 * 32 * (3 * 3 * 16)
    exit_2 = (2 * 2 * 32) * 10
    conv_3 = 4 * 4 * 64 * (3 * 3 * 32)
    conv_4 = 4 * 4 * 64 * (3 * 3 * 64)
    final = (2 * 2 * 64) * 64 + 64 * 10  # hidden Dense + classifier
    assert macs.segment_macs == [
        conv_1 + exit_1,
        conv_2 + exit_2,
        conv_3 + conv_4 + final,
    ]
    assert macs.cumulative_macs == [
        conv_1 + exit_1,
        conv_1 + exit_1 + conv_2 + exit_2,
        sum([conv_1, exit_1, conv_2, exit_2, conv_3, conv_4, final]),
    ]
    by_name = {row.name: row.macs for row in macs.layers}
    assert by_name["pool_2"] == 0 and by_name["conv_2"] == conv_2
    table = str(macs)
    assert "conv_4" in table and "exit_2" in table and "cumulative" in table


def test_image_layers_by_hand():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)  # (6, 6, 4)
    x = keras.layers.BatchNormalization(name="bn_folded")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.BatchNormalization(name="bn_alone")(x)
    e1 = kee.ExitBranch(5, hidden_units=8, name="exit_1")(x)
    x = keras.layers.SeparableConv2D(6, 3, depth_multiplier=2, name="sep")(x)  # 4x4
    x = keras.layers.AveragePooling2D(2, name="pool")(x)  # (2, 2, 6)
    x = keras.layers.Conv2D(6, 1, groups=2, use_bias=False, name="grouped")(x)
    final = kee.ExitBranch(5, name="final")(x)
    macs = kee.count_macs(kee.EarlyExitModel(inputs, [e1, final]))
    rows = {row.name: row for row in macs.layers}
    assert rows["conv"].macs == 6 * 6 * 4 * (3 * 3 * 3)
    assert rows["bn_folded"].macs == 0 and "folded" in rows["bn_folded"].note
    assert rows["dw"].macs == 6 * 6 * 4 * 3 * 3
    assert rows["bn_alone"].macs == 6 * 6 * 4
    assert rows["exit_1"].macs == 4 * 8 + 8 * 5
    assert rows["sep"].macs == 4 * 4 * (3 * 3 * 4 * 2) + 4 * 4 * (8 * 6)
    assert rows["pool"].macs == 0 and "pooling" in rows["pool"].note
    assert rows["grouped"].macs == 2 * 2 * 6 * (6 // 2)
    assert macs.segment_macs == [3888 + 0 + 1296 + 144 + 72, 1152 + 768 + 0 + 72 + 30]


def test_sequence_and_attention_layers_by_hand():
    inputs = keras.Input((10, 6))
    x = keras.layers.Conv1D(8, 3, padding="same", name="conv1d")(inputs)
    x = keras.layers.Dense(4, name="dense_seq")(x)  # per step
    e1 = kee.ExitBranch(3, name="exit_1")(x)
    x = keras.layers.SeparableConv1D(4, 3, name="sep1d")(x)  # (8, 4)
    x = keras.layers.DepthwiseConv1D(3, padding="same", name="dw1d")(x)
    x = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3, name="mha")(x, x)
    x = keras.layers.LayerNormalization(name="ln")(x)
    x = keras.layers.EinsumDense("abc,cd->abd", output_shape=(None, 5), name="ein")(x)
    final = kee.ExitBranch(3, name="final")(x)
    macs = kee.count_macs(kee.EarlyExitModel(inputs, [e1, final]))
    rows = {row.name: row.macs for row in macs.layers}
    assert rows["conv1d"] == 10 * 8 * 3 * 6
    assert rows["dense_seq"] == 10 * 8 * 4
    assert rows["sep1d"] == 8 * 3 * 4 + 8 * 4 * 4
    assert rows["dw1d"] == 8 * 4 * 3
    projections = 3 * (8 * 4 * 2 * 3) + 8 * (2 * 3) * 4  # q, k, v, output
    scores_and_sum = 2 * 8 * 8 * (3 + 3)
    assert rows["mha"] == projections + scores_and_sum
    assert rows["ln"] == 8 * 4
    assert rows["ein"] == 8 * 4 * 5
    assert macs.cumulative_macs[-1] == sum(rows.values())


def test_plain_model_is_one_segment():
    model = keras.Sequential(
        [keras.Input((20,)), keras.layers.Dense(30), keras.layers.Dense(10)]
    )
    macs = kee.count_macs(model)
    assert macs.segment_macs == [20 * 30 + 30 * 10]
    assert macs.cumulative_macs == macs.segment_macs


def test_unknown_layer_with_weights_is_named_in_one_warning():
    inputs = keras.Input((12, 4))
    x = keras.layers.LSTM(6, return_sequences=True, name="lstm")(inputs)
    e1 = kee.ExitBranch(3, name="exit_1")(x)
    x = keras.layers.GRU(6, name="gru")(x)
    final = kee.ExitBranch(3, name="final")(x)
    with pytest.warns(UserWarning, match="GRU, LSTM") as record:
        macs = kee.count_macs(kee.EarlyExitModel(inputs, [e1, final]))
    assert len([w for w in record if "count_macs" in str(w.message)]) == 1
    assert macs.uncounted == ["GRU", "LSTM"]
    assert macs.segment_macs == [6 * 3, 6 * 3]


def test_dynamic_shapes_are_rejected():
    inputs = keras.Input((None, 4))
    x = keras.layers.Conv1D(4, 3)(inputs)
    e1 = kee.ExitBranch(3, name="exit_1")(x)
    final = kee.ExitBranch(3, name="final")(keras.layers.Conv1D(4, 3)(x))
    with pytest.raises(ValueError, match="static shapes"):
        kee.count_macs(kee.EarlyExitModel(inputs, [e1, final]))


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="TF profiler: TensorFlow only"
)
def test_matches_tensorflow_profiler():
    import tensorflow as tf

    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(8, 3, use_bias=False),
            keras.layers.Flatten(),
            keras.layers.Dense(10, use_bias=False),
        ]
    )
    fn = tf.function(lambda x: model(x)).get_concrete_function(
        tf.TensorSpec((1, 8, 8, 3), tf.float32)
    )
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    flops = tf.compat.v1.profiler.profile(fn.graph, options=options).total_float_ops
    assert flops == 2 * kee.count_macs(model).cumulative_macs[-1]


def _batchnorm_cases() -> kee.EarlyExitModel:
    """BatchNormalization after each kind of producer; the names say whether
    the TFLite converter folds it (checked in the test on TensorFlow)."""
    layers = keras.layers
    x = inputs = keras.Input((8, 8, 3))
    x = layers.BatchNormalization(name="fold_conv")(
        layers.Conv2D(4, 3, padding="same")(x)
    )
    x = layers.ReLU()(x)
    x = layers.Dropout(0.2)(layers.DepthwiseConv2D(3, padding="same")(x))
    x = layers.BatchNormalization(name="fold_depthwise_dropout")(x)
    x = layers.Conv2D(4, 3, padding="same", activation="relu")(x)
    x = layers.BatchNormalization(name="keep_after_activation")(x)
    x = layers.Conv2D(4, 1, name="read_by_exit")(x)
    exit_1 = kee.ExitBranch(10, name="exit_1")(x)
    x = layers.BatchNormalization(name="keep_segment_input")(x)
    conv = layers.Conv2D(4, 3, padding="same")(x)
    x = layers.Add()([layers.BatchNormalization(name="keep_skip")(conv), conv])
    x = layers.Conv2D(4, 3, padding="same")(x)
    x = layers.BatchNormalization(axis=1, name="keep_height_axis")(x)
    x = layers.Dense(8, name="dense")(layers.Flatten()(x))
    x = layers.BatchNormalization(name="fold_dense")(x)
    final = kee.ExitBranch(10, name="final")(x)
    return kee.EarlyExitModel(inputs, [exit_1, final])


def test_batchnorm_counts_zero_only_where_the_converter_folds_it():
    keras.utils.set_random_seed(0)
    model = _batchnorm_cases()
    rows = [r for r in kee.count_macs(model).layers if r.type == "BatchNormalization"]
    assert len(rows) == 7
    for r in rows:
        folded = r.name.startswith("fold_")
        assert (r.macs == 0) == folded, (r.name, r.macs, r.note)
        assert ("folded into" in r.note) == folded
    by_name = {r.name: r for r in rows}
    assert by_name["keep_skip"].macs == 8 * 8 * 4
    assert by_name["fold_dense"].note == "folded into 'dense'"
    if keras.backend.backend() != "tensorflow":
        return
    from keras_earlyexit.export.flatbuffer import list_ops
    from keras_earlyexit.export.tflite import convert_model

    for layer in model.layers:  # statistics that no rewrite can drop
        if isinstance(layer, keras.layers.BatchNormalization):
            weights = layer.get_weights()
            layer.set_weights([np.random.rand(*w.shape) + 0.5 for w in weights])
    for k, segment in enumerate(model.segments()):
        ops = [op.name for op in list_ops(convert_model(segment, "float32"))]
        kept = [r for r in rows if r.segment == k and r.macs > 0]
        # Each batch norm the converter keeps is one MUL (scale) + ADD (shift).
        assert ops.count("MUL") == len(kept), (k, ops, [r.name for r in kept])


def test_conv3d_batchnorm_is_not_folded():
    inputs = keras.Input((4, 4, 4, 2))
    x = keras.layers.Conv3D(3, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    model = keras.Model(inputs, x)
    (bn,) = [r for r in kee.count_macs(model).layers if r.name == "bn"]
    assert bn.macs == 4 * 4 * 4 * 3


# One post-LN transformer encoder block at T = 10 tokens, d = 8 features,
# 2 heads of size 4 (key_dim = value_dim = 4), feed-forward width 16:
#   Q, K, V projections   3 * T * d * heads * key_dim = 3 * 10 * 8 * 8 = 1920
#   output projection     T * heads * value_dim * d    = 10 * 8 * 8     =  640
#   QK^T                  heads * T * T * key_dim      = 2 * 10 * 10 * 4 =  800
#   AV                    heads * T * T * value_dim    = 2 * 10 * 10 * 4 =  800
#   feed-forward          T * d * 16 + T * 16 * d      = 1280 + 1280   = 2560
#   two LayerNorms        2 * T * d (1 MAC per element)                =  160
BLOCK_MACS = 1920 + 640 + 800 + 800 + 2560 + 160  # = 6880


def _encoder_block(x, name: str):
    attention = keras.layers.MultiHeadAttention(2, 4, name=f"{name}_mha")(x, x)
    x = keras.layers.LayerNormalization(name=f"{name}_ln_1")(
        keras.layers.Add()([x, attention])
    )
    y = keras.layers.Dense(16, activation="relu", name=f"{name}_ff_1")(x)
    y = keras.layers.Dense(8, name=f"{name}_ff_2")(y)
    return keras.layers.LayerNormalization(name=f"{name}_ln_2")(
        keras.layers.Add()([x, y])
    )


def test_transformer_block_by_hand_at_a_given_sequence_length():
    tokens = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(50, 8, name="embed")(tokens)
    x = _encoder_block(x, "block_1")
    e1 = kee.ExitBranch(3, name="exit_1")(x)
    final = kee.ExitBranch(3, name="final")(_encoder_block(x, "block_2"))
    model = kee.EarlyExitModel(tokens, [e1, final])
    with pytest.raises(
        ValueError, match=r"sequence length is unknown.*sequence_length="
    ):
        kee.count_macs(model)
    macs = kee.count_macs(model, sequence_length=10)
    rows = {row.name: row.macs for row in macs.layers}
    assert rows["embed"] == 0
    assert rows["block_1_mha"] == 1920 + 640 + 800 + 800
    assert rows["block_1_ff_1"] + rows["block_1_ff_2"] == 2560
    assert rows["block_1_ln_1"] + rows["block_1_ln_2"] == 160
    assert macs.segment_macs == [BLOCK_MACS + 8 * 3, BLOCK_MACS + 8 * 3]
    # Attention grows with T^2, the rest with T.
    at_20 = kee.count_macs(model, sequence_length=20).segment_macs[0]
    assert at_20 - 8 * 3 == 2 * (BLOCK_MACS - 1600) + 4 * 1600


def test_keras_hub_transformer_encoder_is_counted_through_its_sublayers():
    keras_hub = pytest.importorskip("keras_hub")
    x = inputs = keras.Input((10, 8))
    for i in range(2):
        x = keras_hub.layers.TransformerEncoder(16, 2, name=f"encoder_{i}")(x)
        if i == 0:
            e1 = kee.ExitBranch(3, name="exit_1")(x)
    final = kee.ExitBranch(3, name="final")(x)
    macs = kee.count_macs(kee.EarlyExitModel(inputs, [e1, final]))
    assert macs.uncounted == []
    assert macs.segment_macs == [BLOCK_MACS + 8 * 3, BLOCK_MACS + 8 * 3]
    rows = {row.name: row for row in macs.layers}
    attention = rows["encoder_0/self_attention_layer"]
    assert attention.macs == 1920 + 640 + 800 + 800
    assert "self-attention" in attention.note
    assert rows["encoder_0/feedforward_intermediate_dense"].macs == 10 * 8 * 16


def test_reversible_embedding_counts_its_reverse_projection():
    tokens = keras.Input((6,), dtype="int32")
    embedding = keras.layers.ReversibleEmbedding(40, 8, name="embed")
    x = embedding(tokens)
    logits = embedding(keras.layers.Dense(8, name="dense")(x), reverse=True)
    model = keras.Model(tokens, logits)
    rows = [(row.name, row.macs) for row in kee.count_macs(model).layers]
    assert rows == [("embed", 0), ("dense", 6 * 8 * 8), ("embed", 6 * 8 * 40)]


def test_nested_layer_with_an_uncountable_sublayer_is_named():
    class Recurrent(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(4)
            self.lstm = keras.layers.LSTM(4, return_sequences=True)

        def call(self, x):
            return self.lstm(self.dense(x))

    inputs = keras.Input((5, 4))
    x = Recurrent(name="recurrent")(inputs)
    model = keras.Model(inputs, kee.ExitBranch(3, name="exit")(x))
    with pytest.warns(UserWarning, match="Recurrent"):
        macs = kee.count_macs(model)
    assert macs.uncounted == ["Recurrent"]
    assert macs.segment_macs == [4 * 3]


def test_sequence_length_must_be_a_positive_int():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="sequence_length must be an int >= 1"):
            kee.count_macs(model, sequence_length=bad)


def test_sequence_length_of_the_data_for_open_inputs():
    from keras_earlyexit.evaluation.macs import sequence_length_of

    tokens = keras.Input((None,), dtype="int32", name="tokens")
    features = keras.Input((4,), name="features")
    x = keras.layers.Embedding(10, 4)(tokens)
    pooled = keras.layers.GlobalAveragePooling1D()(x)
    model = keras.Model([tokens, features], keras.layers.Add()([pooled, features]))
    ids, dense = np.zeros((2, 12), "int32"), np.zeros((2, 4), "float32")
    assert sequence_length_of(model, [ids, dense]) == 12
    assert sequence_length_of(model, {"features": dense, "tokens": ids}) == 12
    fixed = keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)])
    assert sequence_length_of(fixed, np.zeros((2, 5))) is None
    macs = kee.count_macs(
        model, sequence_length=sequence_length_of(model, [ids, dense])
    )
    assert macs.segment_macs == [0]


def test_quantization_aware_model_counts_like_the_float_model():
    """Fake-quantized layers count as their float layers, the tracked
    ranges as 0, and nothing is left without a rule."""
    import warnings

    from keras_earlyexit.quantization import (
        ActivationQuantizer,
        QuantizedSeparableConv2D,
    )

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)  # folded in both
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.DepthwiseConv2D(3, activation="relu", name="dw")(x)  # 6x6
    e1 = kee.ExitBranch(5, hidden_units=8, name="exit_1")(x)
    x = keras.layers.SeparableConv2D(6, 3, activation="relu", name="sep")(x)  # 4x4
    x = keras.layers.MaxPooling2D(2, name="pool")(x)  # (2, 2, 6)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(7, activation="relu", name="dense")(x)
    final = kee.ExitBranch(5, name="final")(x)
    model = kee.EarlyExitModel(inputs, [e1, final])
    qat = kee.quantize_aware(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no rule" warning
        float_macs = kee.count_macs(model)
        qat_macs = kee.count_macs(qat)
    assert qat_macs.segment_macs == float_macs.segment_macs
    assert qat_macs.uncounted == []
    rows = {row.name: row for row in qat_macs.layers}
    assert rows["sep"].type == QuantizedSeparableConv2D.__name__
    assert rows["sep"].macs == 4 * 4 * (3 * 3 * 4) + 4 * 4 * (4 * 6)
    quantizers = [r for r in qat_macs.layers if r.type == ActivationQuantizer.__name__]
    assert quantizers and all(r.macs == 0 for r in quantizers)
    assert float_macs.segment_macs == [
        8 * 8 * 4 * 27 + 6 * 6 * 4 * 9 + 4 * 8 + 8 * 5,
        4 * 4 * 4 * 9 + 4 * 4 * 4 * 6 + 24 * 7 + 7 * 5,
    ]
