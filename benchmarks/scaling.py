"""Step time and refresh time against layer width: where the d³ refresh starts to dominate.

    python benchmarks/scaling.py                       # d = 256 … 4096, batch 256
    python benchmarks/scaling.py --widths 256 512 --repeats 1
    python benchmarks/scaling.py --device gpu          # the same on a GPU

For each width d, an MLP d → d → d → d → 10 (three tanh Dense(d) layers and a
classifier head, Keras's default initialisers) is trained with `model.fit` on
random data, K-FAC at its defaults against Keras's Adam, side by side in one
process. Reported per width:

- the mean, median and max step of each, after the first refresh of every layer
  (steps 0-4 are dropped, and the steps run over two inverse intervals);
- `refresh_ms`: one Dense(d) layer's refresh on its own, the damped inverses of
  its (d+1)×(d+1) A and d×d G in one compiled function (median of 5 runs);
- `all_layers_refresh_ms`: every layer's refresh (the head's too, measured the
  same way), what a step would pay if all
  layers refreshed together (before staggering, every `inverse_update_interval`
  steps);
- `refresh_share`: the refreshes' share of K-FAC's mean step, amortised
  (all layers' refresh / interval / mean step).

With staggering each layer refreshes on its own step of the interval, so the
max step carries one layer's refresh, not all of them: compare `kfac_max` with
`kfac_median + all_layers_refresh_ms`. Results go to stdout and to
benchmarks/results/scaling.json (or scaling_gpu.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_kfac  # noqa: E402
from tf_kfac.linalg import damped_inverse  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import StepTimer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEPTH, CLASSES, WARMUP = 3, 10, 5


def mlp(width: int) -> keras.Model:
    return keras.Sequential(
        [keras.Input((width,))]
        + [keras.layers.Dense(width, activation="tanh") for _ in range(DEPTH)]
        + [keras.layers.Dense(CLASSES)])


def step_times(width: int, optimizer, batch: int, steps: int) -> dict[str, float]:
    keras.utils.set_random_seed(0)
    model = mlp(width)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * steps, width)).astype("float32")
    y = rng.integers(0, CLASSES, size=batch * steps)
    timer = StepTimer()
    model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0, callbacks=[timer])
    times = timer.times[WARMUP:]
    return {"mean": statistics.fmean(times) * 1e3, "median": statistics.median(times) * 1e3,
            "max": max(times) * 1e3}


def refresh_ms(inputs: int, outputs: int) -> float:
    """One Dense layer's refresh: (A + πγI)⁻¹ of (inputs+1)² and (G + γ/π I)⁻¹ of outputs²."""
    rng = np.random.default_rng(0)
    factors = []
    for size in (inputs + 1, outputs):
        m = rng.normal(size=(size, 2 * size)).astype("float32")
        factors.append(tf.constant(m @ m.T / (2 * size)))

    @tf.function
    def refresh(a, g):
        return damped_inverse(a, 1e-2), damped_inverse(g, 1e-2)

    refresh(*factors)  # trace and warm up
    times = []
    for _ in range(5):
        start = time.perf_counter()
        _ = [t.numpy() for t in refresh(*factors)]
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs per optimizer")
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    args = parser.parse_args()
    gpus = tf.config.list_physical_devices("GPU")
    if args.device == "gpu" and not gpus:
        parser.error("--device gpu: TensorFlow sees no GPU on this machine")
    device = "/GPU:0" if args.device == "gpu" or (args.device == "auto" and gpus) else "/CPU:0"
    interval = tf_kfac.KFAC().inverse_update_interval
    steps = WARMUP + 2 * interval
    rows = {}
    with tf.device(device):
        for width in args.widths:
            runs = {"kfac": [], "adam": []}
            for _ in range(args.repeats):
                runs["kfac"].append(step_times(width, tf_kfac.KFAC(), args.batch, steps))
                runs["adam"].append(step_times(width, keras.optimizers.Adam(), args.batch, steps))
            row = {f"{key}_{part}": statistics.median(r[part] for r in values)
                   for key, values in runs.items() for part in ("mean", "median", "max")}
            row["refresh_ms"] = refresh_ms(width, width)
            row["all_layers_refresh_ms"] = (DEPTH * row["refresh_ms"]
                                            + refresh_ms(width, CLASSES))
            row["refresh_share"] = row["all_layers_refresh_ms"] / interval / row["kfac_mean"]
            row["kfac_over_adam"] = row["kfac_mean"] / row["adam_mean"]
            row["kfac_max_over_median"] = row["kfac_max"] / row["kfac_median"]
            rows[str(width)] = row
            print(f"d={width:5d}  Adam {row['adam_mean']:8.1f} ms  K-FAC mean "
                  f"{row['kfac_mean']:8.1f} (median {row['kfac_median']:.1f}, max "
                  f"{row['kfac_max']:.1f}) = {row['kfac_over_adam']:.2f}x Adam  one layer's "
                  f"refresh {row['refresh_ms']:.1f} ms, all layers "
                  f"{row['all_layers_refresh_ms']:.1f} ms ({100 * row['refresh_share']:.1f}% of "
                  f"the mean step amortised)", flush=True)
    record = {
        "command": "python benchmarks/scaling.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "device": device,
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__,
                     "tf_kfac": tf_kfac.__version__},
        "model": f"{DEPTH} x Dense(d, tanh) + Dense({CLASSES}), batch {args.batch}",
        "inverse_update_interval": interval, "steps": steps, "repeats": args.repeats,
        "ms": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("scaling_gpu.json" if "GPU" in device else "scaling.json")
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
