"""Fault injection and awkward data: nothing non-finite is written, training goes on.

Faults: NaN or Inf in inputs, labels or sample weights at random steps, a model whose
output overflows, an exploding step. Data: a partial last batch (of one example), a
`tf.data` pipeline of unknown cardinality, `validation_split`, and `steps_per_execution`
that does not divide the epoch. In every case the weights and the whole optimizer state
stay finite, every poisoned step is counted as skipped, and the other steps train.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_kfac

BATCH = 8


def make_model(outputs=3):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"),
                             keras.layers.Dense(outputs, activation="softmax")])


def make_data(n, rng):
    x = rng.normal(size=(n, 4)).astype("float32")
    return x, rng.integers(0, 3, n).astype("int32")


def assert_finite_state(model, opt):
    for weight in model.get_weights():
        assert np.all(np.isfinite(weight))
    for variable in opt.variables:
        assert np.all(np.isfinite(np.asarray(variable.numpy(), np.float64))), variable.path


def test_random_fault_injection_skips_exactly_the_poisoned_steps(rng):
    """30 epochs of 4 steps; each epoch poisons one random step at a random place."""
    model = make_model()
    opt = tf_kfac.KFAC(seed=0, factor_update_interval=1, inverse_update_interval=2)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    x, y = make_data(4 * BATCH, rng)
    kinds = ["nan_input", "inf_input", "nan_weight", "inf_weight"]
    injected = 0
    for _ in range(30):
        xs, weights = x.copy(), np.ones(len(x), "float32")
        step, row = rng.integers(0, 4), rng.integers(0, BATCH)
        kind = kinds[rng.integers(0, len(kinds))]
        index = step * BATCH + row
        if kind == "nan_input":
            xs[index, rng.integers(0, 4)] = np.nan
        elif kind == "inf_input":
            xs[index, rng.integers(0, 4)] = np.inf
        elif kind == "nan_weight":
            weights[index] = np.nan
        else:
            weights[index] = np.inf
        injected += 1
        before = model.get_weights()
        model.fit(xs, y, sample_weight=weights, batch_size=BATCH, epochs=1, shuffle=False,
                  verbose=0)
        assert_finite_state(model, opt)
        assert int(opt._kfac.state.skipped_steps.numpy()) == injected, kind
        assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights(),
                                                             strict=True))
    print(f"\nfault injection: {injected} poisoned steps, {injected} skipped, 0 crashes, "
          "0 non-finite values written")


def test_a_model_whose_output_overflows_skips_the_step(rng):
    """A layer that scales by 1e30 on a flagged input makes the logits infinite."""
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(8, activation="tanh")(inputs)
    flag = keras.layers.Lambda(lambda t: 1.0 + 1e30 * t[:, :1] * t[:, :1])(inputs)
    logits = keras.layers.Dense(3)(hidden)
    model = keras.Model(inputs, keras.layers.Multiply()([logits, flag]))
    opt = tf_kfac.KFAC(seed=0)
    model.compile(optimizer=opt,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = make_data(2 * BATCH, rng)
    x[:, 0] = 0.0
    x[3, 0] = 1e10  # the first batch overflows
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    assert int(opt._kfac.state.skipped_steps.numpy()) == 1
    assert_finite_state(model, opt)


def test_an_exploding_step_is_not_written(rng):
    """A learning rate so large that the update overflows float32: nothing is written."""
    model = make_model()
    opt = tf_kfac.KFAC(seed=0, learning_rate=1e38, kl_clip=None, damping=1e-8)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    x, y = make_data(2 * BATCH, rng)
    before = model.get_weights()
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    assert int(opt._kfac.state.skipped_steps.numpy()) >= 1
    assert_finite_state(model, opt)
    assert any(np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))


@pytest.mark.parametrize("case", ["partial_last_batch_of_one", "unknown_cardinality",
                                  "validation_split", "steps_per_execution"])
def test_awkward_data_trains_to_finite_state(case, rng):
    model = make_model()
    initial = model.get_weights()[0]
    opt = tf_kfac.KFAC(seed=0)
    x, y = make_data(4 * BATCH + 1, rng)
    compile_args = {"steps_per_execution": 3} if case == "steps_per_execution" else {}
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", **compile_args)
    fit_args = dict(batch_size=BATCH, epochs=2, verbose=0)
    if case == "unknown_cardinality":
        data = tf.data.Dataset.from_tensor_slices((x, y)).filter(
            lambda a, b: a[0] > -10.0).batch(BATCH)
        assert int(data.cardinality()) == int(tf.data.UNKNOWN_CARDINALITY)
        history = model.fit(data, epochs=2, verbose=0)
    elif case == "validation_split":
        history = model.fit(x, y, validation_split=0.25, **fit_args)
        assert np.isfinite(history.history["val_loss"][-1])
    else:
        history = model.fit(x, y, **fit_args)
    assert int(opt._kfac.state.skipped_steps.numpy()) == 0
    assert all(np.isfinite(history.history["loss"]))
    # 33 examples: 4 full batches and one of 1 a epoch; 24 of them with validation_split.
    # (With an unknown cardinality Keras's own optimizers count 12 here too.)
    expected = {"validation_split": 6, "unknown_cardinality": 12}.get(case, 10)
    assert int(opt.iterations.numpy()) == expected
    assert not np.array_equal(model.get_weights()[0], initial)
    assert_finite_state(model, opt)
