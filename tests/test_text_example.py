"""The generated text task (`keras_earlyexit.demo_text`) and a tiny run of
the pipeline functions of `examples/train_text_classifier.py`."""

import importlib.util
import os

import keras
import numpy as np
import pytest

import keras_earlyexit as kee
from keras_earlyexit import demo_text as dt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _decode(row: np.ndarray) -> tuple[int, bool]:
    """The class and kind of one sample, read from its tokens by the rules
    of the module docstring (written independently of the generator)."""
    seq = [int(t) for t in row if t != dt.PAD]
    markers = [i for i, t in enumerate(seq) if t in dt.MARKERS]
    if markers:
        assert len(markers) == 1
        i = markers[0]
        c = dt.MARKERS.index(seq[i])
        return ((c + 1) % dt.NUM_CLASSES if seq[i - 1] == dt.SHIFT else c), False
    found = []
    for f, (p, q) in enumerate(dt.FAMILIES):
        pq = [i for i in range(len(seq) - 1) if seq[i : i + 2] == [p, q]]
        qp = [i for i in range(len(seq) - 1) if seq[i : i + 2] == [q, p]]
        if pq or qp:
            assert len(pq) == len(qp) == 1, seq
            # Far apart: at least a third of the sequence.
            assert abs(pq[0] - qp[0]) >= max(3, (len(seq) - 1) // 3), seq
            found.append(2 * f + (0 if pq[0] < qp[0] else 1))
    assert len(found) == 1, seq
    return found[0], True


@pytest.fixture(scope="module")
def sample():
    return dt.make_sequences(2000, seed=5)


def test_sequences_are_deterministic_and_padded(sample):
    tokens, labels, hard = sample
    again = dt.make_sequences(2000, seed=5)
    for a, b in zip(sample, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(dt.make_sequences(50, seed=6)[0], tokens[:50])
    assert tokens.dtype == np.int32 and tokens.shape == (2000, dt.MAX_LENGTH)
    assert labels.dtype == np.int64 and hard.dtype == bool
    lengths = (tokens != dt.PAD).sum(axis=1)
    assert lengths.min() == dt.MIN_LENGTH and lengths.max() == dt.MAX_LENGTH
    # Valid tokens first, then only padding; every sequence starts with CLS.
    np.testing.assert_array_equal(
        tokens != dt.PAD, np.arange(dt.MAX_LENGTH)[None] < lengths[:, None]
    )
    assert (tokens[:, 0] == dt.CLS).all()
    assert tokens.max() < dt.VOCAB_SIZE


def test_labels_follow_the_documented_rules(sample):
    tokens, labels, hard = sample
    decoded = [_decode(row) for row in tokens]
    np.testing.assert_array_equal([c for c, _ in decoded], labels)
    np.testing.assert_array_equal([h for _, h in decoded], hard)


def test_shares_and_no_single_token_shortcut(sample):
    tokens, labels, hard = sample
    # Bars from 100 seeds of 2000 samples: the long-range share was within
    # 0.027 of 0.25, each class share per kind within 0.054 of 0.25, and the
    # first / last token rule below within 0.063 / 0.090 of a coin (a real
    # shortcut is far off: with the lone tokens placed anywhere instead, the
    # first-token rule would be right on 83% of long-range samples).
    assert abs(hard.mean() - 0.25) < 0.04
    for kind in (hard, ~hard):
        counts = np.bincount(labels[kind], minlength=dt.NUM_CLASSES) / kind.sum()
        assert np.all(np.abs(counts - 0.25) < 0.08), counts
    # Long-range samples: the first and the last token of the family are
    # lone tokens drawn at random, so they say nothing about the order.
    first_right, last_right = [], []
    for row, c in zip(tokens[hard], labels[hard]):
        p, q = dt.FAMILIES[c // 2]
        at = [i for i, t in enumerate(row) if t in (p, q)]
        first_right.append((row[at[0]] == p) == (c % 2 == 0))
        last_right.append((row[at[-1]] == q) == (c % 2 == 0))
    assert abs(np.mean(first_right) - 0.5) < 0.12
    assert abs(np.mean(last_right) - 0.5) < 0.12
    # SHIFT alone is no cue either: it stands in local samples of every class.
    has_shift = (tokens == dt.SHIFT).any(axis=1)
    assert set(labels[has_shift & ~hard]) == set(range(dt.NUM_CLASSES))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": 0}, "n must be an int >= 1"),
        ({"n": 5, "hard_fraction": 1.5}, "hard_fraction must be in"),
        ({"n": 5, "min_length": 4}, "8 <= min_length <= max_length"),
        ({"n": 5, "max_length": 12}, "8 <= min_length <= max_length"),
    ],
)
def test_bad_generator_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dt.make_sequences(**kwargs)


def test_bad_encoder_arguments_are_refused():
    with pytest.raises(ValueError, match="width must be a multiple of heads"):
        dt.text_encoder(width=10, heads=4)
    with pytest.raises(ValueError, match=r"exit_after must hold layer numbers"):
        dt.text_encoder(num_layers=3, exit_after=[3])


def _example():
    path = os.path.join(REPO, "examples", "train_text_classifier.py")
    spec = importlib.util.spec_from_file_location("train_text_classifier", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines functions only; main() not run
    return module


@pytest.fixture(scope="module")
def pipeline():
    """The example's functions on a tiny encoder trained for one epoch."""
    keras.utils.set_random_seed(0)
    example = _example()
    data = example.load_data((600, 300, 200), seed=1)
    model = dt.text_encoder(num_layers=2, width=16, heads=2, ffn_units=32)
    example.train(model, data, epochs=1, batch_size=64, verbose=0)
    return example, data, model


@pytest.mark.slow
def test_example_pipeline_calibrates_and_runs_gated_inference(pipeline):
    example, data, model = pipeline
    macs = kee.count_macs(model).cumulative_macs
    figures = example.calibrated_max_prob(model, data)
    shares = [float(s) for s in figures["exit shares"].split(", ")]
    assert len(shares) == model.num_exits and abs(sum(shares) - 1) < 0.02
    assert model.thresholds != [0.9] * (model.num_exits - 1)  # applied
    result = model.predict_early(data.x_test)
    assert set(np.unique(result.exit_indices)) <= set(range(model.num_exits))
    expected = np.asarray(macs)[result.exit_indices].mean()
    assert f"{expected:,.0f} of {macs[-1]:,}" in figures["average MACs"]

    patience = example.calibrated_patience(model, data)
    assert set(patience) == {"accuracy", "exit shares", "average MACs"}


@pytest.mark.slow
@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="conversion from every backend is covered by test_export.py",
)
def test_example_pipeline_exports_int8_and_runs_on_litert(pipeline, tmp_path):
    example, data, model = pipeline
    bundle, result = example.export_and_run(
        model, data, str(tmp_path / "int8"), calibration_samples=100
    )
    manifest = kee.export.read_manifest(bundle)
    assert len(manifest.segments) == model.num_exits
    float_result = model.predict_early(data.x_test)
    # int8 confidences move a few samples across a threshold; measured over
    # seeds 0-9 of this fixture: exits agree on 0.945-1.0 of the samples,
    # classes on 0.935-0.99.
    assert np.mean(result.exit_indices == float_result.exit_indices) > 0.85
    assert np.mean(result.classes == float_result.classes) > 0.85
