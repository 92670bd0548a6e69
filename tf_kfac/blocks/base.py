"""The interface every curvature block shares, and the Kronecker-factored base."""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence

import keras
import tensorflow as tf

from tf_kfac import _keras_internals as internals
from tf_kfac.capture import LayerCall
from tf_kfac.linalg import factored_tikhonov_inverses


class CurvatureBlock(abc.ABC):
    """One block of K-FAC's block-diagonal curvature approximation.

    A block covers some of the model's trainable variables, owns the optimizer
    variables that hold its curvature, updates them from one step's captured
    tensors, and turns gradients into preconditioned updates.

    Attributes:
        kind: short name shown in the summary table.
        name: the layer's or variable's path.
        variables: the model variables this block preconditions.
    """

    kind: str = ""

    def __init__(self, name: str, variables: Sequence[keras.Variable]):
        self.name = name
        self.variables = list(variables)

    @property
    def layer(self) -> keras.layers.Layer | None:
        """The layer whose calls this block needs recorded (None: needs none)."""
        return None

    def build(self, optimizer: keras.optimizers.Optimizer) -> None:  # noqa: B027
        """Creates the block's optimizer variables (none by default)."""

    @property
    def state(self) -> tuple[keras.Variable, ...]:
        """The block's optimizer variables, in creation order."""
        return ()

    @abc.abstractmethod
    def precondition(self, gradients: Sequence[tf.Tensor], inverses) -> list[tf.Tensor]:
        """Preconditioned update directions for `gradients` (one per variable)."""

    def describe(self) -> str:
        """One line on the curvature this block keeps, for the summary table."""
        return ""


class FirstOrderBlock(CurvatureBlock):
    """The documented fallback for a variable outside any Kronecker block.

    Its update direction is the gradient itself (plus the L2 term): the variable
    trains with the same learning rate, KL-clip scale and momentum as the
    K-FAC blocks, like SGD with momentum.
    """

    kind = "first-order"

    def __init__(self, variable: keras.Variable, reason: str):
        super().__init__(variable.path, [variable])
        self.reason = reason

    def precondition(self, gradients, inverses):
        return list(gradients)

    def describe(self) -> str:
        return self.reason


class KroneckerBlock(CurvatureBlock):
    """A layer s = ā·W̄ with curvature A ⊗ G (Martens & Grosse 2015).

    W̄ is the kernel, reshaped to (d_in, d_out), with the bias appended as its
    last row; ā is the layer input (or a patch of it) with a 1 appended when
    there is a bias. A = (1/B) Σ ā āᵀ summed over positions, G = (1/B) Σ
    (1/|T|) Σ g gᵀ averaged over positions, so that with the row-major
    vectorisation of W̄ the Fisher block is approximately kron(A, G).

    Subclasses say how a layer input becomes rows ā (`input_rows`).
    """

    def __init__(self, layer: keras.layers.Layer):
        variables = [layer.kernel] + ([layer.bias] if layer.bias is not None else [])
        super().__init__(layer.path, variables)
        self._layer = layer
        self.has_bias = layer.bias is not None
        kernel_shape = tuple(layer.kernel.shape)
        self.kernel_shape = kernel_shape
        self.output_size = int(kernel_shape[-1])
        self.input_size = math.prod(kernel_shape[:-1]) + int(self.has_bias)
        self.a_factor = self.g_factor = self.a_inverse = self.g_inverse = None

    @property
    def layer(self) -> keras.layers.Layer:
        return self._layer

    def build(self, optimizer) -> None:
        def add(shape, suffix, replica_local=False):
            name = f"{self.name.replace('/', '_')}_{suffix}"
            if replica_local:
                return internals.add_replica_local_variable(optimizer, shape, name)
            return optimizer.add_variable(shape, initializer="zeros", dtype="float32", name=name)

        a_shape, g_shape = (self.input_size,) * 2, (self.output_size,) * 2
        # Each replica keeps its own moving averages; they are averaged across
        # replicas only when the inverses refresh (tf_kfac/distribute.py).
        self.a_factor = add(a_shape, "kfac_A", replica_local=True)
        self.g_factor = add(g_shape, "kfac_G", replica_local=True)
        self.a_inverse = add(a_shape, "kfac_A_inverse")
        self.g_inverse = add(g_shape, "kfac_G_inverse")

    @property
    def state(self):
        return (self.a_factor, self.g_factor, self.a_inverse, self.g_inverse)

    @property
    def inverse_cost(self) -> float:
        """The work of one refresh of the damped inverses: d³ per factor."""
        return float(self.input_size) ** 3 + float(self.output_size) ** 3

    # --------------------------------------------------------------- rows
    @abc.abstractmethod
    def input_rows(self, inputs: tf.Tensor) -> tf.Tensor:
        """Rows (examples × positions, d_in) of the layer input, without the 1."""

    def output_rows(self, preactivation_grads: tf.Tensor) -> tf.Tensor:
        """Rows (examples × positions, d_out) of pre-activation gradients."""
        grads = tf.cast(preactivation_grads, tf.float32)
        return tf.reshape(grads, [-1, self.output_size])

    def _rows_of_calls(self, calls: Sequence[LayerCall],
                       row_scales: tf.Tensor | None = None) -> tf.Tensor:
        """ā rows of every call (example-major), each example's rows times `row_scales`."""
        rows = []
        for call in calls:
            call_rows = self.input_rows(tf.cast(call.inputs, tf.float32))
            if self.has_bias:
                call_rows = tf.concat([call_rows, tf.ones_like(call_rows[:, :1])], axis=1)
            if row_scales is not None:
                per_example = tf.shape(call_rows)[0] // tf.shape(row_scales)[0]
                call_rows *= tf.repeat(row_scales, per_example)[:, None]
            rows.append(call_rows)
        return tf.concat(rows, axis=0) if len(rows) > 1 else rows[0]

    # ------------------------------------------------------------ factors
    def input_factor(self, calls: Sequence[LayerCall], batch_size: tf.Tensor,
                     example_weights: tf.Tensor | None = None) -> tf.Tensor:
        """This batch's A = Σᵢ wᵢ Σₜ āāᵀ / Σᵢ wᵢ, summed over positions and calls.

        With the example weights wᵢ of the objective (1/B) Σ wᵢ ℓᵢ (sample and
        class weights), A is their weighted mean, so an example of weight 0
        does not shape it; without weights it is (1/B) Σ āāᵀ. G carries the
        weights' scale, (1/B) Σ wᵢ gᵢgᵢᵀ.
        """
        if example_weights is None:
            rows = self._rows_of_calls(calls)
            return tf.matmul(rows, rows, transpose_a=True) / tf.cast(batch_size, tf.float32)
        weights = tf.cast(example_weights, tf.float32)
        rows = self._rows_of_calls(calls, tf.sqrt(weights))
        total = tf.reduce_sum(weights)
        return tf.math.divide_no_nan(tf.matmul(rows, rows, transpose_a=True), total)

    def output_factor(
        self, preactivation_grads: Sequence[tf.Tensor], batch_size: tf.Tensor, g_scale
    ) -> tf.Tensor:
        """This batch's G = g_scale · (1/B) Σᵢ (1/|T|) Σₜ g gᵀ.

        Args:
            preactivation_grads: for each recorded call, the estimator's
                per-example gradients with respect to the pre-activation.
            batch_size: B.
            g_scale: the loss's scale c (or what turns the rows into c-scaled
                per-example gradients).
        """
        rows = tf.concat([self.output_rows(g) for g in preactivation_grads], axis=0)
        batch = tf.cast(batch_size, tf.float32)
        rows_per_example = tf.cast(tf.shape(rows)[0], tf.float32) / batch
        return tf.matmul(rows, rows, transpose_a=True) * (g_scale / (batch * rows_per_example))

    def damped_inverses(self, a_factor, g_factor, gamma):
        return factored_tikhonov_inverses(a_factor, g_factor, gamma)

    # ------------------------------------------------------ precondition
    def gradient_matrix(self, gradients: Sequence[tf.Tensor]) -> tf.Tensor:
        """∇W̄: the kernel gradient as (d_in, d_out), the bias gradient as last row."""
        matrix = tf.reshape(tf.cast(gradients[0], tf.float32), [-1, self.output_size])
        if self.has_bias:
            matrix = tf.concat([matrix, tf.cast(gradients[1], tf.float32)[None, :]], axis=0)
        return matrix

    def split_matrix(self, matrix: tf.Tensor) -> list[tf.Tensor]:
        """Inverse of `gradient_matrix`: back to the variables' shapes and dtypes."""
        kernel = tf.reshape(matrix[: self.input_size - int(self.has_bias)], self.kernel_shape)
        parts = [kernel]
        if self.has_bias:
            parts.append(matrix[-1])
        return [tf.cast(p, v.dtype) for p, v in zip(parts, self.variables, strict=True)]

    def precondition(self, gradients, inverses):
        a_inverse, g_inverse = inverses
        matrix = self.gradient_matrix(gradients)
        return self.split_matrix(tf.matmul(tf.matmul(a_inverse, matrix), g_inverse))

    def dense_curvature(self, a_factor, g_factor) -> tf.Tensor:
        """kron(A, G): the block as a dense matrix over row-major vec(W̄) (tests)."""
        a = tf.linalg.LinearOperatorFullMatrix(tf.convert_to_tensor(a_factor))
        g = tf.linalg.LinearOperatorFullMatrix(tf.convert_to_tensor(g_factor))
        return tf.linalg.LinearOperatorKronecker([a, g]).to_dense()

    def describe(self) -> str:
        return f"A {self.input_size}x{self.input_size}, G {self.output_size}x{self.output_size}"
