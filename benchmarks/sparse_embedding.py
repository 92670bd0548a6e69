"""Step time with a large Embedding: its gradient kept row-sparse against made dense.

    python benchmarks/sparse_embedding.py              # vocab 20k and 100k, 3 repeats
    python benchmarks/sparse_embedding.py --quick      # vocab 20k, one repeat

A bag-of-words classifier, Embedding(vocab, 128) → mean over 32 positions →
Dense(64, relu) → Dense(10), batch 64 of random ids, trained with `model.fit`.
K-FAC's Embedding gradient is a `tf.IndexedSlices` of at most 64 × 32 rows:

- `kfac_m0`: momentum 0, the weights and the momentum buffer written at the rows
  seen only;
- `kfac`: the default momentum 0.5, where heavy-ball momentum writes the whole
  table and buffer (the direction is still computed on the rows seen);
- `kfac_dense_m0`, `kfac_dense`: the same with the gradient made dense first (a
  vocab × d gradient, and a vocab × d × d product in the preconditioning), which
  is how the update was computed before gradients stayed sparse;
- `adam`: Keras's Adam, side by side.

The runs alternate within one process; each figure is the median over the
repeats of the mean step after the first 5. Results go to stdout and to
benchmarks/results/sparse_embedding.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_kfac  # noqa: E402
from tf_kfac import sparse  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import StepTimer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DIM, POSITIONS, BATCH, CLASSES, WARMUP = 128, 32, 64, 10, 5


def bag_of_words(vocab: int) -> keras.Model:
    return keras.Sequential([
        keras.Input((POSITIONS,), dtype="int32"),
        keras.layers.Embedding(vocab, DIM),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(CLASSES),
    ])


class DenseGradients:
    """Within the block, every gradient is made dense before the update."""

    def __enter__(self):
        self._prepare = sparse.prepare
        sparse.prepare = lambda grads, keep: [sparse.dense(g) for g in grads]

    def __exit__(self, *exc):
        sparse.prepare = self._prepare


def mean_step(vocab: int, optimizer, steps: int) -> float:
    keras.utils.set_random_seed(0)
    model = bag_of_words(vocab)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    n = BATCH * (steps + WARMUP)
    x = rng.integers(0, vocab, size=(n, POSITIONS)).astype("int32")
    y = rng.integers(0, CLASSES, size=n)
    timer = StepTimer()
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[timer])
    return statistics.fmean(timer.times[WARMUP:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    vocabs, repeats = ((20_000,), 1) if args.quick else ((20_000, 100_000), args.repeats)
    variants = {
        "kfac_m0": (lambda: tf_kfac.KFAC(momentum=0.0), False),
        "kfac": (lambda: tf_kfac.KFAC(), False),
        "kfac_dense_m0": (lambda: tf_kfac.KFAC(momentum=0.0), True),
        "kfac_dense": (lambda: tf_kfac.KFAC(), True),
        "adam": (lambda: keras.optimizers.Adam(), False),
    }
    results = {}
    for vocab in vocabs:
        runs = {name: [] for name in variants}
        for _ in range(repeats):
            for name, (make, dense) in variants.items():
                if dense:
                    with DenseGradients():
                        runs[name].append(mean_step(vocab, make(), args.steps))
                else:
                    runs[name].append(mean_step(vocab, make(), args.steps))
        row = {name: statistics.median(times) * 1e3 for name, times in runs.items()}
        for name in variants:
            row[f"{name}_over_adam"] = row[name] / row["adam"]
        row["dense_over_sparse_m0"] = row["kfac_dense_m0"] / row["kfac_m0"]
        row["dense_over_sparse"] = row["kfac_dense"] / row["kfac"]
        results[f"vocab_{vocab}"] = row
        print(f"vocab {vocab:>7,}: " + "  ".join(
            f"{name} {row[name]:.1f} ms ({row[name + '_over_adam']:.2f}x Adam)"
            for name in variants), flush=True)
    record = {
        "command": "python benchmarks/sparse_embedding.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__,
                     "tf_kfac": tf_kfac.__version__},
        "model": f"Embedding(vocab, {DIM}) -> mean over {POSITIONS} -> Dense(64) -> "
                 f"Dense({CLASSES}), batch {BATCH}",
        "steps": args.steps, "repeats": repeats, "ms_per_step": results,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "sparse_embedding.json"
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
