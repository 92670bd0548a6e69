"""K-FAC under MirroredStrategy: step time against Adam and SGD, and the bytes each all-reduces.

    python benchmarks/distributed.py            # full run, 3 repeats (about 5 minutes)
    python benchmarks/distributed.py --quick    # smoke run, one repeat (under 3 minutes)

The CPU is split into `--replicas` logical devices (2 by default) before
TensorFlow runs anything. Two workloads, each at a fixed global batch: the
MLP 784-1000-500-250-30 at batch 1000 (MSE) and the quickstart convnet on
8x8 images at batch 256 (cross-entropy on logits), on random data of the
right shape.

Step time: `model.fit` with a callback timing every batch (wall time, and the
process's CPU time, which other load on the machine disturbs less), for K-FAC
at its defaults, Adam and SGD with momentum 0.9, each on one replica (no
strategy, and MirroredStrategy over one device, which separates the
strategy's own machinery from replication) and on MirroredStrategy over the
logical devices, at the same global batch. The first steps (tracing, first
inversions) are dropped and the rest averaged over whole inverse intervals,
so K-FAC's periodic factor updates and inverse refreshes count at their
amortised cost; each figure is the median over repeats, the optimizers and
replica counts alternating within a repeat. The logical devices share the
same cores, so the two-replica figures measure the overhead of replication
and communication, not a speedup.

Bytes: what each optimizer hands to all-reduce per replica and step, (a)
from the model's shapes and tf_kfac's design (gradients plus two floats every
step; on inverse refreshes the Kronecker factors and their inverses; empty
payloads otherwise) and (b) counted, by wrapping
`tf.distribute.ReplicaContext.all_reduce` while the step is traced (shapes,
dtypes, whether the payload's size is known only at run time) and adding an
op that records each call's payload size when it runs. The strategy's
cross-device ops (`reduce`, `batch_reduce`) are wrapped too, to confirm that
nothing else crosses. The two must agree (the script asserts it).

Results go to stdout, benchmarks/results/distributed.json and
benchmarks/results/distributed.md (with estimates for 8 replicas derived from
the counted bytes).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

if __name__ == "__main__":  # logical devices must exist before any op runs
    _parser = argparse.ArgumentParser(add_help=False)
    _parser.add_argument("--replicas", type=int, default=2)
    _REPLICAS = _parser.parse_known_args()[0].replicas
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration()] * _REPLICAS,
    )

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_kfac  # noqa: E402
from tf_kfac.distribute import inverse_owners  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import convnet, data, mlp  # noqa: E402  (the step-time benchmark's workloads)

RESULTS = Path(__file__).resolve().parent / "results"
FLOAT32 = 4
WARMUP = 5  # untimed steps at the start of every run (tracing, first inverses)


class StepTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times: list[float] = []
        self.cpu_times: list[float] = []  # the whole process: every thread, both cores

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()
        self._cpu_start = time.process_time()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._start)
        self.cpu_times.append(time.process_time() - self._cpu_start)


WORKLOADS = {
    "mlp_784-1000-500-250-30_b1000": (mlp, 1000, "mse"),
    "convnet_8x8_b256": (convnet, 256, "sparse_ce"),
}
TITLES = {
    "mlp_784-1000-500-250-30_b1000": "MLP 784-1000-500-250-30, batch 1000",
    "convnet_8x8_b256": "quickstart convnet (8×8), batch 256",
}
OPTIMIZERS = {
    "kfac": lambda: tf_kfac.KFAC(),
    "adam": lambda: keras.optimizers.Adam(),
    "sgd": lambda: keras.optimizers.SGD(momentum=0.9),
}
# Bytes are also counted for the adaptive mode (not timed: see step_time.py).
COUNTED = {**OPTIMIZERS, "kfac_adaptive": lambda: tf_kfac.KFAC(adaptive=True)}


def loss_for(loss: str):
    return "mse" if loss == "mse" else keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def fit(builder, make, strategy, x, y, batch_size, loss, callbacks=()):
    keras.utils.set_random_seed(0)
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        model = builder()
        model.compile(optimizer=make(), loss=loss_for(loss))
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0,
              callbacks=list(callbacks))
    return model


def mean_step_time(builder, make, strategy, x, y, batch_size, loss) -> tuple[float, float]:
    """Mean wall and process CPU seconds per step, over the steps after the warm-up."""
    timer = StepTimer()
    fit(builder, make, strategy, x, y, batch_size, loss, [timer])
    return statistics.fmean(timer.times[WARMUP:]), statistics.fmean(timer.cpu_times[WARMUP:])


def summarise(runs: dict, titles: dict, many: str) -> tuple[dict, dict]:
    """Medians over repeats per setting and optimizer, and the replica ratios."""
    rows = {}
    for config, per_optimizer in runs.items():
        row = {key: statistics.median(values) for key, values in per_optimizer.items()}
        row.setdefault("sgd", float("nan"))
        row["kfac_over_adam"] = row["kfac"] / row["adam"]
        rows[config] = row
    ratios = {titles[base]: {key: rows[many][key] / rows[base][key]
                             for key in ("kfac", "adam", "sgd")}
              for base in runs if base != many}
    return rows, ratios


# ----------------------------------------------------------------- design
def kronecker_dims(model: keras.Model) -> list[tuple[str, int, int]]:
    """(name, d_in, d_out) of each Dense/Conv2D layer; d_in counts the bias coordinate."""
    dims = []
    for index, layer in enumerate(model.layers):
        if isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D)) and layer.trainable:
            shape = tuple(layer.kernel.shape)
            d_in = math.prod(shape[:-1]) + int(layer.bias is not None)
            dims.append((f"{type(layer).__name__} #{index}", d_in, int(shape[-1])))
    return dims


def design_bytes(model: keras.Model, interval: int, adaptive_k: int = 2) -> dict[str, dict]:
    """Payload bytes per replica and step from the shapes, as tf_kfac is designed."""
    gradients = sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize
                    for v in model.trainable_variables)
    factors = sum(d_in * d_in + d_out * d_out for _, d_in, d_out in kronecker_dims(model))
    refresh = 2 * factors * FLOAT32  # factors (mean), then damped inverses (sum)
    first_order = {"every_step": gradients, "refresh": 0, "calls_per_step": 1}
    kfac = {"every_step": gradients + 2 * FLOAT32, "refresh": refresh, "calls_per_step": 3}
    adaptive = {"every_step": kfac["every_step"] + (adaptive_k ** 2 + 1) * FLOAT32,
                "refresh": refresh, "calls_per_step": 5}
    out = {"adam": first_order, "sgd": dict(first_order), "kfac": kfac,
           "kfac_adaptive": adaptive}
    for row in out.values():
        row["average"] = row["every_step"] + row["refresh"] / interval
    return out


# -------------------------------------------------------------- counting
class CollectiveLog:
    """Records every all-reduce made in replica context while a step is traced and run.

    Trace time: the tensors (shape, dtype) of each `ReplicaContext.all_reduce`
    call with more than one replica, and of each cross-device `reduce` /
    `batch_reduce`. Run time: each all-reduce call's payload size in bytes,
    through a `tf.py_function` that the payload depends on.
    """

    def __init__(self):
        self.calls: list[dict] = []  # one per (replica, call site) traced
        self.executed: dict[int, list[int]] = {}
        self.cross_device: list[dict] = []

    def _executed(self, call: int, nbytes) -> np.int64:
        self.executed.setdefault(call, []).append(int(nbytes.numpy()))
        return np.int64(0)

    @contextlib.contextmanager
    def installed(self):
        context_cls = tf.distribute.ReplicaContext
        ops_cls = tf.distribute.CrossDeviceOps
        originals = (context_cls.all_reduce, ops_cls.reduce, ops_cls.batch_reduce)
        log = self

        def all_reduce(context, reduce_op, value, options=None):
            flat = tf.nest.flatten(value)
            if (context.num_replicas_in_sync > 1 and tf.inside_function()
                    and all(isinstance(t, tf.Tensor) for t in flat)):
                call = len(log.calls)
                replica = tf.get_static_value(context.replica_id_in_sync_group)
                log.calls.append({
                    "call": call,
                    "replica": None if replica is None else int(replica),
                    "op": str(getattr(reduce_op, "value", reduce_op)).lower(),
                    "tensors": [describe(t) for t in flat],
                })
                sizes = [tf.size(t, out_type=tf.int64) * t.dtype.size for t in flat]
                token = tf.py_function(functools.partial(log._executed, call),
                                       [tf.add_n(sizes)], tf.int64)
                with tf.control_dependencies([token]):
                    flat = [tf.identity(t) for t in flat]
                value = tf.nest.pack_sequence_as(value, flat)
            return originals[0](context, reduce_op, value, options)

        def reduce(ops, reduce_op, per_replica_value, destinations, options=None):
            log._cross_device("reduce", [per_replica_value])
            return originals[1](ops, reduce_op, per_replica_value, destinations, options)

        def batch_reduce(ops, reduce_op, value_destination_pairs, options=None):
            log._cross_device("batch_reduce", [v for v, _ in value_destination_pairs])
            return originals[2](ops, reduce_op, value_destination_pairs, options)

        context_cls.all_reduce, ops_cls.reduce, ops_cls.batch_reduce = (
            all_reduce, reduce, batch_reduce)
        try:
            yield self
        finally:
            context_cls.all_reduce, ops_cls.reduce, ops_cls.batch_reduce = originals

    def _cross_device(self, kind: str, values) -> None:
        tensors = []
        for value in values:
            parts = getattr(value, "values", None)
            first = parts[0] if parts else value
            tensors.append({**describe(first), "replicas": len(parts) if parts else 1})
        self.cross_device.append({"kind": kind, "in_step": tf.inside_function(),
                                  "tensors": tensors})


def describe(tensor) -> dict:
    shape = tf.TensorShape(getattr(tensor, "shape", None))
    dtype = tf.as_dtype(tensor.dtype)
    static = shape.is_fully_defined()
    return {"shape": shape.as_list() if shape.rank is not None else None,
            "dtype": dtype.name,
            "bytes": shape.num_elements() * dtype.size if static else None}


def static_bytes(tensors: list[dict]) -> int:
    return sum(t["bytes"] or 0 for t in tensors)


def count_bytes(builder, make, strategy, x, y, batch_size, loss, steps) -> dict:
    """Trains `steps` steps under `strategy` with the collectives recorded; their bytes."""
    log = CollectiveLog()
    with log.installed():
        model = fit(builder, make, strategy, x[: batch_size * steps], y[: batch_size * steps],
                    batch_size, loss)
    optimizer = model.optimizer
    iterations = int(optimizer.iterations.numpy())
    state = {v.name: int(v.numpy()) for v in optimizer.variables
             if v.name in ("kfac_inverse_updates", "kfac_factor_updates")}
    replicas = strategy.num_replicas_in_sync
    ran = [c for c in log.calls if log.executed.get(c["call"])]
    assert ran, "no all-reduce was recorded at run time"
    assert iterations == steps, (iterations, steps)
    per_replica = {}
    for replica in range(replicas):
        mine = [c for c in ran if c["replica"] == replica]
        per_replica[replica] = sum(sum(log.executed[c["call"]]) for c in mine)
        assert all(len(log.executed[c["call"]]) == steps for c in mine), "retraced step?"
    assert len(set(per_replica.values())) == 1, f"replicas sent different bytes: {per_replica}"
    calls = []
    for c in (c for c in ran if c["replica"] == 0):
        sizes = log.executed[c["call"]]
        conditional = any(t["bytes"] is None for t in c["tensors"])
        nonempty = [s for s in sizes if s]
        calls.append({
            "op": c["op"],
            "tensors": c["tensors"],
            "conditional": conditional,
            "bytes_static": None if conditional else static_bytes(c["tensors"]),
            "executions": len(sizes),
            "nonempty_executions": len(nonempty),
            "bytes_when_nonempty": sorted(set(nonempty)),
        })
    every_step = sum(c["bytes_static"] for c in calls if not c["conditional"])
    conditional = [c for c in calls if c["conditional"]]
    for c in conditional:
        assert len(c["bytes_when_nonempty"]) <= 1, c
    refresh = sum(c["bytes_when_nonempty"][0] for c in conditional if c["bytes_when_nonempty"])
    refreshes = state.get("kfac_inverse_updates", 0)
    for c in conditional:
        assert c["nonempty_executions"] == refreshes, (c["nonempty_executions"], refreshes)
    total = per_replica[0]
    assert total == steps * every_step + refreshes * refresh, (total, every_step, refresh)
    in_step = [r for r in log.cross_device if r["in_step"]]
    cross_static = sum(static_bytes(r["tensors"]) for r in in_step)
    cross_dynamic = sum(t["bytes"] is None for r in in_step for t in r["tensors"])
    traced_static = sum(static_bytes(c["tensors"]) for c in log.calls if c["replica"] == 0)
    traced_dynamic = sum(t["bytes"] is None for c in log.calls if c["replica"] == 0
                         for t in c["tensors"])
    return {
        "steps": steps,
        "replicas": replicas,
        "optimizer_state": state,
        "calls_per_step": len(calls),
        "calls": calls,
        "every_step": every_step,
        "refresh": refresh,
        "refreshes": refreshes,
        "total_bytes_per_replica": total,
        "average_counted": total / steps,
        "cross_device_ops_in_step": {
            "calls": len(in_step),
            "static_bytes": cross_static,
            "dynamic_tensors": cross_dynamic,
            "matches_all_reduce": (cross_static, cross_dynamic) == (traced_static,
                                                                     traced_dynamic),
        },
        "cross_device_ops_outside_step": [r for r in log.cross_device if not r["in_step"]],
    }


# ------------------------------------------------------------- estimates
def estimates(model: keras.Model, design: dict, replicas: int = 8) -> dict:
    """Arithmetic from the counted bytes and the layer sizes, for `replicas` devices."""
    dims = kronecker_dims(model)
    costs = [float(d_in) ** 3 + float(d_out) ** 3 for _, d_in, d_out in dims]
    owners = inverse_owners(costs, replicas)
    loads = [0.0] * replicas
    for owner, cost in zip(owners, costs, strict=True):
        loads[owner] += cost
    ring = 2 * (replicas - 1) / replicas  # bytes each replica sends (and receives) per byte
    links = {"nvlink_10GBps": 10e9, "ethernet_10Gbit_1.25GBps": 1.25e9}
    kfac, adam = design["kfac"], design["adam"]
    payloads = {
        "adam_every_step": adam["every_step"],
        "kfac_normal_step": kfac["every_step"],
        "kfac_refresh_step": kfac["every_step"] + kfac["refresh"],
        "kfac_average": kfac["average"],
    }
    times = {link: {key: ring * nbytes / speed * 1e3 for key, nbytes in payloads.items()}
             for link, speed in links.items()}
    return {
        "replicas": replicas,
        "layers": [{"layer": name, "d_in": d_in, "d_out": d_out, "cost_d3": cost,
                    "owner": owner}
                   for (name, d_in, d_out), cost, owner in zip(dims, costs, owners, strict=True)],
        "replica_loads_d3": loads,
        "busiest_share": max(loads) / sum(costs),
        # A⁻¹ ∇W̄ G⁻¹ for every layer, on every replica (not split across them).
        "precondition_flop_per_replica": sum(2 * d_in * d_out * (d_in + d_out)
                                             for _, d_in, d_out in dims),
        "inverting_replicas": sum(load > 0 for load in loads),
        "ring_factor": ring,
        "payload_bytes": payloads,
        "ms_per_step_ring_allreduce": times,
    }


# ---------------------------------------------------------------- output
def mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.3f} MB" if nbytes < 1e7 else f"{nbytes / 1e6:.1f} MB"


def spread(repeats: dict) -> str:
    """The (max − min) / median of the repeats, median and largest over all settings."""
    spreads = sorted((max(v) - min(v)) / statistics.median(v)
                     for per_config in repeats.values() for per_optimizer in per_config.values()
                     for v in per_optimizer.values() if len(v) > 1)
    if not spreads:
        return "One repeat: no spread."
    return (f"Spread of the repeats, (max − min) / median: {statistics.median(spreads):.0%} "
            f"for the median setting, {spreads[-1]:.0%} at most.")


def time_table(record: dict, key: str, ratios_key: str) -> list[str]:
    lines = [spread(record[key + "_repeats"]), "",
             "| workload | replicas | K-FAC | Adam | SGD | K-FAC / Adam |",
             "|---|---|---|---|---|---|"]
    for name, rows in record[key].items():
        for config in record["configs"]:
            row = rows[config]
            lines.append(f"| {TITLES[name]} | {record['config_titles'][config]} | "
                         f"{row['kfac']:.1f} | {row['adam']:.1f} | {row['sgd']:.1f} | "
                         f"{row['kfac'] / row['adam']:.2f}× |")
        for base, ratios in record[ratios_key][name].items():
            lines.append(f"| {TITLES[name]} | {record['replicas']} / {base} | "
                         f"{ratios['kfac']:.2f}× | {ratios['adam']:.2f}× | {ratios['sgd']:.2f}× "
                         "| |")
    return lines


def markdown(record: dict) -> str:
    lines = [
        "# K-FAC under MirroredStrategy: step time and bytes per step",
        "",
        f"`{record['command']}` on {record['machine']}; TensorFlow "
        f"{record['versions']['tensorflow']}, Keras {record['versions']['keras']}, "
        f"tf_kfac {record['versions']['tf_kfac']}. {record['replicas']} logical CPU devices "
        f"({record['strategy']}); {WARMUP} untimed then {record['steps']} timed steps per run, "
        f"median of {record['repeats']} alternating repeats. Load average before / after: "
        f"{record['load_average']['before']} / {record['load_average']['after']}.",
        "",
        f"**The {record['replicas']} logical devices share the same "
        f"{os.cpu_count()} cores: the {record['replicas']}-replica figures measure the overhead "
        "of replication and communication, not a speedup.**",
        "",
        "## Step time (wall ms per step, global batch fixed)",
        "",
        *time_table(record, "ms_per_step", "replica_ratios"),
        "",
        "## CPU time per step (ms of the process's CPU time, all threads)",
        "",
        "Less sensitive to other load on the machine than wall time; with two replicas on two "
        "cores it is the total work, so its two-to-one ratio is the work replication adds. "
        "Each replica preconditions all layers' gradients (A⁻¹∇W̄G⁻¹, which does not shrink "
        "with the per-replica batch), so K-FAC's work grows more with replicas than Adam's.",
        "",
        *time_table(record, "cpu_ms_per_step", "cpu_replica_ratios"),
    ]
    lines += [
        "",
        "## Bytes all-reduced per replica and step",
        "",
        "Payload handed to all-reduce by each replica (what a ring all-reduce moves is "
        f"2(N−1)/N times this). K-FAC refreshes its inverses every "
        f"{record['inverse_update_interval']} steps; on the other steps its two refresh "
        "collectives carry an empty tensor. Average = every step + refresh / interval.",
        "",
        "| workload | Adam (= SGD) | K-FAC every step | K-FAC refresh extra | K-FAC average "
        "| K-FAC / Adam | K-FAC adaptive average | calls per step (Adam / K-FAC / adaptive) "
        "| design = counted |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, b in record["bytes"].items():
        counted = b["counted"]
        kfac_extra = counted["kfac"]["every_step"] - counted["adam"]["every_step"]
        adaptive_extra = counted["kfac_adaptive"]["every_step"] - counted["adam"]["every_step"]
        lines.append(
            f"| {TITLES[name]} | {mb(counted['adam']['every_step'])} | "
            f"{mb(counted['kfac']['every_step'])} | {mb(counted['kfac']['refresh'])} | "
            f"{mb(b['design']['kfac']['average'])} | {b['kfac_over_adam']:.3f}× | "
            f"{mb(b['design']['kfac_adaptive']['average'])} | "
            f"{counted['adam']['calls_per_step']} / {counted['kfac']['calls_per_step']} / "
            f"{counted['kfac_adaptive']['calls_per_step']} | "
            f"{'yes' if b['design_equals_counted'] else 'NO'} |")
    lines += [
        "",
        "Counted: the shapes of every `ReplicaContext.all_reduce` call traced in the step, and "
        "the payload size of each call at run time over a "
        f"{record['count_steps']}-step run "
        "(refreshes read from `kfac_inverse_updates`); the cross-device ops saw the same "
        "tensors and nothing else in the step (outside it, once per `fit`, Keras reduces one "
        "input batch to build the model and a few metric scalars). Every step K-FAC adds "
        f"{kfac_extra} bytes to Adam's gradients (the loss and the non-finite flag; the "
        f"adaptive mode {adaptive_extra}). Exact counts and each call's tensors are in "
        "`distributed.json`.",
    ]
    est = record["estimates"]
    mlp_name = "mlp_784-1000-500-250-30_b1000"
    if mlp_name in est:
        e = est[mlp_name]
        p = e["payload_bytes"]
        n = e["replicas"]
        t = e["ms_per_step_ring_allreduce"]
        nv, eth = t["nvlink_10GBps"], t["ethernet_10Gbit_1.25GBps"]
        calls = record["bytes"][mlp_name]["counted"]
        owners = ", ".join(f"{layer['layer']} ({layer['d_in']}/{layer['d_out']}) → "
                           f"{layer['owner']}" for layer in e["layers"])
        lines += [
            "",
            f"## What to expect on {n} GPUs and on several hosts (estimates)",
            "",
            "Arithmetic from the counted bytes of the MLP above, not measurements: "
            f"ring all-reduce over {n} replicas (each replica sends and receives "
            f"{e['ring_factor']:.2f}× the payload), bandwidth only, latency and overlap with "
            "compute ignored.",
            "",
            "| per step | payload | at 10 GB/s (NVLink) | at 1.25 GB/s (10 Gbit between hosts) |",
            "|---|---|---|---|",
            f"| Adam | {mb(p['adam_every_step'])} | {nv['adam_every_step']:.2f} ms | "
            f"{eth['adam_every_step']:.1f} ms |",
            f"| K-FAC, step without refresh | {mb(p['kfac_normal_step'])} | "
            f"{nv['kfac_normal_step']:.2f} ms | {eth['kfac_normal_step']:.1f} ms |",
            f"| K-FAC, refresh step | {mb(p['kfac_refresh_step'])} | "
            f"{nv['kfac_refresh_step']:.2f} ms | {eth['kfac_refresh_step']:.1f} ms |",
            f"| K-FAC, average | {mb(p['kfac_average'])} | {nv['kfac_average']:.2f} ms | "
            f"{eth['kfac_average']:.1f} ms |",
            "",
            f"- Averaged over an inverse interval K-FAC all-reduces "
            f"{p['kfac_average'] / p['adam_every_step']:.2f}× Adam's bytes; the refresh step "
            f"alone moves {p['kfac_refresh_step'] / p['adam_every_step']:.1f}× Adam's, so "
            f"with a slow link between hosts it is that one step in "
            f"{record['inverse_update_interval']} that stalls.",
            f"- Inverse work (d³ per factor) split by `inverse_owners` over {n} replicas: "
            f"{owners}. Only {e['inverting_replicas']} of {n} replicas invert anything "
            f"({len(e['layers'])} layers); the busiest carries {e['busiest_share']:.0%} of the "
            f"work, so a refresh's inversions take at best {e['busiest_share']:.0%} of their "
            f"one-device time ({1 / e['busiest_share']:.2f}× faster), however many replicas "
            "there are.",
            "- The inverses are shared by an all-reduce sum in which the non-owners send "
            "zeros, so on a ring they cost a full all-reduce of their size; an all-gather of "
            "each owner's part would move about half as many bytes.",
            f"- Every replica preconditions every layer's gradient, "
            f"{e['precondition_flop_per_replica'] / 1e9:.1f} GFLOP per step (2·d_in·d_out·"
            "(d_in + d_out) per layer), whatever the number of replicas: unlike the "
            "inversions it is not split, and unlike the forward and backward passes it does "
            "not shrink with the per-replica batch.",
            f"- Each K-FAC step makes {calls['kfac']['calls_per_step']} collective calls "
            f"against Adam's {calls['adam']['calls_per_step']} (two of them "
            "empty between refreshes): on several hosts each adds one collective's latency.",
        ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2, help="logical CPU devices")
    parser.add_argument("--steps", type=int, default=60,
                        help=f"timed steps per run, after {WARMUP} untimed ones "
                             "(a multiple of the inverse interval)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per setting")
    parser.add_argument("--count-steps", type=int, default=40,
                        help="steps of the byte-counting run (a multiple of the interval)")
    parser.add_argument("--no-one-device-mirrored", action="store_true",
                        help="do not also time MirroredStrategy over one device")
    parser.add_argument("--quick", action="store_true",
                        help="40 timed steps, one repeat, 20 counted steps; neither SGD nor "
                             "one-device MirroredStrategy timed")
    args = parser.parse_args()
    steps, repeats, count_steps = ((40, 1, 20) if args.quick
                                   else (args.steps, args.repeats, args.count_steps))
    optimizers = {k: v for k, v in OPTIMIZERS.items() if not (args.quick and k == "sgd")}
    interval = tf_kfac.KFAC().inverse_update_interval
    devices = [f"/cpu:{i}" for i in range(args.replicas)]
    load_before = [round(v, 2) for v in os.getloadavg()]
    started = time.perf_counter()

    # One strategy object over the devices for the whole process (TensorFlow
    # numbers collectives per strategy; two over the same devices can collide).
    strategy = tf.distribute.MirroredStrategy(devices)
    strategies = {"1": None}
    titles = {"1": "1 (no strategy)"}
    if not (args.quick or args.no_one_device_mirrored):
        strategies["mirrored_1"] = tf.distribute.MirroredStrategy(devices[:1])
        titles["mirrored_1"] = "1 (MirroredStrategy, 1 device)"
    strategies[str(args.replicas)] = strategy
    titles[str(args.replicas)] = f"{args.replicas} (MirroredStrategy, {args.replicas} devices)"
    ops = getattr(strategy.extended, "_cross_device_ops", None) or getattr(
        strategy.extended, "_inferred_cross_device_ops", None)

    timings, cpu_timings, byte_counts, estimate = {}, {}, {}, {}
    many = str(args.replicas)
    for name, (builder, batch, loss) in WORKLOADS.items():
        x, y = data(builder, batch, steps + WARMUP, loss)
        runs = {config: {key: [] for key in optimizers} for config in strategies}
        cpu_runs = {config: {key: [] for key in optimizers} for config in strategies}
        for _ in range(repeats):
            for key, make in optimizers.items():
                for config, strat in strategies.items():
                    wall, cpu = mean_step_time(builder, make, strat, x, y, batch, loss)
                    runs[config][key].append(wall * 1e3)
                    cpu_runs[config][key].append(cpu * 1e3)
        for label, table, out in (("wall", runs, timings), ("cpu", cpu_runs, cpu_timings)):
            rows, ratios = summarise(table, titles, many)
            out[name] = {"median": rows, "repeats": table, "ratios": ratios}
            for config, row in rows.items():
                print(f"{name:30s} {label:4s} {titles[config]:34s} K-FAC {row['kfac']:6.1f} ms  "
                      f"Adam {row['adam']:6.1f} ms  SGD {row['sgd']:6.1f} ms  "
                      f"K-FAC/Adam {row['kfac_over_adam']:.2f}x", flush=True)
            for base, ratio in ratios.items():
                print(f"{name:30s} {label:4s} {many} / {base}: " + "  ".join(
                    f"{k} {v:.2f}x" for k, v in ratio.items()), flush=True)

        counted = {key: count_bytes(builder, make, strategy, x, y, batch, loss, count_steps)
                   for key, make in COUNTED.items()}
        design = design_bytes(builder(), interval)
        agree = True
        for key in COUNTED:
            c, d = counted[key], design[key]
            c["average"] = c["every_step"] + c["refresh"] / interval
            same = (c["every_step"], c["refresh"], c["calls_per_step"]) == (
                d["every_step"], d["refresh"], d["calls_per_step"])
            agree = agree and same and c["cross_device_ops_in_step"]["matches_all_reduce"]
            print(f"{name:30s} {key:14s} bytes/step per replica: every step "
                  f"{c['every_step']:>10,} (design {d['every_step']:>10,})  refresh "
                  f"{c['refresh']:>10,} (design {d['refresh']:>10,})  average "
                  f"{c['average']:>12,.1f} (design {d['average']:>12,.1f}, "
                  f"counted over {count_steps} steps {c['average_counted']:>12,.1f})  "
                  f"calls {c['calls_per_step']}", flush=True)
        kfac_over_adam = design["kfac"]["average"] / design["adam"]["average"]
        print(f"{name:30s} K-FAC/Adam bytes per step {kfac_over_adam:.3f}x; design and "
              f"counted {'agree' if agree else 'DISAGREE'}", flush=True)
        byte_counts[name] = {"design": design, "counted": counted,
                             "kfac_over_adam": kfac_over_adam, "design_equals_counted": agree}
        estimate[name] = estimates(builder(), design)
        assert agree, f"design and counted bytes differ for {name}"

    elapsed = time.perf_counter() - started
    record = {
        "command": " ".join(["python benchmarks/distributed.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__,
                     "tf_kfac": tf_kfac.__version__},
        "note": (f"{args.replicas} logical CPU devices share the same {os.cpu_count()} cores: "
                 "the multi-replica step times measure overhead, not speedup."),
        "replicas": args.replicas,
        "strategy": f"MirroredStrategy({devices}), cross-device ops "
                    f"{type(ops).__name__ if ops is not None else 'default'}",
        "configs": list(strategies),
        "config_titles": titles,
        "steps": steps,
        "warmup_steps": WARMUP,
        "repeats": repeats,
        "count_steps": count_steps,
        "inverse_update_interval": interval,
        "kfac_defaults": tf_kfac.KFAC().get_config(),
        "ms_per_step": {name: t["median"] for name, t in timings.items()},
        "ms_per_step_repeats": {name: t["repeats"] for name, t in timings.items()},
        "replica_ratios": {name: t["ratios"] for name, t in timings.items()},
        "cpu_ms_per_step": {name: t["median"] for name, t in cpu_timings.items()},
        "cpu_ms_per_step_repeats": {name: t["repeats"] for name, t in cpu_timings.items()},
        "cpu_replica_ratios": {name: t["ratios"] for name, t in cpu_timings.items()},
        "bytes": byte_counts,
        "estimates": estimate,
        "load_average": {"before": load_before, "after": [round(v, 2) for v in os.getloadavg()]},
        "wall_seconds": round(elapsed, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distributed.json").write_text(json.dumps(record, indent=2, default=str))
    (RESULTS / "distributed.md").write_text(markdown(record))
    print(markdown(record))
    print(f"wrote {RESULTS / 'distributed.json'} and distributed.md ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
