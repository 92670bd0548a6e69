"""Does a step that blows the network up slow the steps after it? Step time before and after.

    python benchmarks/bad_step.py --data-dir path/to/mnist     # or MNIST from tensorflow_datasets
    python benchmarks/bad_step.py --steps 120 --repeats 1

The untuned suite's Keras-default MNIST autoencoder (batch 1000) is trained with
`model.fit` twice, alternating: K-FAC at its defaults (healthy), and with
`damping=1e-6, kl_clip=None`, which blows the activations up within the first
steps (the loss jumps by orders of magnitude and the sigmoids saturate). For
each run the median step over the steps before the blow-up (the first loss
above 10× the first step's) and after it are reported, with the healthy run's
medians over the same steps, and the number of subnormal float32 values
(0 < |x| < 2⁻¹²⁶, which some CPUs compute slowly) in the weights and the
optimizer state at the end. Results go to stdout and to
benchmarks/results/bad_step.json.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite_problems  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SMALLEST_NORMAL = np.finfo(np.float32).tiny
VARIANTS = {
    "healthy (defaults)": {},
    "blown up (damping=1e-6, kl_clip=None)": {"damping": 1e-6, "kl_clip": None},
}


class Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times, self.losses = [], []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._start)
        self.losses.append(float(logs["loss"]))


def subnormals(variables) -> int:
    count = 0
    for v in variables:
        if v.dtype != "float32":
            continue
        a = np.abs(v.numpy())
        count += int(((a > 0) & (a < SMALLEST_NORMAL)).sum())
    return count


def run(settings: dict, steps: int, data_dir: str | None) -> dict:
    keras.utils.set_random_seed(0)
    problem = suite_problems.BUILDERS["autoencoder"](seed=0, data_dir=data_dir)
    model = problem.model
    model.compile(optimizer=tf_kfac.KFAC(seed=0, **settings), **problem.compile_kwargs)
    recorder = Recorder()
    model.fit(problem.data, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=[recorder])
    return {"times": recorder.times, "losses": recorder.losses,
            "subnormal_weights": subnormals(model.weights),
            "subnormal_optimizer_state": subnormals(model.optimizer.variables)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="MNIST IDX files (default: tfds)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per variant")
    args = parser.parse_args()
    runs = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, settings in VARIANTS.items():
            runs[name].append(run(settings, args.steps, args.data_dir))
    blown = runs["blown up (damping=1e-6, kl_clip=None)"]
    first = blown[0]["losses"][0]
    at = next((i for i, loss in enumerate(blown[0]["losses"]) if not loss < 10 * first), None)
    if at is None:
        print("the blown-up variant did not blow up in this run; nothing to compare")
        return
    start = max(at + 5, 10)  # past the blow-up and the first refreshes
    rows = {}
    for name, results in runs.items():
        before = statistics.median(statistics.median(r["times"][5:at]) for r in results) \
            if at > 6 else None
        after = statistics.median(statistics.median(r["times"][start:]) for r in results)
        rows[name] = {
            "median_step_ms_before": None if before is None else before * 1e3,
            "median_step_ms_after": after * 1e3,
            "final_loss": statistics.median(r["losses"][-1] for r in results),
            "subnormal_weights": max(r["subnormal_weights"] for r in results),
            "subnormal_optimizer_state": max(r["subnormal_optimizer_state"] for r in results),
        }
        row = rows[name]
        print(f"{name:40s} median step after step {start}: {row['median_step_ms_after']:.1f} ms"
              f"  final loss {row['final_loss']:.4g}  subnormal values: weights "
              f"{row['subnormal_weights']}, optimizer state {row['subnormal_optimizer_state']}",
              flush=True)
    healthy = rows["healthy (defaults)"]["median_step_ms_after"]
    ratio = rows["blown up (damping=1e-6, kl_clip=None)"]["median_step_ms_after"] / healthy
    print(f"blow-up at step {at}; blown-up / healthy median step after it: {ratio:.2f}x")
    record = {
        "command": "python benchmarks/bad_step.py " + " ".join(
            a if not a.startswith("/") else "DIR" for a in sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__,
                     "tf_kfac": tf_kfac.__version__},
        "steps": args.steps, "repeats": args.repeats, "blow_up_step": at,
        "compared_from_step": start, "blown_over_healthy": ratio, "variants": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bad_step.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {RESULTS / 'bad_step.json'}")


if __name__ == "__main__":
    main()
