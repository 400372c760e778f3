"""Learned exit policies: the `"learned"` gate (its score, state and saved
weights), `fit_exit_policy` (the logistic fit, its rule on sample counts,
bad input), calibration of the fitted score on other samples, and the
policy inside exported int8 segments on LiteRT and TFLite Micro."""

import importlib.util
import os

import keras
import numpy as np
import pytest
from keras import ops

import keras_earlyexit as kee
from keras_earlyexit import criteria, demo
from keras_earlyexit.evaluation.policy import (
    MIN_PER_LABEL,
    MIN_SAMPLES,
    fit_exit_policy,
    logistic_regression,
    policy_features,
)
from keras_earlyexit.gate import INITIAL_POLICY_BIAS, INITIAL_POLICY_WEIGHTS

tensorflow_only = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="TFLite conversion needs the TensorFlow backend",
)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _features(z: np.ndarray) -> np.ndarray:
    """`criteria.POLICY_FEATURES` by hand, in NumPy, for logits whose top
    two probabilities are more than 1/256 apart (no near-tie)."""
    p = _softmax(z)  # (n, C)
    top = np.sort(p, axis=-1)
    logits = np.sort(z, axis=-1)
    assert np.all(top[:, -1] - top[:, -2] > 1 / 256)
    return np.stack(
        [
            top[:, -1],
            top[:, -1] - top[:, -2],
            logits[:, -1],
            logits[:, -1] - logits[:, -2],
        ],
        axis=1,
    )


@pytest.fixture(scope="module")
def trained(digits) -> kee.EarlyExitModel:
    """A narrow digits CNN trained for 6 epochs: its shallow exits are
    wrong often enough for a policy fit on the 360 validation samples
    (seeds 0-4 on each backend: exit 1 wrong on 34-47% of them, exit 2 on
    9-17%, i.e. 34-61 samples)."""
    keras.utils.set_random_seed(0)
    model = demo.digits_cnn(width=6)
    model.compile(keras.optimizers.Adam(3e-3), kee.EarlyExitLoss("linear"))
    model.fit(digits.x_train, digits.y_train, epochs=6, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="module")
def learned(trained, digits):
    """`trained` with learned gates (same layers), policies fitted on the
    validation split."""
    model = kee.EarlyExitModel(
        trained.inputs, trained.outputs, criterion="learned", name="learned"
    )
    result = fit_exit_policy(model, digits.x_val, digits.y_val)
    return model, result


def test_gate_before_fitting_is_monotone_in_top1():
    z = np.random.default_rng(1).normal(size=(32, 7)).astype("float32") * 3
    gate = kee.ExitGate("learned", temperature=2.0)
    expected = _sigmoid(8.0 * _softmax(z / 2.0).max(-1) - 4.0)
    np.testing.assert_allclose(ops.convert_to_numpy(gate(z)), expected, atol=1e-6)
    weights, bias = gate.policy
    assert weights.tolist() == list(INITIAL_POLICY_WEIGHTS)
    assert bias == INITIAL_POLICY_BIAS
    assert gate.threshold == pytest.approx(0.9)
    assert len(gate.non_trainable_weights) == 4 and not gate.trainable_weights
    assert kee.ExitGate("max_prob").policy is None


def test_gate_score_is_the_logistic_of_the_features():
    z = np.random.default_rng(2).normal(size=(64, 5)).astype("float32") * 4
    top = np.sort(_softmax(z), axis=-1)
    z = z[top[:, -1] - top[:, -2] > 1 / 256]  # near-ties: see the next test
    w, b = np.array([1.5, -2.0, 3.0, 0.25], np.float32), -0.5
    gate = kee.ExitGate("learned", policy_weights=w, policy_bias=b)
    expected = _sigmoid(_features(z) @ w + b)
    np.testing.assert_allclose(ops.convert_to_numpy(gate(z)), expected, atol=1e-5)
    features = policy_features(z)
    np.testing.assert_allclose(features, _features(z), atol=1e-5)
    clone = kee.ExitGate.from_config(gate.get_config())
    np.testing.assert_allclose(clone.policy[0], w)
    assert clone.policy[1] == pytest.approx(b)


def test_features_of_a_tie_have_no_margin():
    z = np.array([[2.0, 2.0, 0.0], [3.0, 1.0, 1.0], [1.0, 1.0, 1.0]], "float32")
    features = policy_features(z)
    np.testing.assert_allclose(features[:, 1], [0.0, 0.68048, 0.0], atol=1e-5)
    np.testing.assert_allclose(features[:, 3], [0.0, 2.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(features[:, 2], [2.0, 3.0, 1.0], atol=1e-6)


def test_gate_refuses_a_bad_policy():
    with pytest.raises(ValueError, match="only to criterion='learned'"):
        kee.ExitGate("max_prob", policy_bias=1.0)
    with pytest.raises(ValueError, match="policy applies only to"):
        kee.ExitGate("margin").set_policy([1, 0, 0, 0], 0.0)
    gate = kee.ExitGate("learned")
    with pytest.raises(ValueError, match="must hold 4 numbers"):
        gate.set_policy([1.0, 2.0], 0.0)
    with pytest.raises(ValueError, match="must be finite"):
        gate.set_policy([1.0, np.nan, 0.0, 0.0], 0.0)
    assert gate.policy[0].tolist() == list(INITIAL_POLICY_WEIGHTS)  # unchanged
    with pytest.raises(ValueError, match="needs the gate's policy weights"):
        criteria.confidence(np.zeros((2, 3), "float32"), "learned")


def test_logistic_regression_reaches_the_optimum():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 3)) * [1.0, 5.0, 0.1] + [0.0, 2.0, -1.0]
    t = (x @ [1.0, -0.3, 4.0] + rng.logistic(size=400)) > -1.0
    l2 = 0.05
    w, b = logistic_regression(x, t, l2)
    # The penalized gradient vanishes at the optimum (standardized space).
    mean, scale = x.mean(0), x.std(0)
    theta = w * scale  # standardized weights
    z = x @ w + b
    residual = _sigmoid(z) - t
    gradient_w = ((x - mean) / scale).T @ residual / len(t) + l2 * theta
    np.testing.assert_allclose(gradient_w, 0.0, atol=1e-7)
    assert abs(residual.mean()) < 1e-7  # the free bias
    # An uninformative feature: the bias alone, log(positives / negatives).
    t = np.arange(100) < 30
    w, b = logistic_regression(np.ones((100, 1)), t, l2)
    assert w.tolist() == [0.0] and b == pytest.approx(np.log(30 / 70), abs=1e-9)


def test_fit_sets_the_gates_and_predicts_correctness(learned, trained, digits):
    model, result = learned
    assert result.exits == [0, 1] and result.target == "correct"
    assert result.num_samples == len(digits.y_val)
    logits = [np.asarray(z, np.float32) for z in trained.predict(digits.x_test)]
    for k, (w, b) in enumerate(zip(result.weights, result.biases)):
        gate_w, gate_b = model.gates[k].policy
        np.testing.assert_allclose(gate_w, w)
        score = ops.convert_to_numpy(model.gates[k](logits[k]))
        expected = _sigmoid(policy_features(logits[k]) @ w + b)
        np.testing.assert_allclose(score, expected, atol=1e-5)
        # On unseen samples the score ranks right answers above wrong ones
        # about as well as the top-1 probability, or better. Measured over
        # training seeds 0-4 on each backend, AUC learned minus AUC top-1:
        # exit 0 -0.003 to +0.114 (AUC 0.66-0.77), exit 1 -0.005 to +0.049
        # (AUC 0.79-0.91). Bars: -0.02 and AUC 0.6.
        right = logits[k].argmax(-1) == digits.y_test
        top1 = _softmax(logits[k]).max(-1)
        assert _auc(score, right) >= max(_auc(top1, right) - 0.02, 0.6)
    # The final gate keeps its starting policy.
    assert model.gates[-1].policy[1] == INITIAL_POLICY_BIAS
    text = str(result)
    assert "target='correct'" in text and "max_logit" in text
    # predict_early reports the gates' scores.
    prediction = model.predict_early(digits.x_test, thresholds=[0.0, 0.0])
    assert np.all(prediction.exit_indices == 0)
    first = ops.convert_to_numpy(model.gates[0](logits[0]))
    np.testing.assert_allclose(prediction.confidences, first, atol=1e-5)


def _auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a positive outranks a negative (ties count half)."""
    pos, neg = score[positive], score[~positive]
    greater = (pos[:, None] > neg[None, :]).mean()
    return float(greater + 0.5 * (pos[:, None] == neg[None, :]).mean())


def test_policy_is_saved_with_the_model(learned, digits, tmp_path):
    model, result = learned
    path = str(tmp_path / "learned.keras")
    model.set_thresholds([0.8, 0.7])
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.criterion == "learned"
    for k in result.exits:
        np.testing.assert_allclose(loaded.gates[k].policy[0], result.weights[k])
    a = model.predict_early(digits.x_test[:50])
    b = loaded.predict_early(digits.x_test[:50])
    np.testing.assert_array_equal(a.exit_indices, b.exit_indices)
    np.testing.assert_allclose(a.confidences, b.confidences, atol=1e-5)


def test_calibrated_on_other_samples(learned, digits):
    """Fit on the validation split, calibrate on the test split: the
    calibration's figures are those of the learned scores there."""
    model, _ = learned
    calibration = kee.calibrate(
        model, digits.x_test, digits.y_test, max_accuracy_drop=0.02
    )
    assert calibration.expected_accuracy >= calibration.final_accuracy - 0.02
    prediction = model.predict_early(digits.x_test, calibration.thresholds)
    accuracy = np.mean(prediction.classes == digits.y_test)
    assert accuracy == pytest.approx(calibration.expected_accuracy, abs=1e-9)
    assert calibration.expected_share < 1.0  # some samples leave early


def test_validation_split_and_agreement_target(trained, digits):
    model = kee.EarlyExitModel(trained.inputs, trained.outputs, criterion="learned")
    x = np.concatenate([digits.x_val, digits.x_test])
    y = np.concatenate([digits.y_val, digits.y_test])
    result = fit_exit_policy(
        model, x, y, target="agrees_with_final", validation_split=0.25, exits=[1]
    )
    x_cal, y_cal = result.validation_data
    assert result.num_samples == 540 and len(x_cal) == 180
    np.testing.assert_array_equal(x_cal, x[540:])
    np.testing.assert_array_equal(y_cal, y[540:])
    assert result.exits == [1]
    assert model.gates[0].policy[1] == INITIAL_POLICY_BIAS  # left out
    final = trained.predict(x[:540], verbose=0)
    agrees = np.argmax(final[1], -1) == np.argmax(final[-1], -1)
    assert result.positives == [int(agrees.sum())]


def test_too_few_samples_says_how_many(trained, digits):
    model = kee.EarlyExitModel(trained.inputs, trained.outputs, criterion="learned")
    x, y = digits.x_val[: MIN_SAMPLES - 1], digits.y_val[: MIN_SAMPLES - 1]
    with pytest.raises(ValueError, match=f"at least {MIN_SAMPLES} samples"):
        fit_exit_policy(model, x, y)
    # Exit 1 is right on all but a few: too few wrong answers to fit.
    logits = trained.predict(digits.x_val, verbose=0)
    right = np.argmax(logits[1], -1) == digits.y_val
    keep = np.concatenate([np.flatnonzero(right), np.flatnonzero(~right)[:5]])
    with pytest.raises(ValueError) as info:
        fit_exit_policy(model, digits.x_val[keep], digits.y_val[keep], exits=[1])
    message = str(info.value)
    need = int(np.ceil(MIN_PER_LABEL * len(keep) / 5))
    for part in ("exit 1 ('exit_2')", "5 of them wrong", f"about {need} samples"):
        assert part in message, message
    assert model.gates[1].policy[1] == INITIAL_POLICY_BIAS  # nothing set


def test_bad_arguments_are_refused(trained, digits):
    x, y = digits.x_val, digits.y_val
    with pytest.raises(ValueError, match="criterion='learned'; this model's"):
        fit_exit_policy(trained, x, y)
    model = kee.EarlyExitModel(trained.inputs, trained.outputs, criterion="learned")
    with pytest.raises(ValueError, match="target must be one of"):
        fit_exit_policy(model, x, y, target="risk")
    with pytest.raises(ValueError, match="indices of non-final exits"):
        fit_exit_policy(model, x, y, exits=[2])
    with pytest.raises(ValueError, match="validation_split must be"):
        fit_exit_policy(model, x, y, validation_split=1.5)
    with pytest.raises(ValueError, match="l2 must be a number > 0"):
        fit_exit_policy(model, x, y, l2=0.0)
    with pytest.raises(TypeError, match="Expected a kee.EarlyExitModel"):
        fit_exit_policy(keras.Sequential([keras.layers.Dense(2)]), x, y)


@tensorflow_only
def test_int8_bundle_and_fused_file_run_the_policy(learned, digits, tmp_path):
    """The learned gate inside each int8 segment (integer ops only, no
    float op left) takes the exits Keras takes, on LiteRT and TFLite Micro,
    in a bundle and in a fused file.

    Measured over training seeds 0-19 (TensorFlow: the only backend that
    converts, so the test is skipped on the others; thresholds calibrated
    to a 2-point drop, 360 test samples), agreement of the int8 bundle with
    Keras: exits LiteRT 0.956-0.992 (mean 0.979), TFLite Micro 0.958-0.992
    (mean 0.979); classes LiteRT 0.978-0.997, TFLite Micro 0.981-1.0
    (seed 0, run here: exits 0.961 / 0.964, classes 0.986). The policy
    weighs the logit margin, whose int8 step (the logits' scale, about
    0.03) moves the score more than the softmax step moves the top-1
    probability. Bars a margin below the worst seed: 0.93 for exits (about
    9 samples below seed 5's 0.956), 0.96 for classes (6 below seed 18's
    0.978).
    """
    from keras_earlyexit.export.flatbuffer import list_ops

    model, _ = learned
    calibration = kee.calibrate(
        model, digits.x_test, digits.y_test, max_accuracy_drop=0.02
    )
    model.set_thresholds(calibration.thresholds)
    paths = {
        fused: kee.export.to_tflite(
            model,
            str(tmp_path / ("fused.tflite" if fused else "bundle")),
            representative_data=digits.x_val,
            quantization="int8",
            fused=fused,
            verbose=0,
        )
        for fused in (False, True)
    }
    bundle = paths[False]
    manifest = kee.runtime.GatedInterpreter(bundle).manifest
    assert manifest.criterion == "learned"
    for segment in manifest.segments:
        with open(os.path.join(bundle, segment.file), "rb") as f:
            found = list_ops(f.read())
        assert "LOGISTIC" in {op.name for op in found}
        assert not [op.name for op in found if "FLOAT32" in op.output_types]
    reference = model.predict_early(digits.x_test)
    assert len(np.unique(reference.exit_indices)) == 3  # every exit is taken
    backends = ["litert"]
    if importlib.util.find_spec("tflite_micro") is not None:
        backends.append("micro")
    results = {}
    for backend in backends:
        for fused, path in paths.items():
            result = kee.runtime.GatedInterpreter(path, backend=backend).predict(
                digits.x_test
            )
            exits = np.mean(result.exit_indices == reference.exit_indices)
            classes = np.mean(result.classes == reference.classes)
            assert exits >= 0.93, (backend, fused, exits)
            assert classes >= 0.96, (backend, fused, classes)
            results[backend, fused] = result
    # The fused file runs the bundle's segments: the same exits.
    for backend in backends:
        np.testing.assert_array_equal(
            results[backend, True].exit_indices, results[backend, False].exit_indices
        )
