"""The patience criterion (PABEE) in Keras: the gate and its saved state,
predict_early on every runner against the shared NumPy rule, profile over
the patience and the floor, calibrate of the patience (and floors), and
clear errors for bad patience values."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_earlyexit as kee
from keras_earlyexit.evaluation import _data
from keras_earlyexit.inference import gated_runner
from keras_earlyexit.runtime.patience import patience_passes, streaks

NUM_EXITS = 4


def _four_exit_cnn(**model_kwargs) -> kee.EarlyExitModel:
    """Small CNN with 4 exits on 8x8 digits: streaks up to 3."""
    inputs = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu")(inputs)
    exits = [kee.ExitBranch(10, pooled_size=2, name="exit_1")(x)]
    x = keras.layers.Conv2D(12, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    exits.append(kee.ExitBranch(10, pooled_size=2, name="exit_2")(x))
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    exits.append(kee.ExitBranch(10, pooled_size=2, name="exit_3")(x))
    x = keras.layers.Conv2D(24, 3, padding="same", activation="relu")(x)
    exits.append(kee.ExitBranch(10, hidden_units=24, name="final")(x))
    return kee.EarlyExitModel(inputs, exits, name="pabee_cnn", **model_kwargs)


@pytest.fixture(scope="module")
def pabee(digits) -> kee.EarlyExitModel:
    """Trained briefly: shallow exits still disagree often, so streaks of
    every length occur (shared: tests that change it restore it)."""
    keras.utils.set_random_seed(0)
    model = _four_exit_cnn(criterion="patience", patience=2)
    model.compile(keras.optimizers.Adam(3e-3), kee.EarlyExitLoss("linear"))
    model.fit(digits.x_train, digits.y_train, epochs=6, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="module")
def exit_data(pabee, digits):
    """Every exit's logits, classes, streaks and confidences on the test
    digits, from the full model (the reference predict_early must match)."""
    logits = np.stack(
        [np.asarray(z, np.float32) for z in pabee.predict(digits.x_test, verbose=0)]
    )
    classes = logits.argmax(-1).T  # (n, exits)
    confidences = np.stack(
        [ops.convert_to_numpy(g(z)) for g, z in zip(pabee.gates, logits)], 1
    ).astype(np.float32)
    top2 = np.sort(logits, axis=-1)[..., -2:]  # (exits, n, 2)
    # A segment's batch can change a logit's last bits: samples with a
    # near-tie for the top class at some exit may take another streak.
    tied = (top2[..., 1] - top2[..., 0] < 1e-4).any(axis=0)
    return logits, classes, streaks(classes), confidences, tied


def _reference(classes, streak, confidences, thresholds, patience):
    """Exit, class and confidence per sample by the shared NumPy rule."""
    n = len(classes)
    exits = np.full(n, NUM_EXITS - 1)
    for k in reversed(range(NUM_EXITS - 1)):
        leave = patience_passes(
            streak[:, k], patience, confidences[:, k], thresholds[k]
        )
        exits[leave] = k
    rows = np.arange(n)
    return exits, classes[rows, exits], confidences[rows, exits]


def test_gate_confidence_state_and_config():
    z = np.random.default_rng(1).normal(size=(16, 5)).astype("float32") * 3
    gate = kee.ExitGate("patience", patience=3, temperature=2.0)
    probs = np.exp(z / 2.0) / np.exp(z / 2.0).sum(-1, keepdims=True)
    np.testing.assert_allclose(ops.convert_to_numpy(gate(z)), probs.max(-1), atol=1e-6)
    assert gate.threshold == 0.0 and gate.patience == 3  # no floor by default
    assert kee.ExitGate("patience").patience == 2
    assert kee.ExitGate("max_prob").patience is None
    gate.patience = 4
    clone = kee.ExitGate.from_config(gate.get_config())
    assert clone.criterion == "patience" and clone.patience == 4
    assert len(gate.non_trainable_weights) == 3 and not gate.trainable_weights


@pytest.mark.parametrize("patience", [0, -1, 1.5, True, "2", None])
def test_gate_refuses_bad_patience(patience):
    gate = kee.ExitGate("patience")
    with pytest.raises(ValueError, match="patience must be an int >= 1"):
        gate.patience = patience
    if patience is not None:
        with pytest.raises(ValueError, match="patience must be an int >= 1"):
            kee.ExitGate("patience", patience=patience)
    assert gate.patience == 2  # nothing changed


def test_patience_needs_the_patience_criterion():
    with pytest.raises(ValueError, match="only to criterion='patience'"):
        kee.ExitGate("max_prob", patience=2)
    with pytest.raises(ValueError, match="only to criterion='patience'"):
        kee.ExitGate("entropy").patience = 2
    with pytest.raises(ValueError, match="received criterion='margin'"):
        _four_exit_cnn(criterion="margin", patience=2)
    model = _four_exit_cnn()
    assert model.patience is None
    with pytest.raises(ValueError, match="set_patience applies to"):
        model.set_patience(2)
    with pytest.raises(ValueError, match="only to criterion='patience' models"):
        model.predict_early(np.zeros((2, 8, 8, 1), "float32"), patience=2)


def test_patience_beyond_the_exits_is_refused():
    with pytest.raises(
        ValueError, match=r"patience=5 is larger than the number of exits \(4\)"
    ):
        _four_exit_cnn(criterion="patience", patience=5)
    model = _four_exit_cnn(criterion="patience", patience=4)
    assert model.patience == 4 and model.thresholds == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match=r"1 <= patience <= 4"):
        model.set_patience(5)
    with pytest.raises(ValueError, match="patience must be an int >= 1"):
        model.set_patience(0)
    with pytest.raises(ValueError, match="larger than the number of exits"):
        model.predict_early(np.zeros((2, 8, 8, 1), "float32"), patience=7)
    assert model.patience == 4


# One sample per batch: the first 48 samples only (eager PyTorch is slow).
@pytest.mark.parametrize("batch_size, n", [(1, 48), (29, 360), (360, 360)])
def test_predict_early_follows_the_shared_rule(pabee, digits, exit_data, batch_size, n):
    assert exit_data[-1].mean() < 0.02  # near-ties, over all 360 samples
    classes, streak, confidences, tied = (v[:n] for v in exit_data[1:])
    floors = [float(np.median(confidences[:, k])) for k in range(NUM_EXITS - 1)]
    settings = [(p, [0.0] * 3) for p in range(1, NUM_EXITS + 1)]
    settings += [(2, floors), (3, [0.3, 1.0, 0.0]), (1, [1.0, 1.0, 1.0])]
    for patience, thresholds in settings:
        exits, expected_classes, expected_conf = _reference(
            classes, streak, confidences, thresholds, patience
        )
        result = pabee.predict_early(
            digits.x_test[:n], thresholds, batch_size=batch_size, patience=patience
        )
        # ... and confidences within 1e-5 of a floor may tip either way.
        gap = np.abs(confidences[:, :-1] - np.float32(thresholds))
        near = tied | (gap < 1e-5)[:, np.asarray(thresholds) < 1.0].any(axis=1)
        assert near.mean() < 0.05
        np.testing.assert_array_equal(result.exit_indices[~near], exits[~near])
        np.testing.assert_array_equal(result.classes[~near], expected_classes[~near])
        np.testing.assert_allclose(
            result.confidences[~near], expected_conf[~near], atol=1e-5
        )


def test_the_streak_decides(pabee, digits):
    """With no floor, patience p lets no sample leave before exit p - 1,
    and samples whose exits disagree go deeper."""
    for p in range(1, NUM_EXITS + 1):
        taken = pabee.predict_early(digits.x_test, [0.0] * 3, patience=p).exit_indices
        assert taken.min() == min(p - 1, NUM_EXITS - 1)
    mid = pabee.predict_early(digits.x_test, [0.0] * 3, patience=2).exit_indices
    counts = np.bincount(mid, minlength=NUM_EXITS)
    assert counts[1] > 0 and counts[2:].sum() > 0, counts  # streaks vary
    if keras.backend.backend() == "tensorflow":
        assert gated_runner(pabee).compiled_count() == 1  # p is an argument


def test_model_patience_is_used_and_saved(pabee, digits, exit_data, tmp_path):
    _, classes, streak, confidences, tied = exit_data
    path = str(tmp_path / "pabee.keras")
    pabee.save(path)
    model = keras.saving.load_model(path)
    model.set_patience(3)
    model.set_thresholds([0.2, 0.4, 0.0])
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.criterion == "patience" and loaded.patience == 3
    np.testing.assert_allclose(loaded.thresholds, [0.2, 0.4, 0.0], atol=1e-7)
    exits, _, _ = _reference(classes, streak, confidences, [0.2, 0.4, 0.0], 3)
    result = loaded.predict_early(digits.x_test)
    near = tied | (np.abs(confidences[:, :2] - np.float32([0.2, 0.4])) < 1e-5).any(1)
    np.testing.assert_array_equal(result.exit_indices[~near], exits[~near])
    assert pabee.patience == 2  # the shared model is untouched


def test_profile_sweeps_patience_and_floor(pabee, digits):
    report = kee.profile(pabee, digits.x_val, digits.y_val)
    logits = np.stack(pabee.predict(digits.x_val, verbose=0))
    accuracy = (logits.argmax(-1) == digits.y_val).mean(axis=1)
    np.testing.assert_allclose(report.accuracy, accuracy)  # per exit, unchanged
    assert report.patience == 2 and report.criterion == "patience"
    assert report.current.patience == 2
    assert [p.patience for p in report.patience_sweep] == [1, 2, 3, 4]
    assert {p.patience for p in report.sweep} == {1, 2, 3, 4}
    assert {p.patience for p in report.pareto_front} <= {1, 2, 3, 4}
    assert report.patience_sweep[-1].exit_shares[-1] == 1.0  # p = exits: none leave
    # Sweep points are what predict_early gives with that patience and floor.
    points = (
        report.patience_sweep
        + report.pareto_front[:: max(1, len(report.pareto_front) // 6)]
    )
    macs = np.asarray(report.cumulative_macs)
    for point in points:
        result = pabee.predict_early(
            digits.x_val, list(point.thresholds), patience=point.patience
        )
        assert abs(np.mean(result.classes == digits.y_val) - point.accuracy) <= 2 / 360
        assert macs[result.exit_indices].mean() == pytest.approx(
            point.average_macs, rel=0.02
        )
    assert all(t >= 0.0 for p in report.pareto_front for t in p.thresholds)
    text = str(report)
    assert "patience 2" in text and "p=2 [" in text
    assert "p=1 [" in report.to_markdown()


def test_calibrate_patience_and_floors(pabee, digits):
    x, y = digits.x_val, digits.y_val
    outputs = _data.exit_outputs(pabee, x, y)
    result = kee.calibrate(pabee, x, y, max_accuracy_drop=0.02)
    assert result.patience in (1, 2, 3, 4) and result.bound <= 0.02
    # The kept patience is the cheapest of those calibrated one by one.
    for p in range(1, NUM_EXITS + 1):
        alone = kee.calibrate(pabee, x, y, max_accuracy_drop=0.02, patience=p)
        assert alone.patience == p
        assert result.expected_macs <= alone.expected_macs + 1e-9
    # Its figures are those of gated inference with that patience.
    gated = outputs.with_patience(result.patience)
    accuracy, macs, _, _ = gated.simulate(result.thresholds)
    assert accuracy == pytest.approx(result.expected_accuracy)
    assert macs == pytest.approx(result.expected_macs)
    prediction = pabee.predict_early(x, result.thresholds, patience=result.patience)
    assert abs(np.mean(prediction.classes == y) - accuracy) <= 2 / 360
    assert "patience:" in str(result)


def test_calibrate_patience_alone(pabee, digits):
    x, y = digits.x_val, digits.y_val
    outputs = _data.exit_outputs(pabee, x, y)
    result = kee.calibrate(pabee, x, y, macs_budget=0.6, confidence_floor=False)
    assert result.thresholds == [0.0, 0.0, 0.0] and result.bound <= 0.6
    accuracy, macs, _, _ = outputs.with_patience(result.patience).simulate([0.0] * 3)
    assert accuracy == pytest.approx(result.expected_accuracy)
    assert macs / outputs.cumulative_macs[-1] <= 0.6
    # Every more accurate patience is out of budget.
    for p in range(1, NUM_EXITS + 1):
        other, _, _, _ = outputs.with_patience(p).simulate([0.0] * 3)
        if other > accuracy:
            with pytest.raises(ValueError, match="not reachable with patience alone"):
                kee.calibrate(
                    pabee, x, y, macs_budget=0.6, confidence_floor=False, patience=p
                )
    risky = kee.calibrate(pabee, x, y, risk=0.1, confidence_floor=False)
    assert risky.bound <= 0.1 and risky.thresholds == [0.0] * 3
    _, _, agreement, _ = outputs.with_patience(risky.patience).simulate([0.0] * 3)
    assert 1.0 - agreement <= 0.1


def test_calibrate_risk_and_apply(pabee, digits, tmp_path):
    x = np.concatenate([digits.x_val, digits.x_test])
    y = np.concatenate([digits.y_val, digits.y_test])
    outputs = _data.exit_outputs(pabee, x, y)
    rows = np.random.default_rng(0).permutation(len(y))
    fit, unseen = rows[: len(y) // 2], rows[len(y) // 2 :]
    result = kee.calibrate(pabee, x[fit], y[fit], risk=0.05, patience=[2, 3])
    assert result.patience in (2, 3) and result.bound <= 0.05 and result.delta == 0.1
    _, _, agreement, _ = (
        outputs.with_patience(result.patience)
        .subset(unseen)
        .simulate(result.thresholds)
    )
    # Unseen half (360 samples) over 22 models (seeds 0-11 TensorFlow, 0-5
    # PyTorch, 0-3 JAX): disagreement at most 0.0556, mean 0.017.
    assert 1.0 - agreement <= 0.05 + 0.03
    path = str(tmp_path / "calibrated.keras")
    pabee.save(path)
    model = keras.saving.load_model(path)
    model.set_patience(4)
    result.apply(model)
    assert model.patience == result.patience
    np.testing.assert_allclose(model.thresholds, result.thresholds, atol=1e-7)
    scaled = kee.calibrate(
        model, x[fit], y[fit], max_accuracy_drop=0.02, temperature_scaling=True
    )
    assert len(scaled.temperatures) == NUM_EXITS and scaled.patience is not None


def test_calibrate_bad_patience(pabee, digits):
    x, y = digits.x_val, digits.y_val
    with pytest.raises(ValueError, match="larger than the number of exits"):
        kee.calibrate(pabee, x, y, max_accuracy_drop=0.02, patience=5)
    with pytest.raises(ValueError, match="patience must be an int >= 1"):
        kee.calibrate(pabee, x, y, max_accuracy_drop=0.02, patience=[0, 2])
    with pytest.raises(ValueError, match="empty list"):
        kee.calibrate(pabee, x, y, max_accuracy_drop=0.02, patience=[])
    with pytest.raises(ValueError, match="confidence_floor=False there are none"):
        kee.calibrate(
            pabee,
            x,
            y,
            max_accuracy_drop=0.02,
            confidence_floor=False,
            temperature_scaling=True,
        )
    with pytest.raises(ValueError, match="criterion is 'max_prob'"):
        kee.calibrate(_four_exit_cnn(), x, y, max_accuracy_drop=0.02, patience=2)
    with pytest.raises(ValueError, match="No patience in \\[4\\] reaches"):
        kee.calibrate(pabee, x, y, macs_budget=0.5, patience=4)
