"""One training process for tests/test_saving_crash.py (a script, not a test module).

    python tests/saving_worker.py '<job as JSON>'

The process kills itself with SIGKILL in the middle of a save.
`tf_kfac.KFAC.save_own_variables` is wrapped: on save number
``job["kill_at_save"]`` (counting from 1) it writes ``<out>/killed.json`` (the
step count, and the size of every file under ``<out>`` at that moment) and
kills the process. Keras calls it once the file being saved is open and the
layers' weights are written, before the optimizer's state. When
``killed.json`` exists, nothing is killed: running the same command again is
the restart. Every save that goes through writes what it saves, every
optimizer variable and weight, to ``<out>/<run>-save<n>.npz`` first, where
``<run>`` is ``first`` for the run that gets killed and ``restart`` after.

Two kinds of job:

- ``"save"``: trains an epoch, saves ``<out>/model.keras`` with
  ``job["saver"]`` (``"tf_kfac"``: ``tf_kfac.save_model``; ``"keras"``:
  ``model.save``), trains another epoch and saves again to the same path.
- ``"backup"``: `model.fit` for ``EPOCHS`` epochs with
  ``keras.callbacks.BackupAndRestore(<out>/backup, save_freq=SAVE_FREQ,
  double_checkpoint=job["double_checkpoint"])``. Writes
  ``<run>-begin.npz``, the state once `BackupAndRestore` has restored it,
  and at the end ``<run>-end.npz``, or ``<run>-error.txt`` with the exception
  that `fit` raised (and exits with 1).

The ``.npz`` files hold ``opt<i>`` for the optimizer variables in order,
``weight<i>`` for the model's weights, ``iterations``, and in ``-end.npz``
``epochs_run``.
"""

from __future__ import annotations

import json
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_kfac  # noqa: E402

BATCH = 8
STEPS_PER_EPOCH = 5
EPOCHS = 3  # of the "backup" jobs
SAVE_FREQ = 3  # batches between backups: saves at steps 3, 6, 9, ...


def make_data():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(BATCH * STEPS_PER_EPOCH, 6)).astype("float32")
    return x, (x[:, 0] + x[:, 1] > 0).astype("int32") + (x[:, 2] > 0.5).astype("int32")


def build_model() -> keras.Model:
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((6,)),
                              keras.layers.Dense(8, activation="tanh", name="hidden"),
                              keras.layers.Dense(3, activation="softmax", name="probs")])
    model.compile(optimizer=tf_kfac.KFAC(seed=3, inverse_update_interval=2),
                  loss="sparse_categorical_crossentropy")
    return model


def state_of(model: keras.Model) -> dict:
    out = {f"opt{i:02d}": np.asarray(v.numpy()) for i, v in enumerate(model.optimizer.variables)}
    out.update({f"weight{i}": w.numpy() for i, w in enumerate(model.weights)})
    out["iterations"] = np.asarray(int(model.optimizer.iterations.numpy()))
    return out


class KillMidSave:
    """Wraps `KFAC.save_own_variables`: records each save, kills the process at one."""

    def __init__(self, model: keras.Model, out: str, kill_at_save: int):
        self.model, self.out, self.kill_at_save = model, out, kill_at_save
        self.marker = os.path.join(out, "killed.json")
        self.run = "restart" if os.path.exists(self.marker) else "first"
        self.saves = 0
        original = tf_kfac.KFAC.save_own_variables
        wrapper = self

        def save_own_variables(optimizer, store):
            wrapper.before_save()
            return original(optimizer, store)

        tf_kfac.KFAC.save_own_variables = save_own_variables

    def before_save(self) -> None:
        self.saves += 1
        if self.run == "first" and self.saves == self.kill_at_save:
            sizes = {}
            for root, _, files in os.walk(self.out):
                for name in files:
                    path = os.path.join(root, name)
                    sizes[os.path.relpath(path, self.out)] = os.path.getsize(path)
            with open(self.marker, "w") as f:
                json.dump({"save": self.saves, "sizes": sizes,
                           "iterations": int(self.model.optimizer.iterations.numpy())}, f)
                f.flush()
                os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        np.savez(os.path.join(self.out, f"{self.run}-save{self.saves}.npz"),
                 **state_of(self.model))


class RecordBegin(keras.callbacks.Callback):
    """Writes the state at the start of `fit`, after `BackupAndRestore` (listed before it)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def on_train_begin(self, logs=None):
        np.savez(self.path, **state_of(self.model))


def run_save(job: dict, model: keras.Model) -> None:
    x, y = make_data()
    path = os.path.join(job["out"], "model.keras")
    save = {"tf_kfac": tf_kfac.save_model, "keras": keras.Model.save}[job["saver"]]
    for _ in range(2):
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        save(model, path)


def run_backup(job: dict, model: keras.Model, run: str) -> None:
    x, y = make_data()
    out = job["out"]
    callbacks = [keras.callbacks.BackupAndRestore(os.path.join(out, "backup"),
                                                  save_freq=SAVE_FREQ,
                                                  double_checkpoint=job["double_checkpoint"]),
                 RecordBegin(os.path.join(out, f"{run}-begin.npz"))]
    try:
        history = model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0,
                            callbacks=callbacks)
    except Exception as error:  # recorded for the test, which reports it
        with open(os.path.join(out, f"{run}-error.txt"), "w") as f:
            f.write(f"{type(error).__name__}: {error}")
        sys.exit(1)
    np.savez(os.path.join(out, f"{run}-end.npz"), epochs_run=len(history.history["loss"]),
             **state_of(model))


def main() -> None:
    job = json.loads(sys.argv[1])
    model = build_model()
    killer = KillMidSave(model, job["out"], job["kill_at_save"])
    if job["role"] == "save":
        run_save(job, model)
    elif job["role"] == "backup":
        run_backup(job, model, killer.run)
    else:
        raise ValueError(f"unknown role {job['role']!r}")


if __name__ == "__main__":
    main()
