"""EKFAC under tf.distribute: two replicas give the run of one device (docs/design.md §7).

MirroredStrategy on two logical CPU devices (conftest.py's `mirrored`), each replica
with half of the global batch, against one device with the whole batch. The
preconditioner reads EKFAC's rescaling S at every step, so S must be the same
on every replica: each batch's S is averaged across the replicas before its
moving average. Compared with `fisher="exact"`, which draws nothing (the
sampled estimator draws differently on each replica).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import tf_kfac
from tf_kfac.blocks import ekfac

GLOBAL_BATCH = 16
STEPS = 5
# The softmax's G is singular (the logits' sum), so EKFAC divides the float32 rounding of its
# eigenvector there by δ alone: at the default λ = 3e-4 the replicas' runs differ by up to
# 3e-3 on a bias of norm 2e-3 (1.2e-5 at most at 1e-2, as the K-FAC cases measure).
DAMPING = 1e-2


def _model():
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, activation="softmax")])


def _separable_model():
    """A separable convolution: EKFAC per channel on its depthwise part, Dense's on its
    pointwise part."""
    return keras.Sequential([
        keras.Input((3, 3, 2)),
        keras.layers.SeparableConv2D(3, 2, depth_multiplier=2),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Activation("softmax"),
    ])


def _train(strategy, weights, x, y, build=_model):
    with strategy.scope() if strategy is not None else _nothing():
        model = build()
        model.set_weights(weights)
        model.compile(optimizer=tf_kfac.KFAC(
            fisher="exact", curvature="ekfac", damping=DAMPING, factor_update_interval=1,
            inverse_update_interval=3, seed=3), loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    return model


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


@pytest.fixture(scope="module")
def one_device():
    """(initial weights, data, the model after 5 steps on one device with the global batch)."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(GLOBAL_BATCH * STEPS, 6)).astype("float32")
    y = rng.integers(0, 3, size=(GLOBAL_BATCH * STEPS,))
    keras.utils.set_random_seed(5)
    weights = _model().get_weights()
    return weights, (x, y), _train(None, weights, x, y)


def _copies(strategy, variable):
    """Each replica's copy of a variable, as float64 arrays."""
    return [np.asarray(v.numpy(), np.float64)
            for v in strategy.experimental_local_results(variable.value)]


def test_two_replicas_equal_one_device_with_ekfac(one_device, mirrored, rel_err):
    """Weights, A, G and S after 5 steps (S measured on each, refreshes on the first and the
    fourth, S measured in the new basis on the fifth) equal one device's on the global
    batch, within the tolerance of the K-FAC cases (tests/test_distributed.py); every
    replica holds the same S and weights, while A stays replica-local."""
    weights, (x, y), single = one_device
    model = _train(mirrored, weights, x, y)
    assert mirrored.num_replicas_in_sync == 2
    assert int(model.optimizer.iterations.numpy()) == STEPS
    for w1, w2 in zip(single.trainable_variables, model.trainable_variables, strict=True):
        assert rel_err(w2.numpy(), w1.numpy()) < 1e-4, w1.path
        first, second = _copies(mirrored, w2)
        np.testing.assert_array_equal(first, second)
    block1, block2 = single.optimizer._blocks[0], model.optimizer._blocks[0]
    assert block2.kind == "dense+ekfac"
    assert float(block2.moments_basis.numpy()) == float(block2.basis.numpy()) == 2.0
    for v1, v2 in zip(block1.statistics, block2.statistics, strict=True):
        assert rel_err(v2.numpy(), v1.numpy()) < 1e-4, v1.path
    first, second = _copies(mirrored, block2.second_moments)
    np.testing.assert_array_equal(first, second)
    a_first, a_second = _copies(mirrored, block2.a_factor)
    assert rel_err(a_first, a_second) > 1e-2
    moved = max(np.abs(w.numpy() - w0).max()
                for w, w0 in zip(single.trainable_variables, weights, strict=True))
    assert moved > 1e-3  # it trained


def test_two_replicas_equal_one_device_for_the_parts_of_a_separable_convolution(
        mirrored, rng, rel_err):
    """Each part of a separable block, the depthwise one (S of C × n × m) and the pointwise
    one, has its S at its own offset among the block's statistics: weights and statistics
    equal one device's, and S is the same on both replicas."""
    x = rng.normal(size=(GLOBAL_BATCH * STEPS, 3, 3, 2)).astype("float32")
    y = rng.integers(0, 3, size=(GLOBAL_BATCH * STEPS,))
    weights = _separable_model().get_weights()
    single = _train(None, weights, x, y, _separable_model)
    model = _train(mirrored, weights, x, y, _separable_model)
    for w1, w2 in zip(single.trainable_variables, model.trainable_variables, strict=True):
        assert rel_err(w2.numpy(), w1.numpy()) < 1e-4, w1.path
    (block1,), (block2,) = single.optimizer._blocks, model.optimizer._blocks
    assert [p.kind for p in block2.parts] == ["depthwise_conv+ekfac", "dense+ekfac"]
    assert block2.synchronized_statistics == (2, 3, 4, 7, 8, 9)
    for part1, part2 in zip(block1.parts, block2.parts, strict=True):
        assert float(part2.moments_basis.numpy()) == float(part2.basis.numpy()) == 2.0
        for v1, v2 in zip(part1.statistics, part2.statistics, strict=True):
            assert rel_err(v2.numpy(), v1.numpy()) < 1e-4, v1.path
        first, second = _copies(mirrored, part2.second_moments)
        np.testing.assert_array_equal(first, second)


def test_replica_local_rescaling_is_caught(one_device, mirrored, rel_err, monkeypatch):
    """Negative control: with each replica's S left local (not averaged before its moving
    average), the replicas precondition differently: their weights drift apart and away
    from the one-device run."""
    weights, (x, y), single = one_device
    monkeypatch.setattr(ekfac.EigenbasisRescaling, "synchronized_statistics", ())
    model = _train(mirrored, weights, x, y)
    s_first, s_second = _copies(mirrored, model.optimizer._blocks[0].second_moments)
    assert rel_err(s_first, s_second) > 1e-2
    first, second = _copies(mirrored, model.trainable_variables[0])
    assert rel_err(first, second) > 1e-3
    assert rel_err(first, single.trainable_variables[0].numpy()) > 1e-3
