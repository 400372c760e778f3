"""`python -m keras_earlyexit.export MODEL.keras DIRECTORY ...`: the
conversion step that `to_tflite` runs in a TensorFlow-backend subprocess
when the caller's backend is JAX or PyTorch."""

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keras_earlyexit.export")
    parser.add_argument("model", help="EarlyExitModel saved as .keras")
    parser.add_argument("directory", help="bundle directory to write")
    parser.add_argument("--quantization", default="int8")
    parser.add_argument(
        "--representative-data", help=".npz with one array per model input"
    )
    parser.add_argument("--verbose", type=int, default=1)
    parser.add_argument(
        "--micro",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="check ops and measure arenas for TFLite Micro (default: int8)",
    )
    args = parser.parse_args(argv)
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        parser.error("run with KERAS_BACKEND=tensorflow (TFLite conversion).")

    import keras
    import numpy as np

    import keras_earlyexit
    from keras_earlyexit.export.tflite import to_tflite

    # The package imported before Keras did: register its classes now.
    keras_earlyexit.register_keras_objects()
    model = keras.saving.load_model(args.model)
    data = None
    if args.representative_data:
        with np.load(args.representative_data) as f:
            data = {k: f[k] for k in f.files}
    to_tflite(
        model,
        args.directory,
        representative_data=data,
        quantization=args.quantization,
        calibration_samples=sys.maxsize,
        verbose=args.verbose,
        micro=args.micro,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
