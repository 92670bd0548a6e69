"""Row-sparse Embedding gradients kept to the update (tf_kfac/sparse.py; docs/design.md oracle 19).

The reference for the preconditioned rows is dense NumPy, diag(A)⁻¹ ∇ G⁻¹ over the
whole vocabulary; the reference trajectory is the same training with every gradient
made dense first, which is how the update was computed before gradients stayed sparse.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_kfac
from tf_kfac import sparse
from tf_kfac.blocks.embedding import EmbeddingBlock

VOCAB, DIM, POSITIONS, CLASSES = 50, 6, 5, 3
SEEN = 12  # the batches use ids below SEEN only


class Lookup(keras.layers.Layer):
    """A table read with `ops.take`: no curvature block, so it trains first-order."""

    def build(self, input_shape):
        self.table = self.add_weight(shape=(VOCAB, 2), initializer="glorot_uniform")

    def call(self, ids):
        return keras.ops.take(self.table, ids, axis=0)


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    ids = keras.Input((POSITIONS,), dtype="int32")
    x = keras.layers.Concatenate()([keras.layers.Embedding(VOCAB, DIM)(ids), Lookup()(ids)])
    x = keras.layers.Flatten()(x)
    return keras.Model(ids, keras.layers.Dense(CLASSES)(keras.layers.Dense(8, "tanh")(x)))


def _data(seed=1, batch=16):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, SEEN, size=(batch, POSITIONS)).astype("int32")  # repeated ids
    return x, rng.integers(0, CLASSES, size=(batch,)).astype("int32")


def _train(steps=4, dense=False, monkeypatch=None, **kwargs):
    """Weights and momentum buffers after `steps` K-FAC steps; `dense` makes every
    gradient dense first (the reference)."""
    if dense:
        monkeypatch.setattr(sparse, "prepare", lambda grads, keep: [sparse.dense(g) for g in grads])
    model = _model()
    opt = tf_kfac.KFAC(seed=5, **kwargs)
    opt.attach(model, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    step = tf.function(opt.step)
    x, y = _data()
    for _ in range(steps):
        step(x, y)
    return ([v.numpy() for v in model.trainable_variables],
            [m.numpy() for m in opt._kfac.state.momentums])


def test_embedding_block_receives_the_gradient_sparse(monkeypatch):
    """The Embedding's block and the first-order table get `tf.IndexedSlices`, never a
    dense vocab × d gradient."""
    seen = []
    original = EmbeddingBlock.precondition

    def spy(self, gradients, refreshed, loss_scale):
        seen.append(type(gradients[0]).__name__)
        return original(self, gradients, refreshed, loss_scale)

    monkeypatch.setattr(EmbeddingBlock, "precondition", spy)
    _train(steps=1)
    assert seen and set(seen) == {"IndexedSlices"}, seen


def test_sparse_rows_equal_dense_preconditioning(rng):
    """diag(A)⁻¹ ∇ G⁻¹ on the unique rows equals the dense product over the whole table,
    with duplicate ids in the gradient summed."""
    layer = keras.layers.Embedding(VOCAB, DIM)
    layer.build((None, POSITIONS))
    block = EmbeddingBlock(layer)
    a_inverse = rng.uniform(0.5, 2.0, VOCAB).astype("float32")
    m = rng.normal(size=(DIM, DIM))
    g_inverse = (m @ m.T + np.eye(DIM)).astype("float32")
    indices = np.array([3, 7, 3, 0, 7, 7], dtype="int64")
    values = rng.normal(size=(len(indices), DIM)).astype("float32")
    gradient = tf.IndexedSlices(tf.constant(values), tf.constant(indices),
                                tf.constant([VOCAB, DIM], tf.int64))
    rows = block.precondition([sparse.unique_rows(gradient)],
                              [tf.constant(a_inverse), tf.constant(g_inverse)], 1.0)[0]
    assert isinstance(rows, tf.IndexedSlices)
    assert sorted(rows.indices.numpy().tolist()) == [0, 3, 7]

    dense_gradient = np.zeros((VOCAB, DIM))
    np.add.at(dense_gradient, indices, values)
    expected = a_inverse[:, None] * (dense_gradient @ g_inverse)
    actual = tf.convert_to_tensor(rows).numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)
    # Negative control: taking each occurrence once (no summing of duplicates) is wrong.
    once = np.zeros((VOCAB, DIM))
    once[indices] = values
    assert not np.allclose(a_inverse[:, None] * (once @ g_inverse), actual, rtol=1e-3)


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_sparse_trajectory_equals_dense_trajectory(momentum, monkeypatch):
    """With the default KL-clip, weights and momentum after 4 steps equal those of the
    all-dense update, for momentum 0 (rows written alone) and 0.5 (whole writes)."""
    weights, buffers = _train(momentum=momentum)
    with monkeypatch.context() as patch:
        ref_weights, ref_buffers = _train(momentum=momentum, dense=True, monkeypatch=patch)
    for got, want in zip(weights, ref_weights, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    moved = [not np.allclose(w, r) for w, r in zip(weights, _model().get_weights(), strict=True)]
    assert all(moved)  # every variable trained, so the comparison is not vacuous
    if momentum:  # at momentum 0 the buffer's unseen rows are never read, nor written
        for got, want in zip(buffers, ref_buffers, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_momentum_zero_leaves_unseen_rows_untouched():
    """At momentum 0 the rows of ids not in any batch keep their exact initial bits,
    in the weights and in the momentum buffer; the rows seen change."""
    initial = [w for w in _model().get_weights() if w.shape[0] == VOCAB]
    weights, buffers = _train(momentum=0.0)
    tables = [w for w in weights if w.shape[0] == VOCAB]
    assert len(tables) == 2
    for before, after in zip(initial, tables, strict=True):
        np.testing.assert_array_equal(after[SEEN:], before[SEEN:])
        assert np.abs(after[:SEEN] - before[:SEEN]).max(axis=1).min() > 0
    for buffer in (b for b in buffers if b.shape[0] == VOCAB):
        np.testing.assert_array_equal(buffer[SEEN:], 0.0)
        assert np.abs(buffer[:SEEN]).sum() > 0


@pytest.mark.parametrize("setting", [
    {"l2_reg": 1e-4}, {"weight_decay": 1e-3}, {"clipnorm": 1.0}, {"adaptive": True},
])
def test_settings_that_make_the_update_dense_train(setting, monkeypatch):
    """l2_reg, weight decay, clipping and the adaptive mode densify first (their terms
    are dense) and give what the all-dense update gives."""
    weights, _ = _train(steps=2, momentum=0.5, **setting)
    with monkeypatch.context() as patch:
        ref, _ = _train(steps=2, momentum=0.5, dense=True, monkeypatch=patch, **setting)
    for got, want in zip(weights, ref, strict=True):
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_non_finite_step_writes_no_row():
    """A NaN in the objective skips the step: no row of the tables or buffers moves."""
    model = _model()
    opt = tf_kfac.KFAC(seed=5, momentum=0.0)
    opt.attach(model, loss="mse")
    step = tf.function(opt.step)
    x, _ = _data()
    y = np.zeros((len(x), CLASSES), "float32")
    step(x, y)
    before = [v.numpy() for v in (*model.trainable_variables, *opt._kfac.state.momentums)]
    y[0, 0] = np.nan
    logs = step(x, y)
    after = [v.numpy() for v in (*model.trainable_variables, *opt._kfac.state.momentums)]
    assert int(logs["skipped_steps"]) == 1
    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)
