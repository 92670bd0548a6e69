"""Curvature for SeparableConv1D and SeparableConv2D: a depthwise and a pointwise block."""

from __future__ import annotations

import types

import keras
import tensorflow as tf

from tf_kfac.blocks.base import PartsBlock
from tf_kfac.blocks.dense import DenseBlock
from tf_kfac.blocks.depthwise import DepthwiseConvBlock
from tf_kfac.blocks.ekfac import block_for
from tf_kfac.capture import LayerCall


class SeparableConvBlock(PartsBlock):
    """A separable convolution as the two layers it is: depthwise, then 1×1.

    The depthwise kernel gets per-channel factors (`DepthwiseConvBlock`, no
    bias) from the layer's input and the gradients at the depthwise output;
    the pointwise kernel and the bias get one Kronecker block (a 1×1
    convolution is a Dense layer at every position) from the depthwise output
    and the gradients at the pre-activation. While recorded, the layer is
    computed in these two steps (Keras's `separable_conv` computes the same),
    so that the depthwise output is a tensor whose gradient can be taken.
    The two blocks are independent: their cross-curvature is not kept.
    """

    kind = "separable_conv"
    # The curvature of the parts: "ekfac" in `EKFACSeparableConvBlock`.
    curvature = "kfac"

    def __init__(self, layer: keras.layers.Layer):
        variables = [layer.depthwise_kernel, layer.pointwise_kernel]
        variables += [layer.bias] if layer.bias is not None else []
        super().__init__(layer, variables)
        common = dict(strides=layer.strides, dilation_rate=layer.dilation_rate,
                      padding=layer.padding, data_format="channels_last")
        self.depthwise = block_for(DepthwiseConvBlock, types.SimpleNamespace(
            kernel=layer.depthwise_kernel, bias=None, path=f"{layer.path}/depthwise",
            **common), self.curvature)
        self.pointwise = block_for(DenseBlock, types.SimpleNamespace(
            kernel=layer.pointwise_kernel, bias=layer.bias, path=f"{layer.path}/pointwise"),
            self.curvature)
        self.parts = (self.depthwise, self.pointwise)

    @classmethod
    def eigenbasis_variant(cls) -> type | None:
        """Each part its EKFAC variant (`EKFACSeparableConvBlock`), for this kind only
        (a subclass keeps its own blocks)."""
        return EKFACSeparableConvBlock if cls is SeparableConvBlock else None

    @classmethod
    def obstacle(cls, layer, trainable_ids):
        if layer.data_format != "channels_last":
            return "separable convolution with channels_first data"
        variables = [layer.depthwise_kernel, layer.pointwise_kernel, layer.bias]
        if any(v is not None and id(v) not in trainable_ids for v in variables):
            return "some of its variables are frozen"
        return None

    @staticmethod
    def preactivation(layer, inputs):
        middle = keras.ops.depthwise_conv(
            inputs, layer.depthwise_kernel, strides=layer.strides, padding=layer.padding,
            dilation_rate=layer.dilation_rate, data_format=layer.data_format)
        s = keras.ops.conv(middle, layer.pointwise_kernel, strides=1, padding="valid",
                           data_format=layer.data_format)
        if layer.bias is not None:
            s = s + layer.bias
        return s, (middle,)

    def batch_statistics(self, calls, output_gradients, batch_size, g_scale, example_weights):
        middle = [LayerCall(c.intermediates[0], c.preactivation, c.output) for c in calls]
        depthwise_grads = [[(g[0],) for g in grads] for grads in output_gradients]
        pointwise_grads = [[(g[1],) for g in grads] for grads in output_gradients]
        return [*self.depthwise.batch_statistics(calls, depthwise_grads, batch_size, g_scale,
                                                 example_weights),
                *self.pointwise.batch_statistics(middle, pointwise_grads, batch_size, g_scale,
                                                 example_weights)]

    def preconditioner(self, refreshed, statistics):
        """[the depthwise part's, the pointwise part's] own preconditioner values."""
        return [part.preconditioner(values, averages) for part, values, averages in zip(
            self.parts, self.shares(refreshed, "refreshed"), self.shares(statistics, "statistics"),
            strict=True)]

    def precondition(self, gradients, refreshed, loss_scale):
        depthwise, pointwise = refreshed
        return [*self.depthwise.precondition(gradients[:1], depthwise, loss_scale),
                *self.pointwise.precondition(gradients[1:], pointwise, loss_scale)]

    def kronecker_factors(self) -> tuple[tuple[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
        """((A, G) of the depthwise part, (A, G) of the pointwise part)."""
        return self.depthwise.kronecker_factors(), self.pointwise.kronecker_factors()

    def describe(self) -> str:
        return f"depthwise {self.depthwise.describe()}; pointwise {self.pointwise.describe()}"


class EKFACSeparableConvBlock(SeparableConvBlock):
    """A separable convolution under `curvature="ekfac"`: the depthwise part gets
    EKFAC per channel (`PerChannelRescaling`), the pointwise part the Dense kind's
    EKFAC variant, each from its own recorded rows; they stay independent."""

    kind = "separable_conv+ekfac"
    curvature = "ekfac"
