"""`to_c_arrays`: C arrays round-trip to the segment bytes, the config header
agrees with the manifest, the arena estimate runs in TFLite Micro, and bad
input fails with a clear error."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from _micro_bundle import (
    TOKEN_VOCABULARY,
    patience_int8_bundle,
    patience_int8_fused,
    small_c_arrays,
    small_int8_bundle,
    small_int8_fused,
    token_int8_bundle,
)

from keras_earlyexit.export import BundleError, list_ops, read_manifest
from keras_earlyexit.export.c_arrays import (
    CONFIG_NAME,
    FUSED_CONFIG_NAME,
    _resolver_method,
    bundle_arena_size,
    estimate_arena_size,
    read_c_array,
    read_c_arrays,
    resolver_ops,
    to_c_arrays,
)

pytest.importorskip("ai_edge_litert")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def bundle(root) -> str:
    return small_int8_bundle(root)


@pytest.fixture(scope="module")
def out_dir(root) -> str:
    return small_c_arrays(root)


def _segment_bytes(bundle: str) -> list[bytes]:
    manifest = read_manifest(bundle)
    out = []
    for s in manifest.segments:
        with open(os.path.join(bundle, s.file), "rb") as f:
            out.append(f.read())
    return out


def test_arrays_round_trip_to_identical_bytes(bundle, out_dir):
    assert read_c_arrays(out_dir) == _segment_bytes(bundle)
    for k in (1, 2, 3):
        with open(os.path.join(out_dir, f"segment_{k}_model_data.cc")) as f:
            source = f.read()
        # TFLite Micro reads the flatbuffer in place: it must be aligned.
        assert f"alignas(16) const unsigned char g_segment_{k}_model_data[]" in source


def test_config_header_matches_manifest(bundle, out_dir):
    manifest = read_manifest(bundle)
    with open(os.path.join(out_dir, CONFIG_NAME)) as f:
        header = f.read()

    def constant(name):
        return int(re.search(rf"{name} = (\d+);", header).group(1))

    assert constant("kNumSegments") == len(manifest.segments) == 3
    assert constant("kNumClasses") == manifest.num_classes
    # The arena measured at export, for one MicroAllocator shared by all
    # segments: persistent parts add up, the activation area is shared.
    segments = manifest.segments
    shared = sum(s.arena_bytes - s.arena_head_bytes for s in segments) + max(
        s.arena_head_bytes for s in segments
    )
    assert constant("kArenaSize") == bundle_arena_size(manifest) == shared
    assert max(s.arena_bytes for s in segments) < shared
    assert shared < estimate_arena_size(_segment_bytes(bundle))
    # Carries are 16-byte aligned; the largest boundary sets the buffer size.
    expected_carry = max(
        sum(-(-_nbytes(t) // 16) * 16 for t in s.inputs) for s in manifest.segments[1:]
    )
    assert constant("kCarryBufferSize") == expected_carry
    quantized = re.findall(r"/\*threshold_quantized=\*/(-?\d+)", header)
    assert [int(q) for q in quantized] == [
        s.gate.threshold_quantized for s in manifest.segments
    ]
    for s in manifest.segments:
        for role in ("logits", "confidence"):
            t = s.output(role)
            assert f'/*{role}=*/{{"{role}", {t.position}, ' in header
    ops = re.search(r"#define EARLYEXIT_OPS\(OP\) (.*)", header).group(1)
    expected = {
        _resolver_method(op.name)
        for data in _segment_bytes(bundle)
        for op in list_ops(data)
    }
    assert set(re.findall(r"OP\((\w+)\)", ops)) == expected
    assert constant("kNumOps") == len(expected)


def _nbytes(t) -> int:
    size = 1
    for d in t.shape:
        size *= d
    return size * (1 if t.dtype == "int8" else 4)


def test_resolver_method_names():
    assert _resolver_method("CONV_2D") == "Conv2D"
    assert _resolver_method("DEPTHWISE_CONV_2D") == "DepthwiseConv2D"
    assert _resolver_method("REDUCE_MAX") == "ReduceMax"
    assert _resolver_method("L2_POOL_2D") == "L2Pool2D"
    assert _resolver_method("BATCH_MATMUL") == "BatchMatMul"
    assert _resolver_method("RELU6") == "Relu6"


def test_estimated_arena_runs_every_segment_in_tflite_micro(bundle):
    """Each segment allocates and invokes in the TFLite Micro interpreter
    with the estimate for that segment alone (a child process: TFLite Micro
    aborts the process when an arena is too small)."""
    pytest.importorskip("tflite_micro")
    script = (
        "import sys\n"
        "from tflite_micro.python.tflite_micro import runtime\n"
        "from keras_earlyexit.export.c_arrays import estimate_arena_size\n"
        "for path in sys.argv[1:]:\n"
        "    data = open(path, 'rb').read()\n"
        "    size = estimate_arena_size([data])\n"
        "    runtime.Interpreter.from_bytes(data, arena_size=size).invoke()\n"
        "    print(path, size)\n"
    )
    files = [os.path.join(bundle, s.file) for s in read_manifest(bundle).segments]
    proc = subprocess.run(
        [sys.executable, "-c", script, *files],
        capture_output=True,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("\n") == len(files)
    # Shared arena: the persistent parts add up, activations are shared.
    sizes = [int(line.split()[1]) for line in proc.stdout.splitlines()]
    assert estimate_arena_size(_segment_bytes(bundle)) < sum(sizes)


def test_bundle_without_measured_arena_falls_back(bundle, tmp_path):
    """Manifests written before `arena_bytes` existed still load: to_c_arrays
    uses the estimate, the micro runtime its default arena."""
    from keras_earlyexit.runtime import GatedInterpreter

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for segment in manifest["segments"]:
        del segment["arena_bytes"], segment["arena_head_bytes"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert bundle_arena_size(read_manifest(str(copy))) is None
    to_c_arrays(str(copy), str(tmp_path / "model"))
    header = (tmp_path / "model" / CONFIG_NAME).read_text()
    estimate = estimate_arena_size(_segment_bytes(bundle))
    assert f"kArenaSize = {estimate};" in header
    pytest.importorskip("tflite_micro")
    x = np.zeros((2, 8, 8, 1), np.float32)
    old = GatedInterpreter(str(copy), backend="micro").predict(x)
    new = GatedInterpreter(bundle, backend="micro").predict(x)
    np.testing.assert_array_equal(old.classes, new.classes)


def test_explicit_arena_size_and_replacing_a_previous_output(bundle, tmp_path):
    target = tmp_path / "model"
    to_c_arrays(bundle, str(target), arena_size=12345)
    to_c_arrays(bundle, str(target), arena_size=4096)
    header = (target / CONFIG_NAME).read_text()
    assert "kArenaSize = 4096;" in header
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no temporary left


def test_corrupted_segment_fails_and_keeps_the_previous_output(bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    target = tmp_path / "model"
    to_c_arrays(str(copy), str(target))
    before = {p: (target / p).read_bytes() for p in os.listdir(target)}
    data = bytearray((copy / "segment_2.tflite").read_bytes())
    data[100] ^= 0xFF
    (copy / "segment_2.tflite").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="corrupted"):
        to_c_arrays(str(copy), str(target))
    assert {p: (target / p).read_bytes() for p in os.listdir(target)} == before
    assert sorted(os.listdir(tmp_path)) == ["bundle", "model"]


def test_bad_input_errors(bundle, tmp_path):
    with pytest.raises(BundleError, match="manifest.json not found"):
        to_c_arrays(str(tmp_path), str(tmp_path / "out"))
    foreign = tmp_path / "src"
    foreign.mkdir()
    (foreign / "main.cc").write_text("int main() {}\n")
    with pytest.raises(FileExistsError, match="replaces only its own output"):
        to_c_arrays(bundle, str(foreign))
    assert os.listdir(foreign) == ["main.cc"]
    with pytest.raises(ValueError, match="arena_size must be a positive int"):
        to_c_arrays(bundle, str(tmp_path / "out"), arena_size=0)
    with pytest.raises(ValueError, match="namespace must be a C\\+\\+ identifier"):
        to_c_arrays(bundle, str(tmp_path / "out"), namespace="my-model")
    # A manifest that lists a dtype the runner cannot handle.
    copy = tmp_path / "bundle_int16"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    spec = manifest["segments"][0]["inputs"][0]
    spec.update(dtype="int16", scale=None, zero_point=None)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="dtype int16"):
        to_c_arrays(str(copy), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_read_c_array_rejects_mismatched_files(out_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(out_dir, copy)
    header = copy / "segment_1_model_data.h"
    header.write_text(re.sub(r"_len = \d+", "_len = 7", header.read_text()))
    with pytest.raises(ValueError, match="different exports"):
        read_c_arrays(str(copy))


def test_resolver_ops_of_the_bundle(bundle):
    ops = resolver_ops(_segment_bytes(bundle))
    assert "Conv2D" in ops and "Softmax" in ops
    assert ops == sorted(ops)


def test_layer_of_reads_keras_names_from_tensor_names():
    from keras_earlyexit.export import OpInfo
    from keras_earlyexit.export.micro import layer_of

    fused = "segment_2_1/conv_2_1/Gelu/mul;segment_2_1/conv_2_1/Gelu/Erfc"
    op = OpInfo("GELU", ["INT8"], ["INT8"], ["StatefulPartitionedCall:0"], [fused])
    # Keras suffixes name scopes with _<n>; an exact name wins over stripping.
    assert layer_of(op, ["pool_2", "conv_2"]) == "conv_2"
    assert layer_of(op, ["conv_2_1", "conv_2"]) == "conv_2_1"
    assert layer_of(op, ["dense"]) is None


# --- Generated code takes manifest values only checked or escaped ---------
MICRO_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "tflite", "micro")
needs_compiler = pytest.mark.skipif(
    shutil.which("g++") is None, reason="g++ is needed to compile generated sources"
)


def _compile_and_run(directory, main: str, extra_sources=()) -> str:
    """Compiles `main` with the generated sources in `directory` (pedantic,
    warnings as errors) and returns what it prints."""
    main_path = os.path.join(directory, "check_main.cc")
    with open(main_path, "w") as f:
        f.write(main)
    binary = os.path.join(directory, "check_main")
    sources = [main_path, *extra_sources]
    sources += [
        os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".cc")
    ]
    command = ["g++", "-std=c++17", "-Wall", "-Wextra", "-Wpedantic", "-Werror"]
    command += ["-I", MICRO_DIR, "-I", str(directory), *set(sources), "-o", binary]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return subprocess.run(
        [binary], capture_output=True, text=True, timeout=60, check=True
    ).stdout


# Prints each segment's exit name and input names as hex bytes.
_PRINT_NAMES = r"""
#include <cstdio>
#include "earlyexit_config.h"
void Hex(const char* s) {
  for (; *s; ++s) std::printf("%02x", static_cast<unsigned char>(*s));
  std::printf("\n");
}
int main() {
  for (const auto& s : earlyexit_config::kSegments) {
    Hex(s.exit_name);
    for (int i = 0; i < s.num_inputs; ++i) Hex(s.inputs[i].name);
  }
  Hex(earlyexit_config::kQuantization);
}
"""


def _generate(bundle: str, manifest) -> dict:
    from keras_earlyexit.export.c_arrays import _generate

    models = _segment_bytes(bundle)
    return _generate(
        manifest, models, "bundle", resolver_ops(models), 4096, "earlyexit_config"
    )


@needs_compiler
def test_names_are_escaped_into_string_literals(bundle, tmp_path):
    """Names a reader might let through (quotes, backslashes, line breaks,
    trigraphs, comment markers, non-ASCII) come out of the compiled header
    byte for byte, and inject nothing."""
    hostile = [
        'exit"; int injected = 1; //',
        "exit\\\n#error injected\n",
        "??/ */ /* \u2028 é \U0001f600 \x7f \t end",
    ]
    manifest = read_manifest(bundle)
    for segment, name in zip(manifest.segments, hostile):
        segment.exit_name = name
    manifest.segments[0].inputs[0].name = 'in"put\\'
    # In code the names are escaped; in comments they are made printable.
    for name, text in _generate(bundle, manifest).items():
        (tmp_path / name).write_text(text)
    out = _compile_and_run(tmp_path, _PRINT_NAMES).split()
    names = [bytes.fromhex(h).decode() for h in out]
    assert names == [
        hostile[0],
        'in"put\\',
        hostile[1],
        manifest.segments[1].inputs[0].name,
        hostile[2],
        manifest.segments[2].inputs[0].name,
        "int8",
    ]
    lines = (tmp_path / CONFIG_NAME).read_text().splitlines()
    assert not any(line.startswith(("#error", "int injected")) for line in lines)


@pytest.mark.parametrize(
    "field, value",
    [
        ("quantization", 'int8";\nint injected = 1;//'),
        ("num_classes", "10; int injected"),
        ("size_bytes", "1; int injected"),
        ("size_bytes", 7),
        ("index", 5),
        ("macs", 1.5),
        ("position", -1),
        ("shape", [1, "8}; int injected; //"]),
        ("shape", [1, True]),
        ("shape", [1, 1, 1, 1, 1, 1, 1]),
        ("scale", float("nan")),
        ("scale", 1e300),
        ("zero_point", 300),
        ("threshold", 2.0),
        ("threshold_quantized", "0}; int injected; //"),
        ("dtype", "int8, injected"),
    ],
)
def test_tampered_manifest_values_are_refused(bundle, field, value):
    """Values the manifest reader would refuse are refused again where they
    would be written into code (a reader bypassed, or an older one)."""
    manifest = read_manifest(bundle)
    segment = manifest.segments[0]
    tensor = segment.inputs[0]
    if field in ("quantization", "num_classes"):
        setattr(manifest, field, value)
    elif field in ("size_bytes", "index", "macs"):
        setattr(segment, field, value)
    elif field in ("threshold", "threshold_quantized"):
        setattr(segment.gate, field, value)
    else:
        setattr(tensor, field, value)
    with pytest.raises(BundleError, match=field if field != "dtype" else "dtype"):
        _generate(bundle, manifest)


@needs_compiler
def test_bundle_directory_name_cannot_inject_code(bundle, tmp_path):
    """The bundle's directory name is written into comments: a line break
    in it must not end the comment."""
    copy = tmp_path / "bundle\n#error injected\nint injected = 1; \\"
    shutil.copytree(bundle, copy)
    out = tmp_path / "model"
    to_c_arrays(str(copy), str(out))
    for name in os.listdir(out):
        lines = (out / name).read_text().splitlines()
        assert lines[0].startswith("// Generated by") and lines[1].startswith("//")
        assert not any(line.startswith(("#error", "int injected")) for line in lines)
    exit_names = read_manifest(bundle).exit_names
    printed = _compile_and_run(out, _PRINT_NAMES).split()
    assert [bytes.fromhex(h).decode() for h in printed[::2][:3]] == exit_names


@needs_compiler
def test_single_segment_bundle_has_no_zero_length_array(root, tmp_path):
    """A one-segment bundle has no carry; the carry buffer the firmware
    declares from kCarryBufferSize must still not be a zero-length array
    (ill-formed C++)."""
    from _micro_bundle import single_segment_bundle

    out = tmp_path / "model"
    to_c_arrays(single_segment_bundle(root), str(out))
    header = (out / CONFIG_NAME).read_text()
    assert "kNumSegments = 1;" in header
    assert "kCarryBufferSize = 16;" in header
    main = (
        '#include <cstdio>\n#include "earlyexit_config.h"\n'
        "alignas(16) unsigned char g_carry[earlyexit_config::kCarryBufferSize];\n"
        'int main() { std::printf("%zu\\n", sizeof(g_carry)); }\n'
    )
    assert _compile_and_run(out, main).strip() == "16"


def test_fused_file_as_one_array_and_its_config(root, bundle, tmp_path):
    """A fused file: one array holding its exact bytes, a header with the
    embedded manifest's values and the op list with IF; a tampered file is
    refused before anything is written; a directory holding the file is
    refused; a previous bundle output is replaced whole."""
    from keras_earlyexit.runtime import FusedModelError
    from keras_earlyexit.runtime.fused import read_fused_manifest
    from keras_earlyexit.runtime.manifest import RUNTIME_ARENA_MARGIN

    fused = small_int8_fused(root)
    with open(fused, "rb") as f:
        data = f.read()
    manifest = read_fused_manifest(data)
    out = str(tmp_path / "out")
    to_c_arrays(bundle, out)  # a previous bundle output, replaced
    to_c_arrays(fused, out)
    assert sorted(os.listdir(out)) == sorted(
        ["fused_model_data.cc", "fused_model_data.h", FUSED_CONFIG_NAME]
    )
    assert read_c_array(os.path.join(out, "fused_model_data.cc")) == data
    with open(os.path.join(out, FUSED_CONFIG_NAME)) as f:
        header = f.read()

    def constant(name):
        return re.search(rf"\b{name}(?:\[\d+\])? = \{{?([^;}}]*)\}}?;", header)[1]

    ops = re.search(r"#define EARLYEXIT_FUSED_OPS\(OP\) (.*)", header)[1]
    assert ops == " ".join(f"OP({op})" for op in resolver_ops([data]))
    assert "OP(If)" in ops
    assert int(constant("kNumOps")) == len(ops.split())
    assert int(constant("kNumExits")) == manifest.num_exits
    assert int(constant("kArenaSize")) >= manifest.arena_bytes + RUNTIME_ARENA_MARGIN
    for name in ("class", "exit_index", "confidence"):
        key = "k" + "".join(p.title() for p in name.split("_")) + "Output"
        assert int(constant(key)) == manifest.output_position(name)
    assert constant("kLogitsOutput") == "-1"
    names = [e.exit_name for e in manifest.exits]
    assert constant("kExitNames") == ", ".join(f'"{n}"' for n in names)
    thresholds = [float(v.rstrip("f")) for v in constant("kThresholds").split(", ")]
    assert thresholds == [
        pytest.approx(e.gate.threshold, rel=1e-7) for e in manifest.exits
    ]
    quantized = [int(v) for v in constant("kThresholdsQuantized").split(", ")]
    assert quantized == [e.gate.threshold_quantized for e in manifest.exits]
    spec = manifest.inputs[0]
    assert f'{{"{spec.name}", {spec.position}, earlyexit::DType::kInt8' in header

    tampered = tmp_path / "tampered.tflite"
    at = data.index(b'"exit_1"')
    tampered.write_bytes(data[:at] + b'"exit_X"' + data[at + 8 :])
    with pytest.raises(FusedModelError, match="modified after export"):
        to_c_arrays(str(tampered), out)
    assert read_c_array(os.path.join(out, "fused_model_data.cc")) == data
    with pytest.raises(ValueError, match="contains the fused model"):
        to_c_arrays(fused, os.path.dirname(fused))


# Prints the criterion, the patience and each segment-1 input's dtype and
# value range.
_PRINT_CRITERION = r"""
#include <cstdio>
#include "earlyexit_config.h"
namespace config = earlyexit_config;
int main() {
  std::printf("%s %d %d\n", config::kCriterion, config::kPatience,
              config::kModel.patience);
  for (const auto& t : config::kSegment1Inputs) {
    std::printf("%s %d %ld %ld\n", t.name, static_cast<int>(t.dtype),
                static_cast<long>(t.min_value), static_cast<long>(t.max_value));
  }
}
"""
_INT32 = (-(2**31), 2**31 - 1)


@needs_compiler
@pytest.mark.parametrize("kind", ["max_prob", "patience", "tokens"])
def test_patience_and_input_ranges_compile_into_the_config(root, kind, tmp_path):
    """kCriterion and kPatience (the manifest's p for "patience", else 0,
    also in kModel); int32 inputs with their value range (token ids: the
    embedding's rows; a padding mask: all of int32), other inputs with the
    default range."""
    bundle = {
        "max_prob": small_int8_bundle,
        "patience": patience_int8_bundle,
        "tokens": token_int8_bundle,
    }[kind](root)
    manifest = read_manifest(bundle)
    out = tmp_path / "model"
    to_c_arrays(bundle, str(out))
    lines = [
        line.split() for line in _compile_and_run(out, _PRINT_CRITERION).splitlines()
    ]
    patience = "2" if kind == "patience" else "0"
    assert lines[0] == [manifest.criterion, patience, patience]
    dtypes = {"int8": 0, "float32": 1, "int32": 2}
    expected = {t.name: [dtypes[t.dtype], *_INT32] for t in manifest.segments[0].inputs}
    if kind == "tokens":
        expected["tokens"][1:] = [0, TOKEN_VOCABULARY - 1]
        assert expected["padding_mask"][0] == dtypes["int32"]
    assert {line[0]: [int(v) for v in line[1:]] for line in lines[1:]} == expected


def _tokens_header(bundle: str, value_range) -> str:
    manifest = read_manifest(bundle)
    tokens = next(t for t in manifest.segments[0].inputs if t.name == "tokens")
    tokens.value_range = value_range
    return _generate(bundle, manifest)[CONFIG_NAME]


@pytest.mark.parametrize(
    "value_range, expected",
    [
        ([0, TOKEN_VOCABULARY - 1], (0, TOKEN_VOCABULARY - 1)),
        # Wider than the table: narrowed to its rows (GATHER's indices are
        # not checked by TFLite Micro).
        ([0, 1000], (0, TOKEN_VOCABULARY - 1)),
        ([-5, 10], (0, 10)),
        # No manifest range: the rows the graph's GATHER reads.
        (None, (0, TOKEN_VOCABULARY - 1)),
    ],
)
def test_token_range_is_narrowed_to_the_embedding_rows(root, value_range, expected):
    header = _tokens_header(token_int8_bundle(root), value_range)
    assert re.search(
        rf'{{"tokens", \d+, earlyexit::DType::kInt32, 2, {{1, 8}}, 32u, 0.0f, 0, '
        rf"{expected[0]}, {expected[1]}}}",
        header,
    ), header


def test_token_range_outside_the_embedding_is_refused(root):
    with pytest.raises(BundleError, match="indexes a table of 20 rows"):
        _tokens_header(token_int8_bundle(root), [30, 40])


@pytest.mark.parametrize("patience", [0, 4, -1, "2", True, 2.0, None])
def test_bad_patience_is_refused(root, patience):
    """Criterion "patience" needs an int in [1, exits] to be written into
    C++; other criteria take none."""
    bundle = patience_int8_bundle(root)
    manifest = read_manifest(bundle)
    manifest.patience = patience
    with pytest.raises(BundleError, match="patience"):
        _generate(bundle, manifest)


def test_patience_for_another_criterion_is_refused(bundle):
    manifest = read_manifest(bundle)
    manifest.patience = 2
    with pytest.raises(BundleError, match="patience must be null for criterion"):
        _generate(bundle, manifest)


def test_patience_fused_file_config(root, tmp_path):
    """The fused header of a patience model names its patience (the graph
    computes the streak)."""
    out = tmp_path / "fused"
    to_c_arrays(patience_int8_fused(root), str(out))
    header = (out / FUSED_CONFIG_NAME).read_text()
    assert 'kCriterion = "patience";' in header
    assert "inline constexpr int kPatience = 2;" in header
