"""Steps to target: EKFAC (`curvature="ekfac"`) against K-FAC, no wall clock.

    python benchmarks/ekfac_steps.py            # a few minutes on one CPU core
    python benchmarks/ekfac_steps.py --seeds 1  # quicker

Counts the optimizer steps each curvature needs to bring the training loss
(on the whole training set, checked every 5 steps) below two targets, on two
small synthetic problems, with the same initial weights and data order for
both, over a few seeds. It measures steps only: the cost of a step differs
(EKFAC's eigendecompositions and per-example projections against K-FAC's
inverses), and that needs a wall-clock measurement on an otherwise idle
machine, which this script does not make.

* `mlp`: 16-64-64-8 tanh classifier on a fixed random teacher network's
  labels, batch 64, sparse categorical cross-entropy; targets 0.1 and 0.03.
* `autoencoder`: 32-16-4-16-32 sigmoid autoencoder of low-rank binary
  patterns, batch 64, binary cross-entropy; targets 0.05 and 0.03.

Each runs with K-FAC's defaults and with `factor_update_interval=1` (EKFAC's
rescaling is then re-measured at every step). Writes
`benchmarks/results/ekfac_steps.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_kfac  # noqa: E402

MAX_STEPS = 1500
CHECK_EVERY = 5
BATCH = 64


def mlp_problem(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2048, 16)).astype("float32")
    teacher = [rng.normal(size=(16, 32)), rng.normal(size=(32, 8))]
    y = np.argmax(np.tanh(x @ teacher[0]) @ teacher[1], axis=1).astype("int32")

    def model():
        return keras.Sequential([keras.Input((16,)), keras.layers.Dense(64, "tanh"),
                                 keras.layers.Dense(64, "tanh"), keras.layers.Dense(8)])

    return x, y, model, keras.losses.SparseCategoricalCrossentropy(from_logits=True), (0.1, 0.03)


def autoencoder_problem(seed):
    rng = np.random.default_rng(seed)
    codes = rng.normal(size=(2048, 4))
    x = (codes @ rng.normal(size=(4, 32)) > 0).astype("float32")

    def model():
        return keras.Sequential([
            keras.Input((32,)), keras.layers.Dense(16, "sigmoid"), keras.layers.Dense(4),
            keras.layers.Dense(16, "sigmoid"), keras.layers.Dense(32)])

    return x, x, model, keras.losses.BinaryCrossentropy(from_logits=True), (0.05, 0.03)


PROBLEMS = {"mlp": mlp_problem, "autoencoder": autoencoder_problem}
CONFIGS = {"defaults": {}, "factor_update_interval=1": {"factor_update_interval": 1}}


def steps_to_target(problem, seed, curvature, config):
    x, y, build, loss, targets = PROBLEMS[problem](seed)
    keras.utils.set_random_seed(seed)
    model = build()
    opt = tf_kfac.KFAC(curvature=curvature, seed=seed, **CONFIGS[config])
    opt.attach(model, loss)
    step = tf.function(opt.step)
    order = np.random.default_rng(seed + 1)
    batches = len(x) // BATCH
    losses, reached = [], {t: None for t in targets}
    for i in range(MAX_STEPS):
        if i % batches == 0:
            perm = order.permutation(len(x))
        idx = perm[(i % batches) * BATCH:(i % batches + 1) * BATCH]
        step(x[idx], y[idx])
        if (i + 1) % CHECK_EVERY == 0:
            value = float(loss(y, model(x)))
            losses.append(value)
            if not np.isfinite(value):
                break
            for t in targets:
                if reached[t] is None and value <= t:
                    reached[t] = i + 1
            if reached[targets[-1]] is not None:
                break
    return [reached[t] for t in targets], losses


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    results = []
    for problem in PROBLEMS:
        for config in CONFIGS:
            for curvature in ("kfac", "ekfac"):
                for seed in range(args.seeds):
                    steps, losses = steps_to_target(problem, seed, curvature, config)
                    results.append({"problem": problem, "config": config,
                                    "curvature": curvature, "seed": seed, "steps": steps,
                                    "targets": PROBLEMS[problem](seed)[4],
                                    "final_loss": losses[-1], "min_loss": min(losses)})
                    print(results[-1], flush=True)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "ekfac_steps.json").write_text(json.dumps(results, indent=1))
    lines = ["| problem | config | curvature | steps to the first target, per seed | "
             f"to the second (— : not within {MAX_STEPS}) |", "|---|---|---|---|---|"]
    for problem in PROBLEMS:
        for config in CONFIGS:
            for curvature in ("kfac", "ekfac"):
                steps = [r["steps"] for r in results if (r["problem"], r["config"],
                         r["curvature"]) == (problem, config, curvature)]
                cells = [", ".join("—" if s[k] is None else str(s[k]) for s in steps)
                         for k in range(2)]
                lines.append(f"| {problem} | {config} | {curvature} | {cells[0]} | {cells[1]} |")
    (out / "ekfac_steps.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
