"""Nothing wrong, nothing lost: hyperparameters, dtype policies, inversions, saved state.

Each test here was written against a defect of tf_kfac 0.1 and failed there:
non-finite hyperparameters were accepted, a float16 layer inside a float32
model slipped past the mixed-precision check (it is now refused unless the loss
is scaled), a non-finite first inversion left a layer with the all-zero
initial inverse (and counted as done), and a `.keras` file whose optimizer
state did not match was loaded with fresh state after a Keras warning only.
"""

from __future__ import annotations

import math
import os
import zipfile

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_kfac
from tf_kfac.blocks import kronecker as block_base

FINITE_CHECKED = ["learning_rate", "momentum", "damping", "l2_reg", "kl_clip", "factor_decay",
                  "min_damping", "max_damping", "quadratic_model_fraction"]


def _mlp():
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"),
                             keras.layers.Dense(3, activation="softmax")])


def _data(n=32):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype("float32")
    return x, (x[:, 0] > 0).astype("int32") + (x[:, 1] > 0).astype("int32")


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("name", FINITE_CHECKED)
def test_non_finite_hyperparameters_are_rejected(name, value):
    with pytest.raises(ValueError, match=f"`{name}`(.|\n)*finite"):
        tf_kfac.KFAC(**{name: value})


def test_finite_hyperparameters_at_their_bounds_are_accepted():
    """The control: the same arguments with finite values in range construct fine."""
    tf_kfac.KFAC(learning_rate=1e3, momentum=0.0, damping=1e6, l2_reg=0.0, kl_clip=1e3,
                 factor_decay=0.0, min_damping=1e-12, max_damping=1e12,
                 quadratic_model_fraction=1.0)


def test_a_float16_layer_inside_a_float32_model_is_refused_without_loss_scaling():
    """The model's policy is float32, one layer's own policy is mixed_float16,
    and the optimizer is a bare KFAC: its gradients would underflow, so it is
    refused with a message naming the layer and the LossScaleOptimizer."""
    model = keras.Sequential([
        keras.Input((4,)), keras.layers.Dense(8, activation="tanh", dtype="mixed_float16"),
        keras.layers.Dense(3, activation="softmax", dtype="float32")])
    assert model.dtype_policy.name == "float32"
    model.compile(optimizer=tf_kfac.KFAC(), loss="sparse_categorical_crossentropy")
    x, y = _data(8)
    with pytest.raises(ValueError, match=r"float16(.|\n)*LossScaleOptimizer(.|\n)*dense"):
        model.fit(x, y, batch_size=4, verbose=0)


def test_a_float16_layer_trains_inside_a_loss_scale_optimizer():
    """The same model compiled with LossScaleOptimizer(KFAC()) trains, its
    factors in float32."""
    model = keras.Sequential([
        keras.Input((4,)), keras.layers.Dense(8, activation="tanh", dtype="mixed_float16"),
        keras.layers.Dense(3, activation="softmax", dtype="float32")])
    opt = tf_kfac.KFAC(seed=0)
    model.compile(optimizer=keras.optimizers.LossScaleOptimizer(opt),
                  loss="sparse_categorical_crossentropy")
    x, y = _data(32)
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    for factor in opt.kronecker_factors(model.layers[0]):
        assert factor.dtype == tf.float32 and np.all(np.isfinite(factor.numpy()))


def test_a_bfloat16_layer_is_accepted():
    """The control: a mixed_bfloat16 layer needs no loss scaling and trains."""
    model = keras.Sequential([
        keras.Input((4,)), keras.layers.Dense(8, activation="tanh", dtype="mixed_bfloat16"),
        keras.layers.Dense(3, activation="softmax", dtype="float32")])
    model.compile(optimizer=tf_kfac.KFAC(), loss="sparse_categorical_crossentropy")
    x, y = _data(8)
    model.fit(x, y, batch_size=4, verbose=0)
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())


def test_the_mixed_bfloat16_policy_trains_with_float32_factors():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = _mlp()
        opt = tf_kfac.KFAC(seed=0)
        model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
        x, y = _data(32)
        history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.layers[0].compute_dtype == "bfloat16"
    assert history.history["loss"][-1] < history.history["loss"][0]
    for layer in model.layers:
        for factor in opt.kronecker_factors(layer):
            assert factor.dtype == tf.float32
            assert np.all(np.isfinite(factor.numpy()))
    assert int(opt._kfac.state.skipped_steps.numpy()) == 0


class _FailFirstInversions:
    """Makes the first `count` calls of the damped inverses return NaN."""

    def __init__(self, count):
        self.count = count
        self.original = block_base.factored_tikhonov_inverses

    def __call__(self, a_factor, g_factor, gamma):
        a_inverse, g_inverse = self.original(a_factor, g_factor, gamma)
        if self.count > 0:
            self.count -= 1
            return a_inverse * np.nan, g_inverse
        return a_inverse, g_inverse


def test_a_non_finite_first_inversion_skips_the_step_and_is_retried(monkeypatch):
    """Never an all-zero inverse: the step is skipped, nothing is written, and the next
    step inverts again and trains every layer."""
    model = _mlp()
    opt = tf_kfac.KFAC(seed=0)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", run_eagerly=True)
    x, y = _data(16)
    layers = model.layers
    monkeypatch.setattr(block_base, "factored_tikhonov_inverses",
                        _FailFirstInversions(count=1))
    before = [layer.kernel.numpy().copy() for layer in layers]
    model.fit(x[:8], y[:8], batch_size=8, verbose=0)
    assert int(opt._kfac.state.skipped_steps.numpy()) == 1
    assert int(opt._kfac.state.inverse_updates.numpy()) == 0
    for layer, kernel in zip(layers, before, strict=True):
        np.testing.assert_array_equal(layer.kernel.numpy(), kernel)
    model.fit(x[8:], y[8:], batch_size=8, verbose=0)
    assert int(opt._kfac.state.inverse_updates.numpy()) == 1
    for layer, kernel in zip(layers, before, strict=True):
        assert not np.array_equal(layer.kernel.numpy(), kernel), layer.name
    for block in opt._blocks:
        for variable in block.state:
            assert np.all(np.isfinite(variable.numpy())), variable.path


def test_a_non_finite_later_inversion_keeps_the_previous_inverse(monkeypatch):
    """A later refresh that is not finite keeps the last finite inverses and trains on."""
    model = _mlp()
    opt = tf_kfac.KFAC(seed=0, inverse_update_interval=2)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", run_eagerly=True)
    x, y = _data(32)
    model.fit(x[:8], y[:8], batch_size=8, verbose=0)  # iteration 0: first inversion
    kept = [v.numpy().copy() for b in opt._blocks for v in b.refreshed]
    model.fit(x[8:16], y[8:16], batch_size=8, verbose=0)  # iteration 1: no refresh
    monkeypatch.setattr(block_base, "factored_tikhonov_inverses",
                        _FailFirstInversions(count=1))
    weights = model.get_weights()
    model.fit(x[16:24], y[16:24], batch_size=8, verbose=0)  # iteration 2: refresh fails
    now = [v.numpy() for b in opt._blocks for v in b.refreshed]
    assert int(opt._kfac.state.skipped_steps.numpy()) == 0
    assert any(not np.array_equal(a, b) for a, b in zip(weights, model.get_weights(),
                                                         strict=True))
    # The failed layer keeps its previous inverse; nothing non-finite is written.
    assert all(np.all(np.isfinite(v)) for v in now)
    assert np.array_equal(now[0], kept[0])


def _trained_model(tmp_path):
    model = _mlp()
    model.compile(optimizer=tf_kfac.KFAC(seed=0), loss="sparse_categorical_crossentropy")
    x, y = _data(16)
    model.fit(x, y, batch_size=8, verbose=0)
    path = tmp_path / "run.keras"
    model.save(path)
    return path


def _drop_last_optimizer_variable(path, out):
    """A copy of a .keras file whose optimizer state has one variable fewer."""
    with zipfile.ZipFile(path) as source:
        names = source.namelist()
        members = {name: source.read(name) for name in names}
    weights = out.parent / "weights.h5"
    weights.write_bytes(members["model.weights.h5"])
    with h5py.File(weights, "r+") as store:
        group = store["optimizer"]["vars"]
        del group[str(len(group.keys()) - 1)]
    members["model.weights.h5"] = weights.read_bytes()
    os.remove(weights)
    with zipfile.ZipFile(out, "w") as target:
        for name in names:
            target.writestr(name, members[name])


def test_a_keras_file_with_mismatched_optimizer_state_fails_loudly(tmp_path):
    path = _trained_model(tmp_path)
    broken = tmp_path / "broken.keras"
    _drop_last_optimizer_variable(path, broken)
    match = r"saved optimizer state has \d+ variables(.|\n)*K-FAC(.|\n)*compile=False"
    with pytest.raises(ValueError, match=match):
        keras.models.load_model(broken)


def test_a_matching_keras_file_loads_with_its_state(tmp_path):
    """The control: the unmodified file loads and keeps the optimizer's step count."""
    path = _trained_model(tmp_path)
    loaded = keras.models.load_model(path)
    assert int(loaded.optimizer.iterations.numpy()) == 2
    for block in loaded.optimizer._blocks:
        assert np.any(block.state[0].numpy() != 0)


def test_a_keras_file_loads_without_its_optimizer_with_compile_false(tmp_path):
    """The way out that the error names works."""
    path = _trained_model(tmp_path)
    broken = tmp_path / "broken.keras"
    _drop_last_optimizer_variable(path, broken)
    model = keras.models.load_model(broken, compile=False)
    assert getattr(model, "optimizer", None) is None
    np.testing.assert_allclose(model.predict(_data(4)[0], verbose=0).sum(axis=1), 1.0,
                               rtol=1e-5)
    tf.debugging.assert_all_finite(tf.constant(model.get_weights()[0]), "weights")
