"""Writing bundles: the manifest file and the output directories.

The schema and the reading side live in `keras_earlyexit.runtime.manifest`
(shared with the runtimes, which import no Keras); they are re-exported here.

Output directories (bundles, C arrays) are written next to their target,
in a temporary directory `.<name>.tmp-<random>`, and renamed into place.
A directory that already exists is replaced only when it provably holds a
previous output of this package (`check_replaceable`), so no user file is
ever deleted. Leftovers of an export that was killed (`.<name>.tmp-*`,
`.<name>.old-*`) are recognised by their name and content and removed by
the next export to the same target (`clean_leftovers`).
"""

import json
import os
import re
import secrets
import shutil
import socket
from typing import Callable

from keras_earlyexit.runtime.manifest import (  # noqa: F401  (re-exported)
    FORMAT,
    FORMAT_VERSION,
    INTEGER_DTYPES,
    MANIFEST_NAME,
    PATIENCE,
    QUANTIZATION_MODES,
    BundleError,
    GateInfo,
    Manifest,
    SegmentInfo,
    TensorInfo,
    quantize_threshold,
    read_manifest,
    read_segment,
    sha256_of,
)

# The segment files `to_tflite` writes beside `manifest.json`.
SEGMENT_FILE = re.compile(r"segment_\d+\.tflite")
# Written first into every temporary output directory: who is writing it.
TEMP_MARKER = ".keras-earlyexit-partial"

# Says why a directory is not a previous output of the writer (None: it is).
Ownership = Callable[[str], "str | None"]


def write_manifest(manifest: Manifest, directory: str) -> str:
    path = os.path.join(directory, MANIFEST_NAME)
    with open(path, "w") as f:
        f.write(manifest.to_json())
    return path


def not_a_bundle(directory: str) -> str | None:
    """Why `directory` is not a bundle written by `to_tflite`, or None.

    A bundle holds `manifest.json` with this package's `format` field and,
    beside it, only `segment_<k>.tflite` files.
    """
    path = os.path.join(directory, MANIFEST_NAME)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return f"it has no {MANIFEST_NAME}"
    except (OSError, ValueError):
        return f"its {MANIFEST_NAME} is not a readable JSON file"
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        return (
            f"its {MANIFEST_NAME} is not a keras-earlyexit manifest (format "
            f"{found!r}, not {FORMAT!r})"
        )
    foreign = [
        name
        for name in sorted(os.listdir(directory))
        if name != MANIFEST_NAME
        and not (
            SEGMENT_FILE.fullmatch(name)
            and os.path.isfile(os.path.join(directory, name))
        )
    ]
    if foreign:
        return f"it holds files to_tflite does not write: {name_list(foreign)}"
    return None


def name_list(names: list[str], limit: int = 5) -> str:
    """`names` for an error message: the first few of them."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def resolve_target(directory: str) -> str:
    """The absolute directory to write for `directory`.

    A symlink is followed (also a dangling one), so that the directory it
    points to is replaced and the link itself is kept.
    """
    directory = os.path.abspath(os.fspath(directory))
    if os.path.islink(directory):
        return os.path.realpath(directory)
    return directory


def check_replaceable(directory: str, why_not_ours: Ownership, fix: str) -> None:
    """Refuses to write to `directory` unless it is new, empty, or provably
    a previous output of the writer, so that no user file is replaced.

    Args:
        directory: the resolved target (`resolve_target`).
        why_not_ours: says why a non-empty directory is not the writer's
            output, or returns None when it is.
        fix: what the user can do instead, appended to the error.

    Raises:
        FileExistsError: `directory` is a file, or a directory the writer
            did not write.
    """
    if not os.path.lexists(directory):
        return
    if not os.path.isdir(directory):
        raise FileExistsError(f"{directory} exists and is not a directory. {fix}")
    if not os.listdir(directory):
        return
    reason = why_not_ours(directory)
    if reason is not None:
        raise FileExistsError(f"Refusing to replace {directory}: {reason}. {fix}")


def make_temp_dir(target: str) -> str:
    """Creates `.<name>.tmp-<random>` next to `target`, with the permissions
    of a plain `mkdir` (the umask applies), holding `TEMP_MARKER`."""
    parent, base = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    while True:
        tmp = os.path.join(parent, f".{base}.tmp-{secrets.token_hex(4)}")
        try:
            os.mkdir(tmp)
            break
        except FileExistsError:
            continue
    with open(os.path.join(tmp, TEMP_MARKER), "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
    return tmp


def replace_directory(tmp: str, directory: str) -> None:
    """Renames the finished output `tmp` (from `make_temp_dir`) to
    `directory`, replacing a previous one (a bundle or its C arrays).

    POSIX has no atomic swap of two directories: the old output is first
    renamed aside (`.<name>.old-<random>`), so that at every moment either
    the old or the new output is complete on disk, and removed once the new
    one is in place.
    """
    os.remove(os.path.join(tmp, TEMP_MARKER))
    if not os.path.lexists(directory):
        os.rename(tmp, directory)
        return
    parent, base = os.path.split(directory)
    old = os.path.join(parent, f".{base}.old-{secrets.token_hex(4)}")
    os.rename(directory, old)
    try:
        os.rename(tmp, directory)
    except BaseException:
        os.rename(old, directory)
        raise
    shutil.rmtree(old, ignore_errors=True)


def clean_leftovers(target: str, why_not_ours: Ownership) -> None:
    """Removes what a killed export to `target` left next to it.

    `.<name>.tmp-*` directories are removed when they hold `TEMP_MARKER` of
    a process that no longer runs (or, marker already removed, only the
    writer's files); `.<name>.old-*` directories when they hold only the
    writer's files. An export killed between its two renames leaves no
    `target` but a complete old output: that one is put back first.
    """
    parent, base = os.path.split(target)
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return

    def leftovers(kind: str) -> list[str]:
        paths = [
            os.path.join(parent, name)
            for name in names
            if name.startswith(f".{base}.{kind}-")
        ]
        return [p for p in paths if os.path.isdir(p) and not os.path.islink(p)]

    for tmp in leftovers("tmp"):
        marker = os.path.join(tmp, TEMP_MARKER)
        if os.path.isfile(marker):
            if not _writer_running(marker):
                shutil.rmtree(tmp, ignore_errors=True)
        elif os.listdir(tmp) and why_not_ours(tmp) is None:
            shutil.rmtree(tmp, ignore_errors=True)
    olds = [p for p in leftovers("old") if why_not_ours(p) is None or not os.listdir(p)]
    olds.sort(key=os.path.getmtime)
    if olds and not os.path.lexists(target):
        os.rename(olds.pop(), target)
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)


def _writer_running(marker: str) -> bool:
    """Whether the process named in a `TEMP_MARKER` file still runs (then
    its directory is an export in progress, not a leftover)."""
    try:
        with open(marker) as f:
            writer = json.load(f)
        pid, host = int(writer["pid"]), writer["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if host != socket.gethostname():
        return True  # another machine's export: it cannot be checked from here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
