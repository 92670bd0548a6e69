"""One training process for tests/test_multiworker.py (a script, not a test module).

    python tests/distributed_worker.py '<job as JSON>'

Two kinds of job:

- ``"multiworker"``: one worker of the MultiWorkerMirroredStrategy cluster that
  TF_CONFIG describes, with its one CPU (one replica per worker). Trains each
  of ``job["cases"]`` in turn, under the same strategy object, in a custom
  loop, and writes its final state to ``<out>/<name>-worker<index>.npz``. Then,
  if ``job["fit_case"]`` is given, tries the same with ``model.fit`` and
  writes ``<out>/fit-worker<index>.npz``, or ``.error`` with the exception.
- ``"restore"``: one process, MirroredStrategy over two logical CPU devices.
  Trains ``EPOCHS`` epochs with ``model.fit`` and
  ``keras.callbacks.BackupAndRestore``, writing ``<out>/resumed.npz``; then a
  fresh model, without backups, with the ``model.fit`` calls listed in
  ``job["reference"]`` (``[batches, epochs]``: the first ``batches`` global
  batches of the data, all when None), writing ``<out>/reference.npz``. When
  ``job["backup"]["kill_at"]`` is ``[epoch, batch]`` and the marker file does
  not exist yet, the process creates the marker and kills itself with SIGKILL
  right after the backup at that batch (at the end of that epoch when batch
  is None): running the same command again is the restart.

Data, initial weights and K-FAC options come from fixed seeds here, so the
test process can rerun a case on one device (`train_case(case, None)`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_kfac  # noqa: E402

GLOBAL_BATCH = 8
STEPS_PER_EPOCH = 5
EPOCHS = 3  # of the "restore" jobs
DATA_SEED = 20240
KFAC_ARGS = dict(seed=3, factor_update_interval=2, inverse_update_interval=3,
                 damping_adaptation_interval=2)


def make_data(kind: str):
    """One epoch, `STEPS_PER_EPOCH` global batches, the same in every process."""
    rng = np.random.default_rng(DATA_SEED)
    n = GLOBAL_BATCH * STEPS_PER_EPOCH
    x = rng.normal(size=(n, 6, 6, 2) if kind == "conv" else (n, 10)).astype("float32")
    y = rng.integers(0, 4, size=(n,))
    return x, y


def build_model(kind: str) -> keras.Model:
    """A small model with initial weights from a fixed NumPy seed.

    Fixed names, so that two models in one process have optimizer variables
    of the same names.
    """
    if kind == "conv":
        layers = [keras.Input((6, 6, 2)),
                  keras.layers.Conv2D(3, 3, activation="tanh", name="conv"),
                  keras.layers.Flatten(name="flatten"), keras.layers.Dense(4, name="logits")]
    else:
        layers = [keras.Input((10,)), keras.layers.Dense(8, activation="tanh", name="hidden"),
                  keras.layers.Dense(4, activation="softmax", name="probs")]
    model = keras.Sequential(layers, name=kind)
    rng = np.random.default_rng(7)
    weights = []
    for w in model.get_weights():
        if w.ndim == 1:  # a bias
            weights.append(rng.normal(scale=0.1, size=w.shape))
        else:
            fan_in, fan_out = int(np.prod(w.shape[:-1])), int(w.shape[-1])
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            weights.append(rng.uniform(-limit, limit, size=w.shape))
    model.set_weights([w.astype("float32") for w in weights])
    return model


def compile_model(case: dict, strategy) -> keras.Model:
    """The case's model compiled with KFAC, its variables created under `strategy`."""
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        model = build_model(case["model"])
        loss = keras.losses.SparseCategoricalCrossentropy(
            from_logits=model.layers[-1].activation is keras.activations.linear)
        model.compile(optimizer=tf_kfac.KFAC(**KFAC_ARGS, **case["kfac"]), loss=loss)
    return model


def final_state(model: keras.Model, strategy) -> dict:
    """Weights, each Kronecker layer's (A, G) and every optimizer variable, as arrays.

    Reading a replica-local variable (the factors) under MultiWorkerMirroredStrategy
    is a collective, so every worker calls this at the same point.
    """
    optimizer = model.optimizer
    out = {f"weight{i}:{w.path}": w.numpy() for i, w in enumerate(model.trainable_variables)}
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D)):
            a, g = optimizer.kronecker_factors(layer)
            out[f"A:{layer.name}"], out[f"G:{layer.name}"] = a.numpy(), g.numpy()
    for i, variable in enumerate(optimizer.variables):
        out[f"opt{i:02d}:{variable.name}"] = np.asarray(variable.numpy())
    out["replicas"] = np.asarray(strategy.num_replicas_in_sync if strategy is not None else 1)
    return out


def train_case(case: dict, strategy) -> dict:
    """One epoch in a custom loop (`strategy.run(optimizer.step, ...)`); the final state.

    Every worker builds the same `tf.data` pipeline of global batches;
    `experimental_distribute_dataset` splits each global batch across the
    replicas. Without a strategy the same batches run on one device.
    """
    model = compile_model(case, strategy)
    optimizer = model.optimizer
    x, y = make_data(case["model"])
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    options = tf.data.Options()  # shard by examples, not by files
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = dataset.with_options(options)
    if strategy is None:
        optimizer.attach(model, model.loss)
        batches = dataset
        step = optimizer.step
    else:
        with strategy.scope():
            optimizer.attach(model, model.loss)
        batches = strategy.experimental_distribute_dataset(dataset)

        def step(x_batch, y_batch):
            return strategy.run(optimizer.step, args=(x_batch, y_batch))

    step = tf.function(step, autograph=False)  # K-FAC's step needs no AutoGraph
    for x_batch, y_batch in batches:
        step(x_batch, y_batch)
    return final_state(model, strategy)


def fit_case(case: dict, strategy) -> dict:
    """The same epoch with `model.fit` on the NumPy arrays; the final state."""
    model = compile_model(case, strategy)
    x, y = make_data(case["model"])
    model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    return final_state(model, strategy)


def run_multiworker(job: dict) -> None:
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    local_replicas = np.asarray(len(strategy.extended.worker_devices))
    for case in job["cases"]:
        state = train_case(case, strategy)
        np.savez(os.path.join(job["out"], f"{case['name']}-worker{index}.npz"),
                 local_replicas=local_replicas, **state)
    if job.get("fit_case"):
        path = os.path.join(job["out"], f"fit-worker{index}")
        try:
            state = fit_case(job["fit_case"], strategy)
        except Exception as error:  # recorded for the test, which reports it
            with open(path + ".error", "w") as f:
                f.write(f"{type(error).__name__}: {error}")
        else:
            np.savez(path + ".npz", local_replicas=local_replicas, **state)


class KillOnce(keras.callbacks.Callback):
    """SIGKILLs this process at (epoch, batch), after the backup there, unless marked.

    Put it after `BackupAndRestore` in the callbacks, which Keras calls in
    order. `batch=None` means at the end of `epoch`. The marker file records
    the step count at the kill, and its presence disarms the callback.
    """

    def __init__(self, epoch: int, batch: int | None, marker: str):
        super().__init__()
        self.kill_epoch, self.kill_batch, self.marker = epoch, batch, marker
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.kill_batch is not None and (self.epoch, batch) == (self.kill_epoch,
                                                                    self.kill_batch):
            self._kill()

    def on_epoch_end(self, epoch, logs=None):
        if self.kill_batch is None and epoch == self.kill_epoch:
            self._kill()

    def _kill(self):
        if os.path.exists(self.marker):
            return
        with open(self.marker, "w") as f:
            json.dump({"iterations": int(self.model.optimizer.iterations.numpy())}, f)
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)


class RecordStart(keras.callbacks.Callback):
    """The step count when training begins, after `BackupAndRestore` restored it."""

    start_iterations = None

    def on_train_begin(self, logs=None):
        self.start_iterations = int(self.model.optimizer.iterations.numpy())


def run_restore(job: dict) -> None:
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    case, backup = job["case"], job["backup"]
    x, y = make_data(case["model"])

    model = compile_model(case, strategy)
    start = RecordStart()
    callbacks = [keras.callbacks.BackupAndRestore(backup["dir"], save_freq=backup["save_freq"])]
    if backup.get("kill_at") is not None:
        callbacks.append(KillOnce(*backup["kill_at"], backup["marker"]))
    history = model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=EPOCHS, shuffle=False, verbose=0,
                        callbacks=[*callbacks, start])
    state = final_state(model, strategy)
    state["start_iterations"] = np.asarray(start.start_iterations)
    state["epochs_run"] = np.asarray(len(history.history["loss"]))
    np.savez(os.path.join(job["out"], "resumed.npz"), **state)

    model = compile_model(case, strategy)
    for batches, epochs in job["reference"]:
        n = GLOBAL_BATCH * (batches or STEPS_PER_EPOCH)
        model.fit(x[:n], y[:n], batch_size=GLOBAL_BATCH, epochs=epochs, shuffle=False,
                  verbose=0)
    np.savez(os.path.join(job["out"], "reference.npz"), **final_state(model, strategy))


def main() -> None:
    job = json.loads(sys.argv[1])
    if job["role"] == "restore":  # two replicas in this process; before any op runs
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        run_restore(job)
    elif job["role"] == "multiworker":
        run_multiworker(job)
    else:
        raise ValueError(f"unknown role {job['role']!r}")


if __name__ == "__main__":
    main()
