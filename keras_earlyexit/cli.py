"""`keras-earlyexit` command line: profile, calibrate, convert, run and bench
`.keras` models and TFLite bundles on `.npz` data (arrays `x` and `y`).

Each subcommand is one entry of `SUBCOMMANDS`: a help line, a function that
adds its arguments to an `argparse` parser and a function that runs it with
the parsed arguments and returns an exit status.

Parsing imports neither Keras nor TensorFlow, so `--help` answers at once.
Arguments, paths and labels are checked before any model is loaded or run.
The command line is quiet by default: no progress bars, and the C++ logs
of TensorFlow, XLA and LiteRT are hidden unless a step fails (`--verbose`
shows everything).
"""

import argparse
import contextlib
import ctypes
import os
import sys
import tempfile
import warnings
from collections.abc import Callable

import numpy as np

# `kee.calibrate`'s guarantees (its module imports Keras; --help must not).
GUARANTEES = ("high_probability", "expectation")


def load_model(path: str):
    """Loads a `.keras` file holding an `EarlyExitModel`."""
    import keras

    import keras_earlyexit

    _check_input_path(path, "model file")
    keras_earlyexit.register_keras_objects()
    model = keras.saving.load_model(path)
    if not hasattr(model, "segments"):
        raise SystemExit(
            f"error: {path} holds a {type(model).__name__}, not an EarlyExitModel."
        )
    return model


def load_npz(
    path: str, need_labels: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """Arrays `x` and `y` of an `.npz` file (`y` is None when absent and
    not needed)."""
    hint = "Write it with np.savez(path, x=x, y=y)."
    if not os.path.exists(path):
        raise SystemExit(f"error: data file not found: {path}")
    if os.path.isdir(path):
        raise SystemExit(f"error: {path} is a directory; expected an .npz file. {hint}")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot read {path} as .npz ({e}). {hint}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise SystemExit(
            f"error: {path} holds a single array (.npy); expected an .npz file "
            f"with arrays 'x' (inputs) and 'y' (labels). {hint}"
        )
    with data:
        missing = [k for k in ("x", "y") if k not in data and (need_labels or k == "x")]
        if missing:
            raise SystemExit(
                f"error: {path} has arrays {sorted(data.files)}; expected 'x' "
                f"(inputs) and 'y' (labels). {hint}"
            )
        try:
            return data["x"], (data["y"] if "y" in data else None)
        except ValueError as e:  # object arrays need pickle: refused
            raise SystemExit(f"error: cannot read {path}: {e}. {hint}") from None


def output_path(
    path: str | None, suffix: str | None = None, strict: bool = False
) -> str | None:
    """An output file path, checked before any work: not a directory, in an
    existing folder. `suffix` is appended when the name has none (the path
    reported is the one written); with `strict`, another suffix is refused."""
    if path is None:
        return None
    if os.path.isdir(path):
        raise SystemExit(
            f"error: {path} is a directory; give a file name, e.g. "
            f"{os.path.join(path, 'out' + (suffix or ''))}"
        )
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SystemExit(f"error: folder {folder} does not exist (for {path}).")
    ext = os.path.splitext(path)[1]
    if suffix and not ext:
        return path + suffix
    if suffix and strict and ext != suffix:
        raise SystemExit(f"error: {path} must end in {suffix}.")
    return path


def write_atomically(path: str, write: Callable[[str], None]) -> str:
    """Calls `write(temporary path)` beside `path`, then renames it to
    `path`: an interrupted write never leaves a half-written file, and an
    existing file is replaced only by a complete one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.",
        suffix=os.path.splitext(path)[1],
        dir=folder,
    )
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as open() would create it
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _check_input_path(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise SystemExit(f"error: {what} not found: {path}")


@contextlib.contextmanager
def quiet_native_output(enabled: bool = True):
    """Hides what TensorFlow, XLA and LiteRT print from C++ to file
    descriptors 1 and 2 (oneDNN, CUDA and `cuInit` lines logged before
    absl is initialized, which `TF_CPP_MIN_LOG_LEVEL` does not reach; MLIR
    converter diagnostics; `fully_quantize`; the XNNPACK line). The text is
    replayed on stderr if the block fails unexpectedly; Python warnings
    raised inside are printed after it."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # closed descriptors: nothing to protect
        yield
        return
    log = tempfile.TemporaryFile()
    failed = False
    with warnings.catch_warnings(record=True) as caught:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        except (ValueError, SystemExit, KeyboardInterrupt):
            raise  # a message of ours, or the user: the logs add nothing
        except BaseException:
            failed = True
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            _flush_c_stdio()  # C++ output buffered in stdio goes to the log
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            if failed:
                log.seek(0)
                sys.stderr.write(log.read().decode(errors="replace"))
            log.close()
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)


def _flush_c_stdio() -> None:
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):
        pass  # no C library handle on this platform


def _quiet(args: argparse.Namespace):
    return quiet_native_output(not args.verbose)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _check_labels(y, n: int, num_classes: int, path: str) -> np.ndarray:
    from keras_earlyexit.labels import check_labels

    try:
        return check_labels(y, n, num_classes, what=f"y in {path}")
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show progress bars and the TensorFlow / converter / LiteRT logs",
    )


def _add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="an EarlyExitModel saved as .keras")
    parser.add_argument("data", help=".npz file with arrays x and y (labels)")
    parser.add_argument(
        "--png", help="write the accuracy-vs-MACs plot here (.png added if no suffix)"
    )
    parser.add_argument("--markdown", help="write the tables as markdown to this file")
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=256,
        help="samples per model call (default 256)",
    )


def _run_profile(args: argparse.Namespace) -> int:
    markdown = output_path(args.markdown)
    png = output_path(args.png, ".png")
    _check_input_path(args.model, "model file")
    x, y = load_npz(args.data)
    with _quiet(args):
        from keras_earlyexit.evaluation import profile

        model = load_model(args.model)
        y = _check_labels(y, len(x), model.num_classes, args.data)
        report = profile(
            model, x, y, batch_size=args.batch_size, verbose=int(args.verbose)
        )
    print(report)
    if markdown:
        write_atomically(markdown, lambda p: _write_text(p, report.to_markdown()))
        print(f"markdown: {markdown}")
    if png:
        write_atomically(png, report.plot)
        print(f"plot: {png}")
    return 0


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text + "\n")


def _add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="an EarlyExitModel saved as .keras")
    parser.add_argument(
        "data", help=".npz validation data with arrays x and y, not used in training"
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--max-accuracy-drop",
        type=float,
        help="least compute within this accuracy of the final exit, e.g. 0.01",
    )
    target.add_argument(
        "--macs-budget",
        type=float,
        help="best accuracy within this fraction of full-model MACs, e.g. 0.25",
    )
    target.add_argument(
        "--risk",
        type=float,
        help="guaranteed disagreement rate with the final exit, e.g. 0.05",
    )
    parser.add_argument(
        "--delta",
        type=float,
        default=0.1,
        help="the guarantees hold with probability >= 1 - delta (default 0.1)",
    )
    parser.add_argument(
        "--guarantee",
        choices=GUARANTEES,
        help="a finite-sample promise for --max-accuracy-drop or --risk: "
        "high_probability (w.p. >= 1 - delta over the validation draw, the "
        "target holds on new data) or expectation (it holds on average over "
        "draws; saves more). Default: the approximate guard for "
        "--max-accuracy-drop, Learn then Test for --risk",
    )
    parser.add_argument(
        "--per-exit",
        action="store_true",
        help="with --guarantee, per-exit thresholds ordered on half of the data "
        "and certified on the other half, instead of one shared threshold "
        "certified on all of it (for many thousand samples)",
    )
    parser.add_argument(
        "--temperature-scaling",
        action="store_true",
        help="fit one softmax temperature per exit before the thresholds "
        "(not for learned gates)",
    )
    parser.add_argument(
        "--output",
        help="save the model with the thresholds here (.keras added if no suffix)",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=256,
        help="samples per model call (default 256)",
    )


def _run_calibrate(args: argparse.Namespace) -> int:
    if args.per_exit and args.guarantee is None:
        raise SystemExit(
            "error: --per-exit chooses the thresholds of a guarantee: add "
            "--guarantee high_probability or --guarantee expectation, or drop "
            "--per-exit."
        )
    if args.guarantee is not None and args.macs_budget is not None:
        raise SystemExit(
            "error: --guarantee applies to --max-accuracy-drop and --risk; "
            "--macs-budget is kept by the guard. Drop --guarantee."
        )
    output = output_path(args.output, ".keras", strict=True)
    _check_input_path(args.model, "model file")
    x, y = load_npz(args.data)
    with _quiet(args):
        from keras_earlyexit.evaluation import calibrate

        model = load_model(args.model)
        y = _check_labels(y, len(x), model.num_classes, args.data)
        result = calibrate(
            model,
            x,
            y,
            max_accuracy_drop=args.max_accuracy_drop,
            macs_budget=args.macs_budget,
            risk=args.risk,
            delta=args.delta,
            temperature_scaling=args.temperature_scaling,
            guarantee=args.guarantee,
            per_exit=args.per_exit,
            batch_size=args.batch_size,
            verbose=int(args.verbose),
        )
    print(result)
    if output:
        result.apply(model)
        with _quiet(args):
            write_atomically(output, model.save)
        print(f"saved: {output}")
    return 0


def _add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="an EarlyExitModel saved as .keras")
    parser.add_argument("directory", help="bundle directory to write")
    parser.add_argument(
        "--quantization",
        default="int8",
        choices=["int8", "float16", "dynamic", "float32"],
        help="int8 (microcontrollers, needs --data), float16, dynamic or float32 "
        "(default int8)",
    )
    parser.add_argument(
        "--data", help=".npz with array x: representative inputs (needed for int8)"
    )
    parser.add_argument(
        "--calibration-samples",
        type=_positive_int,
        default=500,
        help="representative samples used for int8 (default 500)",
    )
    parser.add_argument(
        "--micro",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="check ops and measure arenas for TFLite Micro (default: for int8)",
    )


def _run_convert(args: argparse.Namespace) -> int:
    if os.path.exists(args.directory) and not os.path.isdir(args.directory):
        raise SystemExit(
            f"error: {args.directory} is a file; convert writes a bundle "
            "directory. Give a new directory name."
        )
    _check_input_path(args.model, "model file")
    if args.quantization == "int8" and not args.data:
        raise SystemExit(
            "error: int8 needs representative inputs: --data FILE.npz (array x, "
            "a few hundred training or validation samples)."
        )
    x = load_npz(args.data, need_labels=False)[0] if args.data else None
    with _quiet(args):
        from keras_earlyexit.export import read_manifest, to_tflite

        model = load_model(args.model)
        directory = to_tflite(
            model,
            args.directory,
            representative_data=x,
            quantization=args.quantization,
            calibration_samples=args.calibration_samples,
            verbose=int(args.verbose),
            micro=args.micro,
        )
        manifest = read_manifest(directory)
    for s in manifest.segments:
        print(
            f"{s.file}: exit '{s.exit_name}', {s.size_bytes:,} bytes, "
            f"{s.macs:,} MACs, threshold {s.gate.threshold:g}"
            + (f", TFLite Micro arena {s.arena_bytes:,} bytes" if s.arena_bytes else "")
        )
    print(f"bundle: {directory} ({manifest.boundary})")
    return 0


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory written by convert")
    parser.add_argument(
        "data", help=".npz with array x (and y for accuracy): held-out test data"
    )
    _add_interpreter_arguments(parser)
    parser.add_argument(
        "--thresholds",
        type=float,
        nargs="+",
        help="one per non-final exit (default: the bundle's own)",
    )
    parser.add_argument(
        "--output",
        help="write classes, exit_indices, confidences here (.npz added if no suffix)",
    )


def _add_interpreter_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        default="litert",
        choices=["litert", "micro"],
        help="litert (as on Android) or micro (TFLite Micro) (default litert)",
    )
    parser.add_argument(
        "--num-threads",
        type=_positive_int,
        default=1,
        help="LiteRT interpreter threads (default 1)",
    )


def _interpreter(args: argparse.Namespace, thresholds=None):
    _check_input_path(args.bundle, "bundle directory")
    with _quiet(args):
        from keras_earlyexit.runtime import GatedInterpreter

        return GatedInterpreter(
            args.bundle,
            backend=args.backend,
            num_threads=args.num_threads,
            thresholds=thresholds,
        )


def _run_run(args: argparse.Namespace) -> int:
    output = output_path(args.output, ".npz", strict=True)
    x, y = load_npz(args.data, need_labels=False)
    interpreter = _interpreter(args, args.thresholds)
    if y is not None:
        y = _check_labels(y, len(x), interpreter.manifest.num_classes, args.data)
    with _quiet(args):
        result = interpreter.predict(x, verbose=int(args.verbose))
    if y is not None:
        print(f"accuracy: {np.mean(result.classes == y):.4f}")
    print(interpreter.stats)
    if output:
        write_atomically(
            output,
            lambda p: np.savez(
                p,
                classes=result.classes,
                exit_indices=result.exit_indices,
                confidences=result.confidences,
            ),
        )
        print(f"results: {output}")
    return 0


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory written by convert")
    parser.add_argument(
        "data", help=".npz with array x (and y for accuracy): held-out test data"
    )
    _add_interpreter_arguments(parser)
    parser.add_argument(
        "--repeats",
        type=_positive_int,
        default=3,
        help="passes over the data after one warm-up pass (default 3)",
    )


def _run_bench(args: argparse.Namespace) -> int:
    x, y = load_npz(args.data, need_labels=False)
    interpreter = _interpreter(args)
    if y is not None:
        y = _check_labels(y, len(x), interpreter.manifest.num_classes, args.data)
    with _quiet(args):
        interpreter.predict(x[:32])  # warm-up: first invokes allocate and pack
        interpreter.reset_stats()
        for _ in range(args.repeats):
            result = interpreter.predict(x, verbose=int(args.verbose))
    stats = interpreter.stats
    macs = [s.cumulative_macs for s in interpreter.manifest.segments]
    mean_macs = sum(f * m for f, m in zip(stats.exit_fractions, macs))
    if y is not None:
        print(f"accuracy: {np.mean(result.classes == y):.4f}")
    print(stats)
    print(
        f"average MACs per sample: {mean_macs:,.0f} "
        f"({mean_macs / max(macs[-1], 1):.1%} of the full model)"
    )
    return 0


# name -> (help, add_arguments(parser), run(args) -> exit status)
SUBCOMMANDS: dict[
    str,
    tuple[
        str,
        Callable[[argparse.ArgumentParser], None],
        Callable[[argparse.Namespace], int],
    ],
] = {
    "profile": (
        "accuracy and MACs per exit, oracle, Pareto front",
        _add_profile_arguments,
        _run_profile,
    ),
    "calibrate": (
        "per-exit thresholds for an accuracy, MACs or risk target",
        _add_calibrate_arguments,
        _run_calibrate,
    ),
    "convert": (
        "per-exit TFLite segments and manifest (int8, float16, dynamic, float32)",
        _add_convert_arguments,
        _run_convert,
    ),
    "run": (
        "gated inference over a TFLite bundle: accuracy and exit mix",
        _add_run_arguments,
        _run_run,
    ),
    "bench": (
        "latency per exit of the gated loop over a TFLite bundle",
        _add_bench_arguments,
        _run_bench,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keras-earlyexit",
        description="Profile, calibrate, convert and run early-exit Keras models.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, run) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
        _add_common_arguments(sub)
        sub.set_defaults(run=run)
    return parser


def _quiet_environment() -> None:
    """Before TensorFlow loads: C++ logs below errors off (the user's own
    settings win)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `keras-earlyexit`; returns the exit status."""
    args = build_parser().parse_args(argv)
    if not args.verbose:
        _quiet_environment()
    try:
        return args.run(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
