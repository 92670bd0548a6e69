"""K-FAC state survives saving: `.keras` files, `tf.train.Checkpoint`, config.

A resumed run must continue as if it had never stopped, so the resumed
weights are compared with an uninterrupted run's (same data order, fixed
seeds), and every optimizer variable (factors, inverses, momentum, counters)
is compared with the saved one.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_kfac

# The step at which the run is interrupted is not an inverse-refresh step, so
# the resumed step uses the restored (not recomputed) inverses.
BATCH = 8
STEPS_PER_EPOCH = 4
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


# ----------------------------------------------------------------- helpers
def _data():
    rng = np.random.RandomState(0)
    x = rng.randn(BATCH * STEPS_PER_EPOCH, 4).astype("float32")
    return x, ((x[:, 0] > 0).astype("int32") + (x[:, 1] > 0.5).astype("int32"))


def _model():
    return keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(8, activation="tanh"),
        keras.layers.BatchNormalization(),
        keras.layers.Dense(3, activation="softmax"),
    ])


def _schedule_kfac(seed=None):
    """KFAC with schedules for learning rate, damping and momentum."""
    return tf_kfac.KFAC(
        learning_rate=keras.optimizers.schedules.ExponentialDecay(0.2, 4, 0.8),
        damping=keras.optimizers.schedules.ExponentialDecay(1e-2, 4, 0.5),
        momentum=keras.optimizers.schedules.PiecewiseConstantDecay([10], [0.5, 0.9]),
        inverse_update_interval=3,
        seed=seed,
    )


def _fit(model, x, y, epochs):
    model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0)


def _optimizer_state(opt):
    """{position: (path, value)} of every optimizer variable, in creation order.

    Checkpoints restore optimizer variables by position; paths carry the
    model's layer names, which differ between a model and its fresh copy.
    """
    return {i: (v.path, v.numpy().copy()) for i, v in enumerate(opt.variables)}


def _assert_optimizer_state_equal(actual, expected, **tolerance):
    assert len(actual) == len(expected)
    for i, (path, value) in expected.items():
        np.testing.assert_allclose(actual[i][1], value, err_msg=path, **tolerance)


def _assert_nontrivial(state):
    """The saved state is worth restoring: factors, inverses, momentum set."""
    for part in ("kfac_A", "kfac_G_inverse", "momentum"):
        values = [value for path, value in state.values() if part in path]
        assert values and all(np.abs(v).sum() > 0 for v in values), part


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Trains 2 epochs, saves a `.keras` file and a checkpoint, trains 2 more.

    The optimizer draws its own sampling seed (seed=None), so a resumed run
    only matches when that seed is restored too.
    """
    directory = tmp_path_factory.mktemp("reference")
    keras.utils.set_random_seed(0)
    x, y = _data()
    model = _model()
    model.compile(optimizer=_schedule_kfac(), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    _fit(model, x, y, epochs=2)
    saved_state = _optimizer_state(model.optimizer)
    _assert_nontrivial(saved_state)
    assert int(model.optimizer.iterations) % model.optimizer.inverse_update_interval != 0
    model.save(directory / "run.keras")
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    checkpoint_path = checkpoint.save(str(directory / "ckpt" / "run"))
    _fit(model, x, y, epochs=2)
    return {
        "dir": directory,
        "x": x,
        "y": y,
        "saved_state": saved_state,
        "seed": model.optimizer.seed,
        "checkpoint": checkpoint_path,
        "weights": [w.numpy() for w in model.weights],
        "state": _optimizer_state(model.optimizer),
    }


# ---------------------------------------------------- .keras, fresh process
_RESUME_SCRIPT = textwrap.dedent("""
    import json, sys, warnings
    import numpy as np
    import keras
    import tf_kfac  # noqa: F401  (registers KFAC and the fit hook)

    directory = sys.argv[1]
    data = np.load(f"{directory}/data.npz")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = keras.models.load_model(f"{directory}/run.keras")
    opt = model.optimizer
    np.savez(f"{directory}/loaded.npz", *[v.numpy() for v in opt.variables])
    with open(f"{directory}/loaded.json", "w") as f:
        json.dump({
            "warnings": [str(w.message) for w in caught],
            "type": type(opt).__name__,
            "seed": opt.seed,
            "schedules": [type(s).__name__
                          for s in (opt._learning_rate, opt.damping, opt.momentum)],
        }, f)
    model.fit(data["x"], data["y"], batch_size=%d, epochs=2, shuffle=False, verbose=0)
    np.savez(f"{directory}/final.npz", *[v.numpy() for v in opt.variables])
    np.savez(f"{directory}/weights.npz", *[w.numpy() for w in model.weights])
""") % BATCH


@pytest.fixture(scope="module")
def resumed(reference):
    """Loads the `.keras` file in a fresh process and trains 2 more epochs there."""
    directory = reference["dir"]
    np.savez(directory / "data.npz", x=reference["x"], y=reference["y"])
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", _RESUME_SCRIPT, str(directory)],
                            capture_output=True, text=True, env=env, timeout=300)
    return directory, result


def _arrays(path):
    arrays = np.load(path)
    return [arrays[f"arr_{i}"] for i in range(len(arrays.files))]


def test_keras_file_restores_optimizer_state_in_fresh_process(reference, resumed):
    """`keras.models.load_model` of a `.keras` file saved mid-training, in a
    fresh process, rebuilds the KFAC optimizer with its drawn seed and its
    schedules, and restores every optimizer variable (factors, inverses,
    momentum, counters) exactly, without Keras's "Skipping variable loading
    for optimizer" warning."""
    directory, result = resumed
    assert (directory / "loaded.json").exists(), result.stderr[-3000:]
    info = json.loads((directory / "loaded.json").read_text())
    assert info["warnings"] == [], info["warnings"]
    assert info["type"] == "KFAC"
    assert info["seed"] == reference["seed"]
    assert info["schedules"] == ["ExponentialDecay", "ExponentialDecay",
                                 "PiecewiseConstantDecay"]
    loaded = dict(enumerate(("loaded", v) for v in _arrays(directory / "loaded.npz")))
    _assert_optimizer_state_equal(loaded, reference["saved_state"], rtol=0, atol=0)


def test_keras_file_resumes_exactly_in_fresh_process(reference, resumed):
    """`fit` after loading the `.keras` file in a fresh process continues the
    run exactly: weights and every optimizer variable equal the uninterrupted
    run's after 2 more epochs."""
    directory, result = resumed
    assert result.returncode == 0, result.stderr[-3000:]
    final = dict(enumerate(("final", v) for v in _arrays(directory / "final.npz")))
    _assert_optimizer_state_equal(final, reference["state"], **TOLERANCE)
    weights = _arrays(directory / "weights.npz")
    assert len(weights) == len(reference["weights"])
    for actual, expected in zip(weights, reference["weights"], strict=True):
        np.testing.assert_allclose(actual, expected, **TOLERANCE)


# --------------------------------------------------------- tf.train.Checkpoint
@pytest.mark.parametrize("attach_first", [True, False], ids=["attach", "no_attach"])
def test_checkpoint_restores_into_fresh_model_and_optimizer(reference, attach_first):
    """`tf.train.Checkpoint(model=..., optimizer=...)` restored into a freshly
    built model and a fresh KFAC (same hyperparameters and seed) continues
    exactly like the uninterrupted run: with `opt.attach(model)` before the
    restore, and also without it (deferred restoration of the variables that
    `fit` creates later)."""
    keras.utils.set_random_seed(1)  # different initial weights, then restored
    model = _model()
    opt = _schedule_kfac(seed=reference["seed"])
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    if attach_first:
        opt.attach(model)
        assert opt.built
    status = tf.train.Checkpoint(model=model, optimizer=opt).restore(reference["checkpoint"])
    status.assert_existing_objects_matched()
    if attach_first:
        _assert_optimizer_state_equal(_optimizer_state(opt), reference["saved_state"],
                                      rtol=0, atol=0)
    else:
        assert not opt.built  # its K-FAC variables do not exist yet: restored on creation
    _fit(model, reference["x"], reference["y"], epochs=2)
    status.assert_consumed()
    _assert_optimizer_state_equal(_optimizer_state(opt), reference["state"], **TOLERANCE)
    for actual, expected in zip(model.weights, reference["weights"], strict=True):
        np.testing.assert_allclose(actual.numpy(), expected, **TOLERANCE)


def test_kfac_state_is_not_a_checkpoint_dependency_of_the_model():
    """KFAC keeps the model out of TF tracking (a weak reference), so the
    model is not a checkpoint dependency of the optimizer."""
    model = _model()
    opt = tf_kfac.KFAC()
    opt.attach(model, loss="sparse_categorical_crossentropy")
    children = opt._trackable_children()
    assert not any(child is model for child in children.values())
    assert not any(isinstance(child, keras.layers.Layer) for child in children.values())


# ------------------------------------------------------------------ export
def _exported_ops(export_dir):
    """(op name, op type) of every node in the SavedModel, functions included."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((export_dir / "saved_model.pb").read_bytes())
    ops = []
    for meta_graph in proto.meta_graphs:
        ops += [(n.name, n.op) for n in meta_graph.graph_def.node]
        for function in meta_graph.graph_def.library.function:
            ops += [(function.signature.name, "function")]
            ops += [(n.name, n.op) for n in function.node_def]
    return ops


def test_export_serves_like_predict_without_kfac_ops(tmp_path):
    """`model.export(dir)` of a K-FAC-trained Conv2D/Dense model gives a
    SavedModel whose `serve` equals `predict`, whose graph has no K-FAC op
    (no 'kfac' name, no patches, inverses or sampling) and which holds only
    the model's variables."""
    keras.utils.set_random_seed(0)
    rng = np.random.RandomState(0)
    x = rng.randn(16, 5, 5, 2).astype("float32")
    y = rng.randint(0, 3, size=16).astype("int32")
    model = keras.Sequential([
        keras.Input((5, 5, 2)),
        keras.layers.Conv2D(3, 3, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(3, activation="softmax"),
    ])
    model.compile(optimizer=tf_kfac.KFAC(seed=1), loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    export_dir = tmp_path / "exported"
    model.export(str(export_dir), verbose=False)
    loaded = tf.saved_model.load(str(export_dir))  # keep a reference while serving
    served = loaded.serve(tf.constant(x)).numpy()
    np.testing.assert_allclose(served, model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    ops = _exported_ops(export_dir)
    assert any(op == "Conv2D" for _, op in ops)
    forbidden = ("ExtractImagePatches", "MatrixInverse", "StatelessMultinomial",
                 "StatelessRandomUniformV2", "StatelessRandomNormalV2")
    for name, op in ops:
        assert "kfac" not in name.lower() and "kfac" not in op.lower(), (name, op)
        assert op not in forbidden, (name, op)
    assert len(loaded.variables) == len(model.weights)
    assert all("kfac" not in v.name.lower() for v in loaded.variables)


# ------------------------------------------------------------------ config
def _configs():
    schedules = dict(
        learning_rate=keras.optimizers.schedules.ExponentialDecay(0.3, 10, 0.5),
        damping=keras.optimizers.schedules.InverseTimeDecay(0.1, 5, 0.5),
        momentum=keras.optimizers.schedules.PiecewiseConstantDecay([5], [0.5, 0.8]),
        l2_reg=1e-4, fisher="exact", factor_decay=0.9, factor_update_interval=2,
        inverse_update_interval=7, kl_clip=0.01, seed=123, weight_decay=1e-3,
        clipnorm=2.0, name="kfac_schedules",
    )
    floats = dict(
        learning_rate=0.05, damping=0.3, momentum=0.0, l2_reg=0.0, fisher="empirical",
        factor_decay=0.0, factor_update_interval=3, inverse_update_interval=1, kl_clip=None,
        seed=0, global_clipnorm=1.5, name="kfac_floats",
    )
    adaptive = dict(
        learning_rate=0.5, damping=20.0, l2_reg=1e-5, fisher="sampled", adaptive=True,
        adapt_gamma=True, quadratic_model_fraction=0.5, damping_adaptation_interval=3,
        gamma_adaptation_interval=9, min_damping=1e-4, max_damping=1e4, seed=5,
        name="kfac_adaptive",
    )
    return [pytest.param(schedules, id="schedules"), pytest.param(floats, id="floats"),
            pytest.param(adaptive, id="adaptive")]


def _expected_value(value):
    if isinstance(value, keras.optimizers.schedules.LearningRateSchedule):
        return keras.saving.serialize_keras_object(value)
    return value


@pytest.mark.parametrize("kwargs", _configs())
def test_config_round_trip_keeps_every_hyperparameter(kwargs):
    """`get_config()` holds every hyperparameter (schedules for learning rate,
    damping and momentum included), and `KFAC.from_config` rebuilds an
    optimizer with the same config, schedules as schedule objects."""
    opt = tf_kfac.KFAC(**kwargs)
    config = opt.get_config()
    for key, value in kwargs.items():
        expected = _expected_value(value)
        assert config[key] == (pytest.approx(expected) if isinstance(expected, float)
                               else expected), key
    for key in ("use_ema", "gradient_accumulation_steps", "loss_scale_factor"):
        assert not config.get(key), key
    parameters = inspect.signature(tf_kfac.KFAC.__init__).parameters
    missing = [name for name, p in parameters.items()
               if name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD and name not in config]
    assert missing == []
    rebuilt = tf_kfac.KFAC.from_config(config)
    assert rebuilt.get_config() == config
    for key in ("momentum", "damping"):
        if key in kwargs:
            assert type(getattr(rebuilt, key)) is type(kwargs[key]), key
    assert type(rebuilt._learning_rate) is type(opt._learning_rate)


@pytest.mark.parametrize("kwargs", _configs())
def test_keras_serialize_deserialize(kwargs):
    """`keras.optimizers.serialize` / `deserialize` (and `get`) give back a
    KFAC with the same config, through a JSON round trip."""
    opt = tf_kfac.KFAC(**kwargs)
    serialized = json.loads(json.dumps(keras.optimizers.serialize(opt)))
    restored = keras.optimizers.deserialize(serialized)
    assert isinstance(restored, tf_kfac.KFAC)
    assert restored.get_config() == opt.get_config()
    assert keras.optimizers.get(serialized).get_config() == opt.get_config()
