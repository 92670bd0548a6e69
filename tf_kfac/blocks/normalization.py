"""Curvature for the scale γ and shift β of LayerNormalization and BatchNormalization."""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from tf_kfac import masks
from tf_kfac.blocks.base import CurvatureBlock, add_state
from tf_kfac.linalg import damped_inverse


class ScaleShiftBlock(CurvatureBlock):
    """The exact per-unit Fisher of (γᵢ, βᵢ) of a normalisation layer, y = x̂·γ + β.

    Unit i's per-example gradient is (Σₜ gₜᵢ x̂ₜᵢ, Σₜ gₜᵢ), summed over the positions
    t that share the unit (g at the layer's output, x̂ its normalised input), so its
    2 × 2 block F_i = (1/B) Σ ĝĝᵀ is the Fisher's own diagonal block, not a
    factorisation (1 × 1 with `center=False` or `scale=False`); the blocks of
    different units are taken as zero. x̂ uses the layer's statistics of the step:
    the example's own (LayerNormalization) or the batch's (BatchNormalization
    in training; its moving statistics are not trained and get no curvature). The
    positions a Keras mask marks as padding are left out of the sums (and out of
    BatchNormalization's moments, as Keras leaves them out).
    """

    kind = "scale_shift"

    def __init__(self, layer: keras.layers.Layer):
        parameters = [v for v in (layer.gamma, layer.beta) if v is not None]
        super().__init__(layer.path, parameters)
        self._layer = layer
        self.has_scale, self.has_shift = layer.gamma is not None, layer.beta is not None
        self.parameter_shape = tuple(parameters[0].shape)
        self.units = math.prod(self.parameter_shape)
        self.size = len(parameters)
        self.batch_normalization = isinstance(layer, keras.layers.BatchNormalization)
        self.fisher = self.inverse = None

    @classmethod
    def obstacle(cls, layer, trainable_ids):
        parameters = [v for v in (layer.gamma, layer.beta) if v is not None]
        if not parameters:
            return "no scale or shift"
        if any(id(v) not in trainable_ids for v in parameters):
            return "scale or shift not trainable"
        return None

    @property
    def layer(self):
        return self._layer

    def build(self, optimizer) -> None:
        shape = (self.units, self.size, self.size)
        self.fisher = add_state(optimizer, self.name, "kfac_F", shape, replica_local=True)
        self.inverse = add_state(optimizer, self.name, "kfac_F_inverse", shape)

    @property
    def statistics(self):
        return (self.fisher,)

    @property
    def refreshed(self):
        return (self.inverse,)

    @property
    def refresh_cost(self) -> float:
        return self.units * float(self.size) ** 3

    def _axes(self, rank: int) -> list[int]:
        """The axes the parameters run over, as non-negative indices."""
        if self.batch_normalization:
            return [self._layer.axis % rank]
        axis = self._layer.axis
        return sorted(a % rank for a in ([axis] if isinstance(axis, int) else axis))

    def normalised(self, inputs: tf.Tensor, mask: tf.Tensor | None = None) -> tf.Tensor:
        """x̂, in float32, as the layer computes it in a training step.

        `mask` (float32, of the input's shape) is the call's Keras mask:
        BatchNormalization then takes its moments over the real positions, as
        Keras does (with its ε in the weights' sum).
        """
        x = tf.cast(inputs, tf.float32)
        axes = self._axes(x.shape.rank)
        epsilon = self._layer.epsilon
        if self.batch_normalization:
            reduce = [a for a in range(x.shape.rank) if a not in axes]
            if mask is None:
                mean, variance = tf.nn.moments(x, reduce, keepdims=True)
            else:
                count = tf.reduce_sum(mask, reduce, keepdims=True) + keras.config.epsilon()
                mean = tf.reduce_sum(x * mask, reduce, keepdims=True) / count
                variance = tf.reduce_sum(tf.square((x - mean) * mask), reduce,
                                         keepdims=True) / count
            return (x - mean) * tf.math.rsqrt(variance + epsilon)
        if getattr(self._layer, "rms_scaling", False):
            return x * tf.math.rsqrt(tf.reduce_mean(tf.square(x), axes, keepdims=True) + epsilon)
        mean, variance = tf.nn.moments(x, axes, keepdims=True)
        return (x - mean) * tf.math.rsqrt(variance + epsilon)

    def _units_last(self, tensor: tf.Tensor) -> tf.Tensor:
        """(examples, positions, units): the parameter axes moved last and flattened."""
        rank = tensor.shape.rank
        axes = self._axes(rank)
        others = [a for a in range(1, rank) if a not in axes]
        moved = tf.transpose(tensor, [0, *others, *axes])
        return tf.reshape(moved, [tf.shape(tensor)[0], -1, self.units])

    def _mask(self, call) -> tf.Tensor | None:
        """The call's Keras mask as float32 of the input's shape, or None."""
        if call.mask is None:
            return None
        return masks.broadcast_to_input(call.mask, call.inputs, self.name)

    def batch_statistics(self, calls, output_gradients, batch_size, g_scale, example_weights):
        """F_i = g_scale·(1/B) Σ ĝĝᵀ, ĝ summed over the real positions only."""
        call_masks = [self._mask(call) for call in calls]
        normalised = [self._units_last(self.normalised(call.inputs, mask))
                      for call, mask in zip(calls, call_masks, strict=True)]
        unit_masks = [None if m is None else self._units_last(m) for m in call_masks]
        fisher = 0.0
        for grads in output_gradients:
            parts = []
            for call_grads, x_hat, mask in zip(grads, normalised, unit_masks, strict=True):
                g = self._units_last(tf.cast(call_grads[-1], tf.float32))
                if mask is not None:
                    g *= mask
                per_example = []
                if self.has_scale:
                    per_example.append(tf.reduce_sum(g * x_hat, axis=1))
                if self.has_shift:
                    per_example.append(tf.reduce_sum(g, axis=1))
                parts.append(tf.stack(per_example, axis=-1))  # (B, units, size)
            rows = tf.add_n(parts)
            fisher += tf.einsum("bui,buj->uij", rows, rows) * (
                g_scale / tf.cast(batch_size, tf.float32))
        return [fisher]

    def refresh(self, statistics, gamma):
        return [damped_inverse(statistics[0], gamma * gamma)]

    def precondition(self, gradients, refreshed, loss_scale):
        stacked = tf.stack([tf.reshape(tf.cast(g, tf.float32), [-1]) for g in gradients], -1)
        directions = tf.einsum("uij,uj->ui", refreshed[0], stacked)
        return [tf.cast(tf.reshape(directions[:, i], self.parameter_shape), v.dtype)
                for i, v in enumerate(self.variables)]

    def kronecker_factors(self) -> tuple[tf.Tensor]:
        """(F,): the per-unit Fisher blocks, (units, k, k) over (γᵢ, βᵢ)."""
        return (tf.convert_to_tensor(self.fisher),)

    def describe(self) -> str:
        names = "(γ, β)" if self.size == 2 else ("γ" if self.has_scale else "β")
        return f"{self.units} x {self.size}x{self.size} Fisher of {names}"
