"""`compile(jit_compile=True)`: K-FAC's whole training step compiles with XLA.

With the deterministic estimators the weights equal those of the same run without XLA
within float tolerance, for Dense and Conv2D and in both modes. The sampled estimator's
draws come from XLA's own random-number kernels, which differ from TensorFlow's for the
same seed: the run is as valid, not the same, so it is checked for training to finite
state. (tf_kfac 0.1 failed at the first step: the categorical draws used an int64 seed,
for which XLA has no kernel.)
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import tf_kfac


def mlp():
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh"),
                             keras.layers.Dense(3, activation="softmax")])


def convnet():
    return keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3, activation="softmax")])


def run(build, jit, **kfac_args):
    keras.utils.set_random_seed(0)
    model = build()
    opt = tf_kfac.KFAC(seed=1, **kfac_args)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", jit_compile=jit)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, *model.input_shape[1:])).astype("float32")
    y = rng.integers(0, 3, 48)
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0, shuffle=False)
    return model.get_weights(), history.history["loss"], opt


def relative_difference(a, b):
    return max(np.linalg.norm(p - q) / np.linalg.norm(p) for p, q in zip(a, b, strict=True))


@pytest.mark.parametrize("mode", [{}, {"adaptive": True}], ids=["fixed", "adaptive"])
@pytest.mark.parametrize("build", [mlp, convnet], ids=["dense", "conv2d"])
@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_xla_gives_the_same_weights(build, mode, fisher):
    plain, _, _ = run(build, False, fisher=fisher, **mode)
    compiled, _, _ = run(build, True, fisher=fisher, **mode)
    assert relative_difference(plain, compiled) < 1e-4


@pytest.mark.parametrize("mode", [{}, {"adaptive": True}], ids=["fixed", "adaptive"])
def test_xla_with_the_sampled_fisher_trains_to_finite_state(mode):
    weights, losses, opt = run(mlp, True, **mode)
    assert losses[-1] < losses[0]
    assert all(np.all(np.isfinite(w)) for w in weights)
    assert all(np.all(np.isfinite(np.asarray(v.numpy(), np.float64))) for v in opt.variables)
    assert int(opt._kfac.state.skipped_steps.numpy()) == 0
