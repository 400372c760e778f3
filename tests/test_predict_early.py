"""predict_early's compiled paths (one TensorFlow graph per batch; jax.jit
per bucket, or one program per sample; PyTorch exported programs; samples
pooled across batches on JAX, PyTorch and, for large models, TensorFlow)
against `predict` and the gate rule; the compiled-function cache stays
bounded; bad input."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_earlyexit as kee
from keras_earlyexit import demo
from keras_earlyexit.inference import bucket_size, gated_runner, select_exits


def _confidences(model, x) -> tuple[list, np.ndarray]:
    logits = model.predict(x, verbose=0)
    confidences = np.stack(
        [ops.convert_to_numpy(g(z)) for g, z in zip(model.gates, logits)], 1
    )
    return logits, confidences.astype(np.float32)


def _quantile_thresholds(confidences, shares) -> list[float]:
    """Thresholds letting about `shares[k]` of all samples leave at exit k."""
    thresholds, remaining = [], np.ones(len(confidences), bool)
    for k, share in enumerate(shares):
        quantile = 1.0 - share * len(confidences) / remaining.sum()
        thresholds.append(float(np.quantile(confidences[remaining, k], quantile)))
        remaining &= confidences[:, k] < np.float32(thresholds[-1])
    return thresholds


def _assert_equals_predict(model, x, thresholds, batch_size):
    logits, confidences = _confidences(model, x)
    exits = select_exits(confidences, thresholds)
    rows = np.arange(len(x))
    result = model.predict_early(x, thresholds, batch_size=batch_size)
    # Samples within 1e-5 of a threshold may tip either way: a segment's
    # batch size can change the last bits of a confidence.
    # A threshold of 1.0 lets no sample leave, whatever the confidence.
    gap = np.abs(confidences[:, :-1] - np.float32(thresholds))
    near = (gap < 1e-5)[:, np.asarray(thresholds) < 1.0].any(axis=1)
    assert near.mean() < 0.05
    np.testing.assert_array_equal(result.exit_indices[~near], exits[~near])
    chosen = np.stack(logits)[exits, rows]
    np.testing.assert_array_equal(result.classes[~near], chosen.argmax(-1)[~near])
    np.testing.assert_allclose(
        result.confidences[~near], confidences[rows, exits][~near], atol=1e-5
    )
    return result


@pytest.mark.parametrize("batch_size", [1, 13, 64, 360])
def test_equals_predict_with_uneven_exits(trained_digits_model, digits, batch_size):
    model = trained_digits_model
    x = digits.x_test
    _, confidences = _confidences(model, x)
    thresholds = _quantile_thresholds(confidences, [0.4, 0.3])
    result = _assert_equals_predict(model, x, thresholds, batch_size)
    counts = result.exit_counts(3)
    assert (counts > 0.2 * len(x)).all(), counts  # every exit takes a share


@pytest.mark.parametrize(
    "thresholds, exit_index", [([0.0, 0.0], 0), ([1.0, 0.0], 1), ([1.0, 1.0], 2)]
)
def test_every_sample_at_one_exit(trained_digits_model, digits, thresholds, exit_index):
    result = _assert_equals_predict(
        trained_digits_model, digits.x_test[:50], thresholds, batch_size=16
    )
    assert (result.exit_indices == exit_index).all()


def test_closed_exits_run_with_the_next_segment(digits):
    """Exits with threshold 1.0 let no sample leave: their segments run
    with the next one as one compiled call (JAX, PyTorch), and the results
    are those of the final exit."""
    model = demo.digits_cnn(width=4)
    model.set_temperatures([0.05, 0.05, 1.0])  # spread the untrained confidences
    x = digits.x_test[:120]
    result = _assert_equals_predict(model, x, [1.0, 1.0], batch_size=120)
    assert (result.exit_indices == 2).all()
    runner = gated_runner(model)
    if keras.backend.backend() != "tensorflow":
        size = runner._bucket(len(x))  # JAX: bucket_size; PyTorch: any size
        assert list(runner.compiled) == [(0, 2, size)]
        _, confidences = _confidences(model, x)
        threshold = float(np.median(confidences[:, 0]))
        _assert_equals_predict(model, x, [threshold, 1.0], batch_size=120)
        # Segment 0 alone, then the samples that stay through 1 and 2 at once.
        assert (0, 0, size) in runner.compiled
        assert {(first, last) for first, last, _ in runner.compiled} == {
            (0, 0),
            (0, 2),
            (1, 2),
        }


def test_jax_runs_a_sample_as_one_program(trained_digits_model, digits):
    """On JAX, batches of one sample run as one compiled program each (the
    deeper segments under `lax.cond`), with the exits and results of
    `predict`, closed exits merged (patience at batch 1: test_patience)."""
    if keras.backend.backend() != "jax":
        pytest.skip("JAX only")
    model, x = trained_digits_model, digits.x_test
    _, confidences = _confidences(model, x)
    runner = gated_runner(model)
    segment_calls = set(runner.compiled)  # other tests' batches
    for shares in ([0.4, 0.3], [0.0, 0.5]):
        thresholds = _quantile_thresholds(confidences, shares)
        if shares[0] == 0.0:
            thresholds[0] = 1.0  # exit 0 closed: segments 0 and 1 run as one
        result = _assert_equals_predict(model, x, thresholds, batch_size=1)
        assert len(np.unique(result.exit_indices)) == 3 - (shares[0] == 0.0)
    assert set(runner.compiled) == segment_calls  # no segment ran on its own
    assert set(runner.one_sample) >= {
        (((0, 0), (1, 1), (2, 2)), False),
        (((0, 1), (2, 2)), False),
    }


def test_gate_rule_at_the_threshold(trained_digits_model, digits):
    """A sample leaves iff float32(confidence) >= float32(threshold): one
    whose confidence equals the threshold leaves."""
    model, x = trained_digits_model, digits.x_test[:64]
    first = model.predict_early(x, [0.0, 0.0]).confidences  # all leave at exit 0
    threshold = float(np.sort(first)[len(first) // 2])
    result = model.predict_early(x, [threshold, 1.0])
    np.testing.assert_array_equal(result.exit_indices == 0, first >= threshold)
    assert (result.exit_indices[first < threshold] == 2).all()


def test_integer_token_inputs(rng):
    tokens_in = keras.Input((6,), dtype="int32", name="tokens")
    embedded = keras.layers.Embedding(20, 4)(tokens_in)
    deeper = keras.layers.Dense(8, activation="relu")(embedded)
    model = kee.EarlyExitModel(
        tokens_in,
        [kee.ExitBranch(3, name="exit_1")(embedded), kee.ExitBranch(3)(deeper)],
    )
    model.set_temperatures([0.02, 1.0])  # spread the untrained confidences
    tokens = rng.integers(0, 20, size=(40, 6))
    _, confidences = _confidences(model, tokens)
    threshold = float(np.median(confidences[:, 0]))
    _assert_equals_predict(model, tokens, [threshold], batch_size=7)
    with pytest.raises(ValueError, match=r"'tokens' is int32 .* dtype float"):
        model.predict_early(tokens.astype("float32"))


def test_bucket_sizes():
    sizes = [bucket_size(n) for n in range(1, 1025)]
    assert sizes[:8] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert all(s >= n and s <= 1.25 * n for n, s in zip(range(1, 1025), sizes))
    assert sizes == sorted(sizes)
    assert len(set(sizes)) <= 4 * 10  # 4 per octave up to 2**10


def test_pooled_batches_give_the_results_of_one_at_a_time(trained_digits_model, digits):
    """The loops pool the samples that stay across a group of batches and
    advance groups in turns (JAX and PyTorch by default; TensorFlow for
    batches of a large model): each sample gets the class, exit and
    confidence it gets with every batch alone (and, on TensorFlow, as one
    graph per batch)."""
    model, x = trained_digits_model, digits.x_test[:200]
    _, confidences = _confidences(model, x)
    thresholds = _quantile_thresholds(confidences, [0.4, 0.3])
    runner = gated_runner(model)
    on_tensorflow = keras.backend.backend() == "tensorflow"
    results = []
    if on_tensorflow:
        results.append(model.predict_early(x, thresholds, batch_size=16))
        runner.pool_from_macs = 0  # this small model pools too
    loop = runner.pooled if on_tensorflow else runner
    default = loop.group_samples, loop.groups_in_turn
    try:
        # Each batch alone; 13 batches pooled; groups of 3 batches, 2 in turns.
        for group_samples, in_turn in ((0, 1), (len(x), 1), (48, 2)):
            loop.group_samples, loop.groups_in_turn = group_samples, in_turn
            results.append(model.predict_early(x, thresholds, batch_size=16))
    finally:
        loop.group_samples, loop.groups_in_turn = default
        if on_tensorflow:
            del runner.pool_from_macs
    if on_tensorflow:
        assert runner.pooled.compiled  # the pooled loop ran
    alone = results[0]
    # A call's batch size can change the last bits of a confidence.
    far = (np.abs(confidences[:, :-1] - np.float32(thresholds)) >= 1e-5).all(1)
    for together in results[1:]:
        for name in ("classes", "exit_indices"):
            np.testing.assert_array_equal(
                getattr(together, name)[far], getattr(alone, name)[far]
            )
        np.testing.assert_allclose(
            together.confidences[far], alone.confidences[far], atol=1e-5
        )
    assert far.mean() > 0.95
    assert len(np.unique(alone.exit_indices)) == 3


def test_the_models_own_thresholds_are_read_as_they_run(trained_digits_model, digits):
    """Without `thresholds`, predict_early gates with the model's current
    ones (TensorFlow reads them in its graph): a change takes effect at
    once, without recompiling."""
    model, x = trained_digits_model, digits.x_test[:120]
    _, confidences = _confidences(model, x)
    before = model.thresholds
    runner = gated_runner(model)
    counts = []
    try:
        for shares in ([0.4, 0.3], [0.1, 0.6], [0.25, 0.5]):
            model.set_thresholds(_quantile_thresholds(confidences, shares))
            own = model.predict_early(x, batch_size=32)
            given = model.predict_early(x, model.thresholds, batch_size=32)
            counts.append(runner.compiled_count())
            for name in ("classes", "exit_indices", "confidences"):
                np.testing.assert_array_equal(getattr(own, name), getattr(given, name))
            assert abs(own.exit_counts(3)[0] / len(x) - shares[0]) < 0.05
        if keras.backend.backend() == "tensorflow":
            assert counts[0] == counts[2]  # new thresholds, nothing retraced
    finally:
        model.set_thresholds(before)


def test_compiled_cache_stays_bounded(digits):
    model = demo.digits_cnn(width=4)
    model.set_temperatures([0.05, 0.05, 1.0])
    x = digits.x_test[:96]
    _, confidences = _confidences(model, x)
    thresholds = _quantile_thresholds(confidences, [0.4, 0.3])
    runner = gated_runner(model)
    for n in range(1, 97, 3):  # 32 distinct batch sizes, uneven exits
        model.predict_early(x[:n], thresholds, batch_size=n)
    counts = [runner.compiled_count()]
    for n in range(2, 97, 3):
        model.predict_early(x[:n], thresholds, batch_size=n)
    counts.append(runner.compiled_count())
    assert gated_runner(model) is runner
    if keras.backend.backend() == "tensorflow":
        assert counts == [1, 1]  # one graph for every batch size
    elif keras.backend.backend() == "torch":
        # One program per segment for every batch size, one more for
        # batches of one sample (export specializes size 1).
        assert counts == [2 * model.num_exits] * 2
    else:  # one jit per segment and bucket size reached
        buckets = len({bucket_size(n) for n in range(1, 97)})
        assert 0 < counts[1] <= model.num_exits * buckets
        # New batch sizes fall into the buckets already compiled, mostly.
        assert counts[1] - counts[0] <= model.num_exits * 4


def test_torch_segments_are_exported_programs(digits):
    """On PyTorch, each segment runs as an exported program (not the eager
    fallback), without Keras' no-op dtype checks and casts, for any batch
    size."""
    if keras.backend.backend() != "torch":
        pytest.skip("PyTorch's export path")
    import torch

    model = demo.digits_cnn(width=4)
    model.set_temperatures([0.05, 0.05, 1.0])
    x = digits.x_test[:64]
    _, confidences = _confidences(model, x)
    thresholds = _quantile_thresholds(confidences, [0.4, 0.3])
    for batch_size in (64, 5):
        _assert_equals_predict(model, x, thresholds, batch_size)
    runner = gated_runner(model)
    # One program per segment for batches of 2 or more samples (None),
    # one for single samples left in a segment (1).
    assert {(k, k, None) for k in range(3)} <= set(runner.compiled)
    assert {size for _, _, size in runner.compiled} <= {None, 1}
    aten = torch.ops.aten
    for program in runner.compiled.values():
        assert isinstance(program.module, torch.fx.GraphModule)
        assert program.positions is not None  # called on flat arguments
        targets = {node.target for node in program.module.graph.nodes}
        assert aten.conv2d.default in targets  # each segment has a Conv2D
        assert aten._assert_tensor_metadata.default not in targets


def test_torch_gather_keeps_the_memory_layout():
    """PyTorch carries are gathered in their memory order: the same values
    as `index_select`, in the layout the next segment reads (a
    channels-first tensor seen channels-last stays so)."""
    if keras.backend.backend() != "torch":
        pytest.skip("PyTorch's gather")
    import torch

    from keras_earlyexit.inference import _take_rows

    rows = torch.tensor([0, 2, 3])
    channels_first = torch.arange(5 * 4 * 6, dtype=torch.float32).reshape(5, 4, 6)
    for value in (
        channels_first.permute(0, 2, 1),  # Keras' conv output, (n, steps, ch)
        channels_first.reshape(5, 2, 2, 6).permute(0, 2, 3, 1),  # (n, h, w, ch)
        channels_first,  # already in logical order
        channels_first.permute(1, 0, 2),  # samples not outermost in memory
        torch.ones(1, 4).expand(5, 4),  # no memory of its own per sample
    ):
        taken = _take_rows(value, rows)
        assert torch.equal(taken, value.index_select(0, rows))
        if value.stride(0) == max(value.stride()) and value.stride(0) > 0:
            # Same order of strides: the samples' memory copied as it is.
            order = sorted(range(value.dim()), key=lambda d: -value.stride(d))
            assert sorted(range(value.dim()), key=lambda d: -taken.stride(d)) == order


def test_bad_input_leaves_the_compiled_path_usable(digits):
    model = demo.digits_cnn(width=4)
    x = digits.x_test[:8]
    expected = model.predict_early(x, [0.5, 0.5])
    with pytest.raises(ValueError, match="Expected 2 thresholds"):
        model.predict_early(x, [0.5])
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        model.predict_early(x, batch_size=0)
    with pytest.raises(ValueError, match=r"'image' is float32 .* dtype int64"):
        model.predict_early(np.zeros((2, 8, 8, 1), np.int64))
    overflow = np.full((2, 8, 8, 1), 1e39)  # float64, infinite as float32
    with pytest.raises(ValueError, match=r"beyond float32's range \(first at index 0"):
        model.predict_early(overflow)
    with pytest.raises(ValueError, match=r"expects samples of shape \(8, 8, 1\)"):
        model.predict_early(np.zeros((2, 8, 9, 1), np.float32))
    again = model.predict_early(x, [0.5, 0.5])
    np.testing.assert_array_equal(again.classes, expected.classes)
    np.testing.assert_array_equal(again.exit_indices, expected.exit_indices)


def test_inputs_are_fed_in_model_order_as_a_list_or_by_name():
    # Input names in reverse alphabetical order, of different dtypes: a
    # segment built from a dict lists its inputs by name, not in this order.
    tokens = keras.Input((6,), dtype="int32", name="z_tokens")
    mask = keras.Input((6,), dtype="bool", name="a_mask")
    hidden = keras.layers.Embedding(20, 4)(tokens)
    e1 = kee.ExitBranch(3, name="exit_1")(hidden, padding_mask=mask)
    hidden = keras.layers.Dense(4, activation="relu")(hidden)
    e2 = kee.ExitBranch(3, name="final")(hidden, padding_mask=mask)
    model = kee.EarlyExitModel([tokens, mask], [e1, e2], thresholds=[0.5])
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 20, (16, 6)).astype("int32")
    valid = np.arange(6)[None, :] < rng.integers(1, 7, (16, 1))
    full = [np.asarray(o) for o in model.predict([ids, valid], verbose=0)]
    by_list = model.predict_early([ids, valid], batch_size=16)
    by_name = model.predict_early({"a_mask": valid, "z_tokens": ids}, batch_size=16)
    for result in (by_list, by_name):
        exits = result.exit_indices
        expected = np.where(exits == 0, full[0].argmax(-1), full[1].argmax(-1))
        np.testing.assert_array_equal(result.classes, expected)
    np.testing.assert_array_equal(by_list.exit_indices, by_name.exit_indices)
    with pytest.raises(ValueError, match="missing from the dict"):
        model.predict_early({"tokens": ids, "a_mask": valid})
