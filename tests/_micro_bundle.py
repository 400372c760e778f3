"""Small int8 bundles (digits CNN, its patience variant, a token model)
and their C arrays, made once per test process and shared by
test_c_arrays.py, test_micro_cpp.py and test_android_kotlin.py."""

import functools
import os
import warnings

import keras
import numpy as np

import keras_earlyexit as kee
from keras_earlyexit import demo


def _small_int8_export(path: str, fused: bool, **model_kwargs) -> str:
    """An untrained width-4 digits CNN, exported int8 to `path`. The
    thresholds are low, so that int8 thresholds are reachable and every
    exit (and carry) occurs."""
    keras.utils.set_random_seed(0)
    model = demo.digits_cnn(width=4, **model_kwargs)
    model.set_thresholds([0.12, 0.11])
    x = demo.load_digits(seed=0).x_val[:64]
    return kee.export.to_tflite(
        model,
        path,
        representative_data=x,
        quantization="int8",
        fused=fused,
        verbose=0,
    )


@functools.cache
def small_int8_bundle(root: str) -> str:
    """The small int8 digits CNN as a bundle under `root`."""
    return _small_int8_export(os.path.join(root, "bundle"), fused=False)


@functools.cache
def small_int8_fused(root: str) -> str:
    """The same model (seed, thresholds, calibration data) as an int8
    fused file under `root`."""
    return _small_int8_export(os.path.join(root, "fused_int8.tflite"), fused=True)


@functools.cache
def patience_int8_bundle(root: str) -> str:
    """The same digits CNN with criterion "patience" (p = 2), its thresholds
    (0.12, 0.11) the confidence floors, as a bundle under `root`."""
    return _small_int8_export(
        os.path.join(root, "patience_bundle"),
        fused=False,
        criterion="patience",
        patience=2,
    )


@functools.cache
def patience_int8_fused(root: str) -> str:
    """`patience_int8_bundle`'s model as an int8 fused file."""
    return _small_int8_export(
        os.path.join(root, "patience_int8.tflite"),
        fused=True,
        criterion="patience",
        patience=2,
    )


TOKEN_VOCABULARY = 20
TOKEN_LENGTH = 8


def token_samples(n: int, seed: int) -> dict[str, np.ndarray]:
    """`n` samples of the token model, by input name: int32 `tokens` in
    [0, vocabulary) and a `padding_mask` of 1 to 8 valid tokens (ids after
    them are 0)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, TOKEN_LENGTH + 1, n)
    mask = (np.arange(TOKEN_LENGTH)[None] < lengths[:, None]).astype("int32")
    ids = rng.integers(1, TOKEN_VOCABULARY, (n, TOKEN_LENGTH)).astype("int32")
    return {"tokens": ids * mask, "padding_mask": mask}


@functools.cache
def _token_model():
    """A tiny token classifier that runs on TFLite Micro: int32 inputs
    `tokens` (an embedding of 20 rows) and `padding_mask`; three exits of
    Dense/ReLU features, each a masked average pooling. Trained for a few
    epochs on class = first token mod 4."""
    keras.utils.set_random_seed(0)
    tokens = keras.Input((TOKEN_LENGTH,), dtype="int32", name="tokens")
    mask = keras.Input((TOKEN_LENGTH,), dtype="int32", name="padding_mask")
    x = keras.layers.Embedding(TOKEN_VOCABULARY, 8, name="embedding")(tokens)
    exits = []
    for k, name in enumerate(["exit_1", "exit_2", "final"]):
        x = keras.layers.Dense(8, activation="relu", name=f"dense_{k + 1}")(x)
        exits.append(kee.ExitBranch(4, name=name)(x, padding_mask=mask))
    model = kee.EarlyExitModel([tokens, mask], exits, name="tokens")
    model.compile(keras.optimizers.Adam(1e-2), kee.EarlyExitLoss())
    x = token_samples(512, seed=1)
    model.fit(x, x["tokens"][:, 0] % 4, epochs=3, batch_size=64, verbose=0)
    return model


def _token_export(path: str, fused: bool) -> str:
    with warnings.catch_warnings():
        # The mask's CAST to float and QUANTIZE stay float ops (TFLite
        # Micro runs them); the exporter says so.
        warnings.filterwarnings("ignore", message=".*still computes")
        return kee.export.to_tflite(
            _token_model(),
            path,
            representative_data=token_samples(64, seed=1),
            quantization="int8",
            fused=fused,
            verbose=0,
        )


@functools.cache
def token_int8_bundle(root: str) -> str:
    """`_token_model` as an int8 bundle under `root` (tokens' value_range
    [0, 19]; the mask is carried from segment to segment as int32). Each
    threshold is the median confidence of the samples reaching its exit,
    so that every exit occurs."""
    from keras_earlyexit.runtime import GatedInterpreter

    bundle = _token_export(os.path.join(root, "token_bundle"), fused=False)
    x = token_samples(512, seed=1)
    thresholds = []
    for k in range(2):
        reach = [1.0] * k + [0.0] * (2 - k)
        result = GatedInterpreter(bundle, thresholds=reach).predict(x)
        thresholds.append(float(np.median(result.confidences)))
    kee.export.set_thresholds(bundle, thresholds)
    return bundle


@functools.cache
def token_int8_fused(root: str) -> str:
    """`_token_model` as an int8 fused file under `root`, with the bundle's
    thresholds."""
    from keras_earlyexit.export import read_manifest

    fused = _token_export(os.path.join(root, "token_int8.tflite"), fused=True)
    kee.export.set_thresholds(fused, read_manifest(token_int8_bundle(root)).thresholds)
    return fused


@functools.cache
def small_c_arrays(root: str) -> str:
    from keras_earlyexit.export.c_arrays import to_c_arrays

    return to_c_arrays(small_int8_bundle(root), os.path.join(root, "c_arrays"))


@functools.cache
def single_segment_bundle(root: str) -> str:
    """`small_int8_bundle` cut after its first exit: a valid one-segment
    bundle (a Keras EarlyExitModel always has two exits or more)."""
    import json
    import shutil

    source = small_int8_bundle(root)
    target = os.path.join(root, "single_segment_bundle")
    with open(os.path.join(source, "manifest.json")) as f:
        manifest = json.load(f)
    first = manifest["segments"][0]
    first["carry_out"] = []  # its carry outputs stay, unused
    manifest["segments"] = [first]
    manifest["exit_names"] = [first["exit_name"]]
    os.makedirs(target)
    shutil.copy(os.path.join(source, first["file"]), target)
    with open(os.path.join(target, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return target
