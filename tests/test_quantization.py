"""`kee.quantization.quantize_aware`: TFLite's int8 scheme simulated in
Keras (numbers checked by hand in NumPy), fine-tuning with `fit`, `.keras`
round trip, and int8 export that reproduces the fake-quant model."""

import keras
import numpy as np
import pytest

import keras_earlyexit as kee
from keras_earlyexit.quantization import (
    ActivationQuantizer,
    ExitDistillation,
    QuantizedEarlyExitModel,
    quantize_aware,
)
from keras_earlyexit.quantization.layers import fake_quant_weights
from keras_earlyexit.runtime.manifest import read_manifest


def _int8_asymmetric(x, low, high):
    """TFLite's per-tensor int8 grid for range [low, high] (nudged so that
    0.0 is exact), written out in NumPy."""
    scale = (high - low) / 255.0
    zero_point = np.clip(np.round(-128 - low / scale), -128, 127)
    q = np.clip(np.round(x / scale + zero_point), -128, 127)
    return (q - zero_point) * scale


def test_weights_are_symmetric_int8_per_channel(rng):
    kernel = rng.normal(size=(3, 3, 2, 4)).astype("float32")
    scale = np.abs(kernel).max(axis=(0, 1, 2)) / 127.0  # one per channel
    expected = np.clip(np.round(kernel / scale), -127, 127) * scale
    result = keras.ops.convert_to_numpy(fake_quant_weights(kernel, axis=-1))
    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-6)
    # Per tensor (Dense): one scale for the whole kernel.
    scale = np.abs(kernel).max() / 127.0
    expected = np.round(kernel / scale) * scale
    result = keras.ops.convert_to_numpy(fake_quant_weights(kernel))
    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-6)


def test_activation_range_is_tracked_and_used(rng):
    quantizer = ActivationQuantizer(momentum=0.5)
    first = rng.uniform(-1.0, 3.0, size=(64, 5)).astype("float32")
    first[0, 0], first[0, 1] = -1.0, 3.0
    out = keras.ops.convert_to_numpy(quantizer(first, training=True))
    np.testing.assert_allclose(out, _int8_asymmetric(first, -1.0, 3.0), atol=1e-5)
    # The next batch moves the range half way (momentum 0.5); 0 stays inside.
    second = np.full((4, 5), 5.0, "float32")
    quantizer(second, training=True)
    low = float(keras.ops.convert_to_numpy(quantizer.range_min))
    high = float(keras.ops.convert_to_numpy(quantizer.range_max))
    assert (low, high) == pytest.approx((-0.5, 4.0))
    # Inference uses the range without moving it.
    quantizer(second * 10, training=False)
    assert float(keras.ops.convert_to_numpy(quantizer.range_max)) == pytest.approx(4.0)


@pytest.fixture(scope="module")
def qat(trained_digits_model, digits):
    keras.utils.set_random_seed(0)
    model = quantize_aware(trained_digits_model, representative_data=digits.x_val)
    model.compile(keras.optimizers.Adam(3e-4), kee.EarlyExitLoss(label_smoothing=0.0))
    model.fit(digits.x_train, digits.y_train, epochs=1, batch_size=32, verbose=0)
    return model


def test_quantize_aware_keeps_exits_gates_and_weights(trained_digits_model, digits):
    float_model = trained_digits_model
    model = quantize_aware(float_model, representative_data=digits.x_val)
    assert isinstance(model, kee.EarlyExitModel)
    assert model.exit_names == float_model.exit_names
    assert model.thresholds == pytest.approx(float_model.thresholds)
    assert [g.temperature for g in model.gates] == [1.0, 1.0, 1.0]
    assert len(model.weights) > len(float_model.weights)  # + the ranges
    # The float model is untouched and the copy differs only by rounding:
    # of the 360 test samples, at most 8 change class at any exit (mean of
    # the worst exit 3.5-3.9; the conftest model trained from seeds 0-9
    # TensorFlow, 0-12 JAX, 0-14 PyTorch). Bar: 16.
    reference = float_model.predict(digits.x_test, verbose=0)
    fake_quant = model.predict(digits.x_test, verbose=0)
    for a, b in zip(reference, fake_quant):
        assert np.sum(a.argmax(-1) != b.argmax(-1)) <= 16
    # Confidences lie on the int8 softmax grid (k / 256, at most 255/256).
    confidences = model.predict_early(digits.x_test).confidences * 256
    np.testing.assert_allclose(confidences, np.round(confidences), atol=1e-3)
    assert confidences.max() <= 255 + 1e-3


def test_fit_updates_ranges_and_reloads(qat, digits, tmp_path):
    conv = qat.get_layer("conv_2_quant")
    assert conv.initialized
    result = qat.predict_early(digits.x_test)
    # One epoch of fine-tuning keeps the accuracy of the 30-epoch float
    # model: at most 15 of the 360 test samples wrong when gated (mean
    # 9.7-10.1; trained from seeds 0-9 TensorFlow, 0-12 JAX, 0-14 PyTorch,
    # fine-tuned from seed 0 and from the training seed). Bar: 30.
    assert np.sum(result.classes != digits.y_test) <= 30
    path = str(tmp_path / "qat.keras")
    qat.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, QuantizedEarlyExitModel)
    again = loaded.predict_early(digits.x_test)
    np.testing.assert_array_equal(again.classes, result.classes)
    np.testing.assert_array_equal(again.exit_indices, result.exit_indices)
    np.testing.assert_allclose(again.confidences, result.confidences, atol=1e-6)


def test_exit_distillation_is_kl_per_exit_by_hand(rng):
    teacher = [rng.normal(size=(6, 4)).astype("float32") for _ in range(3)]
    student = [rng.normal(size=(6, 4)).astype("float32") for _ in range(3)]

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    t = 2.0
    expected = np.zeros(6)
    for a, b in zip(teacher, student):
        log_p, log_q = log_softmax(a / t), log_softmax(b / t)
        expected += (np.exp(log_p) * (log_p - log_q)).sum(-1)
    expected *= t**2 / 3
    loss = ExitDistillation(temperature=t, reduction=None)
    result = keras.ops.convert_to_numpy(loss(teacher, student))
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)
    assert ExitDistillation.from_config(loss.get_config()).temperature == t


@pytest.fixture(scope="module")
def distilled(trained_digits_model, digits):
    """The `qat` fixture's fine-tuning, learning from the float model only."""
    keras.utils.set_random_seed(0)
    model = quantize_aware(trained_digits_model, representative_data=digits.x_val)
    model.compile(
        keras.optimizers.Adam(3e-4),
        kee.EarlyExitLoss(label_smoothing=0.0),
        teacher=trained_digits_model,
        distillation_weight=1.0,
    )
    model.fit(digits.x_train, digits.y_train, epochs=1, batch_size=32, verbose=0)
    return model


def test_distillation_keeps_the_float_models_exits(
    trained_digits_model, distilled, digits
):
    """The distilled fake-quant model keeps the float model's exits and
    accuracy (both at thresholds 0.9), counted in samples of the 360. The
    float model trained from seeds 0-19 on every backend and both models
    fine-tuned one epoch from the training seed (TensorFlow also from seed
    0: 39 runs; JAX 21, PyTorch 20). Samples whose exit differs from the
    float model's: distilled 0-9 TensorFlow, 1-10 JAX, 1-11 PyTorch (mean
    4); the `qat` fixture's label-only fine-tuning 2-39, 8-34, 7-36 (mean
    19). Distillation moves fewer exits on average, but not on every seed
    (TensorFlow seed 3: 9 against 2; PyTorch seed 12: 8 against 7), so no
    per-seed bar compares the two. Distilled misclassified: 7-22, 6-14,
    8-13; minus the float model's misclassified (gated): -2 to +4, -2 to
    +2, -3 to +2. Bars: 22 differing exits, 44 misclassified, and at most
    8 more misclassified than the float model."""
    reference = trained_digits_model.predict_early(digits.x_test)
    result = distilled.predict_early(digits.x_test)
    assert np.sum(result.exit_indices != reference.exit_indices) <= 22
    wrong = np.sum(result.classes != digits.y_test)
    assert wrong <= 44
    assert wrong <= np.sum(reference.classes != digits.y_test) + 8


def test_teacher_is_checked(trained_digits_model, qat, digits):
    loss = kee.EarlyExitLoss()
    with pytest.raises(ValueError, match="teacher must be an EarlyExitModel"):
        qat.compile("adam", loss, teacher=keras.Model(qat.inputs, qat.outputs[0]))
    with pytest.raises(ValueError, match="quantization-aware; distil from"):
        qat.compile("adam", loss, teacher=qat)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3)(inputs)
    two = kee.EarlyExitModel(
        inputs,
        [kee.ExitBranch(10)(x), kee.ExitBranch(10)(keras.layers.Conv2D(4, 3)(x))],
    )
    with pytest.raises(ValueError, match="has 2 exits of 10 classes.*3 exits"):
        qat.compile("adam", loss, teacher=two)
    with pytest.raises(ValueError, match="distillation_weight must be in"):
        qat.compile("adam", loss, teacher=trained_digits_model, distillation_weight=2)
    with pytest.raises(ValueError, match="distillation_temperature must be > 0"):
        qat.compile(
            "adam", loss, teacher=trained_digits_model, distillation_temperature=0
        )


@pytest.fixture(scope="module")
def qat_bundle(qat, digits, tmp_path_factory):
    return kee.export.to_tflite(
        qat,
        str(tmp_path_factory.mktemp("qat") / "bundle"),
        representative_data=digits.x_val,
        verbose=0,
    )


def test_int8_bundle_reproduces_the_fake_quant_model(qat, qat_bundle, digits):
    """Measured (TensorFlow, the conftest model trained from seeds 0-4, one
    epoch of fine-tuning, 360 test samples): class agreement 0.994-1.0,
    exit agreement 0.989-0.994. Bars: 0.98."""
    manifest = read_manifest(qat_bundle)
    assert manifest.boundary.startswith("identical")
    confidence = [t for t in manifest.segments[0].outputs if t.name == "confidence"]
    assert (confidence[0].scale, confidence[0].zero_point) == (1 / 256, -128)
    reference = qat.predict_early(digits.x_test)
    result = kee.runtime.GatedInterpreter(qat_bundle).predict(digits.x_test)
    assert len(np.unique(reference.exit_indices)) >= 2
    assert np.mean(result.classes == reference.classes) >= 0.98
    assert np.mean(result.exit_indices == reference.exit_indices) >= 0.98


def test_learned_ranges_are_the_int8_parameters(qat, qat_bundle):
    manifest = read_manifest(qat_bundle)
    carry = next(t for t in manifest.segments[0].outputs if t.name == "conv_1")
    quantizer = qat.get_layer("conv_1_quant")
    low = float(keras.ops.convert_to_numpy(quantizer.range_min))
    high = float(keras.ops.convert_to_numpy(quantizer.range_max))
    assert carry.scale == pytest.approx((high - low) / 255, rel=1e-5)


def test_unsupported_layer_is_named(digits):
    inputs = keras.Input((8, 8, 1))
    # After a ReLU, the normalization has no kernel to fold into.
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn_1")(x)
    e1 = kee.ExitBranch(10, name="exit_1")(x)
    e2 = kee.ExitBranch(10, name="final")(keras.layers.Conv2D(4, 3)(x))
    model = kee.EarlyExitModel(inputs, [e1, e2])
    with pytest.raises(ValueError, match="'bn_1' \\(BatchNormalization\\).*folds"):
        quantize_aware(model)
    with pytest.raises(ValueError, match="EarlyExitModel"):
        quantize_aware(keras.Model(inputs, e1))


def test_ranges_must_be_measured_before_int8_export(trained_digits_model, tmp_path):
    model = quantize_aware(trained_digits_model)
    with pytest.raises(ValueError, match="never measured.*representative_data"):
        model.for_export("int8")
    assert not (tmp_path / "bundle").exists()


def test_float16_export_drops_the_ranges_with_a_warning(qat, digits):
    with pytest.warns(UserWarning, match="learned int8 ranges are dropped"):
        float_model = qat.for_export("float16")
    assert type(float_model) is kee.EarlyExitModel
    assert float_model.thresholds == pytest.approx(qat.thresholds)
    # Same fine-tuned weights, without rounding.
    fake_quant = qat.predict(digits.x_test, verbose=0)[-1].argmax(-1)
    plain = float_model.predict(digits.x_test, verbose=0)[-1].argmax(-1)
    assert np.mean(fake_quant == plain) >= 0.97


def test_quantize_aware_keeps_the_patience(trained_digits_model, digits):
    patient = kee.EarlyExitModel(
        trained_digits_model.inputs,
        trained_digits_model.outputs,
        criterion="patience",
        patience=3,
    )
    model = quantize_aware(patient, representative_data=digits.x_val[:64])
    assert model.criterion == "patience"
    assert model.patience == 3
    assert [g.patience for g in model.gates] == [3, 3, 3]


def test_quantize_aware_keeps_the_learned_exit_policies(trained_digits_model, digits):
    """Measured (the conftest model trained from seeds 0-9 TensorFlow, 0-12
    JAX, 0-14 PyTorch, exit 1's policy fitted, thresholds 0.7, before
    fine-tuning): with the fitted policies at most 11 of the 360 test
    samples take another exit than in the float model (mean 5.0-6.3 per
    backend); TensorFlow seeds 0-2 at thresholds 0.5-0.9: 0.833-0.908
    agreement (33-60 samples differ) with the default policies a rebuilt
    gate starts from. Bar: 22 samples."""
    learned = kee.EarlyExitModel(
        trained_digits_model.inputs, trained_digits_model.outputs, criterion="learned"
    )
    kee.fit_exit_policy(learned, digits.x_val, digits.y_val, exits=[0])
    learned.gates[1].set_policy([3.0, 2.0, -0.5, 0.5], -1.5)
    learned.set_thresholds([0.7, 0.7])
    model = quantize_aware(learned, representative_data=digits.x_val)
    assert model.criterion == "learned"
    for gate, original in zip(model.gates, learned.gates):
        np.testing.assert_array_equal(gate.policy[0], original.policy[0])
        assert gate.policy[1] == original.policy[1]
    reference = learned.predict_early(digits.x_test)
    result = model.predict_early(digits.x_test)
    assert len(np.unique(reference.exit_indices)) >= 2
    assert np.sum(result.exit_indices != reference.exit_indices) <= 22
    # The float copy keeps them too.
    plain = model.float_model()
    np.testing.assert_array_equal(plain.gates[0].policy[0], learned.gates[0].policy[0])


def _separable_model() -> kee.EarlyExitModel:
    inputs = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(
        inputs
    )
    x = keras.layers.SeparableConv2D(
        16, 3, padding="same", activation="relu", name="sep_1"
    )(x)
    exit_1 = kee.ExitBranch(10, pooled_size=2, name="exit_1")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.SeparableConv2D(
        16, 3, padding="same", depth_multiplier=2, activation="relu6", name="sep_2"
    )(x)
    final = kee.ExitBranch(10, name="final")(x)
    return kee.EarlyExitModel(inputs, [exit_1, final], thresholds=[0.8])


@pytest.fixture(scope="module")
def separable(digits, tmp_path_factory):
    """A small SeparableConv2D model, its QAT copy fine-tuned one epoch, and
    that copy's int8 bundle."""
    _, _, qat, bundle = _fine_tuned(_separable_model, digits, tmp_path_factory)
    return qat, bundle


def _fine_tuned(build, digits, tmp_path_factory) -> tuple:
    """The model `build()` trained 8 epochs; the float model of its QAT copy
    before fine-tuning; that copy fine-tuned one epoch; its int8 bundle."""
    keras.utils.set_random_seed(0)
    model = build()
    model.compile(keras.optimizers.Adam(3e-3), kee.EarlyExitLoss("linear"))
    model.fit(digits.x_train, digits.y_train, epochs=8, batch_size=32, verbose=0)
    qat = quantize_aware(model, representative_data=digits.x_val)
    before = qat.float_model()
    qat.compile(keras.optimizers.Adam(3e-4), kee.EarlyExitLoss("linear"))
    qat.fit(digits.x_train, digits.y_train, epochs=1, batch_size=32, verbose=0)
    bundle = kee.export.to_tflite(
        qat,
        str(tmp_path_factory.mktemp(build.__name__) / "bundle"),
        representative_data=digits.x_val,
        verbose=0,
    )
    return model, before, qat, bundle


def test_separable_conv_is_a_depthwise_and_a_pointwise_conv(separable):
    """TFLite lowers SeparableConv2D to DEPTHWISE_CONV_2D (no activation)
    and a 1x1 CONV_2D, with an int8 tensor between them: that tensor gets
    the range the QAT layer tracked."""
    from ai_edge_litert.interpreter import Interpreter

    from keras_earlyexit.export.flatbuffer import list_ops

    qat, bundle = separable
    manifest = read_manifest(bundle)
    with open(f"{bundle}/{manifest.segments[0].file}", "rb") as f:
        data = f.read()
    ops = list_ops(data)
    k = next(i for i, op in enumerate(ops) if "sep_1" in op.output_names[0])
    assert (ops[k].name, ops[k + 1].name) == ("DEPTHWISE_CONV_2D", "CONV_2D")
    assert ops[k].output_types == ["INT8"]
    between = ops[k].output_names[0]
    assert ops[k + 1].input_names[0] == between
    details = Interpreter(model_content=data).get_tensor_details()
    scale = next(t["quantization"][0] for t in details if t["name"] == between)
    quantizer = qat.get_layer("sep_1").depthwise_quantizer
    low = float(keras.ops.convert_to_numpy(quantizer.range_min))
    high = float(keras.ops.convert_to_numpy(quantizer.range_max))
    assert scale == pytest.approx((high - low) / 255, rel=1e-5)


def test_int8_bundle_reproduces_the_separable_qat_model(separable, digits, tmp_path):
    """Measured (TensorFlow, seeds 0-4, 360 test samples): exit agreement
    0.983-0.997, class agreement 0.994-1.0. Bars: 0.97 and 0.98."""
    qat, bundle = separable
    reference = qat.predict_early(digits.x_test)
    result = kee.runtime.GatedInterpreter(bundle).predict(digits.x_test)
    assert len(np.unique(reference.exit_indices)) == 2
    assert np.mean(result.classes == reference.classes) >= 0.98
    assert np.mean(result.exit_indices == reference.exit_indices) >= 0.97
    # Saved and loaded with its range; the float copy is a SeparableConv2D
    # model with the fine-tuned weights.
    qat.save(str(tmp_path / "separable.keras"))
    loaded = keras.saving.load_model(str(tmp_path / "separable.keras"))
    again = loaded.predict_early(digits.x_test)
    np.testing.assert_array_equal(again.exit_indices, reference.exit_indices)
    plain = qat.float_model()
    assert type(plain.get_layer("sep_2")) is keras.layers.SeparableConv2D
    # Rounding changes the final class of at most 10 of the 360 test
    # samples (mean 5.2-5.9; trained from seeds 0-9 TensorFlow, 0-12 JAX,
    # 0-14 PyTorch). Bar: 20.
    fake_quant = qat.predict(digits.x_test, verbose=0)[-1].argmax(-1)
    unrounded = plain.predict(digits.x_test, verbose=0)[-1].argmax(-1)
    assert np.sum(fake_quant != unrounded) <= 20


def _batch_norm_model() -> kee.EarlyExitModel:
    """Convolutions and a Dense, each followed by BatchNormalization (the
    first three then by a ReLU or ReLU6 layer)."""
    layers = keras.layers
    inputs = keras.Input((8, 8, 1), name="image")
    x = layers.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = layers.ReLU(name="stem_relu")(layers.BatchNormalization(momentum=0.9)(x))
    x = layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw")(x)
    x = layers.Activation("relu6")(layers.BatchNormalization(momentum=0.9)(x))
    exit_1 = kee.ExitBranch(10, pooled_size=2, name="exit_1")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.SeparableConv2D(16, 3, padding="same", name="sep")(x)
    x = layers.ReLU()(layers.BatchNormalization(momentum=0.9)(x))
    x = layers.Dense(32, name="dense")(layers.Flatten()(x))
    x = layers.BatchNormalization(momentum=0.9, name="dense_bn")(x)
    final = kee.ExitBranch(10, name="final")(x)
    return kee.EarlyExitModel(inputs, [exit_1, final], thresholds=[0.6])


@pytest.fixture(scope="module")
def batch_norm(digits, tmp_path_factory):
    """The model above, the float model of its QAT copy (the normalizations
    folded), that copy fine-tuned one epoch, and its int8 bundle."""
    return _fine_tuned(_batch_norm_model, digits, tmp_path_factory)


def test_batch_norm_folds_into_the_layer_before(batch_norm, digits):
    """The normalization folds into the kernel and bias before it (the
    fake-quant model has no BatchNormalization), computing what the float
    model computes; a layer whose ReLU TFLite fuses has no range of its
    own, only the ReLU after it."""
    model, folded, qat, _ = batch_norm
    names = [layer.name for layer in qat.layers]
    assert not any(
        isinstance(layer, keras.layers.BatchNormalization) for layer in qat.layers
    )
    assert "stem_quant" not in names and "stem_relu_quant" in names
    assert "dense_quant" in names  # no ReLU after it
    reference = model.predict(digits.x_test, verbose=0)
    for a, b in zip(reference, folded.predict(digits.x_test, verbose=0)):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-4)


def test_int8_bundle_reproduces_the_batch_norm_qat_model(batch_norm, digits):
    """Measured (TensorFlow, seeds 0-4, 360 test samples): exit agreement
    0.989-0.997, class agreement 1.0. Bars: 0.97 and 0.98."""
    _, _, qat, bundle = batch_norm
    reference = qat.predict_early(digits.x_test)
    result = kee.runtime.GatedInterpreter(bundle).predict(digits.x_test)
    assert len(np.unique(reference.exit_indices)) == 2
    assert np.mean(result.classes == reference.classes) >= 0.98
    assert np.mean(result.exit_indices == reference.exit_indices) >= 0.97
