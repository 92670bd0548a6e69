"""K-FAC across processes: MultiWorkerMirroredStrategy, and BackupAndRestore after a hard kill.

Every run here is a separate Python process running tests/distributed_worker.py
(which holds the data, the models and the K-FAC options), started and always
stopped by the test, with a time limit. Two things are checked:

- two worker processes on loopback ports, one CPU replica each, train to the
  same weights, factors and optimizer state as one process without a strategy
  that sees the whole global batch, with `model.fit` and in a custom loop
  (`model.fit` under MultiWorkerMirroredStrategy needs the work-around in
  tf_kfac/_keras_internals.py: Keras 3.15 fails there with any optimizer);
- a process killed with SIGKILL and started again with the same command
  resumes from Keras's `BackupAndRestore` backup with all of K-FAC's state
  (factors, inverses, step and factor/inverse counters, momentum, damping, the
  sampling seed), so it ends where an uninterrupted run over the same batches
  ends.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("distributed_worker.py")
REPO = WORKER.parent.parent
TIMEOUT = 240  # seconds, per group of processes run together
NOISE = ("I0000", "E0000", "WARNING: All", "To enable")


# ------------------------------------------------------------------ processes


def _env(tf_config: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return env


def _tail(log: Path, lines: int = 25) -> str:
    text = log.read_text(errors="replace").splitlines() if log.exists() else []
    kept = [line for line in text if not line.startswith(NOISE)]
    return f"--- {log.name} (last {lines} lines) ---\n" + "\n".join(kept[-lines:])


def _run(jobs: list[tuple[dict, dict, Path, int]]) -> None:
    """Runs the worker once per `(job, env, log, expected return code)`, all at once.

    Waits at most `TIMEOUT` seconds. As soon as one process ends with a return
    code other than the one expected (a worker whose peer died would otherwise
    wait for its collectives), or the time is up, the others are killed, and
    the assertion shows the tail of each log. Every process is gone when this
    returns or raises.
    """
    procs: list[subprocess.Popen] = []
    try:
        for job, env, log, _ in jobs:
            with open(log, "wb") as out:
                procs.append(subprocess.Popen(
                    [sys.executable, str(WORKER), json.dumps(job)], env=env, cwd=REPO,
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        deadline = time.monotonic() + TIMEOUT
        problem = None
        while problem is None and any(p.poll() is None for p in procs):
            for p, (_, _, log, expected) in zip(procs, jobs, strict=True):
                if p.returncode is not None and p.returncode != expected:
                    problem = f"{log.stem} exited with {p.returncode}, expected {expected}"
            if problem is None and time.monotonic() > deadline:
                problem = f"timed out after {TIMEOUT} s"
            time.sleep(0.05)
        for p, (_, _, log, expected) in zip(procs, jobs, strict=True):
            if problem is None and p.returncode != expected:
                problem = f"{log.stem} exited with {p.returncode}, expected {expected}"
        assert problem is None, "\n".join([problem] + [_tail(log) for _, _, log, _ in jobs])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def _free_loopback_ports(n: int) -> list[int]:
    """`n` distinct ports the system reports free on 127.0.0.1 (bound together, then closed)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture(scope="module")
def worker_module():
    """tests/distributed_worker.py as a module, to rerun its cases in this process."""
    spec = importlib.util.spec_from_file_location("kfac_distributed_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load(path: Path) -> dict:
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def _assert_same_state(actual: dict, desired: dict, rel_err, tol: float) -> None:
    """Every array within `tol` (relative), integer counters exactly equal."""
    assert sorted(actual) == sorted(desired)
    for key, want in desired.items():
        got = actual[key]
        if np.issubdtype(want.dtype, np.integer):
            np.testing.assert_array_equal(got, want, err_msg=key)
        else:
            assert rel_err(got, want) < tol, (key, rel_err(got, want))


# ------------------------------------------------ MultiWorkerMirroredStrategy

MULTIWORKER_CASES = [
    dict(name="mlp-exact", model="mlp", kfac=dict(fisher="exact")),
    dict(name="conv-empirical", model="conv", kfac=dict(fisher="empirical")),
    dict(name="mlp-exact-adaptive", model="mlp", kfac=dict(fisher="exact", adaptive=True)),
]
FIT_CASE = dict(name="fit", model="mlp", kfac=dict(fisher="exact"))


@pytest.fixture(scope="module")
def multiworker_out(tmp_path_factory) -> Path:
    """Runs a two-worker cluster on loopback ports once, for every case.

    One process per worker, each with its one CPU device, so one replica per
    worker and two in sync. Each worker writes its final state per case.
    """
    out = tmp_path_factory.mktemp("multiworker")
    job = dict(role="multiworker", cases=MULTIWORKER_CASES, fit_case=FIT_CASE, out=str(out))
    logs = [out / f"worker{i}.log" for i in range(2)]
    for attempt in range(3):
        # A port found free can be taken by another process before a worker binds it.
        cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_loopback_ports(2)]}
        try:
            _run([(job, _env({"cluster": cluster, "task": {"type": "worker", "index": i}}),
                   log, 0) for i, log in enumerate(logs)])
            return out
        except AssertionError:
            if attempt == 2 or not any("Could not start gRPC server" in log.read_text(
                    errors="replace") for log in logs):
                raise


def _check_two_workers(out: Path, name: str, single: dict, rel_err) -> None:
    """Both workers' states equal the one-device state `single`, and each other."""
    chief, other = (_load(out / f"{name}-worker{i}.npz") for i in range(2))
    for worker in (chief, other):  # one replica in each process, two in sync
        assert int(worker.pop("local_replicas")) == 1 and int(worker.pop("replicas")) == 2
    assert int(single.pop("replicas")) == 1
    _assert_same_state(chief, single, rel_err, 1e-4)
    _assert_same_state(other, chief, rel_err, 1e-6)


@pytest.mark.parametrize("case", MULTIWORKER_CASES, ids=[c["name"] for c in MULTIWORKER_CASES])
def test_two_workers_equal_one_process_with_the_global_batch(
        case, multiworker_out, worker_module, rel_err):
    """Two worker processes end with the state of one process that sees each global batch.

    A custom loop (`strategy.run(optimizer.step, ...)`) over a distributed
    `tf.data` pipeline, five steps, factor updates every two and inverse
    refreshes every three steps: each worker gets its half of every global
    batch, the loss and gradients are summed across workers, factors averaged
    at each refresh and each layer inverted on one worker. Weights, factors,
    inverses, momentum and counters must equal a run on one device with the
    whole batch, and the two workers must agree with each other.
    """
    single = worker_module.train_case(case, None)
    assert int(single["opt00:iteration"]) == worker_module.STEPS_PER_EPOCH
    initial = worker_module.build_model(case["model"]).get_weights()
    trained = [v for k, v in single.items() if k.startswith("weight")]
    assert max(np.abs(t - w).max() for t, w in zip(trained, initial, strict=True)) > 1e-3
    _check_two_workers(multiworker_out, case["name"], single, rel_err)


def test_model_fit_with_two_workers(multiworker_out, worker_module, rel_err):
    """`model.fit` on two workers ends like one process with the global batch.

    Keras splits each global batch of the NumPy arrays between the workers
    (sharding by data). The workers record the exception if `fit` raises.
    """
    errors = [multiworker_out / f"fit-worker{i}.error" for i in range(2)]
    assert not any(e.exists() for e in errors), "\n".join(
        e.read_text()[:2000] for e in errors if e.exists())
    _check_two_workers(multiworker_out, "fit", worker_module.fit_case(FIT_CASE, None), rel_err)


# ------------------------------------------------------- BackupAndRestore

RESTORE_CASES = {
    # Killed at the end of epoch 0 (step 5), after its backup.
    "after-epoch": dict(case=dict(model="mlp", kfac=dict(fisher="exact", adaptive=True)),
                        save_freq="epoch", kill_at=[0, None], reference=[[None, 3]]),
    # Killed after batch 1 of epoch 1 (step 7), after the backup every 7 batches.
    "mid-epoch": dict(case=dict(model="mlp", kfac=dict(fisher="sampled")),
                      save_freq=7, kill_at=[1, 1], reference=[[None, 1], [2, 1], [None, 2]]),
}


@pytest.fixture(scope="module")
def restore_runs(tmp_path_factory) -> dict:
    """Each case's job run until it kills itself, then the same command to the end.

    The cases run side by side (one process each): first the runs that kill
    themselves, then their restarts, which also train the reference after
    resuming. Returns, per case, its directory and what the killed run left:
    the step count at the kill and the backup's training metadata.
    """
    root = tmp_path_factory.mktemp("restore")
    jobs = {}
    for name, spec in RESTORE_CASES.items():
        out = root / name
        out.mkdir()
        backup = dict(dir=str(out / "backup"), save_freq=spec["save_freq"],
                      kill_at=spec["kill_at"], marker=str(out / "killed.json"))
        jobs[name] = dict(role="restore", case=spec["case"], backup=backup,
                          reference=spec["reference"], out=str(out))
    _run([(job, _env(), root / name / "killed.log", -signal.SIGKILL)
          for name, job in jobs.items()])
    runs = {}
    for name in jobs:
        out = root / name
        assert not (out / "resumed.npz").exists()
        runs[name] = dict(
            out=out,
            killed=json.loads((out / "killed.json").read_text())["iterations"],
            metadata=json.loads((out / "backup" / "training_metadata.json").read_text()))
    _run([(job, _env(), root / name / "restarted.log", 0) for name, job in jobs.items()])
    return runs


def _resumed_and_reference(run: dict) -> tuple[dict, dict]:
    """The restarted run's final state and the reference's, after checking the restart.

    The restarted run must have begun at the step of the backup, and finished
    (BackupAndRestore removes its backup at the end of training).
    """
    out = run["out"]
    assert not (out / "backup").exists()
    resumed, reference = _load(out / "resumed.npz"), _load(out / "reference.npz")
    assert int(resumed.pop("start_iterations")) == run["killed"]
    resumed.pop("epochs_run")
    return resumed, reference


def test_killed_after_an_epoch_resumes_to_the_uninterrupted_result(restore_runs, rel_err):
    """A process SIGKILLed right after the backup of epoch 0 ends like a run never killed.

    MirroredStrategy on two CPU replicas, three epochs of five steps. The kill
    comes after step 5: between factor updates (every 2 steps) and between
    inverse refreshes (every 3), so the restart must take the step count,
    factors, inverses and counters from the backup to make the same updates
    at the same steps. The adaptive mode adds its damping, γ, α, μ, ρ and the
    previous update to what must survive.
    """
    run = restore_runs["after-epoch"]
    assert run["killed"] == 5 and run["metadata"] == {"epoch": 1, "batch": 0}
    resumed, reference = _resumed_and_reference(run)
    assert int(reference["opt00:iteration"]) == 15
    _assert_same_state(resumed, reference, rel_err, 1e-5)


def test_killed_mid_epoch_resumes_from_the_backup_with_nothing_lost(restore_runs, rel_err):
    """A process SIGKILLed right after a mid-epoch backup keeps every step it backed up.

    `BackupAndRestore(save_freq=7)` backs up after step 7 (epoch 1, batch 1)
    and the process is killed there. Keras 3 restores that state but starts
    the interrupted epoch again from its first batch (it records the batch
    and does not use it), so the restarted run applies batches 0 and 1 of
    epoch 1 twice. The reference is one process that applies the same batches
    in the same order without interruption: epoch 0, the first two batches,
    then two full epochs, 17 steps. Equal states show that nothing done before
    the backup was lost or rolled back to the start of the epoch, including
    the sampled Fisher's draws, which depend on the seed and the step count.
    """
    run = restore_runs["mid-epoch"]
    assert run["killed"] == 7 and run["metadata"] == {"epoch": 1, "batch": 1}
    resumed, reference = _resumed_and_reference(run)
    assert int(reference["opt00:iteration"]) == 17
    _assert_same_state(resumed, reference, rel_err, 1e-5)
