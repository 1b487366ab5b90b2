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


WORKER_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    mode, out_path = sys.argv[1], sys.argv[2]
    import tensorflow as tf
    strategy = tf.distribute.MultiWorkerMirroredStrategy() if mode == "worker" else None  # before any other op
    import keras, numpy as np
    import detreg_keras as dr

    def backbone():  # no BatchNorm: per-replica batch statistics would legitimately differ
        inputs = keras.Input((8, 8, 1))
        x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
        return keras.Model(inputs, x, name="backbone")

    def make():
        keras.utils.set_random_seed(0)
        model = dr.DRegModel(num_classes=4, backbone=backbone(), embedding_dim=8, num_couplings=2, hidden_units=8)
        model(np.zeros((2, 8, 8, 1), "float32"))
        for i, w in enumerate(model.flow_min.trainable_weights + model.flow_max.trainable_weights):
            w.assign(w + 0.1 * np.random.default_rng(i).normal(size=w.shape).astype("float32"))
        model.compile(optimizer=keras.optimizers.SGD(0.05))
        return model

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 10).astype("int32")
    x = (rng.uniform(0, 255, (40, 8, 8, 1)) + y[:, None, None, None] * 20).astype("float32")
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(20)  # 2 global batches of 20
    if strategy is None:
        model = make()
        np.savez(out_path.replace(".npz", "_initial.npz"), *model.get_weights())
    else:
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        dataset = dataset.with_options(options)
        with strategy.scope():
            model = make()
    history = model.fit(dataset, epochs=1, verbose=0).history
    np.savez(out_path, *model.get_weights())
    print(json.dumps({"replicas": 1 if strategy is None else strategy.num_replicas_in_sync,
                      "loss": history["loss"][0]}))
    """
)


def _free_ports(count: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_multi_worker_mirrored_strategy_matches_single_device(tmp_path):
    """Two real worker processes (TF_CONFIG, gRPC on localhost) train like one device on the global batch."""
    import os

    import numpy as np

    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT)
    cluster = {"worker": [f"localhost:{port}" for port in _free_ports(2)]}
    workers = []
    for index in range(2):
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        workers.append(subprocess.Popen(
            [sys.executable, str(script), "worker", str(tmp_path / f"worker{index}.npz")],
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))  # fmt: skip
    single = subprocess.run([sys.executable, str(script), "single", str(tmp_path / "single.npz")],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    outputs = []
    for proc in workers:
        try:
            stdout, stderr = proc.communicate(timeout=600)
        finally:
            proc.kill()
        assert proc.returncode == 0, stderr[-3000:]
        outputs.append(json.loads(stdout.strip().splitlines()[-1]))
    assert single.returncode == 0, single.stderr[-3000:]
    reference = json.loads(single.stdout.strip().splitlines()[-1])
    assert [o["replicas"] for o in outputs] == [2, 2]
    for out in outputs:  # the logged loss is the global batch's loss, on both workers
        assert abs(out["loss"] - reference["loss"]) < 1e-4 * max(1.0, abs(reference["loss"]))
    single_w = np.load(tmp_path / "single.npz")
    initial = np.load(tmp_path / "single_initial.npz")
    assert max(float(np.abs(single_w[k] - initial[k]).max()) for k in initial.files) > 1e-2  # it trained
    for index in range(2):
        worker_w = np.load(tmp_path / f"worker{index}.npz")
        assert len(worker_w.files) == len(single_w.files)
        # float32 round-off of a sum of 2 halves vs one sum, over 2 SGD steps; oneDNN (on by default,
        # see detreg_keras._backend) picks kernels per batch shape: 3.2e-5 measured with it, < 2e-5 with Eigen
        for k in single_w.files:
            scale = max(1.0, float(np.abs(single_w[k]).max()))
            assert float(np.abs(worker_w[k] - single_w[k]).max()) < 1e-4 * scale, (index, k)
