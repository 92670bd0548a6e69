"""Keras masks in the curvature statistics (docs/design.md §3 "Masks", §6 oracle 14).

A padded position (Embedding(mask_zero=True), keras.layers.Masking, a mask passed to a
layer) contributes to no factor: padding the same real tokens to more positions changes
no A, G, token count or normalisation statistic, while without a mask it does. The
references are Keras's own forward pass and loss, `tf.GradientTape` Jacobians, NumPy
and explicit loops over the positions; never tf_kfac's arithmetic.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_kfac
from tf_kfac import _keras_internals as internals

TOL = 1e-4
VOCAB, CLASSES = 9, 3


def _sce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _mse(y, z):
    return keras.losses.mean_squared_error(tf.cast(y, z.dtype), z)


def _step(model, loss, x, y, fisher="exact", sample_weight=None, **kwargs):
    opt = tf_kfac.KFAC(fisher=fisher, seed=3, learning_rate=1e-3, momentum=0.0,
                       kl_clip=None, factor_decay=0.0, **kwargs)
    opt.attach(model, loss=loss)
    opt.step(x, y, sample_weight=sample_weight)
    return opt


def _token_model(positions, mask_zero=True):
    """Embedding → Dense → LayerNorm → MultiHeadAttention (+ residual) → BatchNorm →
    masked mean pooling → Dense: no positional information, so only the real tokens
    (and not where they sit) decide the output when the padding is masked."""
    tokens = keras.Input((positions,), dtype="int32")
    h = keras.layers.Embedding(VOCAB, 4, mask_zero=mask_zero, name="embedding")(tokens)
    h = keras.layers.Dense(6, activation="tanh", name="dense")(h)
    h = keras.layers.LayerNormalization(name="layer_norm")(h)
    h = keras.layers.Add()([h, keras.layers.MultiHeadAttention(2, 3, name="attention")(h, h)])
    h = keras.layers.BatchNormalization(name="batch_norm")(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(tokens, keras.layers.Dense(CLASSES, name="head")(h))


def _factors(opt, model):
    """Every block's statistics, by layer path (the attention's projections included)."""
    layers = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.MultiHeadAttention):
            layers += list(internals.attention_projections(layer).values())
        elif layer.trainable_weights:
            layers.append(layer)
    return {layer.path: [np.asarray(f, np.float64) for f in opt.kronecker_factors(layer)]
            for layer in layers}


def _padded_factors(x, extra, where, mask_zero, **step_kwargs):
    """The factors after one step on `x` and on `x` with `extra` padding tokens per
    example (at the end, or spread between the real tokens), same weights."""
    y = np.arange(len(x)) % CLASSES
    out = []
    for padding in (0, extra):
        padded = np.zeros((len(x), x.shape[1] + padding), "int32")
        for i, row in enumerate(x):
            if where == "end":
                padded[i, : len(row)] = row
            else:  # each real token is followed by a padding token while they last
                slots = [2 * t if t < padding else padding + t for t in range(len(row))]
                padded[i, slots] = row
        keras.utils.set_random_seed(7)
        model = _token_model(padded.shape[1], mask_zero)
        out.append(_factors(_step(model, _sce(), padded, y, **step_kwargs), model))
    return out


def _tokens(rng):
    x = rng.integers(1, VOCAB, (5, 6)).astype("int32")
    x[1, 4:] = 0  # some examples are already padded
    x[3, 2:] = 0
    x[4, 0] = 0  # a padding token in front
    return x


@pytest.mark.parametrize(("fisher", "sharing", "where", "weighted"), [
    ("exact", "expand", "end", False),
    ("exact", "reduce", "spread", False),
    ("sampled", "expand", "spread", True),
    ("empirical", "expand", "end", True),
])
def test_padding_changes_no_factor(fisher, sharing, where, weighted, rng, rel_err):
    """Padding the same real tokens with 4 more masked positions leaves every block's
    statistics as they were: Embedding counts and G, the Dense and attention
    projections' A and G (both flavours), LayerNormalization's and BatchNormalization's
    (γ, β) Fisher; with sample weights too."""
    x = _tokens(rng)
    weights = np.array([1.0, 0.5, 2.0, 0.0, 1.5], "float32") if weighted else None
    short, long = _padded_factors(x, 4, where, True, fisher=fisher, weight_sharing=sharing,
                                  sample_weight=weights)
    assert len(short) == 9  # embedding, dense, LN, 4 projections, BN, head
    for path, factors in short.items():
        for a, b in zip(factors, long[path], strict=True):
            # ("reduce" makes the key projection's G zero up to rounding: the
            # softmax ignores a shift shared by all keys, so Σₜ gₜ = 0.)
            assert np.abs(a).max() > 0, path
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max() + 1e-12,
                                       err_msg=path)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_padding_changes_no_factor_inside_fit(jit_compile, rng, rel_err):
    """The same property when the masks travel through `fit`'s traced train
    function (and with XLA): one epoch of one batch, factors of that batch."""
    x = _tokens(rng)
    y = np.arange(len(x)) % CLASSES
    results = []
    for padding in (0, 4):
        keras.utils.set_random_seed(7)
        model = _token_model(x.shape[1] + padding)
        opt = tf_kfac.KFAC(fisher="exact", seed=3, factor_decay=0.0)
        model.compile(optimizer=opt, loss=_sce(), jit_compile=jit_compile)
        model.fit(np.pad(x, [(0, 0), (0, padding)]), y, batch_size=len(x), epochs=1,
                  shuffle=False, verbose=0)
        results.append(_factors(opt, model))
    short, long = results
    for path, factors in short.items():
        for a, b in zip(factors, long[path], strict=True):
            assert np.abs(a).max() > 0, path
            assert rel_err(b, a) < 1e-5, path


def test_without_mask_padding_changes_every_factor(rng, rel_err):
    """Negative control: with mask_zero=False the padding tokens are real inputs, and
    every block's statistics change with the padding."""
    short, long = _padded_factors(_tokens(rng), 4, "end", False, fisher="exact")
    for path, factors in short.items():
        assert max(rel_err(b, a) for a, b in zip(factors, long[path], strict=True)) > 1e-2, path


def test_embedding_counts_skip_the_masked_tokens(rng, rel_err):
    """A_vv = (1/B) Σᵢ Σₜ mᵢₜ [xᵢₜ = v] by an explicit loop: token 0 is never counted
    with mask_zero=True, and the counts of the other tokens are those of the real
    positions."""
    x = _tokens(rng)
    model = _token_model(x.shape[1])
    opt = _step(model, _sce(), x, np.arange(5) % CLASSES)
    counts = np.zeros(VOCAB)
    for row in x:
        for token in row:
            if token != 0:
                counts[token] += 1.0 / len(x)
    a, _ = opt.kronecker_factors(model.get_layer("embedding"))
    assert float(a[0]) == 0.0
    assert rel_err(a, counts) < 1e-6


# --------------------------------------------------------- Masking before Dense

def _masking_model(positions, features, masking=True):
    inputs = keras.Input((positions, features))
    h = keras.layers.Masking(0.0)(inputs) if masking else inputs
    h = keras.layers.Dense(4, name="dense")(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(h))


def test_masking_layer_masks_the_dense_factors(rng, rel_err):
    """keras.layers.Masking before a Dense on (B, T, d), fisher="empirical": A =
    (1/B) Σᵢ Σ_real āāᵀ and G = c·(1/B) Σᵢ (1/Tᵢ) Σ_real ggᵀ, with gᵢₜ = (B/c)·∂h/∂sᵢₜ
    from a hand-written forward pass (masked mean pooling), by explicit loops over the
    real positions. Without the Masking layer (negative control) A is not that."""
    batch, positions, features = 4, 5, 3
    x = rng.normal(size=(batch, positions, features)).astype("float32")
    real = np.array([5, 3, 1, 4])
    for i, count in enumerate(real):
        x[i, count:] = 0.0
    y = rng.normal(size=(batch, 2)).astype("float32")
    model = _masking_model(positions, features)
    dense, head = model.get_layer("dense"), model.get_layer("head")
    kernel, bias = (np.asarray(v, np.float64) for v in (dense.kernel, dense.bias))
    s = tf.Variable(x.astype(np.float64) @ kernel + bias)
    mask = (np.arange(positions)[None] < real[:, None]).astype(np.float64)
    with tf.GradientTape() as tape:
        pooled = tf.reduce_sum(s * mask[..., None], axis=1) / real[:, None]
        z = pooled @ np.asarray(head.kernel, np.float64) + np.asarray(head.bias, np.float64)
        h = tf.reduce_mean(_mse(y, z))
    c = 1.0 / 2
    g_rows = (batch / c) * tape.gradient(h, s).numpy()
    a_ref = np.zeros((features + 1, features + 1))
    g_ref = np.zeros((4, 4))
    for i in range(batch):
        for t in range(real[i]):
            a_bar = np.append(x[i, t], 1.0)
            a_ref += np.outer(a_bar, a_bar) / batch
            g_ref += c * np.outer(g_rows[i, t], g_rows[i, t]) / (batch * real[i])
    opt = _step(model, keras.losses.MeanSquaredError(), x, y, "empirical")
    a, g = opt.kronecker_factors(dense)
    assert rel_err(a, a_ref) < 1e-6
    assert rel_err(g, g_ref) < TOL
    plain = _masking_model(positions, features, masking=False)
    plain.set_weights(model.get_weights())
    a_plain, _ = _step(plain, keras.losses.MeanSquaredError(), x, y,
                       "empirical").kronecker_factors(plain.get_layer("dense"))
    assert rel_err(a_plain, a_ref) > 0.1


def _shared_model(positions, features):
    """One Dense called on two masked sequences (weight sharing across calls)."""
    first, second = keras.Input((positions, features)), keras.Input((positions, features))
    dense = keras.layers.Dense(3, name="shared")
    pool = keras.layers.GlobalAveragePooling1D()
    h = keras.layers.Concatenate()([pool(dense(keras.layers.Masking(0.0)(first))),
                                    pool(dense(keras.layers.Masking(0.0)(second)))])
    return keras.Model([first, second], keras.layers.Dense(2, name="head")(h))


@pytest.mark.parametrize("sharing", ["expand", "reduce"])
def test_shared_layer_counts_the_real_positions_of_every_call(sharing, rng, rel_err):
    """A Dense called on two Masking-ed sequences: with "expand", A sums āāᵀ over the
    real positions of both calls (explicit loop); with "reduce", ā is the mean over
    them. Both factors stay as they were when both inputs get 3 more padded positions."""
    batch, positions, features = 3, 4, 2
    inputs = [rng.normal(size=(batch, positions, features)).astype("float32")
              for _ in range(2)]
    inputs[0][0, 2:] = 0.0
    inputs[1][1, 1:] = 0.0
    inputs[1][2, 1:] = 0.0
    y = rng.normal(size=(batch, 2)).astype("float32")
    a_ref = np.zeros((features + 1, features + 1))
    for i in range(batch):
        rows = [np.append(x[i, t], 1.0) for x in inputs for t in range(positions)
                if np.any(x[i, t] != 0.0)]
        if sharing == "expand":
            a_ref += sum(np.outer(r, r) for r in rows) / batch
        else:
            mean = np.mean(rows, axis=0)
            a_ref += np.outer(mean, mean) / batch
    factors = []
    for padding in (0, 3):
        keras.utils.set_random_seed(4)
        model = _shared_model(positions + padding, features)
        padded = [np.pad(x, [(0, 0), (0, padding), (0, 0)]) for x in inputs]
        opt = _step(model, keras.losses.MeanSquaredError(), padded, y, "exact",
                    weight_sharing=sharing)
        factors.append([np.asarray(f, np.float64)
                        for f in opt.kronecker_factors(model.get_layer("shared"))])
    assert rel_err(factors[0][0], a_ref) < 1e-6
    for short, long in zip(*factors, strict=True):
        assert rel_err(long, short) < 1e-5


# --------------------------------------------------------- brute-force GGN

def _ggn(model, x, y, variables):
    """(1/B) Σ JᵀHJ over the concatenated `variables` (row-major vec of W̄ = [K; b]),
    from Keras's forward pass and mean squared error."""
    with tf.GradientTape(persistent=True) as tape:
        z = tf.cast(model(x, training=True), tf.float64)
    jac = np.concatenate([tf.reshape(tape.jacobian(z, v), [tf.size(z), -1]).numpy()
                          for v in variables], axis=1).astype(np.float64)
    z0 = tf.constant(z.numpy())
    with tf.GradientTape() as outer:
        outer.watch(z0)
        with tf.GradientTape() as inner:
            inner.watch(z0)
            h = tf.reduce_mean(_mse(tf.constant(y), z0))
        dz = inner.gradient(h, z0)
    hess = outer.jacobian(dz, z0).numpy().reshape(z0.shape.num_elements(), -1)
    return jac.T @ hess @ jac


def _oracle_model(positions):
    tokens = keras.Input((positions,), dtype="int32")
    h = keras.layers.Embedding(6, 3, mask_zero=True, name="embedding",
                               embeddings_initializer=keras.initializers.RandomNormal(
                                   stddev=1.0))(tokens)
    h = keras.layers.Dense(4, activation="tanh", name="dense")(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(tokens, keras.layers.Dense(2, name="head")(h))


def test_single_real_position_with_padding_equals_exact_ggn(rng, rel_err):
    """B = 1, one real token among padding tokens, fisher="exact": the masked Dense
    block's kron(A, G) and the Embedding's kron(diag A, G) equal the brute-force GGN
    blocks of Keras's objective, exactly as for an unpadded single position. Negative
    control: the factors that count the padded positions (A over all T positions, G
    averaged over T, built from the oracle's own blocks) are far from the GGN."""
    positions = 5
    x = np.array([[0, 0, 4, 0, 0]], "int32")
    y = rng.normal(size=(1, 2)).astype("float32")
    model = _oracle_model(positions)
    dense, embedding = model.get_layer("dense"), model.get_layer("embedding")
    ggn_dense = _ggn(model, x, y, [dense.kernel, dense.bias])
    ggn_embedding = _ggn(model, x, y, [embedding.embeddings])
    opt = _step(model, keras.losses.MeanSquaredError(), x, y, "exact")
    a, g = (np.asarray(f, np.float64) for f in opt.kronecker_factors(dense))
    assert rel_err(np.kron(a, g), ggn_dense) < TOL
    a_e, g_e = (np.asarray(f, np.float64) for f in opt.kronecker_factors(embedding))
    np.testing.assert_array_equal(a_e, np.eye(6)[4])
    assert rel_err(np.kron(np.diag(a_e), g_e), ggn_embedding) < TOL
    # Negative control, from the oracle alone: the bias block of the GGN is the real
    # position's G (its ā ends in 1), the padded positions' inputs are table row 0.
    g_real = ggn_dense[-4:, -4:]
    table = np.asarray(embedding.embeddings, np.float64)
    a_all = sum(np.outer(np.append(table[token], 1.0), np.append(table[token], 1.0))
                for token in x[0])
    assert rel_err(np.kron(a_all, g_real / positions), ggn_dense) > 0.1
    assert rel_err(np.kron(a_all, g_real), ggn_dense) > 0.1


# --------------------------------------------------------- other layers and inputs

def test_explicit_batch_norm_mask_is_used(rng, rel_err):
    """A mask passed explicitly to BatchNormalization (a subclassed model): its (γ, β)
    Fisher does not change when masked positions are appended, and x̂ uses Keras's
    masked moments; without the mask (negative control) it changes."""

    class Model(keras.Model):
        def __init__(self, use_mask):
            super().__init__()
            self.use_mask = use_mask
            self.dense = keras.layers.Dense(3, name="dense")
            self.norm = keras.layers.BatchNormalization(name="norm")
            self.head = keras.layers.Dense(2, name="head")

        def call(self, x):
            mask = tf.reduce_any(tf.not_equal(x, 0.0), axis=-1)
            h = self.norm(self.dense(x), mask=mask) if self.use_mask else self.norm(
                self.dense(x))
            weights = tf.cast(mask, h.dtype)[..., None]
            return self.head(tf.reduce_sum(h * weights, 1) / tf.reduce_sum(weights, 1))

    x = rng.normal(size=(4, 3, 2)).astype("float32")
    x[2, 1:] = 0.0
    y = rng.normal(size=(4, 2)).astype("float32")
    changes = {}
    for use_mask in (True, False):
        fishers = []
        for padding in (0, 3):
            keras.utils.set_random_seed(5)
            model = Model(use_mask)
            padded = np.pad(x, [(0, 0), (0, padding), (0, 0)])
            model(padded)  # builds the subclassed model before K-FAC sees its layers
            opt = _step(model, keras.losses.MeanSquaredError(), padded, y)
            (f,) = opt.kronecker_factors(model.norm)
            fishers.append(np.asarray(f, np.float64))
        changes[use_mask] = rel_err(fishers[1], fishers[0])
    assert changes[True] < 1e-5
    assert changes[False] > 1e-2


def test_convolution_ignores_the_mask_as_keras_does(rng, rel_err):
    """Keras convolutions drop a mask (with a warning) and convolve every position, so
    a Conv1D after Embedding(mask_zero=True) gets the factors it gets without the mask
    (same weights, same outputs); the Embedding's own counts do change."""
    x = _tokens(rng)
    y = np.arange(5) % 2
    factors, outputs = [], []
    for mask_zero in (True, False):
        keras.utils.set_random_seed(2)
        model = keras.Sequential([
            keras.Input((x.shape[1],), dtype="int32"),
            keras.layers.Embedding(VOCAB, 4, mask_zero=mask_zero, name="embedding"),
            keras.layers.Conv1D(3, 2, activation="relu", name="conv"),
            keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(2, name="head")])
        outputs.append(model.predict(x, verbose=0))
        opt = _step(model, _sce(), x, y)
        factors.append([np.asarray(f, np.float64) for layer in ("conv", "embedding")
                        for f in opt.kronecker_factors(model.get_layer(layer))])
    np.testing.assert_array_equal(outputs[0], outputs[1])  # Keras ignores the mask
    (conv_a, conv_g, emb_a, _), (conv_a0, conv_g0, emb_a0, _) = factors
    assert rel_err(conv_a, conv_a0) < 1e-6 and rel_err(conv_g, conv_g0) < 1e-5
    assert rel_err(emb_a, emb_a0) > 0.1


def test_mask_over_features_is_a_clear_error(rng):
    """A mask with one axis per input axis (it would mask single features of a
    position) reaching a Dense layer raises a ValueError that says what shape to use;
    no factor is written."""

    class FeatureMask(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.supports_masking = True

        def call(self, x):
            return x

        def compute_mask(self, x, mask=None):
            return keras.ops.not_equal(x, 0.0)

    inputs = keras.Input((4, 3))
    h = keras.layers.Dense(2, name="masked_dense")(FeatureMask()(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(keras.layers.Flatten()(h)))
    opt = tf_kfac.KFAC(fisher="exact", seed=0)
    opt.attach(model, loss="mse")
    x = rng.normal(size=(2, 4, 3)).astype("float32")
    with pytest.raises(ValueError, match="marks whole positions"):
        opt.step(x, np.zeros((2, 1), "float32"))
    a, g = opt.kronecker_factors(model.get_layer("masked_dense"))
    assert not np.any(np.asarray(a)) and not np.any(np.asarray(g))


def test_fit_trains_a_masked_model_and_inference_is_unchanged(tmp_path, rng):
    """Embedding(mask_zero=True) → Dense and MultiHeadAttention → pooling → Dense trains
    with `fit` (finite state, the loss falls); `predict`, `evaluate` and the exported
    SavedModel give what a never-attached copy with the same weights gives."""
    tokens = keras.Input((8,), dtype="int32")
    h = keras.layers.Embedding(12, 8, mask_zero=True)(tokens)
    h = keras.layers.Dense(8, activation="relu")(h)
    h = keras.layers.LayerNormalization()(h + keras.layers.MultiHeadAttention(2, 4)(h, h))
    out = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling1D()(h))
    model = keras.Model(tokens, out)
    x = rng.integers(1, 12, (96, 8)).astype("int32")
    lengths = rng.integers(2, 9, 96)
    x[np.arange(8)[None] >= lengths[:, None]] = 0
    y = np.minimum(((x > 0) & (x < 4)).sum(axis=1), 2).astype("int32")
    opt = tf_kfac.KFAC(seed=0)
    model.compile(optimizer=opt, loss=_sce(), metrics=["accuracy"])
    history = model.fit(x, y, batch_size=16, epochs=6, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert history.history["loss"][-1] < 0.8 * history.history["loss"][0]
    assert all(np.all(np.isfinite(v.numpy())) for v in opt.variables)
    fresh = keras.models.clone_model(model)
    fresh.set_weights(model.get_weights())
    fresh.compile(loss=_sce(), metrics=["accuracy"])
    expected = fresh.predict(x, verbose=0)
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model.evaluate(x, y, verbose=0),
                               fresh.evaluate(x, y, verbose=0), rtol=1e-6)
    model.export(str(tmp_path / "exported"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "exported"))
    np.testing.assert_allclose(served.serve(tf.constant(x)).numpy(), expected,
                               rtol=1e-5, atol=1e-6)
