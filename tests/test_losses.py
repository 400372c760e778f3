import math

import keras
import numpy as np
import pytest
from keras import ops

import keras_earlyexit as kee
from keras_earlyexit.losses import WEIGHT_SCHEMES

NUM_CLASSES = 4


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _reference_loss(
    labels,
    logits,
    weights,
    smoothing=0.0,
    alpha=0.0,
    tau=3.0,
    beta=0.0,
    sample_weight=None,
):
    """The early-exit loss written out as a loop over exits and samples."""
    n, c = len(logits), logits[0].shape[-1]
    per_sample = []
    for i, label in enumerate(labels):
        target = np.full(c, smoothing / c)
        target[label] += 1.0 - smoothing
        total = 0.0
        for k, z in enumerate(logits):
            log_p = _log_softmax(z[i])
            term = -(target * log_p).sum()
            if k < n - 1 and alpha:
                teacher = np.exp(_log_softmax(logits[-1][i] / tau))
                kl = (teacher * (np.log(teacher) - _log_softmax(z[i] / tau))).sum()
                term = (1 - alpha) * term + alpha * tau**2 * kl
            if k < n - 1 and beta:
                term += beta * -(np.exp(log_p) * log_p).sum() / math.log(c)
            total += weights[k] * term
        per_sample.append(total)
    per_sample = np.array(per_sample)
    if sample_weight is not None:
        per_sample = per_sample * sample_weight
    return per_sample.mean()


@pytest.fixture
def batch(rng):
    logits = [rng.normal(size=(8, NUM_CLASSES)).astype("float32") * 2 for _ in range(3)]
    labels = rng.integers(0, NUM_CLASSES, size=8)
    return labels, logits


@pytest.mark.parametrize("scheme", list(WEIGHT_SCHEMES) + [[1.0, 0.0, 3.0]])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"label_smoothing": 0.1},
        {"distillation_weight": 0.5, "distillation_temperature": 2.0},
        {"entropy_penalty": 0.3},
        {"label_smoothing": 0.2, "distillation_weight": 0.3, "entropy_penalty": 0.1},
    ],
)
def test_loss_equals_per_exit_loop(batch, scheme, options):
    labels, logits = batch
    loss = kee.EarlyExitLoss(weights=scheme, **options)
    weights = kee.exit_weights(scheme, 3)
    expected = _reference_loss(
        labels,
        logits,
        weights,
        smoothing=options.get("label_smoothing", 0.1),
        alpha=options.get("distillation_weight", 0.0),
        tau=options.get("distillation_temperature", 3.0),
        beta=options.get("entropy_penalty", 0.0),
    )
    got = float(ops.convert_to_numpy(loss(labels, logits)))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("scheme", list(WEIGHT_SCHEMES))
@pytest.mark.parametrize("num_exits", [1, 2, 5])
def test_weights_sum_to_one(scheme, num_exits):
    weights = kee.exit_weights(scheme, num_exits)
    assert len(weights) == num_exits
    assert sum(weights) == pytest.approx(1.0)
    assert all(w > 0 for w in weights)


def test_scheme_shapes():
    assert kee.exit_weights("linear", 3) == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    assert kee.exit_weights("inverse", 2) == pytest.approx([2 / 3, 1 / 3])
    assert kee.exit_weights("geometric", 3) == pytest.approx([1 / 7, 2 / 7, 4 / 7])
    assert kee.exit_weights([2, 2], 2) == pytest.approx([0.5, 0.5])


def test_one_hot_sparse_and_column_labels_agree(batch):
    labels, logits = batch
    loss = kee.EarlyExitLoss(weights="sqrt", label_smoothing=0.1)
    one_hot = np.eye(NUM_CLASSES, dtype="float32")[labels]
    values = [
        float(ops.convert_to_numpy(loss(y, logits)))
        for y in (labels, labels[:, None], one_hot)
    ]
    np.testing.assert_allclose(values, values[0], rtol=1e-6)


def test_sample_weight_and_reductions(batch):
    labels, logits = batch
    sample_weight = np.linspace(0.0, 2.0, 8).astype("float32")
    weights = kee.exit_weights("uniform", 3)
    loss = kee.EarlyExitLoss(label_smoothing=0.0)
    got = float(ops.convert_to_numpy(loss(labels, logits, sample_weight=sample_weight)))
    expected = _reference_loss(labels, logits, weights, sample_weight=sample_weight)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    per_sample = ops.convert_to_numpy(kee.EarlyExitLoss(reduction=None)(labels, logits))
    assert per_sample.shape == (8,)
    total = float(
        ops.convert_to_numpy(kee.EarlyExitLoss(reduction="sum")(labels, logits))
    )
    np.testing.assert_allclose(total, per_sample.sum(), rtol=1e-5)


def test_config_round_trip():
    loss = kee.EarlyExitLoss(
        weights=[1, 2, 3],
        label_smoothing=0.1,
        distillation_weight=0.4,
        distillation_temperature=2.0,
        entropy_penalty=0.05,
        reduction="sum",
        name="joint",
    )
    clone = kee.EarlyExitLoss.from_config(loss.get_config())
    assert clone.get_config() == loss.get_config()
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(loss)
    )
    assert isinstance(restored, kee.EarlyExitLoss)
    assert restored.get_config() == loss.get_config()


def test_teacher_gradient_is_stopped(rng):
    """Exit 1 learns only from the final exit (distillation weight 1, final
    weight 0): the final exit's head must not move, exit 1's must."""
    inputs = keras.Input((6,))
    student = keras.layers.Dense(NUM_CLASSES, name="student")(inputs)
    teacher = keras.layers.Dense(NUM_CLASSES, name="teacher")(inputs)
    model = kee.EarlyExitModel(inputs, [student, teacher])
    model.compile(
        keras.optimizers.SGD(0.5),
        kee.EarlyExitLoss(weights=[1.0, 0.0], distillation_weight=1.0),
    )
    before = {
        layer: model.get_layer(layer).get_weights() for layer in ("student", "teacher")
    }
    x = rng.normal(size=(16, 6)).astype("float32")
    model.fit(x, rng.integers(0, NUM_CLASSES, 16), epochs=1, batch_size=16, verbose=0)
    after = {
        layer: model.get_layer(layer).get_weights() for layer in ("student", "teacher")
    }
    for old, new in zip(before["teacher"], after["teacher"]):
        np.testing.assert_array_equal(old, new)
    assert not np.allclose(before["student"][0], after["student"][0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"weights": "cubic"}, "Unknown exit weight scheme 'cubic'"),
        ({"weights": []}, "non-empty"),
        ({"weights": [1, -1]}, ">= 0"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"distillation_weight": 2.0}, "distillation_weight"),
        ({"distillation_temperature": 0.0}, "distillation_temperature"),
        ({"entropy_penalty": -1.0}, "entropy_penalty"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kee.EarlyExitLoss(**kwargs)


def test_wrong_number_of_explicit_weights(batch):
    labels, logits = batch
    with pytest.raises(ValueError, match="weights has 2 entries but the model has 3"):
        kee.EarlyExitLoss(weights=[1, 2])(labels, logits)


def test_labels_that_fit_no_exit(batch):
    _, logits = batch
    with pytest.raises(ValueError, match=r"fit no exit with 4 classes"):
        kee.EarlyExitLoss()(np.zeros((8, 3), "float32"), logits)


def test_y_pred_must_be_a_list_of_logits(batch):
    labels, logits = batch
    with pytest.raises(ValueError, match="list of logits"):
        kee.EarlyExitLoss()(labels, logits[0])
    with pytest.raises(ValueError, match="same num_classes"):
        kee.EarlyExitLoss()(labels, [logits[0], logits[1][:, :3]])


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ("warmup", [[0.01, 0.01, 1.0], [0.505, 0.505, 1.0], [1.0, 1.0, 1.0]]),
        ("gradual", [[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 1.0]]),
    ],
)
def test_curriculum_schedules(schedule, expected):
    curriculum = kee.ExitCurriculum(schedule, duration=2)
    got = []
    for _ in range(3):
        got.append(curriculum.get(3))
        curriculum.step()
    np.testing.assert_allclose(got, expected)


def test_curriculum_reaches_compiled_training_step(digits):
    """Under the gradual schedule exit 1 has weight 0 in the first epoch, so
    its head must not move; it moves once the schedule switches it on."""
    keras.utils.set_random_seed(0)
    from keras_earlyexit import demo

    model = demo.digits_cnn(width=4)
    loss = kee.EarlyExitLoss()
    model.compile(keras.optimizers.SGD(0.1), loss)
    head = model.get_layer("exit_1").classifier.kernel
    before = ops.convert_to_numpy(head).copy()
    seen = []

    class Probe(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(ops.convert_to_numpy(head).copy())

    x, y = digits.x_train[:128], digits.y_train[:128]
    model.fit(
        x,
        y,
        epochs=3,
        batch_size=32,
        verbose=0,
        callbacks=[kee.ExitCurriculum("gradual", duration=2), Probe()],
    )
    np.testing.assert_array_equal(seen[0], before)  # epoch 0: exit 1 off
    assert not np.allclose(seen[2], seen[1])  # epoch 2: exit 1 on
    assert loss.exit_scales is None  # full weights restored after fit


def test_curriculum_needs_early_exit_loss():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    with pytest.raises(ValueError, match="EarlyExitLoss"):
        model.fit(
            np.zeros((4, 2)),
            np.zeros((4, 2)),
            verbose=0,
            callbacks=[kee.ExitCurriculum()],
        )


def test_curriculum_bad_arguments():
    with pytest.raises(ValueError, match="schedule"):
        kee.ExitCurriculum("cosine")
    with pytest.raises(ValueError, match="duration"):
        kee.ExitCurriculum(duration=0)
