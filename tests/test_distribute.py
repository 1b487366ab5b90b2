"""tf.distribute: MirroredStrategy on 2 logical CPUs gives the single-device loss and update.

Also with a cross-batch memory (XBM): every replica (and worker) holds the
single-device queue, slot for slot.

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


def _run_script(path, source: str) -> dict:
    """Run ``source`` as a Python script at ``path``; return the JSON of its last stdout line."""
    path.write_text(source)
    command = [sys.executable, str(path)]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_mirrored_strategy_matches_single_device_on_the_same_global_batch(tmp_path):
    out = _run_script(tmp_path / "mirrored.py", SCRIPT)
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
    model_kwargs = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}  # e.g. an XBM loss
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
        model = dr.DRegModel(num_classes=4, backbone=backbone(), embedding_dim=8, num_couplings=2, hidden_units=8,
                             **model_kwargs)
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
    _check_multi_worker_matches_single_device(tmp_path, {})


@pytest.mark.slow  # about 45 s: three processes; the MirroredStrategy XBM test below runs by default
def test_multi_worker_xbm_holds_the_single_device_queue(tmp_path):
    """Both workers enqueue both global batches in order: queues (non-trainable weights) equal the single run's."""
    xbm = {"loss": "xbm", "loss_config": {"loss": "contrastive", "memory_size": 30}}
    _check_multi_worker_matches_single_device(tmp_path, xbm)


def _check_multi_worker_matches_single_device(tmp_path, model_kwargs: dict) -> None:
    import os

    import numpy as np

    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT)
    cluster = {"worker": [f"localhost:{port}" for port in _free_ports(2)]}
    workers = []
    for index in range(2):
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        workers.append(subprocess.Popen(
            [sys.executable, str(script), "worker", str(tmp_path / f"worker{index}.npz"), json.dumps(model_kwargs)],
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))  # fmt: skip
    single = subprocess.run(
        [sys.executable, str(script), "single", str(tmp_path / "single.npz"), json.dumps(model_kwargs)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
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


XBM_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np
    import detreg_keras as dr
    from detreg_keras.losses import CrossBatchMemory

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(0)
    out = {"replicas": strategy.num_replicas_in_sync}

    # 1. the layer alone, replicas get halves of each global batch and all-gather them
    xs = rng.normal(size=(32, 5)).astype("float32")
    ys = rng.integers(0, 4, 32).astype("int32")
    single = CrossBatchMemory(loss="multi_similarity", memory_size=12)
    single.build((None, 5))
    with strategy.scope():
        mirrored = CrossBatchMemory(loss="multi_similarity", memory_size=12)
        mirrored.build((None, 5))

    @tf.function
    def step(x, y):
        return strategy.run(lambda a, b: mirrored(a, b, training=True), args=(x, y))

    dataset = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((xs, ys)).batch(8))
    losses = []
    for i, (x, y) in enumerate(dataset):
        expected = float(single(xs[8 * i: 8 * i + 8], ys[8 * i: 8 * i + 8], training=True))
        local = [float(v) for v in strategy.experimental_local_results(step(x, y))]
        losses.append({"single": expected, "replicas": local})
    queue = [np.stack([v.numpy() for v in strategy.experimental_local_results(w.value)]) for w in mirrored.weights]
    out["layer_losses"] = losses
    out["layer_queue_diff"] = max(float(np.abs(q - w.numpy()[None]).max()) for q, w in zip(queue, single.weights))
    out["layer_filled"] = int(single.filled.numpy())

    # 2. DRegModel(loss="xbm"): 2 epochs of 2 global batches of 20 into memories of 30 (wrap-around)
    def make():
        inputs = keras.Input((8, 8, 1))
        x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
        return dr.DRegModel(num_classes=4, backbone=keras.Model(inputs, x, name="backbone"), embedding_dim=8,
                            num_couplings=2, hidden_units=8, loss="xbm",
                            loss_config={"loss": "contrastive", "memory_size": 30})

    y = np.repeat(np.arange(4), 10).astype("int32")
    x = (rng.uniform(0, 255, (40, 8, 8, 1)) + y[:, None, None, None] * 20).astype("float32")
    keras.utils.set_random_seed(0)
    one = make()
    one(x[:2])
    initial = one.get_weights()
    one.compile(optimizer=keras.optimizers.SGD(0.05))
    h1 = one.fit(x, y, batch_size=20, epochs=2, shuffle=False, verbose=0).history
    with strategy.scope():
        two = make()
        two(x[:2])
        two.set_weights(initial)
        two.compile(optimizer=keras.optimizers.SGD(0.05))
    h2 = two.fit(x, y, batch_size=20, epochs=2, shuffle=False, verbose=0).history
    replica_queues = [np.stack([v.numpy() for v in strategy.experimental_local_results(w.value)])
                      for w in two.loss_min.non_trainable_weights]
    out.update({
        "single": h1, "mirrored": h2,
        "weight_diff": max(float(np.abs(a - b).max()) for a, b in zip(one.get_weights(), two.get_weights())),
        "replica_queue_spread": max(float(np.ptp(q, axis=0).max()) for q in replica_queues),
        "filled": int(two.loss_min.filled.numpy()), "steps": int(two.loss_min.steps.numpy()),
    })
    print(json.dumps(out))
    """
)


def test_xbm_under_mirrored_strategy_holds_the_single_device_queue(tmp_path):
    """2 replicas enqueue the global batch in order: same losses, same queue on both, same training."""
    out = _run_script(tmp_path / "xbm.py", XBM_SCRIPT)
    assert out["replicas"] == 2
    # the layer alone: every replica returns the global batch's loss over the single-device memory
    assert len(out["layer_losses"]) == 4 and out["layer_filled"] == 12
    for step in out["layer_losses"]:
        for value in step["replicas"]:
            assert abs(value - step["single"]) < 1e-5 * max(1.0, abs(step["single"])), out["layer_losses"]
    assert out["layer_queue_diff"] < 1e-6  # both replicas hold the single-device queue, slot by slot
    # DRegModel: same logged losses and the same weights (queues included) after 4 steps
    for key in ("loss", "contrastive_loss", "reg_min", "reg_max"):
        for a, b in zip(out["single"][key], out["mirrored"][key]):
            assert abs(a - b) < 1e-4 * max(1.0, abs(a)), (key, out["single"][key], out["mirrored"][key])
    assert out["weight_diff"] < 1e-5
    assert out["replica_queue_spread"] == 0.0 and out["filled"] == 30 and out["steps"] == 4
