"""TFLite Micro arenas checked before a segment is loaded in this process.

With many too-small arenas (16, 200, 1800 or 2500 bytes for a 3.4 KB
segment, for instance) the interpreter of the `tflite_micro` pip package
crashes the process with a segmentation fault instead of failing. A
measured `arena_bytes` in the manifest catches a too-small `arena_size` up
front, but a manifest may come from elsewhere; so each arena is first tried
in a child process, and where it fails the child measures what the segment
needs.
"""

import importlib.util
import json
import os
import subprocess
import sys
import tempfile

from keras_earlyexit.runtime.manifest import BundleError

# The pip interpreter aligns its malloc'd arena to 16 bytes, so the usable
# part of an arena varies by up to 15 bytes between runs: a trial is made
# 16 bytes short, so that what fits there fits in the real arena too, and
# a measured need gets twice that on top, so that it passes such a trial.
ALIGNMENT_SLACK = 16

# Run in the children below before each trial invoke: zeros, not the
# arena's leftovers, since an integer input may index a table (token ids)
# and TFLite Micro's GATHER does not check its indices.
ZERO_INPUTS = r"""
import numpy

def zero_inputs(interpreter):
    i = 0
    while True:
        try:
            details = interpreter.get_input_details(i)
        except IndexError:
            return
        interpreter.set_input(numpy.zeros(details["shape"], details["dtype"]), i)
        i += 1
"""

# Imports only tflite_micro (fast to start, safe to fork); each trial runs
# in a forked child, since a too-small arena can crash TFLite Micro.
_CHILD = (
    r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
from tflite_micro.python.tflite_micro import runtime

"""
    + ZERO_INPUTS
    + r"""

def fits(data, size):
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            interpreter = runtime.Interpreter.from_bytes(data, arena_size=size)
            zero_inputs(interpreter)
            interpreter.invoke()
            code = 0
        except BaseException:
            pass
        os._exit(code)
    return os.waitpid(pid, 0)[1] == 0

def smallest(data):
    lo, hi = 0, 4096
    while not fits(data, hi):
        if hi >= 1 << 30:
            return None
        lo, hi = hi, hi * 2
    while hi - lo > 16:
        mid = (lo + hi) // 32 * 16
        if fits(data, mid):
            hi = mid
        else:
            lo = mid
    return hi

for path, size in json.loads(sys.stdin.read()):
    data = open(path, "rb").read()
    if fits(data, size):
        print(json.dumps({"fits": True}), flush=True)
    else:
        print(json.dumps({"fits": False, "needs": smallest(data)}), flush=True)
"""
)


def check_arenas(models: list[bytes], sizes: list[int]) -> list[int | None]:
    """Tries each model in its arena, in a child process.

    Args:
        models: `.tflite` bytes.
        sizes: arena bytes for each model.

    Returns:
        Per model: `None` if it allocates and invokes in its arena (with 16
        bytes to spare for alignment); otherwise the arena it needs, in
        bytes (alignment included).

    Raises:
        BundleError: a model that runs in no arena up to 1 GiB.
        RuntimeError: the check itself failed (its output is quoted).
    """
    if not hasattr(os, "fork"):
        return [None] * len(models)  # tflite-micro ships for Linux only
    location = os.path.dirname(
        os.path.dirname(importlib.util.find_spec("tflite_micro").origin)
    )
    with tempfile.TemporaryDirectory(prefix="kee-arena-") as tmp:
        jobs = []
        for k, (data, size) in enumerate(zip(models, sizes)):
            path = os.path.join(tmp, f"segment_{k + 1}.tflite")
            with open(path, "wb") as f:
                f.write(data)
            jobs.append((path, max(size - ALIGNMENT_SLACK, 0)))
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, location],
            input=json.dumps(jobs),
            capture_output=True,
            text=True,
            timeout=300,
        )
    lines = proc.stdout.splitlines()
    if proc.returncode != 0 or len(lines) != len(models):
        raise RuntimeError(
            "Checking the TFLite Micro arenas in a child process failed (exit "
            f"status {proc.returncode}): {proc.stderr.strip()[-1000:]}"
        )
    needs = []
    for k, line in enumerate(lines):
        result = json.loads(line)
        if result["fits"]:
            needs.append(None)
        elif result["needs"] is None:
            raise BundleError(
                f"Segment {k + 1} does not run in TFLite Micro with any arena up "
                "to 1 GiB."
            )
        else:
            needs.append(result["needs"] + 2 * ALIGNMENT_SLACK)
    return needs
