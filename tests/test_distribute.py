"""tf.distribute: MirroredStrategy on 2 logical CPUs gives the single-device loss and update.

Runs in a subprocess because logical devices must be configured before
TensorFlow initialises its runtime.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO_ROOT

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np
    import detreg_keras as dr

    def backbone():  # no BatchNorm: per-replica batch statistics would legitimately differ
        inputs = keras.Input((8, 8, 1))
        x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
        x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
        return keras.Model(inputs, x, name="backbone")

    def make():
        return dr.DRegModel(num_classes=4, backbone=backbone(), embedding_dim=8, num_couplings=2, hidden_units=8)

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 5).astype("int32")
    x = (rng.uniform(0, 255, (20, 8, 8, 1)) + y[:, None, None, None] * 20).astype("float32")
    keras.utils.set_random_seed(0)
    single = make()
    single(x[:2])
    for w in single.flow_min.trainable_weights + single.flow_max.trainable_weights:
        w.assign(w + 0.1 * tf.random.normal(w.shape, seed=1))
    initial = single.get_weights()
    reference = {k: float(v) for k, v in single.compute_dreg_losses(tf.constant(x), tf.constant(y)).items()}
    single.compile(optimizer=keras.optimizers.SGD(0.05))  # SGD: the update is the raw gradient
    h1 = single.fit(x, y, batch_size=20, epochs=1, shuffle=False, verbose=0).history

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        mirrored = make()
        mirrored(x[:2])
        mirrored.set_weights(initial)
        mirrored.compile(optimizer=keras.optimizers.SGD(0.05))
    h2 = mirrored.fit(x, y, batch_size=20, epochs=1, shuffle=False, verbose=0).history
    diff = max(float(np.abs(a - b).max()) for a, b in zip(single.get_weights(), mirrored.get_weights()))
    moved = max(float(np.abs(a - b).max()) for a, b in zip(single.get_weights(), initial))
    print(json.dumps({"replicas": strategy.num_replicas_in_sync, "single": h1, "mirrored": h2,
                      "reference": reference, "weight_diff": diff, "moved": moved}))
    """
)


def test_mirrored_strategy_matches_single_device_on_the_same_global_batch(tmp_path):
    script = tmp_path / "mirrored.py"
    script.write_text(SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    for key in ("loss", "pa_loss", "reg_min", "reg_max"):
        assert abs(out["single"][key][0] - out["mirrored"][key][0]) < 1e-4 * max(1.0, abs(out["single"][key][0])), key
    # the logged loss is the loss of the global batch, as computed outside any strategy
    assert abs(out["single"]["loss"][0] - out["reference"]["loss"]) < 1e-4 * max(1.0, abs(out["reference"]["loss"]))
    assert out["moved"] > 1e-3  # the step did something ...
    assert out["weight_diff"] < 1e-5  # ... and the same thing on one device and on two replicas
