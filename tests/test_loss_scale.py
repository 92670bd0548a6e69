"""The loss's scale: every Keras form of it reaches the Fisher, and nothing else depends on it.

Multiplying the objective by a constant c > 0 (a loss weight, the `"sum"`
reduction instead of the mean, ...) multiplies the gradient and the Fisher by
c, so the natural-gradient step F⁻¹∇ is unchanged. K-FAC's damping, KL-clip
bound and the adaptive mode's λ are relative to the curvature's scale, so the
whole trajectory is unchanged too (tested here to float tolerance), and G is
c times the unscaled one.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_kfac

BATCH = 32
SCALES = {"1/784": 1.0 / 784.0, "784": 784.0}


def make_data(rng):
    x = rng.normal(size=(2 * BATCH, 6)).astype("float32")
    y = (rng.uniform(size=(2 * BATCH, 4)) < 0.5).astype("float32")
    return x, y


def make_model():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, activation="sigmoid")(inputs)
    hidden = keras.layers.LayerNormalization()(hidden)  # first-order fallback variables
    hidden = keras.layers.Dense(8, activation="tanh")(hidden)
    return keras.Model(inputs, keras.layers.Dense(4, name="logits")(hidden))


def train(x, y, *, loss_weights=None, reduction="sum_over_batch_size", steps=20,
          factor_interval=None, **kfac_args):
    """Weights, A and G of every Dense layer after `steps` steps of model.fit."""
    model = make_model()
    loss = keras.losses.BinaryCrossentropy(from_logits=True, reduction=reduction)
    settings = dict(seed=11, **kfac_args)
    if factor_interval is not None:
        settings.update(factor_update_interval=factor_interval)
    opt = tf_kfac.KFAC(**settings)
    model.compile(optimizer=opt, loss=loss, loss_weights=loss_weights)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).repeat()
    model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    factors = [tuple(np.asarray(t, np.float64) for t in opt.kronecker_factors(layer))
               for layer in dense]
    return [np.asarray(w, np.float64) for w in model.get_weights()], factors, opt


def weight_error(weights, reference):
    return max(np.linalg.norm(w - r) / np.linalg.norm(r)
               for w, r in zip(weights, reference, strict=True) if np.linalg.norm(r) > 0)


MODES = {
    "fixed": {},
    "adaptive": {"adaptive": True},
    "ekfac": {"curvature": "ekfac", "factor_update_interval": 2, "inverse_update_interval": 6},
}
ESTIMATORS = ["sampled", "exact", "empirical"]
_REFERENCE: dict = {}


def reference(mode, fisher, x, y):
    key = (mode, fisher)
    if key not in _REFERENCE:
        _REFERENCE[key] = train(x, y, fisher=fisher, **MODES[mode])
    return _REFERENCE[key]


def assert_same_run(run, ref, c, rel_tol=1e-4):
    weights, factors, _ = run
    ref_weights, ref_factors, _ = ref
    assert weight_error(weights, ref_weights) < rel_tol
    for (a, g), (a_ref, g_ref) in zip(factors, ref_factors, strict=True):
        assert np.linalg.norm(a - a_ref) <= 1e-5 * np.linalg.norm(a_ref)
        assert np.linalg.norm(g / c - g_ref) <= 1e-4 * np.linalg.norm(g_ref)


@pytest.mark.parametrize("fisher", ESTIMATORS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("scale", list(SCALES) + ["sum"])
def test_trajectory_is_invariant_to_the_loss_scale(scale, mode, fisher, rng):
    """20 steps with the objective × c: same weights, same A, G × c."""
    x, y = make_data(rng)
    ref = reference(mode, fisher, x, y)
    if scale == "sum":
        run = train(x, y, reduction="sum", fisher=fisher, **MODES[mode])
        c = float(BATCH)
    else:
        c = SCALES[scale]
        run = train(x, y, loss_weights=c, fisher=fisher, **MODES[mode])
    assert_same_run(run, ref, c)


def test_invariance_test_rejects_a_damping_off_by_the_scale(rng):
    """Negative control: the damping an absolute reading would give (λ/c) is detected."""
    x, y = make_data(rng)
    ref = reference("fixed", "exact", x, y)
    damping = tf_kfac.KFAC().damping
    run = train(x, y, loss_weights=784.0, fisher="exact", damping=damping / 784.0)
    with pytest.raises(AssertionError):
        assert_same_run(run, ref, 784.0)


def exact_g(x, y, **compile_args):
    _, factors, opt = train(x, y, steps=1, fisher="exact", factor_decay=0.0, **compile_args)
    return factors


@pytest.mark.parametrize("form", ["float", "list", "dict"])
def test_every_loss_weights_form_reaches_the_fisher(form, rng):
    """loss_weights as 784.0, [784.0] and {output name: 784.0}: G is 784 times G."""
    x, y = make_data(rng)
    weights = {"float": 784.0, "list": [784.0], "dict": {"logits": 784.0}}[form]
    plain = exact_g(x, y)
    weighted = exact_g(x, y, loss_weights=weights)
    for (a, g), (a_ref, g_ref) in zip(weighted, plain, strict=True):
        np.testing.assert_allclose(a, a_ref, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(g, 784.0 * g_ref, rtol=1e-4, atol=1e-12)


def one_step_g(model_fn, x, y, loss, fisher, seed=5):
    model = model_fn()
    opt = tf_kfac.KFAC(fisher=fisher, seed=seed, factor_decay=0.0)
    model.compile(optimizer=opt, loss=loss)
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    return [np.asarray(opt.kronecker_factors(layer)[1], np.float64)
            for layer in model.layers if isinstance(layer, keras.layers.Dense)]


@pytest.mark.parametrize("fisher", ESTIMATORS)
def test_sum_reduction_scales_g_by_the_batch_size(fisher, rng):
    """`reduction="sum"` is B times the mean: G must be B times too, for every estimator."""
    x, y = make_data(rng)
    x, y = x[:BATCH], y[:BATCH]
    mean = one_step_g(make_model, x, y, keras.losses.BinaryCrossentropy(from_logits=True),
                      fisher)
    summed = one_step_g(make_model, x, y, keras.losses.BinaryCrossentropy(
        from_logits=True, reduction="sum"), fisher)
    for g_sum, g_mean in zip(summed, mean, strict=True):
        np.testing.assert_allclose(g_sum, BATCH * g_mean, rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("fisher", ESTIMATORS)
def test_sum_reduction_counts_the_positions_of_sequence_outputs(fisher, rng):
    """(B, T, k) outputs: the sum over the batch and T positions is B·T times the mean."""
    positions = 3

    def sequence_model():
        keras.utils.set_random_seed(4)
        return keras.Sequential([keras.Input((positions, 5)),
                                 keras.layers.Dense(6, activation="tanh"),
                                 keras.layers.Dense(2)])

    x = rng.normal(size=(8, positions, 5)).astype("float32")
    y = (rng.uniform(size=(8, positions, 2)) < 0.5).astype("float32")
    mean = one_step_g(sequence_model, x, y, keras.losses.BinaryCrossentropy(from_logits=True),
                      fisher)
    summed = one_step_g(sequence_model, x, y, keras.losses.BinaryCrossentropy(
        from_logits=True, reduction="sum"), fisher)
    for g_sum, g_mean in zip(summed, mean, strict=True):
        np.testing.assert_allclose(g_sum, 8 * positions * g_mean, rtol=1e-4, atol=1e-12)
