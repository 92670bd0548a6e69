"""Embedding and normalisation blocks against brute-force curvature (docs/design.md §6).

The references use Keras's own forward pass and loss, `tf.GradientTape` Jacobians and
Hessians, explicit loops and NumPy; never tf_kfac's arithmetic. The GGN is that of the
objective h = (1/B) Σᵢ ℓᵢ as Keras computes it.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_kfac

TOL = 1e-4


def _step(model, loss, x, y, fisher, **kwargs):
    opt = tf_kfac.KFAC(fisher=fisher, seed=3, learning_rate=1e-3, momentum=0.0,
                       kl_clip=None, factor_decay=0.0, **kwargs)
    opt.attach(model, loss=loss)
    return opt, opt.step(x, y)


def _ggn(model, loss_fn, x, y, variables):
    """(1/B) Σ JᵀHJ over the concatenated `variables`, from Keras's forward and loss."""
    with tf.GradientTape(persistent=True) as tape:
        z = tf.cast(model(x, training=True), tf.float64)
    jac = [tf.reshape(tape.jacobian(z, v), [tf.size(z), -1]).numpy().astype(np.float64)
           for v in variables]
    jac = np.concatenate(jac, axis=1)
    z0 = tf.constant(z.numpy())
    with tf.GradientTape() as outer:
        outer.watch(z0)
        with tf.GradientTape() as inner:
            inner.watch(z0)
            h = tf.reduce_mean(loss_fn(tf.constant(y), z0))
        dz = inner.gradient(h, z0)
    hess = outer.jacobian(dz, z0).numpy().reshape(z0.shape.num_elements(), -1)
    return jac.T @ hess @ jac


def _mse(y, z):
    return keras.losses.mean_squared_error(tf.cast(y, z.dtype), z)


# ------------------------------------------------------------------------ Embedding

def _embedding_model(vocab, dim, positions, classes):
    return keras.Sequential([keras.Input((positions,), dtype="int32"),
                             keras.layers.Embedding(vocab, dim),
                             keras.layers.Flatten(),
                             keras.layers.Dense(classes)])


def test_embedding_single_token_kron_equals_exact_ggn(rng, rel_err):
    """B = 1, one token, fisher="exact": kron(diag(A), G) is the GGN block of the
    embeddings. A is the one-hot count (1 at the token), so the whole vocab × d block
    is zero except the token's row; a wrong row, scale or transpose fails."""
    vocab, dim, classes = 6, 3, 4
    model = _embedding_model(vocab, dim, 1, classes)
    x = np.array([[4]], "int32")
    y = rng.normal(size=(1, classes)).astype("float32")
    layer = model.layers[0]
    ggn = _ggn(model, _mse, x, y, [layer.embeddings])
    opt, _ = _step(model, keras.losses.MeanSquaredError(), x, y, "exact")
    a, g = (np.asarray(t, np.float64) for t in opt.kronecker_factors(layer))
    assert a.shape == (vocab,)
    np.testing.assert_array_equal(a, np.eye(vocab)[4])
    assert rel_err(np.kron(np.diag(a), g), ggn) < TOL


def test_embedding_factors_equal_count_loop(rng, rel_err):
    """B = 5, T = 4 with repeated tokens, fisher="empirical": A_vv = (1/B) Σᵢ Σₜ [xᵢₜ = v]
    by an explicit loop, G = c·(1/B) Σᵢ (1/T) Σₜ ggᵀ with gᵢₜ = (B/c)·∂h/∂sᵢₜ taken
    through a hand-written forward pass. The GGN block is not kron(diag A, G) here (a
    nonlinear head at B > 1), which the last assertion shows."""
    vocab, dim, positions, classes, batch = 7, 3, 4, 2, 5
    x = rng.integers(0, vocab, (batch, positions)).astype("int32")
    y = rng.normal(size=(batch, classes)).astype("float32")
    embed = keras.layers.Embedding(vocab, dim)
    model = keras.Sequential([keras.Input((positions,), dtype="int32"), embed,
                              keras.layers.Dense(5, activation="tanh"), keras.layers.Flatten(),
                              keras.layers.Dense(classes)])
    counts = np.zeros(vocab)
    for i in range(batch):
        for t in range(positions):
            counts[x[i, t]] += 1.0 / batch
    table = np.asarray(embed.embeddings.numpy(), np.float64)
    hidden, head = model.layers[1], model.layers[3]
    s = tf.Variable(table[x])
    with tf.GradientTape() as tape:
        a1 = tf.tanh(s @ hidden.kernel.numpy().astype(np.float64) + hidden.bias.numpy())
        z = tf.reshape(a1, [batch, -1]) @ head.kernel.numpy().astype(np.float64)
        z += head.bias.numpy()
        h = tf.reduce_mean(_mse(y, z))
    c = 1.0 / classes
    g_rows = (batch / c) * tape.gradient(h, s).numpy()
    g_ref = sum(c * np.outer(g_rows[i, t], g_rows[i, t]) / (batch * positions)
                for i in range(batch) for t in range(positions))
    opt, _ = _step(model, keras.losses.MeanSquaredError(), x, y, "empirical")
    a, g = (np.asarray(t, np.float64) for t in opt.kronecker_factors(embed))
    assert rel_err(a, counts) < 1e-6
    assert rel_err(g, g_ref) < TOL
    exact_model = keras.models.clone_model(model)
    exact_model.set_weights(model.get_weights())
    ggn = _ggn(exact_model, _mse, x, y, [exact_model.layers[0].embeddings])
    exact, _ = _step(exact_model, keras.losses.MeanSquaredError(), x, y, "exact")
    a_e, g_e = (np.asarray(t, np.float64) for t in exact.kronecker_factors(exact_model.layers[0]))
    assert rel_err(np.kron(np.diag(a_e), g_e), ggn) > 100 * TOL


def test_embedding_sample_weights_weight_the_counts(rng, rel_err):
    """With sample weights, A is the weighted mean of the counts: an example of weight
    0 adds nothing, so a token only it uses has A = 0."""
    x = np.array([[1, 2], [3, 3], [2, 5]], "int32")
    w = np.array([1.0, 0.0, 2.0], "float32")
    y = rng.normal(size=(3, 2)).astype("float32")
    model = _embedding_model(6, 2, 2, 2)
    opt = tf_kfac.KFAC(fisher="empirical", seed=0, factor_decay=0.0)
    opt.attach(model, loss=keras.losses.MeanSquaredError())
    opt.step(x, y, sample_weight=w)
    a, _ = opt.kronecker_factors(model.layers[0])
    expected = np.zeros(6)
    for row, weight in zip(x, w, strict=True):
        for token in row:
            expected[token] += weight / w.sum()
    assert rel_err(a, expected) < 1e-6
    assert float(a[3]) == 0.0


# -------------------------------------------------------------------- normalisation

def _norm_model(kind, center=True, scale=True):
    norm = (keras.layers.LayerNormalization(center=center, scale=scale,
                                            beta_initializer="random_normal",
                                            gamma_initializer="random_uniform")
            if kind == "layer" else
            keras.layers.BatchNormalization(center=center, scale=scale,
                                            beta_initializer="random_normal",
                                            gamma_initializer="random_uniform"))
    model = keras.Sequential([keras.Input((3, 4)), keras.layers.Dense(5), norm,
                              keras.layers.Activation("tanh"), keras.layers.Flatten(),
                              keras.layers.Dense(3)])
    return model, norm


@pytest.mark.parametrize("kind", ["layer", "batch"])
@pytest.mark.parametrize(("center", "scale"), [(True, True), (False, True), (True, False)])
def test_scale_shift_blocks_equal_ggn_diagonal_blocks(kind, center, scale, rng, rel_err):
    """B = 4 with 3 positions, fisher="exact": each unit's F_i equals the brute-force
    GGN's block over (γᵢ, βᵢ) (1 × 1 without one of them). These blocks are exact at
    any batch size (per-example gradients, no factorisation); x̂ uses the example's
    (LayerNormalization) or the batch's (BatchNormalization) statistics. The GGN has
    non-zero blocks between units, which the block-diagonal approximation drops; the
    last assertion shows the dense approximation is not the GGN."""
    model, norm = _norm_model(kind, center, scale)
    x = rng.normal(size=(4, 3, 4)).astype("float32")
    y = rng.normal(size=(4, 3)).astype("float32")
    params = [v for v in (norm.gamma, norm.beta) if v is not None]
    ggn = _ggn(model, _mse, x, y, params)
    units, size = 5, len(params)
    expected = np.stack([ggn[np.ix_(idx, idx)] for idx in
                         ([i + k * units for k in range(size)] for i in range(units))])
    opt, _ = _step(model, keras.losses.MeanSquaredError(), x, y, "exact")
    (f,) = opt.kronecker_factors(norm)
    f = np.asarray(f, np.float64)
    assert f.shape == (units, size, size)
    assert rel_err(f, expected) < TOL
    block_diagonal = np.zeros_like(ggn)
    for i, idx in enumerate([i + k * units for k in range(size)] for i in range(units)):
        block_diagonal[np.ix_(idx, idx)] = f[i]
    assert rel_err(block_diagonal, ggn) > 100 * TOL


def test_transformer_norms_and_embedding_get_curvature(rng):
    """Embedding and LayerNormalization get blocks in a transformer; `fit` trains with
    finite state, and the summary covers every parameter."""
    tokens = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(12, 8)(tokens)
    h = keras.layers.LayerNormalization()(h + keras.layers.MultiHeadAttention(2, 4)(h, h))
    h = keras.layers.BatchNormalization()(keras.layers.Dense(8)(h))
    out = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling1D()(h))
    model = keras.Model(tokens, out)
    x = rng.integers(0, 12, (64, 6)).astype("int32")
    y = np.minimum((x < 3).sum(axis=1), 2).astype("int32")  # a bag-of-tokens rule
    opt = tf_kfac.KFAC(seed=0)
    model.compile(optimizer=opt,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, batch_size=16, epochs=6, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert history.history["loss"][-1] < history.history["loss"][0]
    text = opt.summary(print_fn=lambda _: None)
    assert "first-order" not in text, text
    assert "(100.0%)" in text
    assert all(np.all(np.isfinite(v.numpy())) for v in opt.variables)
