"""Trains and evaluates the demo model on 2 devices and on 1 device from the
same weights; prints a JSON line with both losses. Run by
tests/test_distributed.py in a fresh process (device setup must precede the
backend's first use)."""

import json
import os
import sys

mode = sys.argv[1]  # "jax" or "tensorflow"
if mode == "jax":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["KERAS_BACKEND"] = mode
if mode == "tensorflow":
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_earlyexit as kee  # noqa: E402
from keras_earlyexit import demo  # noqa: E402

data = demo.load_digits()
x, y = data.x_train[:256], data.y_train[:256]
loss = kee.EarlyExitLoss(weights="linear", distillation_weight=0.5, entropy_penalty=0.1)


def build():
    keras.utils.set_random_seed(1)
    model = demo.digits_cnn(width=8)
    model.compile(keras.optimizers.SGD(0.05), loss)
    return model


single = build()
weights = single.get_weights()
single_loss = single.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)

if mode == "jax":
    import jax

    assert len(jax.devices()) == 2, jax.devices()
    keras.distribution.set_distribution(keras.distribution.DataParallel())
    distributed = build()
    distributed.set_weights(weights)
    dist_loss = distributed.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    history = distributed.fit(x, y, batch_size=64, epochs=1, verbose=0)
else:
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        distributed = build()
    distributed.set_weights(weights)
    dist_loss = distributed.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    history = distributed.fit(x, y, batch_size=64, epochs=1, verbose=0)

print(
    json.dumps(
        {
            "single": single_loss,
            "distributed": dist_loss,
            "trained": bool(np.isfinite(history.history["loss"][-1])),
            "replicas": 2,
        }
    )
)
