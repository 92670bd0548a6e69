"""EKFAC for Embedding layers against dense NumPy oracles (docs/design.md oracle 20, §7).

The Fisher block of the embeddings is built from Keras's forward pass and loss:
`tf.GradientTape.jacobian` of the logits in the table and the dense Hessian of the
mean loss in the logits, F = Jᵀ H J over row-major vec(E). Never tf_kfac's arithmetic.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_kfac
from tf_kfac.blocks.embedding import EKFACEmbeddingBlock

VOCAB, DIM, POSITIONS, CLASSES, BATCH = 7, 3, 4, 3, 5


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((POSITIONS,), dtype="int32"),
        keras.layers.Embedding(VOCAB, DIM, mask_zero=True),
        keras.layers.GlobalAveragePooling1D(),  # follows the mask: padding gets no gradient
        keras.layers.Dense(CLASSES),
    ])


def _data():
    # Repeated tokens inside an example (its row gradient sums them) and padding (id 0).
    x = np.array([[1, 1, 2, 0], [3, 4, 3, 3], [2, 5, 0, 0], [6, 1, 6, 2], [5, 5, 5, 4]],
                 dtype="int32")
    return x, np.array([0, 2, 1, 1, 0], dtype="int32")


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _fisher(model, x, y):
    """The exact Fisher (GGN) block of the embeddings, (V·d, V·d), float64."""
    table = model.layers[0].embeddings
    with tf.GradientTape() as tape:
        z = model(x, training=True)
    jac = tape.jacobian(z, table).numpy().reshape(z.shape.num_elements(), -1).astype(np.float64)
    z0 = tf.constant(z.numpy(), tf.float64)
    with tf.GradientTape() as outer:
        outer.watch(z0)
        with tf.GradientTape() as inner:
            inner.watch(z0)
            h = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                tf.constant(y), z0, from_logits=True))
        dz = inner.gradient(h, z0)
    hess = outer.jacobian(dz, z0).numpy().reshape(z0.shape.num_elements(), -1)
    return jac.T @ hess @ jac


@pytest.fixture(scope="module")
def measured():
    """Two full-batch steps with the exact estimator: step 0 sets U_G, step 1 measures S
    in it (factor_decay=0: the moving averages are the latest batch's)."""
    x, y = _data()
    model = _model()
    opt = tf_kfac.KFAC(fisher="exact", curvature="ekfac", momentum=0.0, kl_clip=None,
                       learning_rate=0.5, damping=1e-2, factor_decay=0.0,
                       factor_update_interval=1, inverse_update_interval=1000, seed=0)
    opt.attach(model, LOSS)
    opt.step(x, y)
    block = opt._blocks[0]
    # At θ₁, where step 1 measures S in the basis step 0 set (no refresh at step 1).
    fisher = _fisher(model, x, y)
    oracles = _moments_from_position_gradients(model, np.asarray(block.g_basis, np.float64))
    opt.step(x, y)
    return block, fisher, oracles


def _diagonal_in(fisher, u_g):
    q = np.kron(np.eye(VOCAB), u_g)
    return np.diag(q.T @ fisher @ q).reshape(VOCAB, DIM)


def _distance(fisher, u_g, scaling):
    q = np.kron(np.eye(VOCAB), u_g)
    return np.linalg.norm(fisher - q @ np.diag(scaling.ravel()) @ q.T)


def test_embedding_gets_its_ekfac_block(measured):
    block, _, _ = measured
    assert isinstance(block, EKFACEmbeddingBlock)
    assert block.kind == "embedding+ekfac"
    assert float(block.moments_basis.numpy()) == float(block.basis.numpy()) == 1.0


def test_second_moments_are_the_fisher_diagonal_in_the_eigenbasis(measured):
    """S = diag(Qᵀ F Q) for Q = I ⊗ U_G, the Frobenius-closest diagonal in Q. Rejected:
    K-FAC's A ⊗ λ_G, and the squares taken per position instead of per example (the
    repeated tokens of an example summed first)."""
    block, fisher, oracles = measured
    u_g = np.asarray(block.g_basis, np.float64)
    np.testing.assert_allclose(u_g.T @ u_g, np.eye(DIM), atol=1e-5)
    optimum = _diagonal_in(fisher, u_g)
    s = np.asarray(block.second_moments, np.float64)
    np.testing.assert_allclose(s, optimum, rtol=1e-4, atol=1e-8 * np.abs(optimum).max())
    best = _distance(fisher, u_g, optimum)
    kfac = (np.asarray(block.a_factor, np.float64)[:, None]
            * np.asarray(block.g_eigenvalues, np.float64)[None, :])
    assert _distance(fisher, u_g, kfac) > best * (1 + 1e-3)
    assert np.linalg.norm(s - kfac) > 1e-2 * np.linalg.norm(s)

    # Per position: the squares of each position's projected row, not of the example's
    # row gradient (its repeated tokens summed first).
    per_example, per_position = oracles
    np.testing.assert_allclose(per_example, optimum, rtol=1e-4,
                               atol=1e-8 * np.abs(optimum).max())  # the two oracles agree
    assert np.linalg.norm(per_position - s) > 1e-2 * np.linalg.norm(s)


def _moments_from_position_gradients(model, u_g):
    """S from each position's gradient columns g_ikt = (H_i^½ J_i)[k, t] at θ₁ (NumPy,
    H_i = (diag p − ppᵀ)/B the mean loss' Hessian in example i's logits), squared after
    summing an example's positions per token, and (wrong) squared per position."""
    x, _ = _data()
    e = tf.constant(model.layers[0](x).numpy())
    with tf.GradientTape() as tape:
        tape.watch(e)
        z = model.layers[2](model.layers[1](e, mask=tf.constant(x != 0)))
    jac = tape.jacobian(z, e).numpy().astype(np.float64)  # (B, k, B, T, d)
    logits = z.numpy().astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    per_example, per_position = np.zeros((VOCAB, DIM)), np.zeros((VOCAB, DIM))
    for i in range(BATCH):
        w, v = np.linalg.eigh((np.diag(p[i]) - np.outer(p[i], p[i])) / BATCH)
        root = v * np.sqrt(np.maximum(w, 0.0))  # H_i = root rootᵀ
        columns = np.einsum("kc,ktd->ctd", root, jac[i, :, i]) @ u_g  # (k, T, d)
        for token in set(x[i].tolist()) - {0}:
            at = x[i] == token
            per_example[token] += (columns[:, at].sum(1) ** 2).sum(0)
            per_position[token] += (columns[:, at] ** 2).sum((0, 1))
    return per_example, per_position


def test_ekfac_reduces_to_kfac_when_the_moments_are_the_eigenvalue_products(measured, rng):
    """With S = A ⊗ λ_G and no damping the direction on the rows seen is diag(A)⁻¹ ∇ G⁻¹
    (NumPy's solve with the block's A and a full-rank G), also before S is measured in
    the basis; with the measured S it is not."""
    block, _, _ = measured
    a = np.asarray(block.a_factor, np.float64)
    # The logits' softmax makes G rank-deficient (rank ≤ classes − 1): add I to invert it.
    g = np.asarray(block.g_factor, np.float64) + 0.1 * np.eye(DIM)
    seen = np.flatnonzero(a > 0)
    grad = rng.normal(size=(len(seen), DIM))
    gradient = tf.IndexedSlices(tf.constant(grad, tf.float32), tf.constant(seen, tf.int64),
                                tf.constant([VOCAB, DIM], tf.int64))
    eigenvalues, basis = np.linalg.eigh(g)  # G's eigenbasis (G moved since the refresh)
    values = [tf.constant(a, tf.float32), tf.constant(basis, tf.float32),
              tf.constant(eigenvalues, tf.float32)]
    expected = (grad / a[seen, None]) @ np.linalg.inv(g)

    def direction(moments, measured_flag):
        out = block.precondition([gradient], [*values, tf.constant(moments, tf.float32),
                                              tf.constant(measured_flag), tf.constant(0.0)],
                                 tf.constant(1.0))[0]
        assert isinstance(out, tf.IndexedSlices)
        return out.values.numpy()

    kfac = a[:, None] * eigenvalues[None, :]
    rel = np.linalg.norm(direction(kfac, True) - expected) / np.linalg.norm(expected)
    assert rel < 1e-3
    rel = np.linalg.norm(direction(np.zeros_like(kfac), False) - expected) / np.linalg.norm(
        expected)  # before S is measured: K-FAC's own scaling
    assert rel < 1e-3
    wrong = direction(np.asarray(block.second_moments), True)
    assert np.linalg.norm(wrong - expected) > 1e-2 * np.linalg.norm(expected)


def test_sparse_and_dense_gradients_give_the_same_direction(measured, rng):
    block, _, _ = measured
    values = block.preconditioner([tf.convert_to_tensor(v) for v in block.refreshed],
                                  [tf.convert_to_tensor(v) for v in block.statistics])
    rows = np.array([1, 4, 6])
    grad = rng.normal(size=(3, DIM)).astype("float32")
    dense = np.zeros((VOCAB, DIM), "float32")
    dense[rows] = grad
    sparse_out = block.precondition([tf.IndexedSlices(tf.constant(grad), tf.constant(rows),
                                                      tf.constant([VOCAB, DIM]))], values, 1.0)
    dense_out = block.precondition([tf.constant(dense)], values, 1.0)[0].numpy()
    np.testing.assert_allclose(tf.convert_to_tensor(sparse_out[0]).numpy()[rows], dense_out[rows],
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.delete(dense_out, rows, axis=0), 0.0)


def test_fit_trains_an_embedding_model_with_ekfac(tmp_path):
    x, y = _data()
    x, y = np.tile(x, (8, 1)), np.tile(y, 8)
    model = _model()
    model.compile(optimizer=tf_kfac.KFAC(curvature="ekfac", seed=0), loss=LOSS)
    history = model.fit(x, y, batch_size=10, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert "embedding+ekfac" in model.optimizer.summary(print_fn=lambda _: None)
    assert all(np.all(np.isfinite(v.numpy())) for v in model.optimizer.variables)
    path = tmp_path / "ekfac_embedding.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
