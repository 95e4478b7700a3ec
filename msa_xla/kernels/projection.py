"""The affine map of every projection: ``x @ kernel + bias`` over the last axis.

Why a kernel of its own: under XLA on CPU the bias gradient, a column sum of the output
gradient over batch x time rows, is rewritten into a slow tree of reduce-windows, one per
projection in the backward pass (reduce-windows were 9.4% of the spec model's XLA thunk time
before this kernel and 4.4% after, mostly layer-norm row sums: `tools/profile_report.py`
on a `--profile_steps` capture). Here, inside an XLA computation, the bias gradient instead
comes out of the weight-gradient matmul: that matmul gets one more input column of ones,
``[x, 1]^T @ dy``, whose last row is the bias gradient. It costs one more row of the output
and a copy of ``x``; the column sum is gone.
Outside XLA, and inside XLA on TPU or GPU (whose column sums are fast), the plain ops and TF's
own gradients run.
"""

import tensorflow as tf

from msa_xla.kernels.scopes import gradient_scope
from msa_xla.runtime.compat import xla_target_platform


def linear(x, kernel, bias=None):
    """``x @ kernel + bias`` for ``x`` of shape (..., D_in); returns (..., D_out).

    Args:
      x: (..., D_in) tensor.
      kernel: (D_in, D_out) tensor in the dtype of ``x``.
      bias: optional (D_out,) tensor in the dtype of ``x``.

    Example:
      >>> linear(tf.ones((2, 3, 4)), tf.ones((4, 5)), tf.zeros((5,))).shape
      TensorShape([2, 3, 5])
    """
    if bias is None:
        return _matmul_last_axis(x, kernel)
    if xla_target_platform() == "CPU":  # the rewrite is for XLA:CPU only (module docstring)
        return _linear_bias_grad_in_matmul(x, kernel, bias)
    return _matmul_last_axis(x, kernel) + bias


def _matmul_last_axis(x, kernel):
    if x.shape.rank == 2:
        return tf.matmul(x, kernel)
    return tf.tensordot(x, kernel, axes=[[x.shape.rank - 1], [0]])


@tf.custom_gradient
def _linear_bias_grad_in_matmul(x, kernel, bias):
    d_in, d_out = kernel.shape[0], kernel.shape[1]
    rows = tf.reshape(x, [-1, d_in])  # (N, D_in): N = every leading position
    out = tf.matmul(rows, kernel) + bias
    out_shape = tf.concat([tf.shape(x)[:-1], [d_out]], 0)
    scope = gradient_scope()  # the backward ops' names (kernels/scopes.py)

    def grad(d_out_value):
        with tf.name_scope(scope):
            return _grad(d_out_value)

    def _grad(d_out_value):
        d_rows = tf.reshape(d_out_value, [-1, d_out])  # (N, D_out)
        d_x = tf.reshape(tf.matmul(d_rows, kernel, transpose_b=True), tf.shape(x))
        # [x, 1]^T @ dy: rows 0..D_in-1 are the kernel gradient, the last row the bias one.
        with_ones = tf.concat([rows, tf.ones([tf.shape(rows)[0], 1], rows.dtype)], axis=1)
        d_kernel_and_bias = tf.matmul(with_ones, d_rows, transpose_a=True)  # (D_in + 1, D_out)
        return d_x, d_kernel_and_bias[:d_in], d_kernel_and_bias[d_in]

    return tf.reshape(out, out_shape), grad
