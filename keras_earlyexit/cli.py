"""`keras-earlyexit` command line: profile and calibrate `.keras` models on
`.npz` data (arrays `x` and `y`).

Each subcommand is one entry of `SUBCOMMANDS`: a help line, a function that
adds its arguments to an `argparse` parser and a function that runs it with
the parsed arguments and returns an exit status.
"""

import argparse
import os
import sys
from collections.abc import Callable

import numpy as np


def load_model(path: str):
    """Loads a `.keras` file holding an `EarlyExitModel`."""
    import keras

    import keras_earlyexit

    keras_earlyexit.register_keras_objects()

    if not os.path.exists(path):
        raise SystemExit(f"error: model file not found: {path}")
    model = keras.saving.load_model(path)
    if not hasattr(model, "segments"):
        raise SystemExit(
            f"error: {path} holds a {type(model).__name__}, not an EarlyExitModel."
        )
    return model


def load_npz(
    path: str, need_labels: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """Arrays `x` and `y` of an `.npz` file."""
    if not os.path.exists(path):
        raise SystemExit(f"error: data file not found: {path}")
    with np.load(path) as data:
        missing = [k for k in ("x", "y") if k not in data and (need_labels or k == "x")]
        if missing:
            raise SystemExit(
                f"error: {path} has arrays {sorted(data.files)}; expected 'x' "
                "(inputs) and 'y' (labels). Write it with np.savez(path, x=x, y=y)."
            )
        return data["x"], (data["y"] if "y" in data else None)


def _add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="an EarlyExitModel saved as .keras")
    parser.add_argument("data", help=".npz file with arrays x and y")
    parser.add_argument("--png", help="write the accuracy-vs-MACs plot here")
    parser.add_argument("--markdown", help="write the tables as markdown here")
    parser.add_argument("--batch-size", type=int, default=256)


def _run_profile(args: argparse.Namespace) -> int:
    from keras_earlyexit.evaluation import profile

    model = load_model(args.model)
    x, y = load_npz(args.data)
    report = profile(model, x, y, batch_size=args.batch_size, verbose=1)
    print(report)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report.to_markdown() + "\n")
        print(f"markdown: {args.markdown}")
    if args.png:
        print(f"plot: {report.plot(args.png)}")
    return 0


def _add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="an EarlyExitModel saved as .keras")
    parser.add_argument("data", help=".npz validation data with arrays x and y")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--max-accuracy-drop", type=float, help="e.g. 0.01 (one point below final)"
    )
    target.add_argument(
        "--macs-budget", type=float, help="fraction of full-model MACs, e.g. 0.25"
    )
    target.add_argument(
        "--risk", type=float, help="disagreement rate with the final exit, e.g. 0.05"
    )
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--temperature-scaling", action="store_true")
    parser.add_argument(
        "--output", help="save the model with the thresholds here (.keras)"
    )
    parser.add_argument("--batch-size", type=int, default=256)


def _run_calibrate(args: argparse.Namespace) -> int:
    from keras_earlyexit.evaluation import calibrate

    model = load_model(args.model)
    x, y = load_npz(args.data)
    result = calibrate(
        model,
        x,
        y,
        max_accuracy_drop=args.max_accuracy_drop,
        macs_budget=args.macs_budget,
        risk=args.risk,
        delta=args.delta,
        temperature_scaling=args.temperature_scaling,
        batch_size=args.batch_size,
        verbose=1,
    )
    print(result)
    if args.output:
        result.apply(model)
        model.save(args.output)
        print(f"saved: {args.output}")
    return 0


def _add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="an EarlyExitModel saved as .keras")
    parser.add_argument("directory", help="bundle directory to write")
    parser.add_argument(
        "--quantization",
        default="int8",
        choices=["int8", "float16", "dynamic", "float32"],
    )
    parser.add_argument(
        "--data", help=".npz with array x: representative inputs (needed for int8)"
    )
    parser.add_argument("--calibration-samples", type=int, default=500)
    parser.add_argument(
        "--micro",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="check ops and measure arenas for TFLite Micro (default: for int8)",
    )


def _run_convert(args: argparse.Namespace) -> int:
    from keras_earlyexit.export import read_manifest, to_tflite

    model = load_model(args.model)
    x = load_npz(args.data, need_labels=False)[0] if args.data else None
    directory = to_tflite(
        model,
        args.directory,
        representative_data=x,
        quantization=args.quantization,
        calibration_samples=args.calibration_samples,
        verbose=1,
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
    parser.add_argument("data", help=".npz with array x (and y for accuracy)")
    parser.add_argument("--backend", default="litert", choices=["litert", "micro"])
    parser.add_argument("--num-threads", type=int, default=1)
    parser.add_argument(
        "--thresholds", type=float, nargs="+", help="one per non-final exit"
    )
    parser.add_argument("--output", help="write classes/exits/confidences (.npz)")


def _run_run(args: argparse.Namespace) -> int:
    from keras_earlyexit.runtime import GatedInterpreter

    interpreter = GatedInterpreter(
        args.bundle,
        backend=args.backend,
        num_threads=args.num_threads,
        thresholds=args.thresholds,
    )
    x, y = load_npz(args.data, need_labels=False)
    result = interpreter.predict(x, verbose=1)
    if y is not None:
        print(f"accuracy: {np.mean(result.classes == np.asarray(y)):.4f}")
    print(interpreter.stats)
    if args.output:
        np.savez(
            args.output,
            classes=result.classes,
            exit_indices=result.exit_indices,
            confidences=result.confidences,
        )
        print(f"results: {args.output}")
    return 0


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory written by convert")
    parser.add_argument("data", help=".npz with array x")
    parser.add_argument("--backend", default="litert", choices=["litert", "micro"])
    parser.add_argument("--num-threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)


def _run_bench(args: argparse.Namespace) -> int:
    from keras_earlyexit.runtime import GatedInterpreter

    interpreter = GatedInterpreter(
        args.bundle, backend=args.backend, num_threads=args.num_threads
    )
    x = load_npz(args.data, need_labels=False)[0]
    interpreter.predict(x[:32])  # warm-up: first invokes allocate and pack
    interpreter.reset_stats()
    for _ in range(max(args.repeats, 1)):
        interpreter.predict(x, verbose=1)
    stats = interpreter.stats
    macs = [s.cumulative_macs for s in interpreter.manifest.segments]
    mean_macs = sum(f * m for f, m in zip(stats.exit_fractions, macs))
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
        sub.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `keras-earlyexit`; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
