"""A process killed while it saves: the previous file stays loadable, and training resumes.

Keras writes a `.keras` file and `BackupAndRestore`'s `latest.weights.h5` in
place, so a kill during the write leaves a truncated file. Here a process
(tests/saving_worker.py) kills itself with SIGKILL in the middle of a save,
when Keras has opened the file and written the layers' weights but not yet
K-FAC's state, and the test checks what it left:

- `tf_kfac.save_model` writes to a temporary file and renames it onto the
  path: the file still holds the previous save, K-FAC state included, and
  training goes on from it;
- `keras.callbacks.BackupAndRestore(double_checkpoint=True)` keeps a copy of
  the previous backup, which the same command, run again, falls back to and
  finishes training from.

Also, in this process: `tf_kfac.save_model` writes what `model.save` writes,
refuses paths and arguments it cannot write safely, and leaves the previous
file and no temporary file when saving raises.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest

import tf_kfac

WORKER = Path(__file__).with_name("saving_worker.py")
REPO = WORKER.parent.parent
TIMEOUT = 240  # seconds, per group of processes run side by side
NOISE = ("I0000", "E0000", "WARNING: All", "To enable")
BATCH, STEPS_PER_EPOCH, EPOCHS, SAVE_FREQ = 8, 5, 3, 3  # as in tests/saving_worker.py


# ------------------------------------------------------------------ processes


def _env() -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _run_side_by_side(jobs: dict[str, tuple[dict, Path]]) -> dict[str, int | None]:
    """Runs the worker once per `name: (job, log)`, all at once; their return codes.

    A process still running after `TIMEOUT` seconds is killed and reported as
    None. Every process is gone when this returns or raises.
    """
    procs = {}
    try:
        for name, (job, log) in jobs.items():
            with open(log, "wb") as out:
                procs[name] = subprocess.Popen(
                    [sys.executable, str(WORKER), json.dumps(job)], env=_env(), cwd=REPO,
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + TIMEOUT
        while any(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return {name: p.poll() for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()


def _check_exit(runs: dict, name: str, expected: int) -> None:
    code, log = runs["codes"][name], runs["logs"][name]
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    tail = "\n".join([line for line in lines if not line.startswith(NOISE)][-25:])
    assert code == expected, (
        f"{name} exited with {code} (None: timed out after {TIMEOUT} s), expected {expected}"
        f"\n--- {log.name} ---\n{tail}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The worker's two kill cases side by side, then the backup case's restart.

    "save" saves `model.keras` with `tf_kfac.save_model` twice and is killed
    in the second save; "backup" trains with `BackupAndRestore(save_freq=3,
    double_checkpoint=True)` and is killed in its second backup (step 6),
    then the same command runs again to the end. Returns each run's return
    code and log, and what the killed backup run left in its backup directory.
    """
    root = tmp_path_factory.mktemp("saving_crash")
    jobs = {"save": dict(role="save", saver="tf_kfac", kill_at_save=2),
            "backup": dict(role="backup", double_checkpoint=True, kill_at_save=2)}
    for name, job in jobs.items():
        (root / name).mkdir()
        job["out"] = str(root / name)
    logs = {"save": root / "save.log", "backup": root / "backup-killed.log",
            "restart": root / "backup-restart.log"}
    codes = _run_side_by_side({name: (job, logs[name]) for name, job in jobs.items()})
    backup_dir = root / "backup" / "backup"
    left = sorted(p.name for p in backup_dir.iterdir()) if backup_dir.exists() else []
    metadata = backup_dir / "training_metadata.json"
    metadata = json.loads(metadata.read_text()) if metadata.exists() else None
    if codes["backup"] == -signal.SIGKILL:
        codes.update(_run_side_by_side({"restart": (jobs["backup"], logs["restart"])}))
    return dict(root=root, codes=codes, logs=logs, backup_left=left, backup_metadata=metadata)


def _load(path: Path) -> dict:
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def _state(model: keras.Model) -> dict:
    """As the worker's `state_of`: optimizer variables, weights, step count."""
    out = {f"opt{i:02d}": np.asarray(v.numpy()) for i, v in enumerate(model.optimizer.variables)}
    out.update({f"weight{i}": w.numpy() for i, w in enumerate(model.weights)})
    out["iterations"] = np.asarray(int(model.optimizer.iterations.numpy()))
    return out


def _assert_equal_states(actual: dict, desired: dict) -> None:
    assert sorted(actual) == sorted(desired)
    for key, want in desired.items():
        np.testing.assert_array_equal(actual[key], want, err_msg=key)


def _assert_finite(state: dict) -> None:
    bad = [key for key, value in state.items() if not np.all(np.isfinite(value))]
    assert not bad, f"non-finite values in {bad}"


def _assert_nontrivial(state: dict, model: keras.Model) -> None:
    """Factors, inverses and momentum have been written: the state is worth restoring."""
    paths = [v.path for v in model.optimizer.variables]
    for part in ("kfac_A", "kfac_G_inverse", "momentum"):
        keys = [f"opt{i:02d}" for i, path in enumerate(paths) if part in path]
        assert keys and all(np.abs(state[key]).sum() > 0 for key in keys), part


# ---------------------------------------------------- killed in the middle of a save


def test_save_model_killed_mid_save_leaves_the_previous_file(runs):
    """A kill in the second `tf_kfac.save_model` to `model.keras` leaves the first save.

    The process is killed after 10 steps, in the save that would replace the
    file written after 5. The file loads, holds every optimizer variable and
    weight of the first save exactly (factors, inverses, momentum, counters,
    the step count 5), and `fit` goes on from it to finite weights and state.
    The incomplete temporary file is left next to it.
    """
    _check_exit(runs, "save", -signal.SIGKILL)
    out = runs["root"] / "save"
    killed = json.loads((out / "killed.json").read_text())
    assert killed["save"] == 2 and killed["iterations"] == 2 * STEPS_PER_EPOCH
    temporaries = [name for name in killed["sizes"] if name.endswith(".tmp.keras")]
    assert len(temporaries) == 1 and temporaries[0].startswith(".model.keras."), killed
    assert (out / temporaries[0]).exists()

    model = keras.models.load_model(out / "model.keras")
    assert isinstance(model.optimizer, tf_kfac.KFAC)
    first = _load(out / "first-save1.npz")
    assert int(first["iterations"]) == STEPS_PER_EPOCH
    _assert_nontrivial(first, model)
    _assert_equal_states(_state(model), first)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * 2, 6)).astype("float32")
    model.fit(x, rng.integers(0, 3, size=len(x)), batch_size=BATCH, verbose=0)
    after = _state(model)
    assert int(after["iterations"]) == STEPS_PER_EPOCH + 2
    _assert_finite(after)


def test_backup_and_restore_with_double_checkpoint_resumes_after_a_kill_mid_backup(runs):
    """A kill in the second backup (step 6): the same command resumes from the first (step 3).

    The killed run left a partly written `latest.weights.h5` and the previous
    backup's copies (`*.bkp`, from `double_checkpoint=True`). Loading the
    partial file raises an OSError, on which Keras restores the copies. The
    restarted run must begin with the first backup's state exactly (step
    count, every K-FAC variable, weights), at the epoch that backup recorded,
    and train to the end (Keras then removes the backup directory), finite.
    """
    _check_exit(runs, "backup", -signal.SIGKILL)
    out = runs["root"] / "backup"
    killed = json.loads((out / "killed.json").read_text())
    assert killed["save"] == 2 and killed["iterations"] == 2 * SAVE_FREQ
    assert runs["backup_left"] == ["latest.weights.h5", "latest.weights.h5.bkp",
                                   "training_metadata.json", "training_metadata.json.bkp"]
    assert runs["backup_metadata"] == {"epoch": 0, "batch": SAVE_FREQ - 1}
    _check_exit(runs, "restart", 0)

    first = _load(out / "first-save1.npz")
    assert int(first["iterations"]) == SAVE_FREQ
    begin = _load(out / "restart-begin.npz")
    _assert_equal_states(begin, first)
    assert not (out / "backup").exists()
    end = _load(out / "restart-end.npz")
    # The first backup recorded epoch 0, so all EPOCHS epochs run again from step 3.
    assert int(end.pop("epochs_run")) == EPOCHS
    assert int(end["iterations"]) == SAVE_FREQ + EPOCHS * STEPS_PER_EPOCH
    _assert_finite(end)
    assert any(not np.array_equal(end[key], first[key]) for key in first if "weight" in key)


# ------------------------------------------------------------ in this process


@pytest.fixture(scope="module")
def trained() -> keras.Model:
    """A small model after one epoch of K-FAC."""
    keras.utils.set_random_seed(2)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(BATCH * 3, 5)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"),
                              keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer=tf_kfac.KFAC(), loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=BATCH, verbose=0)
    return model


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    metadata = json.loads(members.pop("metadata.json"))
    members["keras_version"] = metadata["keras_version"].encode()  # not the date saved
    return members


def test_save_model_writes_what_model_save_writes(trained, tmp_path):
    """The same archive as `model.save`, byte for byte but the date, and nothing else left."""
    trained.save(tmp_path / "keras.keras")
    tf_kfac.save_model(trained, tmp_path / "kfac.keras")
    assert sorted(os.listdir(tmp_path)) == ["keras.keras", "kfac.keras"]
    kfac, reference = _members(tmp_path / "kfac.keras"), _members(tmp_path / "keras.keras")
    assert sorted(kfac) == ["config.json", "keras_version", "model.weights.h5"]
    assert kfac == reference
    loaded = keras.models.load_model(tmp_path / "kfac.keras")
    _assert_equal_states(_state(loaded), _state(trained))


def test_save_model_replaces_a_file_as_model_save_would(trained, tmp_path):
    """It replaces an existing file, keeps its permission bits, and writes through a link."""
    target = tmp_path / "run.keras"
    target.write_bytes(b"an older file")
    target.chmod(0o640)
    link = tmp_path / "link.keras"
    link.symlink_to(target)
    tf_kfac.save_model(trained, str(link))
    assert link.is_symlink()
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(os.listdir(tmp_path)) == ["link.keras", "run.keras"]
    _assert_equal_states(_state(keras.models.load_model(target)), _state(trained))


@pytest.mark.parametrize("path, kwargs, error, words", [
    ("run.h5", {}, ValueError, "does not end in .keras"),
    ("run", {}, ValueError, "does not end in .keras"),
    ("gs://bucket/run.keras", {}, ValueError, "local files only"),
    ("run.keras", {"zipped": False}, ValueError, "zipped=False saves a directory"),
    ("missing/run.keras", {}, FileNotFoundError, "does not exist"),
    ("existing.keras", {"overwrite": False}, FileExistsError, "overwrite=False"),
    ("folder.keras", {}, IsADirectoryError, "it is a directory"),
    ("run.keras", {"unknown": 1}, ValueError, "not supported"),  # Keras's own message
], ids=["h5", "no-extension", "remote", "zipped-false", "no-directory", "no-overwrite",
        "directory", "unknown-argument"])
def test_save_model_refuses_clearly(trained, tmp_path, path, kwargs, error, words):
    """What it cannot write safely raises, in plain words, and leaves the directory as it was."""
    (tmp_path / "existing.keras").write_bytes(b"kept")
    (tmp_path / "folder.keras").mkdir()
    target = path if "://" in path else tmp_path / path
    with pytest.raises(error, match=words):
        tf_kfac.save_model(trained, target, **kwargs)
    assert sorted(os.listdir(tmp_path)) == ["existing.keras", "folder.keras"]
    assert (tmp_path / "existing.keras").read_bytes() == b"kept"
    assert not os.listdir(tmp_path / "folder.keras")


def test_a_save_that_raises_leaves_the_previous_file_and_no_temporary(
        trained, tmp_path, monkeypatch):
    """An error half-way through the save: the file is the previous one, the temporary gone."""
    target = tmp_path / "run.keras"
    tf_kfac.save_model(trained, target)
    before = target.read_bytes()

    def fail(optimizer, store):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tf_kfac.KFAC, "save_own_variables", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        tf_kfac.save_model(trained, target)
    assert os.listdir(tmp_path) == ["run.keras"]
    assert target.read_bytes() == before
