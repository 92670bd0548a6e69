"""Why the normalisation blocks keep a 2×2 (γᵢ, βᵢ) block per unit rather than a diagonal.

    python benchmarks/norm_structure.py

Trains the untuned suite's transformer (100 steps) and the coverage benchmark's
MobileNet-like net (16 steps) with `tf_kfac.KFAC()`, then prints, for every
LayerNormalization and BatchNormalization, the correlation |F₁₂| / √(F₁₁F₂₂) between
each unit's γ and β in its Fisher block: near 0 a diagonal would do; far from 0 it
would drop curvature the 2×2 block keeps.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import keras  # noqa: E402
import layer_coverage  # noqa: E402
import numpy as np  # noqa: E402
import suite_problems  # noqa: E402

import tf_kfac  # noqa: E402


def report(name, model, x, y, loss, steps) -> None:
    opt = tf_kfac.KFAC(seed=0)
    model.compile(optimizer=opt, loss=loss)
    model.fit(x, y, batch_size=64, epochs=1, steps_per_epoch=steps, verbose=0)
    for layer in model.layers:
        if isinstance(layer, (keras.layers.LayerNormalization, keras.layers.BatchNormalization)):
            (f,) = (t.numpy() for t in opt.kronecker_factors(layer))
            corr = np.abs(f[:, 0, 1]) / np.sqrt(f[:, 0, 0] * f[:, 1, 1] + 1e-30)
            print(f"{name:16s} {layer.name:24s} |corr(γ, β)| median {np.median(corr):.2f}, "
                  f"90th percentile {np.percentile(corr, 90):.2f}, max {corr.max():.2f}")


def main() -> None:
    keras.utils.set_random_seed(0)
    (x, y), _ = suite_problems.order_task(0)
    report("transformer", suite_problems.transformer_model(24), x, y,
           keras.losses.SparseCategoricalCrossentropy(from_logits=True), 100)
    keras.utils.set_random_seed(0)
    model, x, y = layer_coverage.mobilenet_like(0)
    report("mobilenet_like", model, x, y, "sparse_categorical_crossentropy", 16)


if __name__ == "__main__":
    main()
