"""Kronecker-factored curvature for `keras.layers.EinsumDense`.

This covers MultiHeadAttention's query, key, value and output projections,
whose kernels (d, heads, head_dim) and (heads, head_dim, d) act as one
(d_in, d_out) matrix at every position.
"""

from __future__ import annotations

import math

import tensorflow as tf

from tf_kfac.blocks.kronecker import KroneckerBlock

_ELLIPSIS_LABELS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _split(equation: str) -> tuple[str, str, str]:
    inputs, output = equation.replace(" ", "").split("->")
    lhs, kernel = inputs.split(",")
    return lhs, kernel, output


def _strip(spec: str) -> str:
    """`spec` without its "..."."""
    return spec.replace("...", "")


def _expand(spec: str, rank: int | None) -> str:
    """`spec` with "..." replaced by one fresh upper-case label per elided axis."""
    if "..." not in spec:
        return spec
    elided = (rank or 0) - (len(spec) - 3)
    return spec.replace("...", _ELLIPSIS_LABELS[:elided])


class EinsumDenseBlock(KroneckerBlock):
    """K-FAC block of an EinsumDense layer, for any equation of a linear map.

    The kernel's labels split into the contracted ones (in the input, not the
    output: d_in) and the output ones (in the output, not the input: d_out);
    W̄ is the kernel transposed to (contracted, output) labels, each group in
    kernel order, as a (d_in, d_out) matrix, with the bias as a last row. The
    input labels that are not the kernel's are positions sharing the weights
    (the batch first), treated by the optimizer's `weight_sharing` flavour.
    """

    kind = "einsum_dense"

    def __init__(self, layer):
        lhs, kernel, output = _split(layer.equation)
        labels = _labels(lhs, kernel, output)
        self.contracted, self.free = labels
        super().__init__(layer)
        kernel_dims = dict(zip(kernel, self.kernel_shape, strict=True))
        self._kernel_labels = kernel
        self._kernel_perm = [kernel.index(c) for c in self.contracted + self.free]
        self._matrix_dims = [kernel_dims[c] for c in self.contracted + self.free]
        self.output_size = math.prod(kernel_dims[c] for c in self.free)
        self.input_size = math.prod(kernel_dims[c] for c in self.contracted) + int(self.has_bias)
        self._lhs, self._output = lhs, output
        if self.has_bias:
            order = [c for c in output if c in layer.bias_axes]
            self._bias_dims = [kernel_dims[c] for c in order]
            self._bias_perm = [order.index(c) for c in self.free]

    @classmethod
    def obstacle(cls, layer, trainable_ids):
        try:
            _labels(*_split(layer.equation))
        except ValueError as error:
            return f"equation '{layer.equation}': {error}"
        bias_axes = getattr(layer, "bias_axes", None)
        if layer.bias is not None:
            _, kernel, output = _split(layer.equation)
            free = [c for c in kernel if c in output]
            if sorted(bias_axes) != sorted(free):
                return (f"bias over the axes '{bias_axes}', not the kernel's output axes "
                        f"'{''.join(free)}'")
        return super().obstacle(layer, trainable_ids)

    @property
    def positions_aligned(self) -> bool:
        """Whether input and output list the shared positions in one order (EKFAC's
        per-example gradients pair input row t with output row t)."""
        def positions(spec):
            return [c for c in spec.replace("...", "*") if c not in self._kernel_labels]
        return positions(self._lhs) == positions(self._output)

    def _rows(self, tensor: tf.Tensor, spec: str, feature_labels: list[str], size: int):
        elided = tensor.shape.rank - len(_strip(spec))
        spec = _expand(spec, tensor.shape.rank)
        # The positions in the input's order, so that the input's and the
        # output's rows (and a mask over the input's positions) line up.
        lhs = _expand(self._lhs, elided + len(_strip(self._lhs)))
        positions = sorted((c for c in spec if c not in self._kernel_labels),
                           key=lambda c: lhs.index(c) if c in lhs else len(lhs))
        perm = [spec.index(c) for c in positions + feature_labels]
        return tf.reshape(tf.transpose(tensor, perm), [tf.shape(tensor)[0], -1, size])

    def position_axes(self, input_rank):
        """The input's leading axes before its first contracted one."""
        spec = _expand(self._lhs, input_rank)
        return next(i for i, c in enumerate(spec) if c in self._kernel_labels)

    def input_rows(self, inputs):
        return self._rows(inputs, self._lhs, self.contracted, self.input_size - int(self.has_bias))

    def output_rows(self, preactivation_grads):
        grads = tf.cast(preactivation_grads, tf.float32)
        return self._rows(grads, self._output, self.free, self.output_size)

    def kernel_matrix(self, kernel):
        return tf.reshape(tf.transpose(kernel, self._kernel_perm), [-1, self.output_size])

    def kernel_from_matrix(self, matrix):
        inverse = [self._kernel_perm.index(i) for i in range(len(self._kernel_perm))]
        return tf.transpose(tf.reshape(matrix, self._matrix_dims), inverse)

    def bias_row(self, bias):
        ordered = tf.transpose(tf.reshape(bias, self._bias_dims), self._bias_perm)
        return tf.reshape(ordered, [self.output_size])

    def bias_from_row(self, row):
        dims = [self._bias_dims[i] for i in self._bias_perm]
        inverse = [self._bias_perm.index(i) for i in range(len(self._bias_perm))]
        return tf.reshape(tf.transpose(tf.reshape(row, dims), inverse), self.variables[1].shape)


def _labels(lhs: str, kernel: str, output: str) -> tuple[list[str], list[str]]:
    """(contracted, output) kernel labels, or ValueError if not one linear map."""
    if "..." in kernel:
        raise ValueError("the kernel has elided axes")
    lhs_set = set(lhs.replace("...", ""))
    out_set = set(output.replace("...", ""))
    contracted = [c for c in kernel if c in lhs_set and c not in out_set]
    free = [c for c in kernel if c in out_set and c not in lhs_set]
    shared = [c for c in kernel if c in lhs_set and c in out_set]
    if shared:
        raise ValueError(f"kernel axes '{''.join(shared)}' are in both the input and the "
                         "output (a batch of matrices, not one)")
    if len(contracted) + len(free) != len(kernel):
        raise ValueError("a kernel axis is summed away")
    summed = [c for c in lhs_set if c not in kernel and c not in out_set]
    if summed:
        raise ValueError(f"input axes '{''.join(sorted(summed))}' are summed without the kernel")
    if not lhs.startswith("...") and lhs[0] in kernel:
        raise ValueError("the first input axis (the batch) is contracted")
    if not contracted or not free:
        raise ValueError("the kernel needs contracted and output axes")
    return contracted, free
