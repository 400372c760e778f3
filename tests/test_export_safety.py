"""Export never loses a user's files: `to_tflite`, the CLI `convert` and
`to_c_arrays` replace only outputs they wrote, follow symlinks, clean up
after killed exports and create folders with the umask's permissions."""

import json
import os
import shutil
import stat
import subprocess
import sys

import keras
import pytest

import keras_earlyexit as kee
from keras_earlyexit import demo
from keras_earlyexit.export import manifest as manifest_lib
from keras_earlyexit.export.c_arrays import CONFIG_NAME, read_c_arrays, to_c_arrays

UMASK = 0o027  # not the usual 0o022, so that a 0700 mkdtemp would show


@pytest.fixture(scope="module")
def model() -> kee.EarlyExitModel:
    keras.utils.set_random_seed(0)
    model = demo.digits_cnn(width=4)
    model.set_thresholds([0.12, 0.11])
    return model


@pytest.fixture(scope="module")
def made(model, tmp_path_factory) -> tuple[str, int]:
    """A float32 bundle, exported under `UMASK`, and its folder's mode."""
    root = tmp_path_factory.mktemp("made")
    previous = os.umask(UMASK)
    try:
        bundle = kee.export.to_tflite(
            model, str(root / "bundle"), quantization="float32", verbose=0
        )
    finally:
        os.umask(previous)
    return bundle, stat.S_IMODE(os.stat(bundle).st_mode)


@pytest.fixture(scope="module")
def bundle(made) -> str:
    return made[0]


def _tree(root) -> dict:
    """Every file under `root` with its bytes (symlinks as their target)."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            key = os.path.relpath(path, root)
            if os.path.islink(path):
                out[key] = "-> " + os.readlink(path)
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    out[key] = f.read()
            else:
                out[key] = "dir"
    return out


def _webapp(root) -> str:
    """A web app with another tool's manifest.json."""
    app = root / "webapp"
    (app / "src").mkdir(parents=True)
    (app / "manifest.json").write_text(json.dumps({"name": "My app", "icons": []}))
    (app / "index.html").write_text("<html></html>\n")
    (app / "src" / "app.js").write_text("console.log('hi');\n")
    return str(app)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_new_bundle_folder_gets_mkdir_permissions(made):
    assert made[1] == 0o777 & ~UMASK


def test_foreign_directory_with_a_manifest_is_refused(model, tmp_path):
    app = _webapp(tmp_path)
    before = _tree(app)
    with pytest.raises(FileExistsError) as error:
        kee.export.to_tflite(model, app, quantization="float32", verbose=0)
    message = str(error.value)
    for part in (app, "not a keras-earlyexit manifest", "new or empty directory"):
        assert part in message, message
    assert _tree(app) == before
    assert sorted(os.listdir(tmp_path)) == ["webapp"]


def test_bundle_with_foreign_files_is_refused(model, bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    (copy / "notes.txt").write_text("mine")
    (copy / "assets").mkdir()
    before = _tree(copy)
    with pytest.raises(FileExistsError, match="assets, notes.txt"):
        kee.export.to_tflite(model, str(copy), quantization="float32", verbose=0)
    assert _tree(copy) == before


def test_cli_convert_refuses_a_foreign_directory(model, tmp_path, capsys):
    from keras_earlyexit import cli

    model_path = str(tmp_path / "model.keras")
    model.save(model_path)
    app = _webapp(tmp_path)
    before = _tree(app)
    argv = ["convert", model_path, app, "--quantization", "float32"]
    try:
        status = cli.main(argv)
    except FileExistsError as error:
        message = str(error)
    else:
        assert status != 0
        message = capsys.readouterr().err
    assert app in message and "new or empty directory" in message, message
    assert _tree(app) == before


def test_symlinked_bundle_is_replaced_through_the_link(model, bundle, tmp_path):
    """The link stays and points to the new bundle; a killed export's
    leftovers next to the bundle are removed, a stranger's folder is kept."""
    real = tmp_path / "real"
    shutil.copytree(bundle, real)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    killed = tmp_path / ".real.tmp-0badc0de"  # killed mid-export
    killed.mkdir()
    (killed / manifest_lib.TEMP_MARKER).write_text(
        json.dumps({"pid": _dead_pid(), "host": os.uname().nodename})
    )
    (killed / "segment_1.tflite").write_bytes(b"partial")
    old = tmp_path / ".real.old-0badc0de"  # killed after the swap
    shutil.copytree(bundle, old)
    stranger = tmp_path / ".real.tmp-notours"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    previous = os.umask(UMASK)
    try:
        model.set_thresholds([0.5, 0.4])
        kee.export.to_tflite(model, str(link), quantization="float32", verbose=0)
    finally:
        model.set_thresholds([0.12, 0.11])
        os.umask(previous)
    assert os.readlink(link) == str(real)
    assert kee.export.read_manifest(str(link)).thresholds == pytest.approx([0.5, 0.4])
    assert stat.S_IMODE(os.stat(real).st_mode) == 0o777 & ~UMASK
    assert sorted(os.listdir(tmp_path)) == [".real.tmp-notours", "link", "real"]
    assert (stranger / "notes.txt").read_text() == "mine"


def test_leftovers_of_a_live_export_are_kept_and_a_lost_bundle_restored(
    bundle, tmp_path
):
    target = tmp_path / "bundle"
    running = tmp_path / ".bundle.tmp-1"
    running.mkdir()
    (running / manifest_lib.TEMP_MARKER).write_text(
        json.dumps({"pid": os.getpid(), "host": os.uname().nodename})
    )
    # Killed between its two renames: no target, the old bundle aside.
    shutil.copytree(bundle, tmp_path / ".bundle.old-1")
    manifest_lib.clean_leftovers(str(target), manifest_lib.not_a_bundle)
    assert sorted(os.listdir(tmp_path)) == [".bundle.tmp-1", "bundle"]
    kee.export.read_manifest(str(target))  # complete: every sha256 checks


@pytest.fixture
def old_output(bundle, tmp_path_factory) -> str:
    """A previous to_c_arrays output, to copy into firmware folders."""
    return to_c_arrays(bundle, str(tmp_path_factory.mktemp("old") / "model"))


def test_c_arrays_refuse_a_folder_holding_the_bundle(bundle, old_output, tmp_path):
    fw = tmp_path / "fw"
    shutil.copytree(bundle, fw / "bundle")
    shutil.copy(os.path.join(old_output, CONFIG_NAME), fw)
    (fw / "main.cc").write_text("int main() { return 0; }\n")
    before = _tree(tmp_path)
    with pytest.raises(ValueError, match="contains the bundle") as error:
        to_c_arrays(str(fw / "bundle"), str(fw))
    assert os.path.join(str(fw), "model") in str(error.value)  # the fix
    with pytest.raises(ValueError, match="is or contains the bundle"):
        to_c_arrays(str(fw / "bundle"), str(fw / "bundle"))
    with pytest.raises(ValueError, match="inside the bundle"):
        to_c_arrays(str(fw / "bundle"), str(fw / "bundle" / "c"))
    assert _tree(tmp_path) == before


def test_c_arrays_replace_only_their_own_files(bundle, old_output, tmp_path):
    fw = tmp_path / "fw"
    shutil.copytree(old_output, fw)
    (fw / "main.cc").write_text("int main() { return 0; }\n")
    (fw / "lib").mkdir()
    (fw / "lib" / "board.h").write_text("#pragma once\n")
    # A stale generated file from an export with more segments.
    shutil.copy(fw / "segment_1_model_data.cc", fw / "segment_9_model_data.cc")
    config = (fw / CONFIG_NAME).read_text()
    (fw / CONFIG_NAME).write_text(config.replace("kArenaSize = ", "kArenaSize = 9"))
    to_c_arrays(bundle, str(fw))
    assert (fw / "main.cc").read_text() == "int main() { return 0; }\n"
    assert (fw / "lib" / "board.h").read_text() == "#pragma once\n"
    assert not (fw / "segment_9_model_data.cc").exists()
    assert (fw / CONFIG_NAME).read_text() == config
    segments = kee.export.read_manifest(bundle).segments
    expected = [open(os.path.join(bundle, s.file), "rb").read() for s in segments]
    assert read_c_arrays(str(fw)) == expected
    assert sorted(os.listdir(tmp_path)) == ["fw"]  # no temporary left


def test_c_arrays_refuse_a_hand_written_file_with_a_generated_name(
    bundle, old_output, tmp_path
):
    fw = tmp_path / "fw"
    shutil.copytree(old_output, fw)
    (fw / "main.cc").write_text("int main() { return 0; }\n")
    (fw / "segment_1_model_data.h").write_text("// my own model header\n")
    before = _tree(fw)
    with pytest.raises(FileExistsError, match="segment_1_model_data.h"):
        to_c_arrays(bundle, str(fw))
    assert _tree(fw) == before


def test_c_arrays_through_a_symlink_with_mkdir_permissions(bundle, tmp_path):
    real = tmp_path / "real"
    link = tmp_path / "model"
    link.symlink_to(real, target_is_directory=True)  # dangling at first
    previous = os.umask(UMASK)
    try:
        to_c_arrays(bundle, str(link))
        to_c_arrays(bundle, str(link), arena_size=4096)
    finally:
        os.umask(previous)
    assert os.readlink(link) == str(real)
    assert "kArenaSize = 4096;" in (real / CONFIG_NAME).read_text()
    assert stat.S_IMODE(os.stat(real).st_mode) == 0o777 & ~UMASK
    assert sorted(os.listdir(tmp_path)) == ["model", "real"]


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="file handling does not depend on the backend; one run suffices",
)
@pytest.mark.parametrize("script", ["convert_for_android", "deploy_microcontroller"])
def test_example_writes_only_into_its_ignored_output_folder(script, tmp_path):
    """Run (1 epoch) in an empty folder: everything lands in
    example_outputs/<script>/, which git ignores, and a stale model file
    there is replaced, not reused."""
    with open(os.path.join(REPO, "examples", f"{script}.py")) as f:
        source = f.read()
    assert "EPOCHS = 30\n" in source
    (tmp_path / "run.py").write_text(source.replace("EPOCHS = 30\n", "EPOCHS = 1\n"))
    stale = tmp_path / "example_outputs" / script / "digits_cnn.keras"
    if script == "convert_for_android":
        stale.parent.mkdir(parents=True)
        stale.write_bytes(b"stale")
    proc = subprocess.run(
        [sys.executable, "run.py"],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=REPO),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["example_outputs", "run.py"]
    assert sorted(os.listdir(tmp_path / "example_outputs")) == [script]
    if script == "convert_for_android":
        assert stale.read_bytes() != b"stale"
        keras.saving.load_model(str(stale))  # a model trained by this run
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", f"example_outputs/{script}/x"], cwd=REPO
    )
    assert ignored.returncode == 0, "example_outputs/ is not in .gitignore"
