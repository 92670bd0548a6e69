"""Curvature for Keras's recurrent layers: SimpleRNN, LSTM and GRU.

At time step t a recurrent layer computes its gates' pre-activations from two
linear maps shared over time,

    zₜ = xₜ·W + b  (input kernel)   and   rₜ = hₜ₋₁·U (+ b')  (recurrent kernel),

which the cell combines into hₜ (zₜ + rₜ for SimpleRNN and LSTM; GRU's
candidate takes its reset gate times its share of rₜ). Each map gets a
Kronecker block shared over the time steps in the "expand" flavour, which is
Martens, Ba & Johnson's (ICLR 2018) approximation of independence over time:
A = (1/B) Σᵢ Σₜ āᵢₜāᵢₜᵀ (ā = [xₜ; 1] for W, hₜ₋₁ for U) and G = (1/B) Σᵢ (1/T) Σₜ
gᵢₜgᵢₜᵀ with g the gradient at zₜ (for W) or at rₜ (for U). The cross-curvature
between W and U is not kept.

While recorded, the layer's time loop runs in Keras's own `rnn` loop (masks,
`go_backwards`, `unroll` as Keras does them) with a step written here: the
input projection x·W + b is one tensor over all time steps, and the recurrent
projection carries a zero "probe" tensor, so that both gradients come from
one backward pass. `tests/test_recurrent.py` checks that the recorded layer
gives Keras's own outputs for every kind.
"""

from __future__ import annotations

import types

import keras
import tensorflow as tf
from keras import ops

from tf_kfac import _keras_internals as internals
from tf_kfac.blocks.base import PartsBlock
from tf_kfac.blocks.dense import DenseBlock
from tf_kfac.capture import LayerCall, wrap_inner_loop


def _simple_rnn(cell, projected, recurrent, states):
    h = projected + recurrent
    if cell.activation is not None:
        h = cell.activation(h)
    return h, [h]


def _lstm(cell, projected, recurrent, states):
    z_i, z_f, z_c, z_o = ops.split(projected + recurrent, 4, axis=-1)
    gate = cell.recurrent_activation
    c = gate(z_f) * states[1] + gate(z_i) * cell.activation(z_c)
    h = gate(z_o) * cell.activation(c)
    return h, [h, c]


def _gru(cell, projected, recurrent, states):
    x_z, x_r, x_h = ops.split(projected, 3, axis=-1)
    r_z, r_r, r_h = ops.split(recurrent, 3, axis=-1)
    update = cell.recurrent_activation(x_z + r_z)
    reset = cell.recurrent_activation(x_r + r_r)
    candidate = cell.activation(x_h + reset * r_h)
    h = update * states[0] + (1.0 - update) * candidate
    return h, [h]


_CELL_STEPS = {
    keras.layers.SimpleRNNCell: _simple_rnn,
    keras.layers.LSTMCell: _lstm,
    keras.layers.GRUCell: _gru,
}


def _two_biases(cell) -> bool:
    """GRU with reset_after=True keeps an input and a recurrent bias, as rows of one (2, 3u)."""
    return cell.use_bias and len(cell.bias.shape) == 2


def _biases(cell):
    if not cell.use_bias:
        return None, None
    if _two_biases(cell):
        return cell.bias[0], cell.bias[1]
    return cell.bias, None


def _unsupported(cell) -> str | None:
    """Why this cell's step is not the two-map form above (None: it is)."""
    if type(cell) not in _CELL_STEPS:
        return f"recurrent cell {type(cell).__name__} has no curvature block"
    if getattr(cell, "dropout_mask_count", None) and (cell.dropout or cell.recurrent_dropout):
        return ("per-gate dropout masks (recurrent_dropout, or dropout with "
                "implementation=1) give each gate its own input; use dropout alone, "
                "with the default implementation=2")
    if isinstance(cell, keras.layers.GRUCell) and not cell.reset_after:
        return "GRU with reset_after=False (its candidate's recurrent input is r⊙h)"
    return None


def _time_loop(layer, sequences, initial_state, mask, training, unrolled=False):
    """The recorded time loop: (Keras's `inner_loop` result, the LayerCall), or None
    for a cell that gets no block (Keras's own loop runs). `unrolled` unrolls it over
    the time steps, which must then be known."""
    cell = layer.cell
    if _unsupported(cell) is not None:
        return None
    if unrolled and sequences.shape[1] is None:
        raise ValueError(
            f"KFAC(adaptive=True) needs the number of time steps of recurrent layer "
            f"'{layer.name}' to be fixed: its quadratic model differentiates the layer in "
            "forward mode, which TensorFlow supports only for an unrolled loop. Give the "
            "model's Input a fixed length, e.g. keras.Input((T, features)), or use "
            "adaptive=False.")
    step_of = _CELL_STEPS[type(cell)]
    if tf.nest.is_nested(mask):
        mask = mask[0]
    input_bias, recurrent_bias = _biases(cell)
    # Keras's own dropout masks of this call (RNN.call made them before the loop):
    # one per example, the same at every step, on the input and on hₜ₋₁.
    input_mask = cell.get_dropout_mask(sequences[:, 0]) if training and cell.dropout else None
    hidden_mask = (cell.get_recurrent_dropout_mask(initial_state[0])
                   if training and cell.recurrent_dropout else None)
    if input_mask is not None:
        sequences = sequences * input_mask[:, None]
    projected = ops.matmul(sequences, cell.kernel)
    if input_bias is not None:
        projected = projected + input_bias
    # Zero, but computed from the variables, so the tape can give its gradient.
    probe = projected * 0.0

    width = projected.shape[-1]

    def step(inputs, states):
        projected_t, probe_t = inputs[:, :width], inputs[:, width:]
        previous = states[0] if hidden_mask is None else states[0] * hidden_mask
        recurrent = ops.matmul(previous, cell.recurrent_kernel)
        if recurrent_bias is not None:
            recurrent = recurrent + recurrent_bias
        h, new_states = step_of(cell, projected_t, recurrent + probe_t, states)
        return ops.concatenate([h, previous], axis=-1), new_states

    last_output, outputs, states = internals.backend_rnn(
        # One tensor, not a pair: Keras's loop reads a pair's length only when it is known.
        step, ops.concatenate([projected, probe], axis=-1), list(initial_state),
        go_backwards=layer.go_backwards, mask=mask, unroll=layer.unroll or unrolled,
        input_length=sequences.shape[1],
        zero_output_for_mask=layer.zero_output_for_mask, return_all_outputs=True)
    units = cell.units
    hidden = outputs[..., units:]
    if layer.go_backwards:  # the loop's outputs run backwards in time
        hidden = ops.flip(hidden, axis=1)
    outputs = outputs[..., :units]
    result = (last_output[..., :units], outputs if layer.return_sequences else outputs[:, -1:],
              states)
    positions = None if mask is None else tf.cast(mask, tf.bool)
    call = LayerCall(sequences, projected, outputs, None, (probe,), positions, hidden)
    return result, call


class RecurrentBlock(PartsBlock):
    """Kronecker blocks of a SimpleRNN, LSTM or GRU layer: one for the input
    kernel (with the input bias), one for the recurrent kernel (with GRU's
    recurrent bias), both shared over time steps."""

    kind = "recurrent"

    def __init__(self, layer: keras.layers.Layer):
        cell = layer.cell
        variables = [cell.kernel, cell.recurrent_kernel] + ([cell.bias] if cell.use_bias else [])
        super().__init__(layer, variables)
        self._split_bias = _two_biases(cell)
        if self._split_bias:  # each part's bias is one row of GRU's (2, 3u) bias
            width = int(cell.kernel.shape[-1])
            input_bias = recurrent_bias = types.SimpleNamespace(shape=(width,),
                                                                dtype=cell.bias.dtype)
        else:
            input_bias, recurrent_bias = (cell.bias if cell.use_bias else None), None
        self.input_part = DenseBlock(types.SimpleNamespace(
            kernel=cell.kernel, bias=input_bias, path=f"{layer.path}/kernel"))
        self.recurrent_part = DenseBlock(types.SimpleNamespace(
            kernel=cell.recurrent_kernel, bias=recurrent_bias,
            path=f"{layer.path}/recurrent_kernel"))
        self.parts = (self.input_part, self.recurrent_part)

    @classmethod
    def obstacle(cls, layer, trainable_ids) -> str | None:
        cell = layer.cell
        reason = _unsupported(cell)
        if reason is not None:
            return reason
        variables = [cell.kernel, cell.recurrent_kernel] + ([cell.bias] if cell.use_bias else [])
        if any(id(v) not in trainable_ids for v in variables):
            return "some of its variables are frozen"
        return None

    @classmethod
    def record_calls(cls, layer: keras.layers.Layer) -> None:
        internals.check_rnn_time_loop(layer)
        wrap_inner_loop(layer, _time_loop)

    def batch_statistics(self, calls, output_gradients, batch_size, g_scale, example_weights):
        inputs = [LayerCall(c.inputs, c.preactivation, c.output, mask=c.mask) for c in calls]
        hidden = [LayerCall(c.hidden, c.intermediates[0], c.output, mask=c.mask) for c in calls]
        input_grads = [[(g[1],) for g in grads] for grads in output_gradients]
        recurrent_grads = [[(g[0],) for g in grads] for grads in output_gradients]
        return [*self.input_part.batch_statistics(inputs, input_grads, batch_size, g_scale,
                                                  example_weights),
                *self.recurrent_part.batch_statistics(hidden, recurrent_grads, batch_size,
                                                      g_scale, example_weights)]

    def precondition(self, gradients, refreshed, loss_scale):
        kernel, recurrent = gradients[0], gradients[1]
        if self._split_bias:
            bias = gradients[2]
            k, input_bias = self.input_part.precondition([kernel, bias[0]], refreshed[:2],
                                                         loss_scale)
            u, recurrent_bias = self.recurrent_part.precondition(
                [recurrent, bias[1]], refreshed[2:], loss_scale)
            return [k, u, tf.stack([input_bias, recurrent_bias])]
        k, *input_bias = self.input_part.precondition([kernel, *gradients[2:]], refreshed[:2],
                                                      loss_scale)
        (u,) = self.recurrent_part.precondition([recurrent], refreshed[2:], loss_scale)
        return [k, u, *input_bias]

    def kronecker_factors(self):
        """((A, G) of the input kernel, (A, G) of the recurrent kernel)."""
        return self.input_part.kronecker_factors(), self.recurrent_part.kronecker_factors()

    def describe(self) -> str:
        return (f"kernel {self.input_part.describe()}; "
                f"recurrent {self.recurrent_part.describe()}")
