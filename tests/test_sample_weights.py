"""Sample and class weights in the factors: the curvature of the weighted objective.

Keras's objective with example weights wᵢ is h = (1/B) Σ wᵢ ℓᵢ. Its K-FAC factors
are A = Σ wᵢ āᵢāᵢᵀ / Σ wᵢ (the weighted mean: an example of weight 0 does not
shape A) and G = c·(1/B) Σ wᵢ gᵢgᵢᵀ (the weights' scale), for every estimator.
tf_kfac 0.1 left A unweighted and gave the empirical G the weights squared.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import tf_kfac

ESTIMATORS = ["exact", "empirical", "sampled"]


def make_model():
    keras.utils.set_random_seed(2)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"),
                             keras.layers.Dense(3, activation="softmax")])


def make_data(n, rng):
    x = rng.normal(size=(n, 4)).astype("float32")
    return x, rng.integers(0, 3, n).astype("int32")


def factors(x, y, fisher, sample_weight=None, class_weight=None, seed=5):
    """A and G of both layers after one full-batch step with factor_decay=0."""
    model = make_model()
    opt = tf_kfac.KFAC(fisher=fisher, seed=seed, factor_decay=0.0)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    model.fit(x, y, sample_weight=sample_weight, class_weight=class_weight,
              batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    return [tuple(np.asarray(t, np.float64) for t in opt.kronecker_factors(layer))
            for layer in model.layers]


@pytest.mark.parametrize("fisher", ESTIMATORS)
def test_zero_weight_examples_do_not_shape_the_factors(fisher, rng):
    """Weights (1, …, 1, 0, …, 0): A is the kept half's A; G is half the kept half's G
    (B counts every example). The sampled draws differ with the batch, so its G is
    checked against the exact one on the same weighted batch instead."""
    x, y = make_data(16, rng)
    weights = np.r_[np.ones(8), np.zeros(8)].astype("float32")
    weighted = factors(x, y, fisher, sample_weight=weights)
    kept = factors(x[:8], y[:8], fisher)
    for (a, g), (a_kept, g_kept) in zip(weighted, kept, strict=True):
        np.testing.assert_allclose(a, a_kept, rtol=1e-5, atol=1e-7)
        if fisher != "sampled":
            np.testing.assert_allclose(g, 0.5 * g_kept, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_a_weight_of_two_counts_like_a_duplicated_example(fisher, rng):
    """w ∈ {1, 2}: A equals A of the batch with the weight-2 examples duplicated, and G
    is (B + k)/B times its G: the weights enter once, for the empirical estimator too."""
    x, y = make_data(12, rng)
    weights = np.where(np.arange(12) < 4, 2.0, 1.0).astype("float32")
    weighted = factors(x, y, fisher, sample_weight=weights)
    duplicated = factors(np.concatenate([x, x[:4]]), np.concatenate([y, y[:4]]), fisher)
    for (a, g), (a_dup, g_dup) in zip(weighted, duplicated, strict=True):
        np.testing.assert_allclose(a, a_dup, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(g, (16 / 12) * g_dup, rtol=1e-4, atol=1e-9)


def test_class_weight_equals_the_same_sample_weights(rng):
    x, y = make_data(16, rng)
    class_weight = {0: 0.25, 1: 2.0, 2: 1.0}
    per_example = np.array([class_weight[int(label)] for label in y], "float32")
    by_class = factors(x, y, "exact", class_weight=class_weight)
    by_sample = factors(x, y, "exact", sample_weight=per_example)
    unweighted = factors(x, y, "exact")
    for (a, g), (a_s, g_s), (a_u, _) in zip(by_class, by_sample, unweighted, strict=True):
        np.testing.assert_allclose(a, a_s, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(g, g_s, rtol=1e-5, atol=1e-9)
        assert np.linalg.norm(a - a_u) > 1e-3 * np.linalg.norm(a_u)  # the weights matter


def test_sampled_g_with_weights_averages_to_the_exact_g(rng):
    """Fractional weights: the sampled G over many draws approaches the exact weighted G."""
    x, y = make_data(3, rng)
    weights = np.array([0.2, 1.0, 3.0], "float32")
    exact = factors(x, y, "exact", sample_weight=weights)
    copies = 512
    sampled = factors(np.tile(x, (copies, 1)), np.tile(y, copies), "sampled",
                      sample_weight=np.tile(weights, copies))
    for (a, g), (a_exact, g_exact) in zip(sampled, exact, strict=True):
        np.testing.assert_allclose(a, a_exact, rtol=1e-4, atol=1e-7)
        assert np.linalg.norm(g - g_exact) < 0.1 * np.linalg.norm(g_exact)
