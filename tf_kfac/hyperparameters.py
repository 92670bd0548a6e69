"""K-FAC's own hyperparameters: their names, defaults, checks and serialisation."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any

import keras

from tf_kfac.blocks import CURVATURES, WEIGHT_SHARING

FISHER_ESTIMATORS = ("sampled", "empirical", "exact")
FIXED_DAMPING = 3e-4
ADAPTIVE_DAMPING = 1.0

# K-FAC's hyperparameters beyond Keras's, in the order of `KFAC.__init__`;
# `get_config` writes exactly these.
NAMES = (
    "momentum", "damping", "l2_reg", "fisher", "factor_decay", "factor_update_interval",
    "inverse_update_interval", "kl_clip", "weight_sharing", "adaptive", "adapt_gamma",
    "quadratic_model_fraction", "damping_adaptation_interval", "gamma_adaptation_interval",
    "min_damping", "max_damping", "seed", "curvature",
)
SCHEDULABLE = ("momentum", "damping")

UNSUPPORTED_BASE_ARGS = {
    "use_ema": "K-FAC keeps no moving average of the weights",
    "gradient_accumulation_steps": "K-FAC's curvature is measured per batch",
    "loss_scale_factor": "K-FAC computes its own objective",
}
IGNORED_BASE_ARGS = ("ema_momentum", "ema_overwrite_frequency")


def check_base_kwargs(kwargs: dict) -> None:
    """Refuses Keras optimizer arguments K-FAC cannot honour; drops the EMA's settings."""
    for arg, why in UNSUPPORTED_BASE_ARGS.items():
        if kwargs.get(arg):
            raise ValueError(f"KFAC does not support `{arg}`: {why}.")
        kwargs.pop(arg, None)
    for arg in IGNORED_BASE_ARGS:
        kwargs.pop(arg, None)


def is_schedule(value: Any) -> bool:
    return isinstance(value, keras.optimizers.schedules.LearningRateSchedule) or (
        callable(value) and not isinstance(value, (int, float))
    )


_FLOAT32_MAX = 3.4028234663852886e38  # numpy.finfo(numpy.float32).max


def _number(name: str, value: Any, low: float, high: float | None, closed_low: bool):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be a number; received {name}={value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number; received {name}={value!r}.")
    if abs(value) > _FLOAT32_MAX:  # it would be stored as inf in K-FAC's float32 state
        raise ValueError(f"`{name}` must be within float32's range (at most "
                         f"{_FLOAT32_MAX:.6g}); received {name}={value!r}.")
    ok = value >= low if closed_low else value > low
    if high is not None:
        ok = ok and value < high
    if not ok:
        bound = f"{'≥' if closed_low else '>'} {low}" + (f" and < {high}" if high else "")
        raise ValueError(f"`{name}` must be {bound}; received {name}={value!r}.")
    return float(value)


def _interval(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a whole number ≥ 1; received {name}={value!r}.")
    return value


def _weight_sharing(value: Any) -> str | dict[str, str]:
    choices = ", ".join(map(repr, WEIGHT_SHARING))
    if isinstance(value, str):
        if value not in WEIGHT_SHARING:
            raise ValueError(f"`weight_sharing` must be one of {choices} or a dict from layer "
                             f"names to them; received weight_sharing={value!r}.")
        return value
    if isinstance(value, Mapping):
        bad = {k: v for k, v in value.items() if not isinstance(k, str) or v not in WEIGHT_SHARING}
        if bad:
            raise ValueError(f"`weight_sharing` maps layer names to {choices}; received {bad!r}.")
        return dict(value)
    raise ValueError(f"`weight_sharing` must be one of {choices} or a dict from layer names "
                     f"to them; received weight_sharing={value!r}.")


def validate(learning_rate, weight_decay, clipnorm, clipvalue, global_clipnorm,
             **settings) -> dict[str, Any]:
    """The checked, normalised values of `NAMES`; raises ValueError for a bad one."""
    s = dict(settings)
    if not is_schedule(learning_rate):
        _number("learning_rate", learning_rate, 0.0, None, closed_low=False)
    if not is_schedule(s["momentum"]):
        _number("momentum", s["momentum"], 0.0, 1.0, closed_low=True)
    adaptive = bool(s["adaptive"])
    if s["damping"] is None:
        s["damping"] = ADAPTIVE_DAMPING if adaptive else FIXED_DAMPING
    if not is_schedule(s["damping"]):
        _number("damping", s["damping"], 0.0, None, closed_low=False)
    s["l2_reg"] = _number("l2_reg", s["l2_reg"], 0.0, None, closed_low=True)
    if s["fisher"] not in FISHER_ESTIMATORS:
        raise ValueError(
            f"`fisher` must be one of {', '.join(map(repr, FISHER_ESTIMATORS))}; "
            f"received fisher={s['fisher']!r}.")
    s["factor_decay"] = _number("factor_decay", s["factor_decay"], 0.0, 1.0, closed_low=True)
    for name in ("factor_update_interval", "inverse_update_interval",
                 "damping_adaptation_interval", "gamma_adaptation_interval"):
        _interval(name, s[name])
    if s["kl_clip"] is not None:
        s["kl_clip"] = _number("kl_clip", s["kl_clip"], 0.0, None, closed_low=False)
    s["weight_sharing"] = _weight_sharing(s["weight_sharing"])
    if not isinstance(s["curvature"], str) or s["curvature"] not in CURVATURES:
        raise ValueError(
            f"`curvature` must be one of {', '.join(map(repr, CURVATURES))} (K-FAC, or its "
            f"eigenbasis rescaling EKFAC); received curvature={s['curvature']!r}.")
    fraction = _number("quadratic_model_fraction", s["quadratic_model_fraction"], 0.0, None,
                       closed_low=False)
    if fraction > 1:
        raise ValueError("`quadratic_model_fraction` must be in (0, 1]; received "
                         f"quadratic_model_fraction={fraction!r}.")
    s["quadratic_model_fraction"] = fraction
    low = s["min_damping"] = _number("min_damping", s["min_damping"], 0.0, None, False)
    high = s["max_damping"] = _number("max_damping", s["max_damping"], 0.0, None, False)
    if not high > low:
        raise ValueError(f"`min_damping` must be below `max_damping`; received "
                         f"min_damping={low!r}, max_damping={high!r}.")
    if s["adapt_gamma"] and not adaptive:
        raise ValueError("`adapt_gamma=True` needs `adaptive=True`: γ is chosen by the "
                         "quadratic model, which only the adaptive mode builds.")
    if adaptive:
        conflicts = [arg for arg, value in (
            ("weight_decay", weight_decay), ("clipnorm", clipnorm),
            ("clipvalue", clipvalue), ("global_clipnorm", global_clipnorm)) if value]
        if conflicts:
            raise ValueError(
                f"`adaptive=True` chooses the step by the quadratic model and cannot "
                f"honour {', '.join(conflicts)}. Use `l2_reg` for L2 regularisation "
                "(the quadratic model accounts for it), or adaptive=False.")
        if is_schedule(s["damping"]):
            raise ValueError("`adaptive=True` adapts the damping itself; pass a float "
                             "initial `damping`, not a schedule.")
        if not low <= s["damping"] <= high:
            raise ValueError(f"`damping`={s['damping']!r} lies outside [min_damping, "
                             f"max_damping] = [{low}, {high}].")
    if s["seed"] is None:
        s["seed"] = random.SystemRandom().randrange(2**31)
    elif isinstance(s["seed"], bool) or not isinstance(s["seed"], int):
        raise ValueError(f"`seed` must be an int or None; received seed={s['seed']!r}.")
    s["adaptive"], s["adapt_gamma"] = adaptive, bool(s["adapt_gamma"])
    return {name: s[name] for name in NAMES}


def serialize(value):
    if isinstance(value, keras.optimizers.schedules.LearningRateSchedule):
        return keras.saving.serialize_keras_object(value)
    return value


def deserialize(config: dict, custom_objects=None) -> dict:
    config = dict(config)
    for key in SCHEDULABLE:
        if isinstance(config.get(key), dict):
            config[key] = keras.saving.deserialize_keras_object(
                config[key], custom_objects=custom_objects)
    return config
