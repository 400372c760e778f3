"""calibrate on the exported artifact: a bundle directory, a fused file or
their interpreters. Thresholds lie on the int8 confidence grid, the
simulation equals the real gated run, the accuracy-drop promise holds on
the test split, apply writes the thresholds, bad input fails before any
inference."""

import os
import shutil

import keras
import numpy as np
import pytest

import keras_earlyexit as kee
from keras_earlyexit import demo
from keras_earlyexit.export.fused import fuse, model_sha256
from keras_earlyexit.runtime import GatedInterpreter
from keras_earlyexit.runtime.fused import FusedInterpreter, read_fused_manifest
from keras_earlyexit.runtime.manifest import (
    BundleError,
    quantize_threshold,
    read_manifest,
    read_segment,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(digits) -> kee.EarlyExitModel:
    """The demo CNN at width 8, trained briefly (8 epochs)."""
    keras.utils.set_random_seed(0)
    model = demo.digits_cnn(width=8)
    model.compile(keras.optimizers.Adam(3e-3), kee.EarlyExitLoss(label_smoothing=0.0))
    model.fit(digits.x_train, digits.y_train, epochs=8, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="module")
def artifacts(model, digits, tmp_path_factory) -> dict:
    """The int8 bundle and the fused file assembled from it (what
    `to_tflite(..., fused=True)` does after converting the bundle)."""
    return _bundle_and_fused(model, digits, tmp_path_factory.mktemp("artifact"))


def _bundle_and_fused(model, digits, root) -> dict:
    bundle = kee.export.to_tflite(
        model, str(root / "bundle"), representative_data=digits.x_val, verbose=0
    )
    manifest = read_manifest(bundle)
    fused = str(root / "digits.tflite")
    with open(fused, "wb") as f:
        segments = [read_segment(bundle, s) for s in manifest.segments]
        f.write(fuse(manifest, segments, model_sha256(model)))
    return {"bundle": bundle, "fused": fused}


@pytest.fixture(scope="module")
def calibrated(artifacts, model, digits) -> dict:
    return {
        kind: kee.calibrate(
            path,
            digits.x_val,
            digits.y_val,
            max_accuracy_drop=0.01,
            reference_model=model,
        )
        for kind, path in artifacts.items()
    }


def _confidence_params(path) -> list[tuple[float, int]]:
    """Per exit, the scale and zero point of its int8 confidence."""
    interpreter = GatedInterpreter(path)
    if isinstance(interpreter, FusedInterpreter):
        params = [
            (e.confidence_scale, e.confidence_zero_point)
            for e in interpreter.manifest.exits
        ]
    else:
        params = [
            (s.output("confidence").scale, s.output("confidence").zero_point)
            for s in interpreter.manifest.segments
        ]
    return params


@pytest.mark.parametrize("kind", ["bundle", "fused"])
def test_thresholds_lie_on_the_int8_grid(artifacts, calibrated, kind):
    result = calibrated[kind]
    assert result.quantization == "int8"
    params = _confidence_params(artifacts[kind])
    for t, q, (scale, zero_point) in zip(
        result.thresholds, result.quantized_thresholds, params
    ):
        grid = (np.arange(-128, 128) - zero_point).astype(np.float32) * np.float32(
            scale
        )
        assert t == 1.0 or np.float32(t) in grid
        assert q == quantize_threshold(t, scale, zero_point)
    # The thresholds let samples leave early: the search had room
    # (measured over training seeds 0-11: final share 0.10 to 0.49).
    assert result.exit_shares[-1] < 0.9
    assert "int8 thresholds" in str(result)


@pytest.mark.parametrize("kind", ["bundle", "fused"])
def test_expected_figures_are_what_the_interpreter_does(
    artifacts, calibrated, digits, kind
):
    result = calibrated[kind]
    gated = GatedInterpreter(artifacts[kind], thresholds=result.thresholds)
    run = gated.predict(digits.x_val)
    assert np.mean(run.classes == digits.y_val) == pytest.approx(
        result.expected_accuracy, abs=1e-12
    )
    shares = np.bincount(run.exit_indices, minlength=3) / len(digits.y_val)
    np.testing.assert_allclose(shares, result.exit_shares, atol=1e-12)
    final = GatedInterpreter(artifacts[kind], thresholds=[1.0, 1.0])
    final_accuracy = np.mean(final.predict(digits.x_val).classes == digits.y_val)
    assert final_accuracy == pytest.approx(result.final_accuracy, abs=1e-12)


def test_bundle_and_fused_file_calibrate_alike(calibrated):
    bundle, fused = calibrated["bundle"], calibrated["fused"]
    assert bundle.thresholds == fused.thresholds
    assert bundle.quantized_thresholds == fused.quantized_thresholds
    assert bundle.expected_macs == fused.expected_macs


@pytest.mark.parametrize("kind", ["bundle", "fused"])
def test_accuracy_drop_holds_on_the_test_split(artifacts, calibrated, digits, kind):
    result = calibrated[kind]
    assert result.bound <= 0.01
    gated = GatedInterpreter(artifacts[kind], thresholds=result.thresholds)
    final = GatedInterpreter(artifacts[kind], thresholds=[1.0, 1.0])
    drop = np.mean(final.predict(digits.x_test).classes == digits.y_test) - np.mean(
        gated.predict(digits.x_test).classes == digits.y_test
    )
    # Measured with this setup over 12 seeds (training and split, 0-11):
    # test-split drop at most 0.0194, mean 0.0032, above 0.01 in 3 of 12.
    # The bound holds for the population with probability 0.9; 360 test
    # samples add their own noise (one sample = 0.28 pt).
    # Training seeds 0-11 on the fixed split: drop -0.011 to 0.014.
    assert drop <= 0.01 + 0.01
    # It does save compute (measured: 24% to 70% of the full MACs; 31% to
    # 62% over training seeds 0-11).
    assert result.expected_share < 0.75


def test_agreement_with_the_float_model(calibrated, model, digits):
    result = calibrated["bundle"]
    keras_run = model.predict_early(digits.x_val, thresholds=result.thresholds)
    assert result.reference_accuracy == pytest.approx(
        np.mean(keras_run.classes == digits.y_val), abs=2 / len(digits.y_val)
    )
    # int8 moves some exit decisions; most stay. Measured over training
    # seeds 0-11 (TensorFlow, 360 samples): same exit 0.978-0.994, same
    # class 0.989-1.0, same class per exit at least 0.964, 0.989, 0.989.
    # The figures are float64 fractions of samples.
    assert 0.9 <= result.exit_agreement <= 1.0
    assert result.class_agreement >= 0.95
    assert all(a >= 0.95 for a in result.exit_class_agreement)
    assert "same exit" in str(result)


def test_match_reference_keeps_the_float_models_exits(artifacts, model, digits):
    """match_reference: thresholds on the int8 grid whose exits agree with
    the float model's at its own thresholds (0.9), within the target."""
    x, y = digits.x_val, digits.y_val
    float_exits = model.predict_early(x).exit_indices
    at_float = GatedInterpreter(artifacts["bundle"], thresholds=model.thresholds)
    at_float_agreement = np.mean(at_float.predict(x).exit_indices == float_exits)
    for target in (0.01, 0.5):
        result = kee.calibrate(
            artifacts["bundle"],
            x,
            y,
            max_accuracy_drop=target,
            reference_model=model,
            match_reference=True,
        )
        assert result.bound <= target
        assert result.reference_thresholds == pytest.approx(model.thresholds)
        assert "at its thresholds [0.9000, 0.9000]" in str(result)
        run = GatedInterpreter(artifacts["bundle"], thresholds=result.thresholds)
        agreement = np.mean(run.predict(x).exit_indices == float_exits)
        # Keras' batched predict and predict_early may round apart.
        assert result.exit_agreement == pytest.approx(agreement, abs=2 / len(y))
    # At a target every setting meets, the search is for agreement alone
    # and starts from the float thresholds: it never agrees less (up to the
    # rounding above).
    assert agreement >= at_float_agreement - 2 / len(y)


def test_risk_target_on_an_artifact(artifacts, digits):
    result = kee.calibrate(artifacts["bundle"], digits.x_val, digits.y_val, risk=0.05)
    assert result.bound <= 0.05
    assert result.exit_agreement is None  # no reference_model given
    gated = GatedInterpreter(artifacts["bundle"], thresholds=result.thresholds)
    final = GatedInterpreter(artifacts["bundle"], thresholds=[1.0, 1.0])
    disagreement = np.mean(
        gated.predict(digits.x_test).classes != final.predict(digits.x_test).classes
    )
    # Measured over 12 seeds: test disagreement 0 to 0.044, mean 0.019
    # (training seeds 0-11 on the fixed split: 0 to 0.036, mean 0.015).
    assert disagreement <= 0.05 + 0.01


@pytest.mark.parametrize("kind", ["bundle", "fused"])
def test_apply_writes_the_artifact(artifacts, calibrated, digits, tmp_path, kind):
    result = calibrated[kind]
    source = artifacts[kind]
    copy = str(tmp_path / os.path.basename(source))
    (shutil.copytree if kind == "bundle" else shutil.copy)(source, copy)
    assert result.apply(copy) == copy
    reloaded = GatedInterpreter(copy)
    assert reloaded.thresholds == result.thresholds
    if kind == "bundle":
        gates = [s.gate for s in read_manifest(copy).segments[:-1]]
    else:
        with open(copy, "rb") as f:
            gates = [e.gate for e in read_fused_manifest(f.read()).exits[:-1]]
    assert [g.threshold_quantized for g in gates] == result.quantized_thresholds
    run = reloaded.predict(digits.x_val)
    assert np.mean(run.classes == digits.y_val) == pytest.approx(
        result.expected_accuracy, abs=1e-12
    )


def test_apply_to_an_interpreter_and_its_state_is_kept(artifacts, digits):
    interpreter = GatedInterpreter(artifacts["fused"], thresholds=[0.3, 0.4])
    interpreter.predict(digits.x_test[:5])
    result = kee.calibrate(
        interpreter, digits.x_val, digits.y_val, max_accuracy_drop=0.02
    )
    # Calibrating runs do not count, and the thresholds come back.
    assert interpreter.thresholds == [0.3, 0.4]
    assert interpreter.stats.samples == 5
    assert result.apply(interpreter) is interpreter
    assert interpreter.thresholds == result.thresholds
    with pytest.raises(TypeError, match="path of a bundle"):
        result.apply(object())


def test_apply_true_writes_the_path(artifacts, digits, tmp_path):
    copy = str(tmp_path / "bundle")
    shutil.copytree(artifacts["bundle"], copy)
    result = kee.calibrate(
        copy, digits.x_val, digits.y_val, max_accuracy_drop=0.02, apply=True
    )
    assert read_manifest(copy).thresholds == result.thresholds


def test_float_artifact_keeps_float_thresholds(model, digits, tmp_path):
    bundle = kee.export.to_tflite(
        model, str(tmp_path / "f16"), quantization="float16", verbose=0
    )
    result = kee.calibrate(bundle, digits.x_val, digits.y_val, max_accuracy_drop=0.01)
    assert result.quantization == "float16"
    assert result.quantized_thresholds is None
    run = GatedInterpreter(bundle, thresholds=result.thresholds).predict(digits.x_val)
    assert np.mean(run.classes == digits.y_val) == pytest.approx(
        result.expected_accuracy, abs=1e-12
    )


def _bad_data(digits, x_name: str) -> list:
    """`(args, kwargs, error, match)`: data and reference models that both
    `calibrate` and `profile` refuse for an artifact before it runs."""
    x, y = digits.x_val, digits.y_val
    return [
        ((x[:, :7], y), {}, ValueError, rf"{x_name} does not fit.*\(n, 8, 8, 1\)"),
        (((x * 16).astype("uint8"), y), {}, ValueError, "takes floats"),
        ((x.astype("float64")[:, :, :, 0], y), {}, ValueError, "shape"),
        (
            (np.where(np.arange(len(x))[:, None, None, None] == 3, np.nan, x), y),
            {},
            ValueError,
            "NaN",
        ),  # fmt: skip
        ((x, y[:-1]), {}, ValueError, "labels but x has"),
        (
            (x, y),
            {"reference_model": demo.digits_cnn(num_classes=5, width=2)},
            ValueError,
            "reference_model has 3 exits and 5 classes",
        ),  # fmt: skip
        ((x, y), {"reference_model": "model"}, TypeError, "EarlyExitModel"),
    ]


def _bad_calls(digits, model):
    x, y = digits.x_val, digits.y_val
    return _bad_data(digits, "x_val") + [
        ((x, y + 1), {}, ValueError, "y_val"),
        ((x, y.astype("float32") + 0.5), {}, ValueError, "y_val"),
        ((x[:5], y[:5]), {}, ValueError, "5 validation samples"),
        ((x, y), {"temperature_scaling": True}, ValueError, "temperatures"),
        ((x, y), {"max_accuracy_drop": 2.0}, ValueError, "max_accuracy_drop"),
        ((x, y), {"match_reference": True}, ValueError, "needs reference_model="),
        (
            (x, y),
            {
                "match_reference": True,
                "reference_model": model,
                "guarantee": "high_probability",
            },
            ValueError,
            "match_reference=True works with the guarded search",
        ),  # fmt: skip
    ]


@pytest.mark.parametrize("kind", ["bundle", "fused"])
def test_bad_input_fails_before_any_inference(artifacts, model, digits, kind):
    interpreter = GatedInterpreter(artifacts[kind])
    written = artifacts[kind]
    if kind == "bundle":
        written = os.path.join(written, "manifest.json")
    with open(written, "rb") as f:
        before = f.read()
    for args, kwargs, error, match in _bad_calls(digits, model):
        kwargs = {"max_accuracy_drop": 0.01, **kwargs}
        for source in (interpreter, artifacts[kind]):
            with pytest.raises(error, match=match):
                kee.calibrate(source, *args, apply=True, **kwargs)
        assert interpreter.stats.samples == 0  # nothing ran
    with open(written, "rb") as f:
        assert f.read() == before  # nothing written


def test_paths_that_are_not_artifacts(digits, model, tmp_path):
    x, y = digits.x_val, digits.y_val
    with pytest.raises(BundleError, match="does not exist"):
        kee.calibrate(str(tmp_path / "missing"), x, y, max_accuracy_drop=0.01)
    with pytest.raises(ValueError, match="Keras model file"):
        kee.calibrate("model.keras", x, y, max_accuracy_drop=0.01)
    with pytest.raises(ValueError, match="reference_model and match_reference are"):
        kee.calibrate(model, x, y, max_accuracy_drop=0.01, reference_model=model)
    with pytest.raises(ValueError, match="reference_model and match_reference are"):
        kee.calibrate(model, x, y, max_accuracy_drop=0.01, match_reference=True)


# A patience artifact (criterion "patience"): its floors, and its patience.


@pytest.fixture(scope="module")
def pabee_artifacts(digits, tmp_path_factory) -> tuple[kee.EarlyExitModel, dict]:
    """The demo CNN with criterion="patience" (patience 2), trained
    briefly; its int8 bundle and the fused file assembled from it."""
    keras.utils.set_random_seed(0)
    model = demo.digits_cnn(width=8, criterion="patience", patience=2)
    model.compile(keras.optimizers.Adam(3e-3), kee.EarlyExitLoss(label_smoothing=0.0))
    model.fit(digits.x_train, digits.y_train, epochs=4, batch_size=32, verbose=0)
    return model, _bundle_and_fused(
        model, digits, tmp_path_factory.mktemp("pabee_artifact")
    )


def _assert_figures_are_the_run(result, target, x, y):
    """The calibrated figures are what the interpreter does with the
    result's patience and floors."""
    interpreter = GatedInterpreter(
        target, patience=result.patience, thresholds=result.thresholds
    )
    run = interpreter.predict(x)
    assert np.mean(run.classes == y) == pytest.approx(
        result.expected_accuracy, abs=1e-12
    )
    shares = np.bincount(run.exit_indices, minlength=3) / len(y)
    np.testing.assert_allclose(shares, result.exit_shares, atol=1e-12)


def test_patience_artifact_floors_for_its_own_patience(pabee_artifacts, digits):
    model, artifacts = pabee_artifacts
    x, y = digits.x_val, digits.y_val
    results = {
        kind: kee.calibrate(path, x, y, max_accuracy_drop=0.02, reference_model=model)
        for kind, path in artifacts.items()
    }
    for kind, result in results.items():
        assert result.patience == 2  # the artifact's own
        _assert_figures_are_the_run(result, artifacts[kind], x, y)
        params = _confidence_params(artifacts[kind])
        for t, q, (scale, zero_point) in zip(
            result.thresholds, result.quantized_thresholds, params
        ):
            assert q == quantize_threshold(t, scale, zero_point)
        # int8 streaks and floors move a few decisions: over training
        # seeds 0-11 (bundle), same exit 0.964-0.997 (mean 0.985), same
        # class 0.986-1.0.
        assert result.exit_agreement >= 0.93 and result.class_agreement >= 0.95
    assert results["bundle"].thresholds == results["fused"].thresholds
    # No sample leaves exit 1 with patience 2 (its streak is 1).
    assert results["bundle"].exit_shares[0] == 0.0
    with pytest.raises(ValueError, match="not supported for a patience artifact"):
        kee.calibrate(
            artifacts["fused"],
            x,
            y,
            max_accuracy_drop=0.02,
            reference_model=model,
            match_reference=True,
        )


# `calibrate`'s defaults, which it passes on to `calibrate_artifact`.
SEARCH = dict(
    delta=0.1,
    guard=True,
    risk_bound="binomial",
    search_fraction=0.5,
    num_candidates=256,
    seed=0,
)


@pytest.mark.parametrize("kind", ["bundle", "fused"])
def test_patience_artifact_chooses_the_patience(
    pabee_artifacts, digits, tmp_path, kind
):
    _, artifacts = pabee_artifacts
    x, y = digits.x_val, digits.y_val
    copy = str(tmp_path / os.path.basename(artifacts[kind]))
    (shutil.copytree if kind == "bundle" else shutil.copy)(artifacts[kind], copy)
    result = kee.calibrate(
        copy, x, y, max_accuracy_drop=0.02, patience=[1, 2, 3], apply=True, **SEARCH
    )
    assert result.patience in (1, 2, 3)
    _assert_figures_are_the_run(result, copy, x, y)
    reloaded = GatedInterpreter(copy)  # apply wrote the patience and floors
    assert (reloaded.patience, reloaded.thresholds) == (
        result.patience,
        result.thresholds,
    )
    # Patience alone: the floors stay 0.0, every p in [1, 3] is a candidate.
    alone = kee.calibrate(
        copy, x, y, max_accuracy_drop=0.02, confidence_floor=False, **SEARCH
    )
    assert alone.thresholds == [0.0, 0.0] and alone.patience in (1, 2, 3)
    _assert_figures_are_the_run(alone, copy, x, y)


def test_patience_arguments_need_a_patience_artifact(artifacts, digits):
    from keras_earlyexit.evaluation.artifact import calibrate_artifact

    for kwargs in ({"patience": 2}, {"confidence_floor": False}):
        with pytest.raises(ValueError, match="criterion='patience'"):
            calibrate_artifact(
                artifacts["bundle"],
                digits.x_val,
                digits.y_val,
                "max_accuracy_drop",
                0.02,
                **kwargs,
                **SEARCH,
            )


# `profile` of an artifact: the same readout, the report of a Keras model,
# and the agreement with the float model it was exported from.

# Samples leave at both early exits: over training seeds 0-11, 21-132 and
# 125-236 of the 360 (exit 1's int8 confidence stays under 0.6 for most
# samples: at [0.6, 0.8] none left it for 6 of the 12 seeds).
THRESHOLDS = [0.3, 0.8]


@pytest.fixture(scope="module")
def profiled(artifacts, model, digits) -> dict:
    return {
        kind: kee.profile(
            GatedInterpreter(path, thresholds=THRESHOLDS),
            digits.x_val,
            digits.y_val,
            reference_model=model,
        )
        for kind, path in artifacts.items()
    }


def _forced_classes(path, x) -> np.ndarray:
    """`(n, exits)`: each exit's class, every sample forced out there."""
    forced = [[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]
    return np.stack(
        [GatedInterpreter(path, thresholds=t).predict(x).classes for t in forced], 1
    )


@pytest.mark.parametrize("kind", ["bundle", "fused"])
def test_profile_of_an_artifact_is_what_the_interpreter_does(
    artifacts, profiled, digits, kind
):
    report, x, y = profiled[kind], digits.x_val, digits.y_val
    assert (report.artifact, report.quantization) == (artifacts[kind], "int8")
    classes = _forced_classes(artifacts[kind], x)
    assert report.accuracy == [float(a) for a in (classes == y[:, None]).mean(0)]
    segments = read_manifest(artifacts["bundle"]).segments
    assert report.segment_macs == [s.macs for s in segments]
    assert report.cumulative_macs == [s.cumulative_macs for s in segments]
    correct = classes == y[:, None]
    assert report.oracle_accuracy == pytest.approx(correct.any(axis=1).mean())
    # The current point and a Pareto point are real gated runs on LiteRT.
    for point in (report.current, report.best_under(0.01)):
        run = GatedInterpreter(artifacts[kind], thresholds=list(point.thresholds))
        result = run.predict(x)
        assert np.mean(result.classes == y) == pytest.approx(point.accuracy, abs=1e-12)
        shares = np.bincount(result.exit_indices, minlength=3) / len(y)
        np.testing.assert_allclose(shares, point.exit_shares, atol=1e-12)
    assert report.current.thresholds == tuple(THRESHOLDS)
    assert report.current.exit_shares[0] > 0 and report.current.exit_shares[1] > 0


def test_profile_of_an_artifact_agrees_with_the_float_model(
    artifacts, profiled, model, digits
):
    report, x = profiled["bundle"], digits.x_val
    float_classes = np.stack([np.argmax(z, 1) for z in model.predict(x, verbose=0)], 1)
    same = _forced_classes(artifacts["bundle"], x) == float_classes
    assert report.exit_class_agreement == [float(a) for a in same.mean(0)]
    thresholds = list(report.current.thresholds)
    keras_run = model.predict_early(x, thresholds=thresholds)
    int8_run = GatedInterpreter(artifacts["bundle"], thresholds=thresholds).predict(x)
    # Keras's float32 confidences may fall on either side of a threshold
    # that the simulation's NumPy ones do not: one sample's margin.
    tolerance = 1 / len(x) + 1e-12
    assert report.exit_agreement == pytest.approx(
        np.mean(keras_run.exit_indices == int8_run.exit_indices), abs=tolerance
    )
    assert report.class_agreement == pytest.approx(
        np.mean(keras_run.classes == int8_run.classes), abs=tolerance
    )
    assert report.reference_accuracy == pytest.approx(
        np.mean(keras_run.classes == digits.y_val), abs=tolerance
    )
    # int8 moves few decisions: at THRESHOLDS over training seeds 0-11,
    # same exit 0.975-0.994 (mean 0.987), same class 0.989-1.0, same gate
    # decision at least 0.983.
    assert report.exit_agreement >= 0.9 and report.class_agreement >= 0.95
    assert len(report.gate_agreement) == 2
    assert all(0.9 <= a <= 1.0 for a in report.gate_agreement)
    assert profiled["fused"].exit_agreement == report.exit_agreement


def test_profile_of_an_artifact_tables(artifacts, profiled, digits):
    report = profiled["fused"]
    for text in (str(report), report.to_markdown()):
        for words in (
            artifacts["fused"],
            "int8",
            "float accuracy",
            "same class",
            "same gate decision",
            f"same exit {report.exit_agreement:.1%}",
            "Pareto" if text == str(report) else "speed-up",
        ):
            assert words in text
    plain = kee.profile(artifacts["fused"], digits.x_val, digits.y_val)
    assert plain.exit_agreement is None and "same exit" not in str(plain)
    assert plain.accuracy == report.accuracy


@pytest.mark.parametrize("kind", ["bundle", "fused"])
def test_profile_of_an_artifact_refuses_bad_input(artifacts, model, digits, kind):
    interpreter = GatedInterpreter(artifacts[kind])
    x, y = digits.x_val, digits.y_val
    bad = _bad_data(digits, "x") + [
        ((x[:0], y[:0]), {}, ValueError, "empty"),
        ((x, y + 1), {}, ValueError, "10 classes"),
    ]
    for args, kwargs, error, match in bad:
        with pytest.raises(error, match=match):
            kee.profile(interpreter, *args, **kwargs)
    assert interpreter.stats.samples == 0  # nothing ran
    with pytest.raises(ValueError, match="reference_model is for profiling"):
        kee.profile(model, x, y, reference_model=model)


def test_profile_of_a_patience_artifact(pabee_artifacts, digits):
    model, artifacts = pabee_artifacts
    x, y = digits.x_val, digits.y_val
    report = kee.profile(artifacts["fused"], x, y, reference_model=model)
    assert report.patience == 2 and report.criterion == "patience"
    assert [p.patience for p in report.patience_sweep] == [1, 2, 3]
    run = GatedInterpreter(artifacts["fused"]).predict(x)
    assert np.mean(run.classes == y) == pytest.approx(
        report.current.accuracy, abs=1e-12
    )
    assert report.current.exit_shares[0] == 0.0  # streak 1 < patience 2
    # Over training seeds 0-11 for the current floors: same exit
    # 0.964-0.994 (mean 0.979), same class 0.981-1.0.
    assert report.exit_agreement >= 0.93 and report.class_agreement >= 0.95
