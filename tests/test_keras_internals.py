"""One test per helper in `tf_kfac/_keras_internals.py`.

Each helper leans on something private in Keras. These tests pin down exactly
what tf_kfac relies on, so that a Keras release that changes it fails here,
loudly, instead of letting K-FAC silently stop running.
"""

from __future__ import annotations

import inspect

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

import tf_kfac
import tf_kfac.training
from tf_kfac import _keras_internals as internals

# Helpers covered below; `test_every_helper_has_a_test` keeps this list honest.
COVERED = {
    "install_fit_hook",
    "fit_hook_installed",
    "overrides_train_step",
    "unwrap_optimizer",
    "find_model_in_call_stack",
    "flatten_layers",
    "backend_rnn",
    "check_rnn_time_loop",
    "call_has_training_arg",
    "compiled_loss",
    "compute_loss",
    "update_loss_tracker",
    "wrap_loss_function",
    "in_symbolic_build",
    "keras_mask",
    "attention_projections",
    "add_replica_local_variable",
    "loss_scale_settings",
    "loss_scale_variables",
}


def _mlp():
    return keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(5, activation="tanh", kernel_regularizer=keras.regularizers.L2(0.1)),
        keras.layers.Dense(3, activation="softmax"),
    ])


def _data(n=16):
    rng = np.random.RandomState(0)
    x = rng.randn(n, 4).astype("float32")
    return x, (x[:, 0] > 0).astype("int32")


def test_every_helper_has_a_test():
    """Each public function of `_keras_internals` is in COVERED (has a test
    here), and the failure message names the Keras version."""
    helpers = {name for name, value in vars(internals).items()
               if inspect.isfunction(value) and not name.startswith("_")
               and value.__module__ == internals.__name__}
    assert helpers == COVERED
    error = internals._changed("Something._private")
    assert isinstance(error, internals.KerasInternalsError)
    assert keras.__version__ in str(error) and "Something._private" in str(error)


# ------------------------------------------------------------ the fit hook
def test_install_fit_hook_routes_kfac_models_only(monkeypatch):
    """The hook replaces `TensorFlowTrainer.train_step`, which is what
    Sequential, functional and subclassed models inherit; `model.fit` of a
    model compiled with KFAC goes through K-FAC's step, a model compiled with
    Adam does not, and installing again changes nothing."""
    hook = TensorFlowTrainer.train_step
    assert getattr(hook, "_tf_kfac_hook", False)
    assert internals._ORIGINAL_TRAIN_STEP is not None
    assert internals._ORIGINAL_TRAIN_STEP is not hook

    class Subclassed(keras.Model):
        def call(self, x):
            return x

    for model_class in (keras.Sequential, keras.Model, Subclassed):
        assert model_class.train_step is hook, model_class

    calls = []
    original = tf_kfac.KFAC._run_step

    def counting(*args, **kwargs):
        calls.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(tf_kfac.KFAC, "_run_step", counting)
    x, y = _data()
    for optimizer, expected in ((keras.optimizers.Adam(), False), (tf_kfac.KFAC(), True)):
        model = _mlp()
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
        history = model.fit(x, y, batch_size=8, verbose=0)
        assert (model in calls) is expected
        assert ("damping" in history.history) is expected

    internals.install_fit_hook(lambda *args: None, lambda optimizer: None)
    assert TensorFlowTrainer.train_step is hook


def test_fit_hook_installed():
    """`fit_hook_installed` reports the hook that importing tf_kfac installs."""
    assert internals.fit_hook_installed()


def test_overrides_train_step():
    """`overrides_train_step` tells a model with its own `train_step` from
    one that inherits Keras's default."""

    class Custom(keras.Model):
        def train_step(self, data):
            return {}

    inputs = keras.Input((2,))
    outputs = keras.layers.Dense(1)(inputs)
    assert internals.overrides_train_step(Custom(inputs, outputs))
    assert not internals.overrides_train_step(keras.Model(inputs, outputs))
    assert not internals.overrides_train_step(_mlp())


def test_unwrap_optimizer():
    """`unwrap_optimizer` finds the optimizer inside a LossScaleOptimizer
    (what `compile` wraps under mixed_float16) and passes others through."""
    inner = tf_kfac.KFAC()
    assert internals.unwrap_optimizer(keras.optimizers.LossScaleOptimizer(inner)) is inner
    assert internals.unwrap_optimizer(inner) is inner
    assert internals.unwrap_optimizer(None) is None


# ------------------------------------------------ the model being built for
def test_find_model_in_call_stack_during_keras_loading(tmp_path, monkeypatch):
    """Loading a `.keras` file builds the optimizer from `compile_from_config`,
    and `find_model_in_call_stack` finds the loaded model there, so the
    optimizer is built with all its variables before the weights load. Outside
    a model's method it finds nothing."""
    x, y = _data()
    model = _mlp()
    model.compile(optimizer=tf_kfac.KFAC(), loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=8, verbose=0)
    model.save(tmp_path / "model.keras")

    found = []
    original = internals.find_model_in_call_stack

    def spy(optimizer):
        result = original(optimizer)
        stack = [frame.function for frame in inspect.stack()]
        found.append((optimizer, result, "compile_from_config" in stack))
        return result

    monkeypatch.setattr(internals, "find_model_in_call_stack", spy)
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert found, "loading did not look for the model on the call stack"
    for optimizer, result, from_compile in found:
        assert optimizer is loaded.optimizer
        assert result is loaded
        assert from_compile
    assert loaded.optimizer.built
    assert len(loaded.optimizer.variables) == len(model.optimizer.variables)
    for restored, saved in zip(loaded.optimizer.variables, model.optimizer.variables,
                               strict=True):
        np.testing.assert_array_equal(restored.numpy(), saved.numpy())
    assert original(loaded.optimizer) is None


# --------------------------------------------------- layers, losses, tracker
def test_flatten_layers_finds_nested_layers():
    """`flatten_layers` returns the layers of nested models and of custom
    layers' sub-layers, not the model itself."""

    class Block(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.first = keras.layers.Dense(4, name="in_block_1")
            self.second = keras.layers.Dense(4, name="in_block_2")

        def call(self, x):
            return self.second(self.first(x))

    inner = keras.Sequential([keras.layers.Dense(3, name="in_inner")], name="inner")
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(2, name="top")(inner(Block(name="block")(inputs)))
    model = keras.Model(inputs, outputs)
    layers = internals.flatten_layers(model)
    names = [layer.name for layer in layers]
    assert model not in layers
    for name in ("block", "in_block_1", "in_block_2", "inner", "in_inner", "top"):
        assert name in names, names
    dense = [layer for layer in layers if isinstance(layer, keras.layers.Dense)]
    assert len(dense) == 4


def test_call_has_training_arg():
    """`call_has_training_arg` is True for Sequential/functional models and a
    `call(self, x, training=None)`, False for `call(self, x)`."""

    class With(keras.Model):
        def call(self, x, training=None):
            return x

    class Without(keras.Model):
        def call(self, x):
            return x

    assert internals.call_has_training_arg(With())
    assert not internals.call_has_training_arg(Without())
    assert internals.call_has_training_arg(_mlp())


@pytest.mark.parametrize("loss, loss_weights", [
    ("mse", None),
    (keras.losses.CategoricalCrossentropy(from_logits=True), None),
    (keras.losses.mean_squared_error, None),
    (["mse"], [0.5]),
    ({"out": "binary_crossentropy"}, {"out": 2.0}),
], ids=["string", "object", "function", "list_with_weights", "dict_with_weights"])
def test_compiled_loss_returns_what_compile_got(loss, loss_weights):
    """`compiled_loss` returns the very loss (and loss weights) object passed
    to `compile`, before Keras wraps it."""
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(inputs))
    model.compile(optimizer="sgd", loss=loss, loss_weights=loss_weights)
    got_loss, got_weights = internals.compiled_loss(model)
    assert got_loss is loss
    assert got_weights is loss_weights


def test_compute_loss_is_the_fit_objective():
    """`compute_loss` gives the objective `fit` minimises: the compiled loss
    (with sample weights and loss weights) plus the regularisation losses."""
    model = _mlp()
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", loss_weights=0.5)
    x, y = _data(n=6)
    weights = np.linspace(0.5, 1.5, 6).astype("float32")
    y_pred = model(x)
    value = internals.compute_loss(model, x, y, y_pred, weights)
    per_example = keras.losses.sparse_categorical_crossentropy(y, y_pred)
    expected = 0.5 * float(keras.ops.mean(per_example * weights)) + float(sum(model.losses))
    assert float(sum(model.losses)) > 0
    assert float(value) == pytest.approx(expected, rel=1e-5)


def test_update_loss_tracker():
    """`update_loss_tracker` feeds the "loss" metric that `fit` reports, as a
    mean weighted by batch size."""
    model = _mlp()
    model.compile(optimizer="sgd", loss="mse")
    internals.update_loss_tracker(model, tf.constant(2.0), 3)
    internals.update_loss_tracker(model, tf.constant(6.0), 1)
    assert float(model.get_metrics_result()["loss"]) == pytest.approx(3.0)


def test_wrap_loss_function():
    """`wrap_loss_function` makes a `keras.losses.Loss` of a plain function
    that reduces over the batch and applies sample weights like `compile`."""

    def squared(y_true, y_pred):
        return keras.ops.mean(keras.ops.square(y_true - y_pred), axis=-1)

    loss = internals.wrap_loss_function(squared)
    assert isinstance(loss, keras.losses.Loss)
    y_true = np.zeros((3, 2), "float32")
    y_pred = np.array([[1, 1], [2, 2], [0, 0]], "float32")
    assert float(loss(y_true, y_pred)) == pytest.approx(5.0 / 3.0)
    weighted = loss(y_true, y_pred, sample_weight=np.array([1.0, 0.0, 1.0], "float32"))
    assert float(weighted) == pytest.approx(1.0 / 3.0)


def test_in_symbolic_build():
    """`in_symbolic_build` is True while Keras runs `call` on placeholders
    (functional construction, an unbuilt model's first call) and False in a
    real call."""
    seen = []

    class Probe(keras.layers.Layer):
        def call(self, x):
            seen.append(internals.in_symbolic_build())
            return x

    class Model(keras.Model):
        def __init__(self):
            super().__init__()
            self.probe = Probe()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(self.probe(x))

    Probe()(keras.Input((3,)))
    assert seen == [True]
    seen.clear()
    model = Model()
    model(np.zeros((2, 3), "float32"))
    assert seen == [True, False]
    seen.clear()
    model(np.zeros((2, 3), "float32"))
    assert seen == [False]
    assert not internals.in_symbolic_build()



def test_keras_mask_reads_the_mask_keras_hands_to_the_next_layer():
    """`keras_mask` gives the mask that Embedding(mask_zero=True) and Masking attach
    to their outputs, eagerly and inside a tf.function, the same one Keras passes
    as `mask=` to a layer whose `call` takes it; None for a tensor without a mask
    (and for None). MultiHeadAttention's `call` still removes its inputs' masks
    before its projections (why tf_kfac routes them; tf_kfac/masks.py)."""
    import tensorflow as tf

    ids = tf.constant([[3, 1, 0, 0]])
    embedded = keras.layers.Embedding(5, 2, mask_zero=True)(ids)
    np.testing.assert_array_equal(internals.keras_mask(embedded).numpy(),
                                  [[True, True, False, False]])
    values = tf.constant([[[1.0], [0.0], [2.0]]])
    masked = keras.layers.Masking(0.0)(values)
    np.testing.assert_array_equal(internals.keras_mask(masked).numpy(), [[True, False, True]])
    assert internals.keras_mask(values) is None and internals.keras_mask(None) is None

    seen = {}

    class Probe(keras.layers.Layer):
        def call(self, x, mask=None):
            seen["argument"], seen["attached"] = mask, internals.keras_mask(x)
            return x

    probe, embedding = Probe(), keras.layers.Embedding(5, 2, mask_zero=True)

    @tf.function
    def traced(tokens):
        return probe(embedding(tokens))

    traced(ids)
    assert tf.is_tensor(seen["argument"]) and seen["attached"] is seen["argument"]

    captured = {}
    attention = keras.layers.MultiHeadAttention(1, 2)
    attention(embedded, embedded)
    original = attention._query_dense.call

    def spy(x, *args, **kwargs):
        captured["mask"] = internals.keras_mask(x)
        return original(x, *args, **kwargs)

    attention._query_dense.call = spy
    attention(embedded, embedded)
    assert "mask" in captured and captured["mask"] is None


def test_attention_projections_are_the_layers_sublayers():
    """`attention_projections` names the EinsumDense sub-layers that MultiHeadAttention
    calls on its query, key, value and output (and gate with use_gate=True): they
    are exactly the EinsumDense layers among its sub-layers."""
    for use_gate in (False, True):
        kwargs = {"use_gate": True} if use_gate else {}
        try:
            attention = keras.layers.MultiHeadAttention(2, 3, **kwargs)
        except (TypeError, ValueError):  # a Keras without gated attention (3.10: ValueError)
            continue
        attention(np.zeros((1, 4, 5), "float32"), np.zeros((1, 4, 5), "float32"))
        found = internals.attention_projections(attention)
        expected = {"query", "key", "value", "output"} | ({"gate"} if use_gate else set())
        assert set(found) == expected
        einsums = [layer for layer in internals.flatten_layers(attention)
                   if isinstance(layer, keras.layers.EinsumDense)]
        assert sorted(map(id, found.values())) == sorted(map(id, einsums))
        assert found["output"].kernel.shape[-1] == 5 and found["query"].kernel.shape[0] == 5


def test_add_replica_local_variable():
    """The variable is tracked by the optimizer like `add_variable`'s (saved by
    position) and, under MirroredStrategy (two logical CPUs, conftest.py), each
    replica writes its own copy while a read outside the replicas gives the mean."""
    import tensorflow as tf

    optimizer = keras.optimizers.SGD()
    optimizer.build([])
    before = len(optimizer.variables)
    variable = internals.add_replica_local_variable(optimizer, (2,), "local")
    assert optimizer.variables[before] is variable
    assert variable.synchronization == "on_read" and variable.aggregation == "mean"
    assert variable.path.endswith("local") and not variable.trainable

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        sgd = keras.optimizers.SGD()
        sgd.build([])
        local = internals.add_replica_local_variable(sgd, (2,), "local")

    @tf.function
    def write():
        def per_replica():
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            local.assign(tf.fill([2], tf.cast(replica, tf.float32) * 2.0 + 1.0))

        strategy.run(per_replica)

    write()
    copies = [v.numpy().tolist() for v in strategy.experimental_local_results(local.value)]
    assert copies == [[1.0, 1.0], [3.0, 3.0]]
    assert local.numpy().tolist() == [2.0, 2.0]


def test_multi_worker_fit_fix_is_installed_and_leaves_other_strategies_alone():
    """Importing tf_kfac patches the two places where Keras's `fit` fails under
    MultiWorkerMirroredStrategy (tests/test_multiworker.py runs `fit` on two
    workers); under MirroredStrategy the log reduction is Keras's own."""
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer as trainer_module

    assert getattr(trainer_module.reduce_per_replica, "_tf_kfac_hook", False)
    assert TensorFlowTrainer._maybe_symbolic_build.__qualname__.startswith(
        "_fix_multi_worker_fit")
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    values = strategy.run(lambda: tf.cast(
        tf.distribute.get_replica_context().replica_id_in_sync_group, tf.float32) + 1.0)
    logs = trainer_module.reduce_per_replica({"loss": values}, strategy, "auto")
    assert float(logs["loss"]) == 1.5  # Keras's mean over the replicas


@pytest.mark.parametrize(("tensorflow_version", "keras_version", "message"), [
    ("2.17.1", "3.15.0", "TensorFlow 2.18 or newer; TensorFlow 2.17.1"),
    ("2.21.0", "3.9.2", "Keras 3.10 or newer; Keras 3.9.2"),
])
def test_an_older_release_gets_a_clear_error_at_import(tensorflow_version, keras_version,
                                                       message):
    from tf_kfac import _versions

    with pytest.raises(ImportError, match=message):
        _versions.check(tensorflow_version, keras_version)


def test_the_lowest_supported_and_the_installed_releases_pass_the_check():
    from tf_kfac import _versions

    _versions.check("2.18.1", "3.10.0")
    _versions.check(tf.__version__, keras.__version__)


def test_backend_rnn_is_keras_time_loop():
    """`backend_rnn` runs a step over time with Keras's masking: a running sum that
    keeps its state (and repeats its output) on masked steps, backwards too."""
    x = tf.constant([[[1.0], [2.0], [4.0]]])
    mask = tf.constant([[True, False, True]])

    def step(inputs, states):
        total = states[0] + inputs
        return total, [total]

    last, outputs, states = internals.backend_rnn(step, x, [tf.zeros((1, 1))], mask=mask,
                                                  return_all_outputs=True)
    np.testing.assert_allclose(outputs.numpy().ravel(), [1.0, 1.0, 5.0])
    np.testing.assert_allclose(last.numpy().ravel(), [5.0])
    _, outputs, _ = internals.backend_rnn(step, x, [tf.zeros((1, 1))], go_backwards=True,
                                          return_all_outputs=True)
    np.testing.assert_allclose(outputs.numpy().ravel(), [4.0, 6.0, 7.0])


def test_check_rnn_time_loop():
    """Keras's recurrent layers run their loop in `inner_loop(sequences, initial_state,
    mask, training)`; a layer class without it is refused loudly."""
    for layer in (keras.layers.SimpleRNN(2), keras.layers.LSTM(2), keras.layers.GRU(2)):
        internals.check_rnn_time_loop(layer)
    with pytest.raises(internals.KerasInternalsError, match="inner_loop"):
        internals.check_rnn_time_loop(keras.layers.Dense(2))


# ---------------------------------------------------- dynamic loss scaling
def test_loss_scale_settings():
    wrapper = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(), initial_scale=64.0, dynamic_growth_steps=3)
    assert internals.loss_scale_settings(wrapper) == (64.0, 3)


def test_loss_scale_variables_and_the_rule_tf_kfac_reproduces():
    """The wrapper's `step_counter` and `dynamic_scale`, and the rule that
    `tf_kfac/loss_scaling.py` applies to them, as Keras's own `apply` does it:
    a non-finite gradient halves the scale and resets the counter, applying
    nothing; `dynamic_growth_steps` finite steps double it."""
    variable = keras.Variable(np.ones(2, "float32"))
    wrapper = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.1), initial_scale=64.0, dynamic_growth_steps=2)
    wrapper.build([variable])
    counter, scale = internals.loss_scale_variables(wrapper)
    assert counter.dtype == "int64" and scale.dtype == "float32"
    assert (int(counter.numpy()), float(scale.numpy())) == (0, 64.0)
    assert float(wrapper.scale_loss(tf.constant(1.0)).numpy()) == 64.0
    wrapper.apply([tf.constant([np.inf, 1.0])], [variable])
    assert (int(counter.numpy()), float(scale.numpy())) == (0, 32.0)
    np.testing.assert_array_equal(variable.numpy(), [1.0, 1.0])
    wrapper.apply([tf.constant([32.0, 32.0])], [variable])
    assert (int(counter.numpy()), float(scale.numpy())) == (1, 32.0)
    np.testing.assert_allclose(variable.numpy(), [0.9, 0.9])  # unscaled by 32
    wrapper.apply([tf.constant([32.0, 32.0])], [variable])
    assert (int(counter.numpy()), float(scale.numpy())) == (0, 64.0)
    with pytest.raises(internals.KerasInternalsError, match="dynamic_scale"):
        internals.loss_scale_variables(keras.optimizers.SGD())
