"""Capturing layer inputs and pre-activations during a K-FAC training step.

Dense, EinsumDense and the convolutions apply their activation inside `call`,
so their pre-activation s is not a tensor of the model's graph. `wrap_layer` replaces `call` on the
layer *instance* (Keras looks `call` up on the instance at every call) with a
function that, only while a `Recording` is active, runs the layer's own `call`
with the activation switched off, records the input and s, and applies the
activation to s. Outside a recording — `predict`, `evaluate`, `model.export()`,
any call of the user's — it is the layer's own `call`, unchanged. Each recorded
call keeps the Keras mask of its positions (`LayerCall.mask`, tf_kfac/masks.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import threading
from collections.abc import Callable, Iterator, Sequence

import keras
import tensorflow as tf

from tf_kfac import _keras_internals as internals
from tf_kfac import masks

_ACTIVE = threading.local()
_WRAPPED_MARK = "_tf_kfac_originals"  # {method name: the layer's own method}


@dataclasses.dataclass
class LayerCall:
    """One call of a registered layer inside a recording.

    Attributes:
        inputs: the layer's input.
        preactivation: s, the output before the layer's activation.
        output: the layer's output.
        activation_name: the activation's name, if any.
        intermediates: tensors inside the layer whose gradients its block
            needs besides s (a separable convolution's depthwise output, a
            recurrent layer's recurrent projections).
        mask: a boolean mask of the input's positions, of the shape of its
            leading (examples, positions...) axes, True at a real position;
            None when every position is real (tf_kfac/masks.py).
        hidden: a recurrent layer's previous hidden state at each position,
            (examples, positions, units), or None.
    """

    inputs: tf.Tensor
    preactivation: tf.Tensor
    output: tf.Tensor
    activation_name: str | None = None
    intermediates: tuple[tf.Tensor, ...] = ()
    mask: tf.Tensor | None = None
    hidden: tf.Tensor | None = None

    @property
    def targets(self) -> tuple[tf.Tensor, ...]:
        """The tensors whose gradients the block needs: the intermediates, then s."""
        return (*self.intermediates, self.preactivation)


class Recording:
    """The calls of the registered layers during one forward pass."""

    def __init__(self, layers: Sequence[keras.layers.Layer], unrolled: bool = False):
        self._ids = {id(layer) for layer in layers}
        # Recurrent time loops run unrolled (forward-mode differentiation, which the
        # adaptive mode's quadratic model uses, does not go through a while loop).
        self.unrolled = unrolled
        self.calls: dict[int, list[LayerCall]] = {id(layer): [] for layer in layers}
        # Masks that a containing layer hands to the layers it calls (by id),
        # for the duration of its call (MultiHeadAttention's projections).
        self.routed_masks: dict[int, tf.Tensor] = {}

    def records(self, layer: keras.layers.Layer) -> bool:
        return id(layer) in self._ids

    def add(self, layer: keras.layers.Layer, call: LayerCall) -> None:
        self.calls[id(layer)].append(call)

    def of(self, layer: keras.layers.Layer) -> list[LayerCall]:
        return self.calls[id(layer)]

    def preactivations(self) -> list[tf.Tensor]:
        return [call.preactivation for calls in self.calls.values() for call in calls]

    def layer_producing(self, tensor) -> tuple[int, LayerCall] | None:
        """The (layer id, call) whose output is `tensor` itself, if any."""
        for layer_id, calls in self.calls.items():
            for call in calls:
                if call.output is tensor:
                    return layer_id, call
        return None


def active_recording() -> Recording | None:
    return getattr(_ACTIVE, "recording", None)


@contextlib.contextmanager
def recording(layers: Sequence[keras.layers.Layer],
              unrolled: bool = False) -> Iterator[Recording]:
    """Records the calls of `layers` made inside the `with` block (recurrent time loops
    unrolled when `unrolled`)."""
    previous = active_recording()
    current = Recording(layers, unrolled)
    _ACTIVE.recording = current
    try:
        yield current
    finally:
        _ACTIVE.recording = previous


def is_wrapped(layer: keras.layers.Layer) -> bool:
    return _WRAPPED_MARK in vars(layer)


def _recording_of(layer: keras.layers.Layer) -> Recording | None:
    """The active recording when it records `layer` (never while Keras builds)."""
    current = active_recording()
    if current is None or not current.records(layer) or internals.in_symbolic_build():
        return None
    return current


def _replace(layer: keras.layers.Layer, name: str, method: Callable) -> None:
    object.__setattr__(layer, _WRAPPED_MARK, {name: getattr(layer, name)})
    object.__setattr__(layer, name, method)


# How a layer kind computes its pre-activation with its intermediates inside a
# recording: (layer, inputs) -> (s, intermediates); the default runs the layer's
# own `call` with its activation switched off.
Preactivation = Callable[[keras.layers.Layer, tf.Tensor], tuple[tf.Tensor, tuple]]


def wrap_layer(layer: keras.layers.Layer, compute: Preactivation | None = None) -> None:
    """Makes `layer` record its input and pre-activation inside a recording.

    `compute` computes the pre-activation and the intermediates when the block
    kind needs tensors from inside the layer; by default the layer's own
    `call` runs with its activation switched off.
    """
    if is_wrapped(layer):
        return
    original_call = layer.call

    def call(inputs, *args, **kwargs):
        current = _recording_of(layer)
        if current is None:
            return original_call(inputs, *args, **kwargs)
        mask = current.routed_masks.get(id(layer))
        if mask is None:
            mask = masks.call_mask(layer, inputs, kwargs.get("mask"))
        if compute is not None:
            s, intermediates = compute(layer, inputs)
            activation = getattr(layer, "activation", None)
            output = activation(s) if activation is not None else s
            name = getattr(activation, "__name__", None)
            current.add(layer, LayerCall(inputs, s, output, name, tuple(intermediates), mask))
            return output
        activation = getattr(layer, "activation", None)
        if activation is None:  # no activation to separate: the output is s
            preactivation = original_call(inputs, *args, **kwargs)
        else:
            object.__setattr__(layer, "activation", None)
            try:
                preactivation = original_call(inputs, *args, **kwargs)
            finally:
                object.__setattr__(layer, "activation", activation)
        output = activation(preactivation) if activation is not None else preactivation
        name = getattr(activation, "__name__", None)
        current.add(layer, LayerCall(inputs, preactivation, output, name, mask=mask))
        return output

    _replace(layer, "call", call)


# How a recurrent layer kind runs its time loop inside a recording:
# (layer, sequences, initial_state, mask, training, unrolled) -> (the loop's result as
# Keras's `RNN.inner_loop` returns it, the LayerCall to record), or None to run
# Keras's own loop unrecorded.
RecurrentLoop = Callable[..., tuple[tuple, LayerCall] | None]


def wrap_inner_loop(layer: keras.layers.Layer, loop: RecurrentLoop) -> None:
    """Makes a Keras recurrent layer run `loop` over time inside a recording.

    Keras's `RNN.call` (initial and stateful states, return_sequences,
    return_state) is kept; only its time loop, `inner_loop`, is replaced while
    the layer is recorded. Outside a recording it is Keras's own loop (cuDNN on
    a GPU).
    """
    if is_wrapped(layer):
        return
    original_loop = layer.inner_loop

    def inner_loop(sequences, initial_state, mask, training=False):
        current = _recording_of(layer)
        if current is None:
            return original_loop(sequences, initial_state, mask, training=training)
        recorded = loop(layer, sequences, initial_state, mask, training, current.unrolled)
        if recorded is None:  # a configuration the loop does not cover: Keras's own
            return original_loop(sequences, initial_state, mask, training=training)
        result, call = recorded
        current.add(layer, call)
        return result

    _replace(layer, "inner_loop", inner_loop)


def unwrap_layer(layer: keras.layers.Layer) -> None:
    """Restores the layer's own methods."""
    if not is_wrapped(layer):
        return
    for name in vars(layer)[_WRAPPED_MARK]:
        object.__delattr__(layer, name)
    object.__delattr__(layer, _WRAPPED_MARK)


def wrap_attention(layer: keras.layers.Layer) -> None:
    """Hands a MultiHeadAttention's masks to its projections inside a recording.

    `MultiHeadAttention.call` removes the Keras masks of its query, value and
    key before projecting them; while recording, this wrapper reads them first
    (`masks.attention_masks`) so that the projections' calls record them.
    Outside a recording it is the layer's own `call`.
    """
    if is_wrapped(layer):
        return
    original_call = layer.call
    signature = inspect.signature(original_call)

    def call(*args, **kwargs):
        current = active_recording()
        if current is None or internals.in_symbolic_build():
            return original_call(*args, **kwargs)
        routed = masks.attention_masks(layer, signature.bind(*args, **kwargs).arguments)
        previous = dict(current.routed_masks)
        current.routed_masks.update(routed)
        try:
            return original_call(*args, **kwargs)
        finally:
            current.routed_masks = previous

    _replace(layer, "call", call)
