"""A `.keras` file saved by tf_kfac 0.1 loads into the current package with its state.

`tests/fixtures/kfac_0_1.keras` was saved by the 0.1 release after 7 steps of a
Conv2D/Dense classifier, and `tests/fixtures/kfac_0_1_state.npz` holds what 0.1 had
at that point (every optimizer variable by index, the model weights, the optimizer's
config) and what 0.1 itself reached when it trained 5 more batches
(`tests/fixtures/make_kfac_0_1.py` made both and says how to make them again).

The current package restores every optimizer variable exactly, so these tests pin
that; a load that silently restarted K-FAC's state (zero factors, zero momentum,
counters at 0) fails them, since the saved factors, inverses and momentum are
non-zero. 0.1's defaults differ from today's (damping 1e-3 and kl_clip 1e-3, and
both changed meaning for losses with a scale c ≠ 1), so the loaded optimizer must
keep the saved config, not take today's defaults.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest

import tf_kfac

FIXTURES = Path(__file__).resolve().parent / "fixtures"
KERAS_FILE = FIXTURES / "kfac_0_1.keras"
STATE_FILE = FIXTURES / "kfac_0_1_state.npz"


@pytest.fixture(scope="module")
def saved():
    """The npz written next to the `.keras` file by 0.1, as a dict of arrays."""
    with np.load(STATE_FILE) as arrays:
        return {key: arrays[key] for key in arrays.files}


def _indexed(saved, prefix):
    count = sum(1 for key in saved if key.startswith(prefix) and key[len(prefix):].isdigit())
    return [saved[f"{prefix}{i}"] for i in range(count)]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:2])


with np.load(STATE_FILE) as _arrays:
    _WRITTEN_BY = str(_arrays["keras_version"])
# A `.keras` file is not readable by an older Keras than the one that wrote it (the
# model config carries initializer arguments added since: Keras 3.10 fails with
# "GlorotUniform.__init__() got an unexpected keyword argument 'input_axes'"); that
# is Keras's own format, not tf_kfac's state, so the loading tests need that Keras.
pytestmark = pytest.mark.skipif(
    _version(keras.__version__) < _version(_WRITTEN_BY),
    reason=f"the fixture was written by Keras {_WRITTEN_BY}, which Keras "
           f"{keras.__version__} cannot read")


def _load():
    """`keras.models.load_model` of the 0.1 file, and the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = keras.models.load_model(KERAS_FILE)
    return model, [str(w.message) for w in caught]


def test_fixture_was_made_by_0_1_and_holds_a_trained_state(saved):
    """The fixture is what it claims: made by tf_kfac 0.1.0 after 7 steps, with
    non-zero factors, inverses and momentum (so a reset state cannot match it)."""
    assert str(saved["tf_kfac_version"]) == "0.1.0"
    paths = [str(p) for p in _indexed(saved, "path_")]
    values = _indexed(saved, "variable_")
    assert len(paths) == len(values) == 30
    assert paths[0] == "kfac/iteration" and int(values[0]) == int(saved["steps"]) == 7
    for part in ("momentum", "kfac_A", "kfac_G", "kfac_A_inverse", "kfac_G_inverse"):
        chosen = [v for p, v in zip(paths, values, strict=True) if p.endswith(part)]
        assert chosen and all(np.abs(v).sum() > 0 for v in chosen), part
    assert KERAS_FILE.stat().st_size + STATE_FILE.stat().st_size < 200_000


def test_loading_0_1_file_restores_every_optimizer_variable_exactly(saved):
    """`load_model` of the 0.1 file gives a built KFAC with as many variables as
    0.1 saved, each equal (exactly, by index) to 0.1's value, the model's weights
    equal to 0.1's, and no Keras warning about skipped optimizer variables."""
    model, caught = _load()
    assert not [w for w in caught if "optimizer" in w.lower()], caught
    opt = model.optimizer
    assert isinstance(opt, tf_kfac.KFAC)
    assert opt.built
    expected = _indexed(saved, "variable_")
    paths = _indexed(saved, "path_")
    assert len(opt.variables) == len(expected)
    for i, (variable, value) in enumerate(zip(opt.variables, expected, strict=True)):
        assert tuple(variable.shape) == value.shape, (i, str(paths[i]))
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=f"{i}: {paths[i]}")
    weights = _indexed(saved, "weight_")
    assert len(model.weights) == len(weights)
    for weight, value in zip(model.weights, weights, strict=True):
        np.testing.assert_array_equal(weight.numpy(), value, err_msg=weight.path)
    a, g = opt.kronecker_factors(model.get_layer("hidden"))
    assert np.abs(a.numpy()).sum() > 0 and np.abs(g.numpy()).sum() > 0


def test_loaded_optimizer_keeps_0_1_config_not_todays_defaults(saved):
    """The loaded KFAC's config holds every hyperparameter 0.1 saved, at 0.1's
    values (damping 1e-3, kl_clip 1e-3, seed 0: not today's defaults 3e-4 and
    3e-3); the only keys 0.1 did not have are new hyperparameters at their
    defaults."""
    model, _ = _load()
    opt = model.optimizer
    config = opt.get_config()
    saved_config = json.loads(str(saved["optimizer_config"]))
    for key, value in saved_config.items():
        assert key in config, key
        assert config[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    new_keys = sorted(set(config) - set(saved_config))
    defaults = tf_kfac.KFAC().get_config()
    assert all(config[key] == defaults[key] for key in new_keys), new_keys
    assert opt.damping == pytest.approx(1e-3) and opt.kl_clip == pytest.approx(1e-3)
    assert opt.seed == 0
    assert opt.fisher == "sampled"


def test_training_continues_from_the_0_1_state(saved):
    """`fit` on the next 5 batches after loading runs from the restored state: all
    weights and optimizer variables stay finite, the step counter goes 7 → 12, the
    factors are updated once more (at step 10: 3 factor updates in all, which a
    reset state would count as 2) and the inverses are not recomputed (none due
    before step 20; a reset state would invert at its first step)."""
    model, _ = _load()
    opt = model.optimizer
    before = [w.numpy().copy() for w in model.weights]
    model.fit(saved["x_next"], saved["y_next"], batch_size=int(saved["batch_size"]),
              shuffle=False, verbose=0)
    for variable in [*opt.variables, *model.weights]:
        assert np.isfinite(variable.numpy()).all(), variable.path
    assert int(opt.iterations) == 12
    paths = [str(p) for p in _indexed(saved, "path_")]
    counters = {path.split("/")[-1]: int(v.numpy())
                for path, v in zip(paths, opt.variables, strict=True) if len(v.shape) == 0}
    assert counters["kfac_factor_updates"] == 3
    assert counters["kfac_inverse_updates"] == 1
    assert counters["kfac_skipped_steps"] == 0
    inverses = [i for i, p in enumerate(paths) if p.endswith("_inverse")]
    for i in inverses:
        np.testing.assert_array_equal(opt.variables[i].numpy(), saved[f"variable_{i}"],
                                      err_msg=paths[i])
    assert all(np.abs(w.numpy() - b).max() > 0 for w, b in zip(model.weights, before,
                                                               strict=True))


def test_training_continues_as_0_1_did(saved):
    """For this classifier (cross-entropy, scale c = 1) the changes since 0.1 leave
    the update unchanged (CHANGELOG), so the loaded run trained on the next 5 batches
    reaches 0.1's own continuation: every optimizer variable and weight to 1e-5."""
    model, _ = _load()
    model.fit(saved["x_next"], saved["y_next"], batch_size=int(saved["batch_size"]),
              shuffle=False, verbose=0)
    expected = _indexed(saved, "continued_variable_")
    paths = _indexed(saved, "path_")
    assert len(model.optimizer.variables) == len(expected)
    for i, (variable, value) in enumerate(zip(model.optimizer.variables, expected,
                                              strict=True)):
        np.testing.assert_allclose(variable.numpy(), value, rtol=1e-5, atol=1e-6,
                                   err_msg=f"{i}: {paths[i]}")
    weights = _indexed(saved, "continued_weight_")
    for weight, value in zip(model.weights, weights, strict=True):
        np.testing.assert_allclose(weight.numpy(), value, rtol=1e-5, atol=1e-6,
                                   err_msg=weight.path)
