"""Writing bundles: the manifest file and the bundle directory.

The schema and the reading side live in `keras_earlyexit.runtime.manifest`
(shared with the runtimes, which import no Keras); they are re-exported here.
"""

import os
import shutil
import tempfile

from keras_earlyexit.runtime.manifest import (  # noqa: F401  (re-exported)
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
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


def write_manifest(manifest: Manifest, directory: str) -> str:
    path = os.path.join(directory, MANIFEST_NAME)
    with open(path, "w") as f:
        f.write(manifest.to_json())
    return path


def check_replaceable(directory: str, marker: str, rule: str) -> None:
    """Refuses to write into `directory` unless it is new, empty or a
    previous output (holding `marker`), so that no user file is replaced."""
    if not os.path.exists(directory):
        return
    if not os.path.isdir(directory):
        raise FileExistsError(
            f"{directory} exists and is a file; choose a directory path."
        )
    entries = os.listdir(directory)
    if entries and marker not in entries:
        raise FileExistsError(
            f"{directory} is a non-empty directory without {marker}; {rule}. "
            "Choose a new or empty directory."
        )


def replace_directory(tmp: str, directory: str) -> None:
    """Renames the finished output `tmp` to `directory`, replacing a
    previous one (a bundle or its C arrays).

    POSIX has no atomic swap of two directories: the old bundle is first
    renamed aside, so that at every moment either the old or the new bundle
    is complete on disk, and removed once the new one is in place.
    """
    if not os.path.exists(directory):
        os.rename(tmp, directory)
        return
    parent, base = os.path.split(directory)
    old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
    os.rmdir(old)
    os.rename(directory, old)
    try:
        os.rename(tmp, directory)
    except BaseException:
        os.rename(old, directory)
        raise
    shutil.rmtree(old, ignore_errors=True)
