"""SimpleRNN, LSTM and GRU blocks (docs/design.md §3, oracle 13).

The references never go through tf_kfac: each cell is written out by hand, unrolled over
time in float64 with every step's input projection zₜ = [xₜ; 1]·W̄ and recurrent projection
rₜ = hₜ₋₁·Ū as tensors of their own (checked against the layer's own outputs), so that
`tf.GradientTape` Jacobians give each step's per-example gradients, and the output Hessian
comes from Keras's own loss function. With the "expand" flavour over the T steps,
A = (1/B) Σᵢ Σₜ āᵢₜāᵢₜᵀ and G = c·(1/B) Σᵢ (1/T) Σₜ E[gᵢₜgᵢₜᵀ] for each of the two maps.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_kfac
from tf_kfac import capture
from tf_kfac.blocks import RecurrentBlock
from tf_kfac.blocks import recurrent as recurrent_blocks

TOL = 1e-4
KINDS = {"SimpleRNN": keras.layers.SimpleRNN, "LSTM": keras.layers.LSTM,
         "GRU": keras.layers.GRU}
B, T, D, UNITS, K = 4, 3, 3, 2, 2


def f64(value) -> np.ndarray:
    return np.asarray(value.numpy() if hasattr(value, "numpy") else value, np.float64)


# ----------------------------------------------------- cells written out (float64)

def _sig(v):
    return 1.0 / (1.0 + tf.exp(-v))


def _cell_step(kind, activation, z, r, state):
    """One step of the hand-written cell: (h, new state) from z, r and the state."""
    h_prev, c_prev = state
    if kind == "SimpleRNN":
        h = z + r if activation is None else tf.tanh(z + r)
        return h, (h, c_prev)
    if kind == "LSTM":
        u = UNITS
        s = z + r
        i, f, g, o = (s[:, j * u:(j + 1) * u] for j in range(4))
        c = _sig(f) * c_prev + _sig(i) * tf.tanh(g)
        h = _sig(o) * tf.tanh(c)
        return h, (h, c)
    u = UNITS  # GRU, reset_after=True
    update = _sig(z[:, :u] + r[:, :u])
    reset = _sig(z[:, u:2 * u] + r[:, u:2 * u])
    candidate = tf.tanh(z[:, 2 * u:] + reset * r[:, 2 * u:])
    h = update * h_prev + (1.0 - update) * candidate
    return h, (h, c_prev)


def _wbars(cell):
    """(W̄ for the input map, Ū for the recurrent map) by the block's convention."""
    kernel, recurrent_kernel = f64(cell.kernel), f64(cell.recurrent_kernel)
    if not cell.use_bias:
        return kernel, recurrent_kernel
    bias = f64(cell.bias)
    if bias.ndim == 2:  # GRU: the input bias, then the recurrent bias
        return (np.concatenate([kernel, bias[:1]]),
                np.concatenate([recurrent_kernel, bias[1:]]))
    return np.concatenate([kernel, bias[None]]), recurrent_kernel


class Reference:
    """Factors by the expand definitions and the exact GGN blocks, by brute force."""

    def __init__(self, model, kind, x, y, activation="tanh", go_backwards=False):
        rnn, head = model.layers[0], model.layers[1]
        cell = rnn.cell
        w_in, w_rec = (tf.Variable(w) for w in _wbars(cell))
        two = cell.use_bias and len(cell.bias.shape) == 2
        n_steps = x.shape[1]
        steps = range(n_steps - 1, -1, -1) if go_backwards else range(n_steps)
        rows_in, rows_rec, zs, rs = [], [], [], []
        with tf.GradientTape(persistent=True) as tape:
            state = (tf.zeros((B, UNITS), tf.float64), tf.zeros((B, UNITS), tf.float64))
            for t in steps:
                a_in = tf.constant(x[:, t], tf.float64)
                if cell.use_bias:
                    a_in = tf.concat([a_in, tf.ones((B, 1), tf.float64)], axis=1)
                a_rec = tf.concat([state[0], tf.ones((B, 1), tf.float64)], 1) if two else state[0]
                z, r = a_in @ w_in, a_rec @ w_rec
                rows_in.append(a_in.numpy())
                rows_rec.append(a_rec.numpy())
                zs.append(z)
                rs.append(r)
                _, state = _cell_step(kind, activation, z, r, state)
            out = state[0] @ f64(head.kernel) + f64(head.bias)
        self.output = out.numpy()
        z0 = tf.constant(out)
        with tf.GradientTape() as outer:
            outer.watch(z0)
            with tf.GradientTape() as inner:
                inner.watch(z0)
                h = tf.reduce_mean(keras.losses.mean_squared_error(y, z0))
            dz = inner.gradient(h, z0)
        hess = outer.jacobian(dz, z0).numpy().reshape(B * K, B * K)
        self.factors, self.ggn = [], []
        for rows, targets, w in ((rows_in, zs, w_in), (rows_rec, rs, w_rec)):
            rows = np.stack(rows, axis=1)  # (B, T, d)
            a = np.einsum("btd,bte->de", rows, rows) / B
            g = 0.0
            for target in targets:
                m = tape.jacobian(out, target).numpy()  # (B, K, B, width)
                g = g + sum(m[i, :, i].T @ hess.reshape(B, K, B, K)[i, :, i] @ m[i, :, i]
                            for i in range(B))
            self.factors.append((a, g / n_steps))
            jac = tape.jacobian(out, w).numpy().reshape(B * K, -1)
            self.ggn.append(jac.T @ hess @ jac)
        del tape


def _model(kind, *, activation="tanh", time_steps=T, **options):
    layer_options = dict(options)
    if kind == "SimpleRNN":
        layer_options["activation"] = activation
    return keras.Sequential([keras.Input((time_steps, D)), KINDS[kind](UNITS, **layer_options),
                             keras.layers.Dense(K)])


def _one_step(model, x, y):
    opt = tf_kfac.KFAC(fisher="exact", learning_rate=1e-3, momentum=0.0, kl_clip=None,
                       factor_decay=0.0)
    opt.attach(model, loss=keras.losses.MeanSquaredError())
    opt.step(x, y)
    return [tuple(f64(f) for f in pair) for pair in opt.kronecker_factors(model.layers[0])]


CASES = [("SimpleRNN", dict(activation=None)), ("SimpleRNN", {}), ("LSTM", {}),
         ("GRU", {}), ("LSTM", dict(go_backwards=True)), ("GRU", dict(use_bias=False))]


@pytest.mark.parametrize(("kind", "options"), CASES)
def test_factors_equal_the_unrolled_loop(kind, options, rng, rel_err):
    """A and G of both maps equal the expand definitions from the hand-unrolled cell
    (B = 4, T = 3, fisher="exact"); a linear SimpleRNN is the issue's linear cell.
    Negative control: summing G over the steps (no 1/T) is rejected."""
    options = dict(options)
    activation = options.pop("activation", "tanh")
    model = _model(kind, activation=activation, **options)
    x = rng.normal(size=(B, T, D)).astype("float32")
    y = rng.normal(size=(B, K)).astype("float32")
    ref = Reference(model, kind, x, y, activation, options.get("go_backwards", False))
    np.testing.assert_allclose(ref.output, model(x).numpy(), rtol=1e-4, atol=1e-5)
    factors = _one_step(model, x, y)
    for (a, g), (a_ref, g_ref) in zip(factors, ref.factors, strict=True):
        assert rel_err(a, a_ref) < TOL
        assert rel_err(g, g_ref) < TOL
        assert rel_err(g, g_ref * T) > 100 * TOL


def test_one_step_is_exact_and_more_steps_are_not(rng, rel_err):
    """With T = 1 and a linear cell the input map is a Dense layer: kron(A, G) is the
    exact GGN block at B = 4. With T = 3 the steps are not independent and kron(A, G)
    misses the GGN (the comparison can fail)."""
    x1 = rng.normal(size=(B, 1, D)).astype("float32")
    y = rng.normal(size=(B, K)).astype("float32")
    errors = {}
    for time_steps, x in ((1, x1), (3, rng.normal(size=(B, 3, D)).astype("float32"))):
        model = _model("SimpleRNN", activation=None, time_steps=time_steps)
        ref = Reference(model, "SimpleRNN", x, y, None)
        (a, g), _ = _one_step(model, x, y)
        errors[time_steps] = rel_err(np.kron(a, g), ref.ggn[0])
    assert errors[1] < TOL
    assert errors[3] > 100 * TOL


# ------------------------------------------------- the recorded loop is Keras's own

def _recorded_and_own(model, rnn_layers, x):
    expected = model(x)
    for layer in rnn_layers:
        RecurrentBlock.record_calls(layer)
    try:
        with capture.recording(rnn_layers) as record:
            actual = model(x)
        calls = [record.of(layer) for layer in rnn_layers]
    finally:
        for layer in rnn_layers:
            capture.unwrap_layer(layer)
    return tf.nest.flatten(expected), tf.nest.flatten(actual), calls


VARIANTS = {
    "last": dict(),
    "sequences": dict(return_sequences=True),
    "backwards": dict(return_sequences=True, go_backwards=True),
    "state": dict(return_state=True),
    "unroll": dict(unroll=True),
    "implementation1": dict(implementation=1),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_recorded_loop_gives_keras_outputs(kind, variant, rng):
    """Inside a recording the layer's outputs (and returned states) equal Keras's own,
    for every option that changes the loop, with a Masking layer (padded steps)."""
    options = dict(VARIANTS[variant])
    if variant == "implementation1" and kind == "SimpleRNN":
        options = {}
    inputs = keras.Input((5, D))
    masked = keras.layers.Masking()(inputs)
    outputs = KINDS[kind](UNITS, **options)(masked)
    model = keras.Model(inputs, outputs)
    x = rng.normal(size=(3, 5, D)).astype("float32")
    x[0, 3:] = 0.0  # padding
    rnn = model.layers[2]
    expected, actual, calls = _recorded_and_own(model, [rnn], x)
    assert len(calls[0]) == 1 and calls[0][0].hidden.shape == (3, 5, UNITS)
    assert not bool(tf.reduce_all(calls[0][0].mask))
    for e, a in zip(expected, actual, strict=True):
        np.testing.assert_allclose(a.numpy(), e.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_recorded_loop_applies_keras_dropout_masks(kind, rng):
    """With `training=True` and dropout (and SimpleRNN's recurrent dropout), the recorded
    loop uses the masks Keras draws for the call: from the same seed state it gives Keras's
    own outputs, and the recorded input is the dropped-out input."""
    options = dict(dropout=0.5)
    if kind == "SimpleRNN":
        options["recurrent_dropout"] = 0.5
    layer = KINDS[kind](UNITS, return_sequences=True, **options)
    model = keras.Sequential([keras.Input((4, D)), layer])
    x = rng.normal(size=(3, 4, D)).astype("float32")
    model(x)
    seed_state = layer.cell.seed_generator.state.numpy()
    expected = model(x, training=True)
    layer.cell.seed_generator.state.assign(seed_state)
    RecurrentBlock.record_calls(layer)
    try:
        with capture.recording([layer]) as record:
            actual = model(x, training=True)
    finally:
        capture.unwrap_layer(layer)
    np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    recorded = record.of(layer)[0].inputs.numpy()
    assert np.mean(recorded == 0.0) > 0.2 and not np.allclose(recorded, x)


def test_a_wrong_cell_step_is_caught(rng, monkeypatch):
    """Negative control: an LSTM step with two gates swapped does not give Keras's outputs."""
    def swapped(cell, projected, recurrent, states):
        z_i, z_f, z_c, z_o = tf.split(projected + recurrent, 4, axis=-1)
        return recurrent_blocks._lstm(cell, tf.concat([z_f, z_i, z_c, z_o], -1), 0.0, states)

    monkeypatch.setitem(recurrent_blocks._CELL_STEPS, keras.layers.LSTMCell, swapped)
    model = keras.Sequential([keras.Input((4, D)), keras.layers.LSTM(UNITS)])
    expected, actual, _ = _recorded_and_own(model, [model.layers[0]],
                                            rng.normal(size=(2, 4, D)).astype("float32"))
    assert not np.allclose(actual[0].numpy(), expected[0].numpy(), atol=1e-4)


def test_bidirectional_layers_are_recorded_in_both_directions(rng):
    model = keras.Sequential([keras.Input((5, D)), keras.layers.Masking(),
                              keras.layers.Bidirectional(keras.layers.GRU(UNITS,
                                                                          return_sequences=True))])
    bidirectional = model.layers[1]
    layers = [bidirectional.forward_layer, bidirectional.backward_layer]
    x = rng.normal(size=(2, 5, D)).astype("float32")
    x[1, 2:] = 0.0
    expected, actual, calls = _recorded_and_own(model, layers, x)
    assert [len(c) for c in calls] == [1, 1]
    np.testing.assert_allclose(actual[0].numpy(), expected[0].numpy(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------- training

def _sequence_task(rng, n=64, steps=6):
    x = rng.normal(size=(n, steps, D)).astype("float32")
    y = (x[:, :, 0].sum(axis=1) > 0).astype("int32")
    return x, y


class SubclassedRNN(keras.Model):
    def __init__(self, layer_class):
        super().__init__()
        self.rnn = layer_class(8)
        self.head = keras.layers.Dense(2)

    def call(self, inputs):
        return self.head(self.rnn(inputs))


def _build(form, layer_class):
    if form == "sequential":
        return keras.Sequential([keras.Input((6, D)), layer_class(8), keras.layers.Dense(2)])
    if form == "functional":
        inputs = keras.Input((6, D))
        return keras.Model(inputs, keras.layers.Dense(2)(layer_class(8)(inputs)))
    return SubclassedRNN(layer_class)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("form", ["sequential", "functional", "subclassed"])
def test_fit_trains_every_recurrent_kind_with_full_coverage(kind, form, rng):
    x, y = _sequence_task(rng)
    model = _build(form, KINDS[kind])
    model.compile(optimizer=tf_kfac.KFAC(),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, batch_size=16, epochs=4, verbose=0).history["loss"]
    assert history[-1] < history[0]
    summary = model.optimizer.summary()
    assert "(100.0%)" in summary and "recurrent" in summary
    for variable in model.optimizer.variables:
        assert np.all(np.isfinite(variable.numpy())), variable.path


def test_bidirectional_masked_stateful_and_dropout_models(rng):
    """Bidirectional with masking trains with curvature on both directions; a stateful
    LSTM and a GRU with input dropout train with full curvature; an LSTM with recurrent
    dropout (per-gate masks) trains first-order and the summary says why."""
    x, y = _sequence_task(rng)
    x[::3, 4:] = 0.0
    models = {
        "bidirectional": keras.Sequential([
            keras.Input((6, D)), keras.layers.Masking(),
            keras.layers.Bidirectional(keras.layers.LSTM(4)), keras.layers.Dense(2)]),
        "stateful": keras.Sequential([
            keras.Input((6, D), batch_size=16), keras.layers.LSTM(4, stateful=True),
            keras.layers.Dense(2)]),
        "dropout": keras.Sequential([
            keras.Input((6, D)), keras.layers.GRU(4, dropout=0.2), keras.layers.Dense(2)]),
        "per-gate dropout": keras.Sequential([
            keras.Input((6, D)), keras.layers.LSTM(4, recurrent_dropout=0.2),
            keras.layers.Dense(2)]),
    }
    for name, model in models.items():
        model.compile(optimizer=tf_kfac.KFAC(),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = model.fit(x, y, batch_size=16, epochs=3, verbose=0).history["loss"]
        assert history[-1] < history[0], name
        summary = model.optimizer.summary()
        if name == "per-gate dropout":
            assert "per-gate dropout masks" in summary and "(100.0%)" not in summary
        else:
            assert "(100.0%)" in summary, name


def test_keras_file_resumes_exactly_and_predict_is_keras_own(rng, tmp_path):
    """An LSTM model saved after 4 steps and trained on 4 more equals the run that never
    stopped (weights and every optimizer variable); outside K-FAC's step the layer runs
    Keras's own loop, so predict equals a fresh copy's."""
    x, y = _sequence_task(rng, n=128)
    model = _build("functional", keras.layers.LSTM)
    model.compile(optimizer=tf_kfac.KFAC(factor_update_interval=1, inverse_update_interval=3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:64], y[:64], batch_size=16, shuffle=False, verbose=0)
    model.save(tmp_path / "run.keras")
    model.fit(x[64:], y[64:], batch_size=16, shuffle=False, verbose=0)
    loaded = keras.models.load_model(tmp_path / "run.keras")
    loaded.fit(x[64:], y[64:], batch_size=16, shuffle=False, verbose=0)
    for actual, expected in zip(loaded.optimizer.variables, model.optimizer.variables,
                                strict=True):
        np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=1e-6, atol=1e-7,
                                   err_msg=expected.path)
    for actual, expected in zip(loaded.weights, model.weights, strict=True):
        np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=1e-6, atol=1e-7)
    fresh = _build("functional", keras.layers.LSTM)
    fresh.set_weights(model.get_weights())
    assert "inner_loop" in vars(model.layers[1])  # recorded inside K-FAC's step only
    np.testing.assert_allclose(model.predict(x, verbose=0), fresh.predict(x, verbose=0),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_masked_padding_changes_no_factor(kind, rng, rel_err):
    """Embedding(mask_zero=True) → recurrent layer → Dense: the same tokens padded to 6 and
    to 9 steps give the same factors of both recurrent maps (masked steps keep the state
    and enter no factor); with mask_zero=False the padding changes them."""
    tokens = rng.integers(1, 10, size=(4, 6))
    tokens[1, 4:] = 0
    tokens[3, 2:] = 0
    y = rng.integers(0, 2, size=(4,))
    padded = np.concatenate([tokens, np.zeros((4, 3), tokens.dtype)], axis=1)
    errors = {}
    for mask_zero in (True, False):
        factors = []
        for x in (tokens, padded):
            keras.utils.set_random_seed(3)
            model = keras.Sequential([
                keras.Input((x.shape[1],), dtype="int32"),
                keras.layers.Embedding(10, D, mask_zero=mask_zero),
                KINDS[kind](UNITS), keras.layers.Dense(2)])
            opt = tf_kfac.KFAC(fisher="exact", factor_decay=0.0)
            opt.attach(model, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            opt.step(x, y)
            factors.append([f64(f) for f in tf.nest.flatten(
                opt.kronecker_factors(model.layers[1]))])
        errors[mask_zero] = max(rel_err(a, b) for a, b in zip(*factors, strict=True))
    assert errors[True] < 1e-5
    assert errors[False] > 1e-2


def test_the_adaptive_mode_trains_recurrent_layers(rng):
    """The adaptive mode's quadratic model differentiates the network in forward mode,
    which TensorFlow supports through an unrolled time loop only: with a fixed number of
    steps LSTM and GRU train; with an unknown number (a dataset of unknown length) the
    fixed mode trains and the adaptive mode's error says what to do."""
    x, y = _sequence_task(rng)
    for layer_class in (keras.layers.LSTM, keras.layers.GRU):
        model = keras.Sequential([keras.Input((6, D)), layer_class(4), keras.layers.Dense(2)])
        model.compile(optimizer=tf_kfac.KFAC(adaptive=True),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = model.fit(x, y, batch_size=16, epochs=3, verbose=0).history["loss"]
        assert history[-1] < history[0] and np.isfinite(history[-1])
    model = keras.Sequential([keras.Input((None, D)), keras.layers.LSTM(4),
                              keras.layers.Dense(2)])
    model.compile(optimizer=tf_kfac.KFAC(adaptive=True),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ragged = tf.data.Dataset.from_tensor_slices((x, y)).batch(16).map(  # length unknown
        lambda a, b: (tf.reshape(a, [tf.shape(a)[0], -1, D]), b))
    assert ragged.element_spec[0].shape[1] is None
    fixed_mode = keras.Sequential([keras.Input((None, D)), keras.layers.LSTM(4),
                                   keras.layers.Dense(2)])
    fixed_mode.compile(optimizer=tf_kfac.KFAC(),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = fixed_mode.fit(ragged, epochs=3, verbose=0).history["loss"]
    assert history[-1] < history[0]  # the fixed mode needs no fixed length
    with pytest.raises(ValueError, match=r"fixed(.|\n)*keras.Input\(\(T, features\)\)"):
        model.fit(ragged, epochs=1, verbose=0)
