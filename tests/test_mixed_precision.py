"""K-FAC under the `mixed_float16` policy, inside Keras's `LossScaleOptimizer`.

The loss is scaled by the wrapper's dynamic scale S before the backward passes
and the gradients and statistics are unscaled in float32; a step whose scaled
gradients overflow changes nothing of K-FAC's and halves S, and S grows after
`dynamic_growth_steps` good steps, as Keras's own wrapper does around Adam.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_kfac

LSO = keras.optimizers.LossScaleOptimizer
# float16's largest finite value is 65504: inputs of 1e5 scale become inf in the
# float16 forward pass and the gradients NaN, while float32 holds them.
OVERFLOW_FACTOR = 1e5


@pytest.fixture
def mixed():
    """Sets the 'mixed_float16' policy for the test and restores float32 after it."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _dense(activation="relu"):
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation=activation),
                             keras.layers.Dense(3, activation="softmax")])


def _conv():
    return keras.Sequential([
        keras.Input((6, 6, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")])


def _data(n=32, seed=0, shape=(4,)):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *shape)).astype("float32")
    flat = x.reshape(n, -1)
    return x, (flat[:, 0] > 0).astype("int32") + (flat[:, 1] > 0).astype("int32")


def _step(model, x, y):
    """Exactly one training step on (x, y)."""
    return model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)


def _inner_state(optimizer):
    return [v.numpy().copy() for v in optimizer.variables]


def _scale_state(wrapper):
    return float(wrapper.dynamic_scale.numpy()), int(wrapper.step_counter.numpy())


def _all_factors(opt, model):
    return [np.asarray(f) for layer in model.layers if layer.weights
            for f in opt.kronecker_factors(layer)]


# ------------------------------------------------------------------ overflow
def test_an_overflowing_batch_writes_nothing_and_halves_the_scale(mixed):
    model = _dense()
    opt = tf_kfac.KFAC(seed=0, factor_update_interval=1, inverse_update_interval=1)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    wrapper = model.optimizer
    assert isinstance(wrapper, LSO) and wrapper.inner_optimizer is opt
    x, y = _data(8)
    for _ in range(3):  # Keras's initial scale 2¹⁵ may overflow at first
        _step(model, x, y)
    weights = [w.copy() for w in model.get_weights()]
    state = _inner_state(opt)
    scale, _ = _scale_state(wrapper)
    done = int(opt.iterations.numpy())
    assert done >= 1

    logs = _step(model, x * OVERFLOW_FACTOR, y).history
    # Every K-FAC variable (iterations, counters, skipped_steps, momentum, the
    # factors and inverses) and every weight is bit for bit what it was.
    for after, before in zip(model.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(after, before)
    for after, before in zip(_inner_state(opt), state, strict=True):
        np.testing.assert_array_equal(after, before)
    assert all(np.all(np.isfinite(v)) for v in _inner_state(opt))
    assert _scale_state(wrapper) == (scale / 2, 0)
    assert logs["dynamic_scale"] == [scale / 2]
    assert logs["skipped_steps"] == [0.0]

    # Training goes on: the next batches change the weights and the factors.
    factors = _all_factors(opt, model)
    for _ in range(2):
        _step(model, x, y)
    assert int(opt.iterations.numpy()) == done + 2
    assert not np.array_equal(model.get_weights()[0], weights[0])
    new_factors = _all_factors(opt, model)
    assert all(np.all(np.isfinite(f)) for f in new_factors)
    assert any(not np.array_equal(a, b) for a, b in zip(new_factors, factors, strict=True))
    assert all(f.dtype == np.float32 for f in new_factors)


def test_the_overflowing_batch_also_overflows_keras_own_loss_scaling(mixed):
    """The control for the test above: the same batch overflows Keras's own
    LossScaleOptimizer around Adam (so the skip is loss scaling's, not a bad
    batch), and at the float32 policy the batch trains K-FAC finitely."""
    model = _dense()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    x, y = _data(8)
    _step(model, x, y)
    scale, _ = _scale_state(model.optimizer)
    _step(model, x * OVERFLOW_FACTOR, y)
    assert _scale_state(model.optimizer) == (scale / 2, 0)

    keras.mixed_precision.set_global_policy("float32")
    model32 = _dense()
    opt = tf_kfac.KFAC(seed=0)
    model32.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    _step(model32, x * OVERFLOW_FACTOR, y)
    assert int(opt._kfac.state.skipped_steps.numpy()) == 0
    assert int(opt.iterations.numpy()) == 1


def test_scaled_gradients_that_overflow_are_skipped_until_the_scale_fits(mixed):
    """The forward pass is finite (so is the loss), only S times the gradients
    overflow float16: the scale halves step after step, nothing is written
    meanwhile, and once it fits the same batch trains."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
                              keras.layers.Dense(1)])
    opt = tf_kfac.KFAC(seed=0, fisher="empirical")
    model.compile(optimizer=opt, loss="mse")
    x, _ = _data(8)
    x, y = 50.0 * x, np.zeros((8, 1), "float32")
    weights = model.get_weights()
    logs = _step(model, x, y).history
    assert np.isfinite(logs["loss"][0])
    assert logs["dynamic_scale"] == [2.0**14]
    assert int(opt.iterations.numpy()) == 0
    for after, before in zip(model.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(after, before)
    for _ in range(30):
        if int(opt.iterations.numpy()) > 0:
            break
        _step(model, x, y)
    assert int(opt.iterations.numpy()) == 1
    assert 1.0 <= float(model.optimizer.dynamic_scale.numpy()) < 2.0**10
    assert not np.array_equal(model.get_weights()[0], weights[0])
    assert all(np.all(np.isfinite(f)) for f in _all_factors(opt, model))


# ----------------------------------------------------------- fixed scale
def _first_step_factors(policy, scale, x, y, weights):
    """Factors and weights after one step from `weights` under `policy`."""
    keras.mixed_precision.set_global_policy(policy)
    model = _dense("tanh")
    model.set_weights(weights)
    opt = tf_kfac.KFAC(seed=0, fisher="exact")
    optimizer = opt if scale is None else LSO(opt, initial_scale=scale,
                                                dynamic_growth_steps=10**6)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    _step(model, x, y)
    if scale is not None:
        assert _scale_state(optimizer) == (scale, 1)  # fixed: no overflow, no growth
    return _all_factors(opt, model), model.get_weights()


def test_fixed_scale_factors_match_the_float32_run(mixed, rel_err):
    """Tolerance 2e-3 (relative, Frobenius), four units of float16's roundoff
    2⁻¹¹ ≈ 4.9e-4: the inputs, pre-activations and the backward pass through
    two layers are each rounded to it (measured: 0.7e-4 to 3.8e-4). The
    control: the float32 factors of another batch differ by more than 0.1."""
    x, y = _data(16)
    keras.mixed_precision.set_global_policy("float32")
    weights = _dense("tanh").get_weights()
    factors32, _ = _first_step_factors("float32", None, x, y, weights)
    factors16, _ = _first_step_factors("mixed_float16", 2.0**12, x, y, weights)
    errors = [rel_err(f16, f32) for f16, f32 in zip(factors16, factors32, strict=True)]
    assert max(errors) < 2e-3, errors
    x2, y2 = _data(16, seed=1)
    other, _ = _first_step_factors("float32", None, x2, y2, weights)
    assert min(rel_err(f16, f) for f16, f in zip(factors16, other, strict=True)) > 5e-2


def test_the_unscaling_is_exact(mixed):
    """Powers of two scale float16 exactly: with S = 2⁴ or 2¹² the factors and
    the updated weights are bit for bit the same."""
    x, y = _data(16)
    weights = _dense("tanh").get_weights()
    factors_a, weights_a = _first_step_factors("mixed_float16", 2.0**4, x, y, weights)
    factors_b, weights_b = _first_step_factors("mixed_float16", 2.0**12, x, y, weights)
    for a, b in zip(factors_a + weights_a, factors_b + weights_b, strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------- dynamic scale
def _scale_history(inner, overflow_at, steps=9):
    model = _dense()
    wrapper = LSO(inner, initial_scale=2.0**10, dynamic_growth_steps=3)
    model.compile(optimizer=wrapper, loss="sparse_categorical_crossentropy")
    x, y = _data(8)
    history = []
    for i in range(steps):
        _step(model, x * OVERFLOW_FACTOR if i in overflow_at else x, y)
        history.append(_scale_state(wrapper))
    return history, int(inner.iterations.numpy())


def test_the_dynamic_scale_moves_as_with_keras_and_adam(mixed):
    overflow_at = {4}
    kfac, kfac_iterations = _scale_history(tf_kfac.KFAC(seed=0), overflow_at)
    adam, adam_iterations = _scale_history(keras.optimizers.Adam(), overflow_at)
    assert kfac == adam
    assert kfac_iterations == adam_iterations == 9 - len(overflow_at)
    scales = [s for s, _ in kfac]
    assert 2.0**11 in scales and scales[4] == scales[3] / 2  # grew, then halved


# ------------------------------------------------------------------ saving
def _wrapped_model():
    model = _dense()
    opt = tf_kfac.KFAC(seed=3, factor_update_interval=1, inverse_update_interval=2)
    model.compile(optimizer=LSO(opt, initial_scale=2.0**10, dynamic_growth_steps=2),
                  loss="sparse_categorical_crossentropy")
    return model


def _train_a_little(model, x, y):
    for batch in (x, x * OVERFLOW_FACTOR, x):
        _step(model, batch, y)


def test_keras_file_resumes_exactly(mixed, tmp_path):
    x, y = _data(8)
    model = _wrapped_model()
    _train_a_little(model, x, y)
    path = str(tmp_path / "mixed.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, LSO)
    assert isinstance(loaded.optimizer.inner_optimizer, tf_kfac.KFAC)
    assert _scale_state(loaded.optimizer) == _scale_state(model.optimizer)
    # One overflow halved the initial 2¹⁰ and reset the counter; one good step since.
    assert _scale_state(model.optimizer) == (2.0**10 / 2, 1)
    for a, b in zip(_inner_state(loaded.optimizer.inner_optimizer),
                    _inner_state(model.optimizer.inner_optimizer), strict=True):
        np.testing.assert_array_equal(a, b)
    for _ in range(2):
        _step(model, x, y)
        _step(loaded, x, y)
    for a, b in zip(loaded.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_inner_state(loaded.optimizer.inner_optimizer),
                    _inner_state(model.optimizer.inner_optimizer), strict=True):
        np.testing.assert_array_equal(a, b)
    assert _scale_state(loaded.optimizer) == _scale_state(model.optimizer)


def test_checkpoint_resumes_exactly(mixed, tmp_path):
    x, y = _data(8)
    model = _wrapped_model()
    _train_a_little(model, x, y)
    path = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(
        str(tmp_path / "ckpt"))

    keras.utils.set_random_seed(7)  # other initial weights, then restored
    fresh = _wrapped_model()
    fresh.optimizer.inner_optimizer.attach(fresh)
    fresh.optimizer.build(fresh.trainable_variables)
    status = tf.train.Checkpoint(model=fresh, optimizer=fresh.optimizer).restore(path)
    status.assert_existing_objects_matched()
    assert _scale_state(fresh.optimizer) == _scale_state(model.optimizer)
    for _ in range(2):
        _step(model, x, y)
        _step(fresh, x, y)
    for a, b in zip(fresh.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_inner_state(fresh.optimizer.inner_optimizer),
                    _inner_state(model.optimizer.inner_optimizer), strict=True):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------- fit
@pytest.mark.parametrize("build,shape", [(_dense, (4,)), (_conv, (6, 6, 1))],
                         ids=["dense", "conv2d"])
def test_fit_with_mixed_float16_trains(mixed, build, shape):
    model = build()
    opt = tf_kfac.KFAC(seed=0)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    assert isinstance(model.optimizer, LSO)
    assert model.layers[0].compute_dtype == "float16"
    x, y = _data(64, shape=shape)
    history = model.fit(x, y, batch_size=16, epochs=4, verbose=0).history
    assert history["loss"][-1] < 0.8 * history["loss"][0], history["loss"]
    factors = _all_factors(opt, model)
    assert all(f.dtype == np.float32 and np.all(np.isfinite(f)) for f in factors)
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())
    assert history["skipped_steps"][-1] == 0.0


@pytest.mark.parametrize("kwargs", [{"fisher": "exact"}, {"fisher": "empirical"},
                                    {"adaptive": True}],
                         ids=["exact", "empirical", "adaptive"])
def test_every_estimator_and_the_adaptive_mode_train(mixed, kwargs):
    model = _dense("tanh")
    opt = tf_kfac.KFAC(seed=0, **kwargs)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    x, y = _data(64)
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0).history
    assert history["loss"][-1] < 0.8 * history["loss"][0], history["loss"]
    assert all(np.all(np.isfinite(f)) for f in _all_factors(opt, model))


def test_a_custom_loop_scales_with_the_compiled_wrapper(mixed):
    """`attach` + `step` on the KFAC inside the model's LossScaleOptimizer use
    its scale too (building the wrapper on the first step)."""
    model = _dense("tanh")
    opt = tf_kfac.KFAC(seed=0)
    model.compile(optimizer=LSO(opt, initial_scale=2.0**8, dynamic_growth_steps=2),
                  loss="sparse_categorical_crossentropy")
    opt.attach(model, loss="sparse_categorical_crossentropy")
    step = tf.function(opt.step)
    x, y = _data(16)
    losses = [float(step(x, y)["loss"]) for _ in range(5)]
    assert model.optimizer.built
    assert _scale_state(model.optimizer) == (2.0**8 * 4, 1)  # five good steps, grown twice
    assert int(opt.iterations.numpy()) == 5
    assert losses[-1] < losses[0]
    logs = step(x * OVERFLOW_FACTOR, y)
    assert float(logs["dynamic_scale"]) == 2.0**8 * 2
    assert int(opt.iterations.numpy()) == 5


def test_two_replicas_with_loss_scaling_are_refused(mixed):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = _dense()
        model.compile(optimizer=tf_kfac.KFAC(), loss="sparse_categorical_crossentropy")
    x, y = _data(8)
    with pytest.raises(ValueError, match=r"one replica(.|\n)*mixed_bfloat16"):
        model.fit(x, y, batch_size=8, verbose=0)
