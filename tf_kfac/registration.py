"""What KFAC knows about the model it trains: its layers, its loss, its blocks.

Python-side state only, never saved: it is rebuilt by `KFAC.attach`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import keras

from tf_kfac import _keras_internals as internals
from tf_kfac import capture
from tf_kfac.blocks import block_type_for
from tf_kfac.losses import SUPPORTED_LOSSES, LossSpec, UnsupportedLossError, resolve_loss


class Registration:
    """The model, the recorded layers, the loss's distribution, the estimator."""

    def __init__(self):
        self.model: Callable[[], keras.Model | None] = lambda: None
        self.candidates: list[keras.layers.Layer] = []
        self.estimator = None  # estimator.CurvatureEstimator, once built
        self.state = None  # step.KFACState, once built
        self.spec: LossSpec | None = None
        self.loss_fn: Any = None
        self.loss_given: Any = None
        self.registered = False  # layers wrapped and loss read (attach ran)

    def model_to_build_for(self, optimizer: Any) -> keras.Model:
        """The attached model or, when Keras builds the optimizer itself (loading a
        `.keras` file), the model found on the call stack; raises when there is none."""
        model = self.model()
        if model is None:
            model = internals.find_model_in_call_stack(optimizer)
            if model is None:
                raise ValueError("KFAC could not tell which model it is built for. Call "
                                 "`optimizer.attach(model)` first (model.fit does this "
                                 "itself).")
            self.model = weakref.ref(model)
        return model

    def register(self, model: keras.Model, loss: Any, fisher: str, adaptive: bool) -> None:
        """Reads the loss and wraps the calls of every layer that has a block kind."""
        layers = internals.flatten_layers(model)
        candidates = [layer for layer in layers if block_type_for(layer)]
        if not candidates:
            raise ValueError(
                f"KFAC found no layer with a curvature block (Dense, EinsumDense, a "
                f"convolution) in model '{model.name}'. Use a first-order optimizer such as "
                "keras.optimizers.Adam for this model, or register a block for your layer "
                "with tf_kfac.register_block.")
        spec = _resolve_spec(model, loss, fisher)
        if adaptive and spec is None:
            raise UnsupportedLossError(
                "KFAC(adaptive=True) builds the quadratic model from the output Hessian "
                "of the loss, which tf_kfac knows only for these losses: "
                + ", ".join(SUPPORTED_LOSSES) + ". Compile with one of them, or use "
                "adaptive=False with fisher='empirical'.")
        self.spec = spec
        self.loss_fn = _as_loss_object(loss)
        self.loss_given = loss
        for layer in candidates:
            capture.wrap_layer(layer, getattr(block_type_for(layer), "preactivation", None))
        for layer in layers:  # they hide their inputs' masks from their projections
            if isinstance(layer, keras.layers.MultiHeadAttention):
                capture.wrap_attention(layer)
        self.candidates = candidates
        self.model = weakref.ref(model)
        self.registered = True


def _resolve_spec(model, loss, fisher: str) -> LossSpec | None:
    loss_weights = None
    if loss is None:
        loss, loss_weights = internals.compiled_loss(model)
    try:
        return resolve_loss(loss, loss_weights, getattr(model, "output_names", None))
    except UnsupportedLossError:
        if fisher == "empirical":
            return None
        raise


def check_dtype_policies(model: keras.Model) -> None:
    """Raises for float16 computation anywhere in the model (not supported yet)."""
    half = [layer.name for layer in internals.flatten_layers(model)
            if getattr(getattr(layer, "dtype_policy", None), "compute_dtype", None) == "float16"]
    if model.dtype_policy.name == "mixed_float16" or half or isinstance(
            getattr(model, "optimizer", None), keras.optimizers.LossScaleOptimizer):
        where = f" (layers computing in float16: {', '.join(half)})" if half else ""
        raise ValueError(
            "KFAC does not support float16 computation and its loss scaling (the "
            f"'mixed_float16' policy) yet{where}. Train in float32, or with the "
            "'mixed_bfloat16' policy, which needs no loss scaling.")


def _as_loss_object(loss: Any) -> keras.losses.Loss | None:
    """A `keras.losses.Loss` (mean over the batch, sample weights) for any loss form."""
    if loss is None or isinstance(loss, keras.losses.Loss):
        return loss
    function = keras.losses.get(loss) if isinstance(loss, str) else loss
    if not callable(function):
        raise ValueError(f"Unknown loss {loss!r}: pass a Keras loss name, function or object.")
    return internals.wrap_loss_function(function)
