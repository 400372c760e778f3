"""keras-earlyexit CLI: profile, calibrate, convert, run and bench on a
.keras file and .npz data; quiet, checked before any work."""

import os
import subprocess
import sys

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


def _run_cli(*argv: str, **env) -> subprocess.CompletedProcess:
    """The installed command line in a fresh process, as a user runs it."""
    environ = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from keras_earlyexit import cli; "
            "sys.exit(cli.main(sys.argv[1:]))",
            *argv,
        ],
        capture_output=True,
        text=True,
        env={**environ, "KERAS_BACKEND": keras.backend.backend(), **env},
    )


def test_help_answers_without_loading_keras():
    code = (
        "import sys\n"
        "from keras_earlyexit import cli\n"
        "for argv in [['--help']] + [[c, '--help'] for c in cli.SUBCOMMANDS]:\n"
        "    try:\n"
        "        cli.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = {'keras', 'tensorflow', 'jax', 'torch'} & set(sys.modules)\n"
        "print('loaded:', sorted(heavy))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert "loaded: []" in done.stdout
    assert "usage: keras-earlyexit bench" in done.stdout


def test_runs_as_python_module():
    done = subprocess.run(
        [sys.executable, "-m", "keras_earlyexit", "--help"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "usage: keras-earlyexit" in done.stdout


def test_every_option_has_help_text():
    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions if a.dest == "command"]
    assert set(commands.choices) == set(cli.SUBCOMMANDS)
    for name, sub in commands.choices.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest}"


def test_subcommands_are_pluggable():
    assert {"profile", "calibrate"} <= set(cli.SUBCOMMANDS)
    for help_text, add_arguments, run in cli.SUBCOMMANDS.values():
        assert isinstance(help_text, str) and callable(add_arguments) and callable(run)


def test_profile_prints_table_and_writes_png(files, capfd):
    folder, model_path, data_path = files
    png = str(folder / "profile")  # no suffix: .png is added and reported
    markdown = str(folder / "profile.md")
    argv = ["profile", model_path, data_path, "--png", png, "--markdown", markdown]
    assert cli.main(argv) == 0
    out, err = capfd.readouterr()
    assert "oracle" in out and "exit_1" in out and "Pareto front" in out
    assert f"plot: {png}.png" in out and f"markdown: {markdown}" in out
    assert err == "" and "step" not in out  # no progress bars
    with open(png + ".png", "rb") as f:
        assert f.read(4) == b"\x89PNG"
    assert not os.path.exists(png)
    with open(markdown) as f:
        assert "| exit |" in f.read()


def test_quiet_in_a_fresh_process(files):
    """TensorFlow's import and device lines (oneDNN, CUDA, cuInit) stay
    hidden; only the report is printed."""
    folder, model_path, data_path = files
    done = _run_cli("profile", model_path, data_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.startswith("Early-exit profile on 360 samples")


def test_calibrate_saves_thresholds(files, digits, capsys):
    folder, model_path, data_path = files
    out_path = str(folder / "calibrated.keras")
    argv = ["calibrate", model_path, data_path, "--max-accuracy-drop", "0.01"]
    assert cli.main(argv + ["--output", out_path[: -len(".keras")]]) == 0
    assert f"saved: {out_path}\n" in capsys.readouterr().out
    leftovers = [f for f in os.listdir(folder) if f.startswith(".calibrated")]
    assert leftovers == []  # the temporary file was renamed
    expected = kee.calibrate(
        keras.saving.load_model(model_path),
        digits.x_val,
        digits.y_val,
        max_accuracy_drop=0.01,
    )
    loaded = keras.saving.load_model(out_path)
    np.testing.assert_allclose(loaded.thresholds, expected.thresholds, atol=1e-6)


@pytest.mark.parametrize(
    "options, kwargs, promise",
    [
        (
            ["--max-accuracy-drop", "0.02", "--guarantee", "high_probability"],
            dict(max_accuracy_drop=0.02, guarantee="high_probability"),
            "with probability >= 0.9 over the draw of the validation data, the "
            "accuracy drop on new data is <= 0.02 (finite-sample guarantee)",
        ),
        (
            ["--risk", "0.1", "--guarantee", "expectation", "--per-exit"],
            dict(risk=0.1, guarantee="expectation", per_exit=True),
            "averaged over draws of the validation data, the disagreement rate "
            "with the final exit on new data is <= 0.1",
        ),
    ],
)
def test_calibrate_with_a_guarantee(files, digits, capsys, options, kwargs, promise):
    _, model_path, data_path = files
    assert cli.main(["calibrate", model_path, data_path, *options]) == 0
    expected = kee.calibrate(
        keras.saving.load_model(model_path), digits.x_val, digits.y_val, **kwargs
    )
    assert expected.guarantee == kwargs["guarantee"]
    out = capsys.readouterr().out
    assert out == f"{expected}\n"  # the same thresholds and report
    assert f"promise:           {promise}" in out


def test_guarantee_options_are_checked_before_any_work(files, capsys):
    folder, model_path, _ = files
    missing = str(folder / "missing.npz")  # never read: the options fail first
    argv = ["calibrate", model_path, missing]
    with pytest.raises(SystemExit, match="--per-exit chooses the thresholds of a"):
        cli.main([*argv, "--risk", "0.1", "--per-exit"])
    with pytest.raises(SystemExit, match="--macs-budget is kept by the guard"):
        cli.main([*argv, "--macs-budget", "0.2", "--guarantee", "expectation"])
    with pytest.raises(SystemExit):
        cli.main([*argv, "--risk", "0.1", "--guarantee", "always"])
    assert "invalid choice: 'always'" in capsys.readouterr().err


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


@pytest.fixture(scope="module")
def bad_data(files, digits):
    folder = files[0] / "bad"
    folder.mkdir()
    x, y = digits.x_val, digits.y_val
    paths = {
        "strings": (x, y.astype(str)),
        "out_of_range": (x, y + 3),
        "not_one_hot": (x, np.eye(10)[y] * 2),
        "too_few": (x, y[:-1]),
        "uint8": ((x * 255).astype("uint8"), y),
    }
    for name, (xs, ys) in paths.items():
        np.savez(folder / f"{name}.npz", x=xs, y=ys)
    np.save(folder / "x.npy", x)
    return folder


@pytest.mark.parametrize(
    "name, message",
    [
        ("strings", r"integer class labels 0\.\.9; received dtype <U"),
        ("out_of_range", r"labels in \[3, 12\], but the model has 10 classes"),
        ("not_one_hot", r"looks one-hot, but 360 row\(s\) are not .* sum 1"),
        ("too_few", "359 labels but x has 360 samples"),
    ],
)
def test_labels_are_checked_before_any_work(files, bad_data, name, message):
    _, model_path, _ = files
    path = str(bad_data / f"{name}.npz")
    for command in (["profile"], ["calibrate", "--risk", "0.1"]):
        with pytest.raises(SystemExit, match=message):
            cli.main([command[0], model_path, path, *command[1:]])


def test_bad_paths_and_data_get_messages(files, bad_data, capsys):
    folder, model_path, data_path = files
    with pytest.raises(SystemExit, match="is a directory; give a file name"):
        cli.main(["profile", model_path, data_path, "--markdown", str(folder)])
    with pytest.raises(SystemExit, match=r"single array \(\.npy\); expected an \.npz"):
        cli.main(["profile", model_path, str(bad_data / "x.npy")])
    with pytest.raises(SystemExit, match="must end in .keras"):
        argv = ["calibrate", model_path, data_path, "--risk", "0.1"]
        cli.main(argv + ["--output", str(folder / "out.h5")])
    with pytest.raises(SystemExit, match="does not exist"):
        cli.main(["run", str(folder), data_path, "--output", "/no/such/dir/r.npz"])
    with pytest.raises(SystemExit, match="is a file; convert writes a bundle"):
        cli.main(["convert", model_path, data_path, "--data", data_path])
    with pytest.raises(SystemExit, match="int8 needs representative inputs"):
        cli.main(["convert", model_path, str(folder / "new_bundle")])
    assert not os.path.exists(folder / "new_bundle")
    capsys.readouterr()
    assert cli.main(["profile", model_path, str(bad_data / "uint8.npz")]) == 2
    assert "x.astype('float32') / 255" in capsys.readouterr().err


def test_convert_run_and_bench_a_bundle(files, digits, capsys):
    """The deployment half of the CLI, end to end on an int8 bundle."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("conversion from other backends is covered in test_export")
    folder, model_path, data_path = files
    bundle = str(folder / "bundle")
    assert cli.main(["convert", model_path, bundle, "--data", data_path]) == 0
    assert "segment_3.tflite" in capsys.readouterr().out
    expected = kee.runtime.GatedInterpreter(bundle).predict(digits.x_test)
    accuracy = f"accuracy: {(expected.classes == digits.y_test).mean():.4f}"
    # Labels as a column (n, 1) and one-hot give the same figure.
    for i, y in enumerate(
        [digits.y_test, digits.y_test[:, None], np.eye(10)[digits.y_test]]
    ):
        test_path = str(folder / f"test_{i}.npz")
        np.savez(test_path, x=digits.x_test, y=y)
        assert cli.main(["run", bundle, test_path]) == 0
        assert accuracy in capsys.readouterr().out
    results = str(folder / "results")
    assert cli.main(["run", bundle, test_path, "--output", results]) == 0
    assert f"results: {results}.npz" in capsys.readouterr().out
    with np.load(results + ".npz") as saved:
        np.testing.assert_array_equal(saved["exit_indices"], expected.exit_indices)
    with pytest.raises(SystemExit, match="labels in"):
        np.savez(str(folder / "bad.npz"), x=digits.x_test, y=digits.y_test + 1)
        cli.main(["run", bundle, str(folder / "bad.npz")])
    assert cli.main(["bench", bundle, test_path, "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert accuracy in out and "mean latency per sample" in out
