"""Every use of private Keras internals in tf_kfac, in one place.

K-FAC needs a few things that Keras 3 does not expose publicly: a way into
`model.fit`'s training step, the model that an optimizer is being built for,
the layers of a model (recursively), the loss that the model was compiled with
and the model's loss tracker. Each helper here fails loudly (with a message
naming the Keras version) when a Keras release changes what it relies on;
`tests/test_keras_internals.py` checks each of them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import keras

KERAS_VERSION = keras.__version__


class KerasInternalsError(RuntimeError):
    """Raised when a Keras internal that tf_kfac relies on has changed."""


def _changed(what: str) -> KerasInternalsError:
    return KerasInternalsError(
        f"tf_kfac relies on {what}, which this Keras release ({KERAS_VERSION}) no "
        "longer provides. Please report this with your Keras version, and pin a "
        "Keras release that tf_kfac supports (see README.md) meanwhile."
    )


# --------------------------------------------------------------------------
# The training step of `model.fit`.
# --------------------------------------------------------------------------


def _tensorflow_trainer_class() -> type:
    try:
        from keras.src.backend.tensorflow.trainer import TensorFlowTrainer
    except ImportError as error:  # pragma: no cover - depends on Keras
        raise _changed("keras.src.backend.tensorflow.trainer.TensorFlowTrainer") from error
    if not callable(getattr(TensorFlowTrainer, "train_step", None)):  # pragma: no cover
        raise _changed("TensorFlowTrainer.train_step")
    return TensorFlowTrainer


_ORIGINAL_TRAIN_STEP: Callable | None = None


def install_fit_hook(kfac_train_step: Callable[[Any, Any, Any], Any], find_kfac: Callable) -> None:
    """Routes `Model.train_step` to K-FAC's step for models compiled with K-FAC.

    `model.fit` binds `model.train_step` when it builds its train function, and
    Keras's default `train_step` is defined on `TensorFlowTrainer`. The hook
    replaces that default with a function that calls `kfac_train_step(optimizer,
    model, data)` when `find_kfac(model.optimizer)` returns a K-FAC optimizer,
    and Keras's own step otherwise. Models that override `train_step` are not
    touched (their step reaches `KFAC.apply`, which explains what to do).
    Installing twice is harmless.
    """
    global _ORIGINAL_TRAIN_STEP
    trainer = _tensorflow_trainer_class()
    if getattr(trainer.train_step, "_tf_kfac_hook", False):
        return
    original = trainer.train_step
    _ORIGINAL_TRAIN_STEP = original

    def train_step(self, data):
        optimizer = find_kfac(getattr(self, "optimizer", None))
        if optimizer is None:
            return original(self, data)
        return kfac_train_step(optimizer, self, data)

    train_step.__doc__ = original.__doc__
    train_step._tf_kfac_hook = True
    trainer.train_step = train_step
    _fix_multi_worker_fit(trainer, find_kfac)


def _fix_multi_worker_fit(trainer: type, find_kfac: Callable) -> None:
    """Lets `model.fit` run under MultiWorkerMirroredStrategy for K-FAC models.

    Keras 3 (up to at least 3.15) fails there with every optimizer, in two
    places (keras-team/keras#20585): `_maybe_symbolic_build` reduces the first
    batch's (x, y) tuple across workers in one call, which the multi-worker
    reduce cannot take, and the train function reduces each scalar log with
    `axis=0`. For models compiled with KFAC, the symbolic build takes this
    replica's own first batch instead (its values do not matter, only its
    structure and shapes); for every model, scalar logs under a multi-worker
    strategy (the case Keras cannot reduce at all) are averaged across
    replicas. Nothing changes for other strategies.
    """
    import tensorflow as tf

    try:
        from keras.src.backend.tensorflow import trainer as trainer_module
    except ImportError as error:  # pragma: no cover - depends on Keras
        raise _changed("keras.src.backend.tensorflow.trainer") from error
    for name in ("reduce_per_replica", "_collective_all_reduce_multi_worker"):
        if not callable(getattr(trainer_module, name, None)):  # pragma: no cover
            raise _changed(f"keras.src.backend.tensorflow.trainer.{name}")
    if not callable(getattr(trainer, "_maybe_symbolic_build", None)):  # pragma: no cover
        raise _changed("TensorFlowTrainer._maybe_symbolic_build")
    if getattr(trainer_module.reduce_per_replica, "_tf_kfac_hook", False):
        return
    multi_worker = trainer_module._collective_all_reduce_multi_worker
    original_reduce = trainer_module.reduce_per_replica
    original_build = trainer._maybe_symbolic_build

    def reduce_per_replica(values, strategy, reduction):
        if not (multi_worker(strategy) and reduction in ("auto", "mean")):
            return original_reduce(values, strategy, reduction)

        def reduce(value):
            local = (strategy.experimental_local_results(value)[0]
                     if isinstance(value, tf.distribute.DistributedValues) else value)
            if getattr(getattr(local, "shape", None), "rank", None) == 0:
                return strategy.reduce("MEAN", value, axis=None)
            return original_reduce(value, strategy, reduction)

        return tf.nest.map_structure(reduce, values)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = getattr(self, "_distribute_strategy", None)
        if (iterator is None or strategy is None or not multi_worker(strategy)
                or find_kfac(getattr(self, "optimizer", None)) is None):
            return original_build(self, iterator=iterator, data_batch=data_batch)
        # The epoch iterator yields (step, batches) up to Keras 3.10 and
        # (first step, last step, batches) later: the batches come last.
        for entry in iterator:
            first = next(entry[-1])
            data_batch = tf.nest.map_structure(
                lambda v: strategy.experimental_local_results(v)[0]
                if isinstance(v, tf.distribute.DistributedValues) else v, first)
            break
        return original_build(self, iterator=None, data_batch=data_batch)

    reduce_per_replica._tf_kfac_hook = True
    trainer_module.reduce_per_replica = reduce_per_replica
    trainer._maybe_symbolic_build = _maybe_symbolic_build


def fit_hook_installed() -> bool:
    return bool(getattr(_tensorflow_trainer_class().train_step, "_tf_kfac_hook", False))


def overrides_train_step(model: keras.Model) -> bool:
    """True when the model's class defines its own `train_step`."""
    trainer = _tensorflow_trainer_class()
    return type(model).train_step is not trainer.train_step


# --------------------------------------------------------------------------
# Finding the model an optimizer is built for.
# --------------------------------------------------------------------------


def unwrap_optimizer(optimizer: Any) -> Any:
    """Returns the optimizer inside a `LossScaleOptimizer`, or the optimizer itself."""
    inner = getattr(optimizer, "inner_optimizer", None)
    return inner if inner is not None else optimizer


def find_model_in_call_stack(optimizer: Any) -> keras.Model | None:
    """The Keras model whose `optimizer` is `optimizer`, from the Python call stack.

    Keras builds an optimizer from inside a method of the model that owns it
    (`compile_from_config` when a `.keras` file is loaded, `_symbolic_build`
    under a distribution strategy, `train_step` otherwise), so the model is the
    `self` of a frame up the stack. Returns None when there is no such frame.
    """
    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, keras.Model):
                owned = getattr(candidate, "optimizer", None)
                if owned is optimizer or unwrap_optimizer(owned) is optimizer:
                    return candidate
            frame = frame.f_back
    finally:
        del frame
    return None


# --------------------------------------------------------------------------
# Layers, losses, loss tracker.
# --------------------------------------------------------------------------


def flatten_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """All layers of a model, nested ones included, in Keras's tracking order."""
    flatten = getattr(model, "_flatten_layers", None)
    if flatten is None:  # pragma: no cover - depends on Keras
        raise _changed("Layer._flatten_layers")
    return list(flatten(include_self=False, recursive=True))


def call_has_training_arg(model: keras.Model) -> bool:
    value = getattr(model, "_call_has_training_arg", None)
    if value is None:  # pragma: no cover - depends on Keras
        raise _changed("Layer._call_has_training_arg")
    return bool(value)


def compiled_loss(model: keras.Model) -> tuple[Any, Any]:
    """The loss and loss weights exactly as the user passed them to `compile`."""
    compile_loss = getattr(model, "_compile_loss", None)
    if compile_loss is None:
        return getattr(model, "loss", None), None
    if not hasattr(compile_loss, "_user_loss"):  # pragma: no cover - depends on Keras
        raise _changed("CompileLoss._user_loss")
    return compile_loss._user_loss, getattr(compile_loss, "_user_loss_weights", None)


def compute_loss(model: keras.Model, x, y, y_pred, sample_weight):
    """The training objective exactly as `model.fit` computes it."""
    compute = getattr(model, "_compute_loss", None)
    if compute is None:  # pragma: no cover - depends on Keras
        raise _changed("Trainer._compute_loss")
    return compute(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)


def update_loss_tracker(model: keras.Model, loss, batch_size) -> None:
    tracker = getattr(model, "_loss_tracker", None)
    if tracker is None:  # pragma: no cover - depends on Keras
        raise _changed("Trainer._loss_tracker")
    tracker.update_state(loss, sample_weight=batch_size)


def wrap_loss_function(function: Callable) -> Any:
    """A Keras `Loss` around a loss function, exactly as `compile` builds one."""
    try:
        from keras.src.losses.losses import LossFunctionWrapper
    except ImportError as error:  # pragma: no cover - depends on Keras
        raise _changed("keras.src.losses.losses.LossFunctionWrapper") from error
    return LossFunctionWrapper(function)


def in_symbolic_build() -> bool:
    """True while Keras runs a layer symbolically to build it or infer shapes.

    An unbuilt model's first call runs `call` once on placeholders in a scratch
    graph (`compute_output_spec`, under a `SymbolicScope`); the capture must not
    record those calls.
    """
    try:
        from keras.src.backend.common.symbolic_scope import in_symbolic_scope
    except ImportError as error:  # pragma: no cover - depends on Keras
        raise _changed("keras.src.backend.common.symbolic_scope.in_symbolic_scope") from error
    return bool(in_symbolic_scope())


# --------------------------------------------------------------------------
# Keras masks (padding positions).
# --------------------------------------------------------------------------


def keras_mask(tensor: Any) -> Any:
    """The Keras mask attached to `tensor` (True = a real position), or None.

    Keras 3 carries a mask as the `_keras_mask` attribute of a tensor (or, for
    tensors that take no attributes, in a global table), written when a layer
    that supports masking returns, and read by `Layer.__call__` to fill a
    layer's `mask=` argument; `keras.src.backend.get_keras_mask` reads both.
    """
    try:
        from keras.src.backend import get_keras_mask
    except ImportError as error:  # pragma: no cover - depends on Keras
        raise _changed("keras.src.backend.get_keras_mask") from error
    if tensor is None:
        return None
    return get_keras_mask(tensor)


_ATTENTION_PROJECTIONS = {"query": "_query_dense", "key": "_key_dense",
                          "value": "_value_dense", "output": "_output_dense",
                          "gate": "_gate_dense"}


def attention_projections(layer: Any) -> dict[str, Any]:
    """A built MultiHeadAttention's EinsumDense projections, by role.

    The roles are "query", "key", "value", "output" and, with `use_gate=True`,
    "gate". `MultiHeadAttention.call` removes the Keras masks of its inputs
    before it applies these projections, so tf_kfac tells them their masks
    itself (tf_kfac/masks.py).
    """
    found = {}
    for role, attribute in _ATTENTION_PROJECTIONS.items():
        projection = getattr(layer, attribute, None)
        if projection is None:
            if role == "gate" and not getattr(layer, "_use_gate", False):
                continue
            raise _changed(f"MultiHeadAttention.{attribute}")
        found[role] = projection
    return found


# --------------------------------------------------------------------------
# Optimizer state that is local to each replica.
# --------------------------------------------------------------------------


def add_replica_local_variable(optimizer: Any, shape, name: str) -> keras.Variable:
    """A float32 optimizer variable that each replica keeps for itself.

    Under a distribution strategy, writes from a replica change only that
    replica's copy, and reading it outside the replicas (saving, checkpoints)
    gives the mean across replicas; restoring writes every copy. Without a
    strategy it is an ordinary variable. `Optimizer.add_variable` has no
    `synchronization` argument, so the variable is created here and tracked
    the way `add_variable` tracks its own (by creation order).
    """
    track = getattr(optimizer, "_track_variable", None)
    if not callable(track):
        raise _changed("Optimizer._track_variable")
    with keras.name_scope(optimizer.name, caller=optimizer):
        variable = keras.Variable(
            initializer=keras.initializers.Zeros(),
            shape=shape,
            dtype="float32",
            trainable=False,
            aggregation="mean",
            synchronization="on_read",
            name=name,
        )
    track(variable)
    return variable


def backend_rnn(step: Callable, sequences: Any, initial_state: list, **options) -> tuple:
    """Keras's own time loop (`keras.src.backend.rnn`), the one `RNN.inner_loop` runs:
    masks, `go_backwards`, `unroll` and `zero_output_for_mask` as in Keras."""
    try:
        from keras.src.backend import rnn
    except ImportError as error:  # pragma: no cover - depends on Keras
        raise _changed("keras.src.backend.rnn") from error
    return rnn(step, sequences, initial_state, **options)


_RNN_LOOP_PARAMETERS = ["sequences", "initial_state", "mask", "training"]


def check_rnn_time_loop(layer: Any) -> None:
    """Raises unless the recurrent layer runs its time loop in
    `inner_loop(sequences, initial_state, mask, training)`, the method that
    `RNN.call` calls and tf_kfac replaces while it records the layer."""
    loop = getattr(type(layer), "inner_loop", None)
    if loop is None or list(inspect.signature(loop).parameters)[1:] != _RNN_LOOP_PARAMETERS:
        raise _changed("RNN.inner_loop(sequences, initial_state, mask, training)")


# --------------------------------------------------------------------------
# Keras's dynamic loss scaling (`keras.optimizers.LossScaleOptimizer`).
# --------------------------------------------------------------------------


def loss_scale_settings(wrapper: Any) -> tuple[float, int]:
    """A `LossScaleOptimizer`'s `(initial_scale, dynamic_growth_steps)`."""
    initial = getattr(wrapper, "initial_scale", None)
    growth = getattr(wrapper, "dynamic_growth_steps", None)
    if initial is None or growth is None:  # pragma: no cover - depends on Keras
        raise _changed("LossScaleOptimizer.initial_scale and .dynamic_growth_steps")
    return float(initial), int(growth)


def loss_scale_variables(wrapper: Any) -> tuple[keras.Variable, keras.Variable]:
    """A built `LossScaleOptimizer`'s `(step_counter, dynamic_scale)` variables.

    Keras multiplies the loss by `dynamic_scale`; after a step with finite
    gradients it increments `step_counter`, or, when the counter has reached
    `dynamic_growth_steps − 1`, doubles the scale and resets the counter; after
    a step with a non-finite gradient it halves the scale, resets the counter
    and applies nothing.
    """
    counter = getattr(wrapper, "step_counter", None)
    scale = getattr(wrapper, "dynamic_scale", None)
    if not (isinstance(counter, keras.Variable) and isinstance(scale, keras.Variable)):
        raise _changed("LossScaleOptimizer.step_counter and .dynamic_scale")
    return counter, scale
