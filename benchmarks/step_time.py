"""Median time per training step of K-FAC against Keras's Adam, measured side by side.

    python benchmarks/step_time.py               # all workloads, 3 repeats
    python benchmarks/step_time.py --quick       # fewer steps, one repeat
    python benchmarks/step_time.py --device gpu --jit   # on a GPU, with XLA

`--device auto` (the default) runs on the GPU when TensorFlow sees one, else on
the CPU; `--device gpu` fails with a clear message where there is none. The
script is the same on both, so figures taken on a GPU compare with these.

Each workload is trained with `model.fit` on random data of the right shape;
a callback records the wall time of every batch. The first steps (tracing,
the first inverses) are dropped; the mean over the rest is the amortised cost
per step with K-FAC's factor and inverse refreshes included, and the median
and the max show how evenly that cost is spread. Also reported: each
optimizer's state in bytes, and the process's peak resident memory.
The optimizers alternate within one run (K-FAC, Adam, K-FAC, Adam, ...) so
that machine noise hits all alike; each figure is the median over repeats of
that mean, and the ratio of those is what to read.
Results go to stdout and to benchmarks/results/step_time.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_kfac  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite_problems  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class StepTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times: list[float] = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._start)


def mlp() -> keras.Model:
    """The encoder half of the paper's MNIST autoencoder: 784-1000-500-250-30."""
    return keras.Sequential(
        [keras.Input((784,))]
        + [keras.layers.Dense(n, activation="sigmoid") for n in (1000, 500, 250)]
        + [keras.layers.Dense(30)]
    )


def convnet() -> keras.Model:
    """The quickstart's convnet on 8×8 single-channel images."""
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


def transformer() -> keras.Model:
    """The untuned suite's transformer: 2 post-norm encoder blocks, d = 64, 4 heads."""
    return suite_problems.transformer_model(n_classes=24)


def autoencoder() -> keras.Model:
    """The MNIST deep autoencoder 784-1000-500-250-30-250-500-1000-784 (Keras defaults)."""
    return keras.Sequential(
        [keras.Input((784,))]
        + [keras.layers.Dense(n, activation="sigmoid") for n in (1000, 500, 250)]
        + [keras.layers.Dense(30)]
        + [keras.layers.Dense(n, activation="sigmoid") for n in (250, 500, 1000)]
        + [keras.layers.Dense(784)]
    )


WORKLOADS = {
    "mlp_784-1000-500-250-30_b256": (mlp, 256, "mse"),
    "mlp_784-1000-500-250-30_b1000": (mlp, 1000, "mse"),
    "autoencoder_b1000": (autoencoder, 1000, "mse"),
    "quickstart_convnet_b64": (convnet, 64, "sparse_ce"),
    "suite_transformer_b64": (transformer, 64, "sparse_ce"),
}


def data(builder, batch_size: int, steps: int, loss: str):
    rng = np.random.default_rng(0)
    model = builder()
    n = batch_size * steps
    if "int" in str(model.inputs[0].dtype):  # token ids
        x = rng.integers(0, suite_problems.VOCAB, size=(n, *model.input_shape[1:]))
    else:
        x = rng.normal(size=(n, *model.input_shape[1:])).astype("float32")
    if loss == "mse":
        y = rng.normal(size=(n, model.output_shape[-1])).astype("float32")
    else:
        y = rng.integers(0, model.output_shape[-1], size=n)
    return x, y


JIT_COMPILE = {"value": "auto"}  # set from --jit


def state_bytes(optimizer) -> int:
    """Bytes of the optimizer's own variables (K-FAC: factors, inverses, momentum, counters)."""
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in optimizer.variables)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_run(builder, optimizer, batch_size, steps, loss, warmup) -> dict[str, float]:
    """One `fit` run: the mean, median and max step after `warmup`, in seconds, and the
    optimizer's state in bytes."""
    keras.utils.set_random_seed(0)
    model = builder()
    loss_fn = (
        "mse" if loss == "mse" else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    model.compile(optimizer=optimizer, loss=loss_fn, jit_compile=JIT_COMPILE["value"])
    x, y = data(builder, batch_size, steps, loss)
    timer = StepTimer()
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0, callbacks=[timer])
    times = timer.times[warmup:]
    return {"mean": statistics.fmean(times), "median": statistics.median(times),
            "max": max(times), "state_bytes": state_bytes(model.optimizer)}


def time_steps(builder, optimizer, batch_size, steps, loss, warmup) -> float:
    return timed_run(builder, optimizer, batch_size, steps, loss, warmup)["mean"]


NEVER = 10**9  # an interval no benchmark reaches


def breakdown(steps: int, repeats: int, workload: str) -> dict[str, float]:
    """Where K-FAC's time goes on a workload, by switching parts off.

    Each variant skips one part of the default step; differences of medians
    attribute the time (the parts are not perfectly additive).
    """
    builder, batch, loss = WORKLOADS[workload]
    variants = {
        "adam": lambda: keras.optimizers.Adam(),
        "kfac (defaults)": lambda: tf_kfac.KFAC(),
        "no inversions": lambda: tf_kfac.KFAC(inverse_update_interval=NEVER),
        "no sampled backward (empirical)": lambda: tf_kfac.KFAC(fisher="empirical"),
        "no statistics, no inversions": lambda: tf_kfac.KFAC(
            factor_update_interval=NEVER, inverse_update_interval=NEVER),
        "kfac, factors every 5 steps": lambda: tf_kfac.KFAC(factor_update_interval=5),
        "kfac adaptive": lambda: tf_kfac.KFAC(adaptive=True),
    }
    medians = {key: [] for key in variants}
    for _ in range(repeats):
        for key, make in variants.items():
            medians[key].append(time_steps(builder, make(), batch, steps + 5, loss, 5))
    result = {key: statistics.median(v) * 1e3 for key, v in medians.items()}
    for key, value in result.items():
        print(f"  {key:34s} {value:7.1f} ms  ({value / result['adam']:.2f}x Adam)", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=85,
                        help="steps per timed run (the first 5 are not timed)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per optimizer")
    parser.add_argument("--quick", action="store_true", help="45 steps, one repeat")
    parser.add_argument("--only", default=None, help="substring of the workloads to run")
    parser.add_argument("--breakdown", action="store_true",
                        help="also attribute K-FAC's time to its parts, on the batch-1000 MLP "
                             "or the one workload --only names")
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                        help="where to run (auto: the GPU when there is one)")
    parser.add_argument("--jit", action="store_true", help="compile(jit_compile=True): XLA")
    args = parser.parse_args()
    gpus = tf.config.list_physical_devices("GPU")
    if args.device == "gpu" and not gpus:
        parser.error("--device gpu: TensorFlow sees no GPU on this machine")
    device = "/GPU:0" if args.device == "gpu" or (args.device == "auto" and gpus) else "/CPU:0"
    if args.jit:
        JIT_COMPILE["value"] = True
    print(f"device {device}, jit_compile={JIT_COMPILE['value']}", flush=True)
    with tf.device(device):
        run(args, device)


def run(args, device: str) -> None:
    steps, repeats = (45, 1) if args.quick else (args.steps, args.repeats)
    warmup = 5

    optimizers = {
        "kfac": lambda: tf_kfac.KFAC(),
        "kfac_adaptive": lambda: tf_kfac.KFAC(adaptive=True),
        "adam": lambda: keras.optimizers.Adam(),
        "sgd": lambda: keras.optimizers.SGD(momentum=0.9),
        "muon": lambda: keras.optimizers.Muon(),
    }
    results = {}
    for name, (builder, batch, loss) in WORKLOADS.items():
        if args.only and args.only not in name:
            continue
        runs = {key: [] for key in optimizers}
        for _ in range(repeats):
            for key, make in optimizers.items():
                runs[key].append(timed_run(builder, make(), batch, steps + warmup, loss,
                                           warmup))
        row = {}
        for key, values in runs.items():  # medians over the repeats, in ms
            for part in ("mean", "median", "max"):
                row[f"{key}_{part}" if part != "mean" else key] = statistics.median(
                    v[part] for v in values) * 1e3
            row[f"{key}_state_bytes"] = values[0]["state_bytes"]
        for key in ("kfac", "kfac_adaptive"):
            row[f"{key}_over_adam"] = row[key] / row["adam"]
            row[f"{key}_max_over_median"] = row[f"{key}_max"] / row[f"{key}_median"]
        row["kfac_over_sgd"] = row["kfac"] / row["sgd"]
        row["kfac_over_muon"] = row["kfac"] / row["muon"]
        row["kfac_state_over_adam"] = row["kfac_state_bytes"] / row["adam_state_bytes"]
        results[name] = row
        print(
            f"{name:32s} K-FAC {row['kfac']:7.1f} ms (median {row['kfac_median']:.1f}, max "
            f"{row['kfac_max']:.1f})  adaptive {row['kfac_adaptive']:7.1f} ms  "
            f"Adam {row['adam']:6.1f}  SGD {row['sgd']:6.1f}  Muon {row['muon']:6.1f} ms  "
            f"K-FAC/Adam {row['kfac_over_adam']:4.2f}x  "
            f"adaptive/Adam {row['kfac_adaptive_over_adam']:4.2f}x  "
            f"state {row['kfac_state_over_adam']:.1f}x Adam's",
            flush=True,
        )
    parts = None
    if args.breakdown:
        chosen = [name for name in results if args.only] or ["mlp_784-1000-500-250-30_b1000"]
        # The breakdown's own variants include Adam, side by side.
        print(f"where the time goes ({chosen[0]}):", flush=True)
        parts = breakdown(steps, repeats, chosen[0])
    record = {
        "command": "python benchmarks/step_time.py " + " ".join(sys.argv[1:]),
        "breakdown_ms_per_step": parts,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "device": device,
        "jit_compile": JIT_COMPILE["value"],
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__,
                     "tf_kfac": tf_kfac.__version__},
        "kfac_defaults": tf_kfac.KFAC().get_config(),
        "steps": steps,
        "repeats": repeats,
        "ms_per_step": results,
        "peak_rss_mb": peak_rss_mb(),
    }
    RESULTS.mkdir(exist_ok=True)
    suffix = ("_gpu" if "GPU" in device else "") + ("_xla" if args.jit else "")
    suffix += f"_{args.only}" if args.only else ""
    out = RESULTS / f"step_time{suffix}.json"
    out.write_text(json.dumps(record, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
