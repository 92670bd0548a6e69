"""What KFAC knows about the model it trains: its layers, its loss, its blocks.

Python-side state only, never saved: it is rebuilt by `KFAC.attach`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import keras

from tf_kfac import _keras_internals as internals
from tf_kfac import capture, loss_scaling
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
            block_type_for(layer).record_calls(layer)
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


def check_dtype_policies(model: keras.Model, optimizer: Any) -> None:
    """Raises for float16 computation that K-FAC cannot train.

    Layers computing in float16 (the `mixed_float16` policy, or one layer's own)
    need loss scaling, which K-FAC's step applies when the model is compiled
    with a `keras.optimizers.LossScaleOptimizer` around `optimizer`
    (`tf_kfac/loss_scaling.py`). Float16 weights are refused.
    """
    layers = internals.flatten_layers(model)
    weights16 = [layer.name for layer in layers if layer.weights and getattr(
        getattr(layer, "dtype_policy", None), "variable_dtype", None) == "float16"]
    if weights16:
        raise ValueError(
            f"KFAC does not train float16 weights (layers: {', '.join(weights16)}): their "
            "updates would round away. Use the 'mixed_float16' policy, which keeps the "
            "weights in float32 and computes in float16, or 'float32'.")
    half = [layer.name for layer in layers if not isinstance(layer, keras.layers.InputLayer)
            and getattr(getattr(layer, "dtype_policy", None), "compute_dtype", None) == "float16"]
    if model.dtype_policy.compute_dtype == "float16":
        half.insert(0, model.name)
    if half and loss_scaling.wrapper_of(model, optimizer) is None:
        raise ValueError(
            "Layers computing in float16 need loss scaling, or their gradients underflow, "
            f"and this KFAC optimizer is not wrapped in a keras.optimizers.LossScaleOptimizer "
            f"(float16 computation in: {', '.join(half)}). Compile the model with "
            "`optimizer=keras.optimizers.LossScaleOptimizer(tf_kfac.KFAC(...))`, or set the "
            "'mixed_float16' global policy before building and compiling it (compile then "
            "wraps the optimizer itself); for a custom loop, compile the model that way and "
            "call attach and step on the inner KFAC. Or train in 'float32' or "
            "'mixed_bfloat16', which needs no loss scaling.")


def check_variables_unchanged(model: keras.Model, var_list) -> None:
    """Raises when the model's trainable variables are not those KFAC was built for."""
    if [id(v) for v in model.trainable_variables] != [id(v) for v in var_list]:
        raise ValueError(
            "The model's trainable variables changed after KFAC was built for it (a layer "
            "was frozen, unfrozen or added). Create a new KFAC optimizer and compile the "
            "model again.")


def check_saved_state(saved: int, built: int) -> None:
    """Raises when a saved optimizer state does not have this optimizer's variable count."""
    if saved != built:
        raise ValueError(
            f"The saved optimizer state has {saved} variables, but this K-FAC optimizer, "
            f"built for the loaded model, has {built}: the file comes from another "
            "version of tf_kfac or another model. Loading it would silently restart "
            "K-FAC's factors, inverses, momentum and step counters. To use the weights "
            "without the optimizer state, load with "
            "`keras.models.load_model(path, compile=False)` and compile again with a new "
            "tf_kfac.KFAC().")


def _as_loss_object(loss: Any) -> keras.losses.Loss | None:
    """A `keras.losses.Loss` (mean over the batch, sample weights) for any loss form."""
    if loss is None or isinstance(loss, keras.losses.Loss):
        return loss
    function = keras.losses.get(loss) if isinstance(loss, str) else loss
    if not callable(function):
        raise ValueError(f"Unknown loss {loss!r}: pass a Keras loss name, function or object.")
    return internals.wrap_loss_function(function)
