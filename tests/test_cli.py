"""keras-earlyexit CLI: profile and calibrate on a .keras file and .npz data."""

import os

import keras
import numpy as np
import pytest

import keras_earlyexit as kee
from keras_earlyexit import cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def files(trained_digits_model, digits, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    model_path = str(folder / "digits.keras")
    data_path = str(folder / "val.npz")
    trained_digits_model.save(model_path)
    np.savez(data_path, x=digits.x_val, y=digits.y_val)
    return folder, model_path, data_path


def test_subcommands_are_pluggable():
    assert {"profile", "calibrate"} <= set(cli.SUBCOMMANDS)
    for help_text, add_arguments, run in cli.SUBCOMMANDS.values():
        assert isinstance(help_text, str) and callable(add_arguments) and callable(run)


def test_profile_prints_table_and_writes_png(files, capsys):
    folder, model_path, data_path = files
    png = str(folder / "profile.png")
    assert cli.main(["profile", model_path, data_path, "--png", png]) == 0
    out = capsys.readouterr().out
    assert "oracle" in out and "exit_1" in out and "Pareto front" in out
    assert f"plot: {png}" in out
    with open(png, "rb") as f:
        assert f.read(4) == b"\x89PNG"


def test_calibrate_saves_thresholds(files, digits, capsys):
    folder, model_path, data_path = files
    out_path = str(folder / "calibrated.keras")
    argv = ["calibrate", model_path, data_path, "--max-accuracy-drop", "0.01"]
    assert cli.main(argv + ["--output", out_path]) == 0
    assert f"saved: {out_path}" in capsys.readouterr().out
    expected = kee.calibrate(
        keras.saving.load_model(model_path),
        digits.x_val,
        digits.y_val,
        max_accuracy_drop=0.01,
    )
    loaded = keras.saving.load_model(out_path)
    np.testing.assert_allclose(loaded.thresholds, expected.thresholds, atol=1e-6)


def test_errors(files, capsys):
    folder, model_path, data_path = files
    with pytest.raises(SystemExit):  # a target is required
        cli.main(["calibrate", model_path, data_path])
    with pytest.raises(SystemExit):  # only one target
        cli.main(
            [
                "calibrate",
                model_path,
                data_path,
                "--risk",
                "0.1",
                "--macs-budget",
                "0.5",
            ]
        )
    bad = str(folder / "bad.npz")
    np.savez(bad, inputs=np.zeros((3, 8, 8, 1)))
    with pytest.raises(SystemExit, match="expected 'x'"):
        cli.main(["profile", model_path, bad])
    with pytest.raises(SystemExit, match="not found"):
        cli.main(["profile", os.path.join(folder, "missing.keras"), data_path])
    capsys.readouterr()
    assert cli.main(["calibrate", model_path, data_path, "--macs-budget", "0.001"]) == 2
    assert "not reachable" in capsys.readouterr().err


def test_convert_run_and_bench_a_bundle(files, digits, capsys):
    """The deployment half of the CLI, end to end on an int8 bundle."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("conversion from other backends is covered in test_export")
    folder, model_path, data_path = files
    bundle = str(folder / "bundle")
    assert cli.main(["convert", model_path, bundle, "--data", data_path]) == 0
    assert "segment_3.tflite" in capsys.readouterr().out
    assert cli.main(["run", bundle, data_path]) == 0
    out = capsys.readouterr().out
    reported = float(out.split("accuracy:")[1].split()[0])
    expected = kee.runtime.GatedInterpreter(bundle).predict(digits.x_val)
    assert reported == pytest.approx(
        (expected.classes == digits.y_val).mean(), abs=1e-4
    )
    assert cli.main(["bench", bundle, data_path, "--repeats", "1"]) == 0
    assert "mean latency per sample" in capsys.readouterr().out
