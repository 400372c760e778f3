"""profile: per-exit figures, oracle bound, Pareto front; predict_early
agrees with computing every exit and selecting afterwards."""

import numpy as np
import pytest
from keras import ops

import keras_earlyexit as kee
from keras_earlyexit import demo
from keras_earlyexit.inference import select_exits

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(trained_digits_model, digits):
    return kee.profile(trained_digits_model, digits.x_val, digits.y_val)


def _all_exits(model, x):
    logits = [np.asarray(o) for o in model.predict(x, verbose=0)]
    conf = np.stack(
        [
            ops.convert_to_numpy(gate(ops.convert_to_tensor(z)))
            for gate, z in zip(model.gates, logits)
        ],
        axis=1,
    )
    return logits, conf


@pytest.mark.parametrize(
    "thresholds", [[0.0, 0.0], [0.6, 0.95], [0.9, 0.5], [1.0, 1.0]]
)
def test_predict_early_equals_compute_all_then_select(
    trained_digits_model, digits, thresholds
):
    model = trained_digits_model
    logits, conf = _all_exits(model, digits.x_test)
    # Thresholds on the float32 confidences, away from ties at the boundary.
    exits = select_exits(conf, thresholds)
    rows = np.arange(len(exits))
    expected_classes = np.stack([np.argmax(z, 1) for z in logits], 1)[rows, exits]
    result = model.predict_early(digits.x_test, thresholds, batch_size=64)
    near = np.abs(conf[:, :-1] - np.asarray(thresholds)).min(axis=1) < 1e-5
    assert np.array_equal(result.exit_indices[~near], exits[~near])
    assert np.array_equal(result.classes[~near], expected_classes[~near])
    np.testing.assert_allclose(
        result.confidences[~near], conf[rows, exits][~near], atol=1e-5
    )


def test_per_exit_figures(report, trained_digits_model, digits):
    logits, _ = _all_exits(trained_digits_model, digits.x_val)
    accuracy = [float(np.mean(np.argmax(z, 1) == digits.y_val)) for z in logits]
    np.testing.assert_allclose(report.accuracy, accuracy)
    macs = kee.count_macs(trained_digits_model)
    assert report.cumulative_macs == macs.cumulative_macs
    assert report.segment_macs == macs.segment_macs
    assert report.macs_share[-1] == 1.0
    assert report.exit_names == ["exit_1", "exit_2", "final"]
    correct = np.stack([np.argmax(z, 1) == digits.y_val for z in logits], 1)
    assert report.oracle_accuracy == pytest.approx(correct.any(axis=1).mean())


def test_oracle_is_cheapest_at_its_accuracy(report):
    points = report.sweep + report.pareto_front
    assert all(p.accuracy <= report.oracle_accuracy + 1e-12 for p in points)
    at_oracle = [p for p in points if p.accuracy >= report.oracle_accuracy - 1e-12]
    assert all(p.average_macs >= report.oracle_macs for p in at_oracle)
    assert report.oracle_macs <= report.cumulative_macs[-1]
    assert sum(report.oracle_exit_shares) == pytest.approx(1.0)


def test_pareto_front_is_monotone_and_real(report, trained_digits_model, digits):
    front = report.pareto_front
    assert len(front) >= 3
    assert all(a.average_macs <= b.average_macs for a, b in zip(front, front[1:]))
    assert all(a.accuracy < b.accuracy for a, b in zip(front, front[1:]))
    for p in report.sweep:  # nothing on the sweep beats the front
        better = [q for q in front if q.average_macs <= p.average_macs + 1e-9]
        assert better and max(q.accuracy for q in better) >= p.accuracy - 1e-12
    # A front point is what gated inference really gives.
    point = report.best_under(0.01)
    result = trained_digits_model.predict_early(digits.x_val, list(point.thresholds))
    macs = np.asarray(report.cumulative_macs)[result.exit_indices].mean()
    assert abs(np.mean(result.classes == digits.y_val) - point.accuracy) <= 2 / 360
    assert macs == pytest.approx(point.average_macs, rel=0.02)
    assert point.accuracy >= report.accuracy[-1] - 0.01


def test_tables_and_plot(report, tmp_path):
    text = str(report)
    for word in ("exit_1", "final", "oracle", "Pareto", "cumulative MACs"):
        assert word in text
    markdown = report.to_markdown()
    assert markdown.count("| exit |") == 1 and "|---|" in markdown
    path = report.plot(str(tmp_path / "profile.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_one_hot_labels_give_the_same_report(report, trained_digits_model, digits):
    one_hot = np.eye(10)[digits.y_val]
    again = kee.profile(trained_digits_model, digits.x_val, one_hot)
    assert again.accuracy == report.accuracy
    assert again.oracle_macs == report.oracle_macs


def test_bad_input(trained_digits_model, digits):
    model, x, y = trained_digits_model, digits.x_val, digits.y_val
    with pytest.raises(ValueError, match="labels but x has"):
        kee.profile(model, x, y[:-1])
    with pytest.raises(ValueError, match="10 classes"):
        kee.profile(model, x, y + 5)
    with pytest.raises(ValueError, match="empty"):
        kee.profile(model, x[:0], y[:0])
    with pytest.raises(ValueError, match="expects samples of shape"):
        kee.profile(model, x[:, :4], y)
    with pytest.raises(ValueError, match="one-hot"):
        kee.profile(model, x, np.eye(7)[y % 7])
    with pytest.raises(TypeError, match="EarlyExitModel"):
        kee.profile(model.segments()[0], x, y)
    with pytest.raises(ValueError, match="Expected 2 thresholds"):
        model.predict_early(x, [0.5])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        model.predict_early(x, [0.5, 1.5])


def test_threshold_one_keeps_saturated_samples(digits):
    """At temperature 1e-6 every float softmax is exactly 1.0 on every
    backend; thresholds of 1.0 still keep every sample to the final exit."""
    model = demo.digits_cnn(width=4)
    model.set_temperatures([1e-6] * 3)
    report = kee.profile(model, digits.x_val, digits.y_val)
    (never,) = [p for p in report.sweep if p.thresholds == (1.0, 1.0)]
    assert never.exit_shares == (0.0, 0.0, 1.0)
    assert never.accuracy == report.accuracy[-1]


def test_non_finite_and_integer_inputs_are_refused(trained_digits_model, digits):
    model, x, y = trained_digits_model, digits.x_val.copy(), digits.y_val
    x[7, 3, 3, 0] = -np.inf
    with pytest.raises(ValueError, match=r"'image' has 1 of 360 .* index 7"):
        kee.profile(model, x, y)
    with pytest.raises(ValueError, match=r"dtype int64. Scale and convert"):
        kee.profile(model, (digits.x_val * 16).astype("int64"), y)
    y_column = y[:, None]  # (n, 1) labels are flattened
    assert (
        kee.profile(model, digits.x_val, y_column).accuracy
        == kee.profile(model, digits.x_val, y).accuracy
    )
