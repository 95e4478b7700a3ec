"""Multi-head attention: projections here, the math in `msa_xla.kernels.masked_attention`."""

import tensorflow as tf
import tf_keras as keras

from msa_xla.errors import UserError
from msa_xla.kernels import linear, masked_attention, validate_impl


def check_heads(model_dim, num_heads):
    """Raises ValueError unless `num_heads` divides `model_dim`."""
    if num_heads <= 0 or model_dim % num_heads:
        raise UserError(
            f"model_dim={model_dim} is not divisible by num_heads={num_heads}")


@keras.saving.register_keras_serializable(package="msa_xla")
class MaskedMultiHeadAttention(keras.layers.Layer):
    """Multi-head attention with separate query and key/value padding masks.

    Self-attention (no `context` given) uses one fused QKV projection: one (D, 3D) matmul
    instead of three (D, D) ones. Cross-attention projects queries and fused key/values.

    Args:
      model_dim: D; output size too.
      num_heads: H; must divide D.
      attention_impl: one of `msa_xla.kernels.ATTENTION_IMPLS`.

    Example:
      >>> mha = MaskedMultiHeadAttention(model_dim=64, num_heads=4)
      >>> mha(tf.zeros((2, 10, 64)), mask=tf.ones((2, 10), tf.bool)).shape
      TensorShape([2, 10, 64])
    """

    def __init__(self, model_dim, num_heads, attention_impl="fused", **kwargs):
        super().__init__(**kwargs)
        check_heads(model_dim, num_heads)
        self.model_dim = int(model_dim)
        self.num_heads = int(num_heads)
        self.attention_impl = validate_impl(attention_impl)
        self.head_dim = self.model_dim // self.num_heads

    def build(self, input_shape):
        d = self.model_dim
        dense = dict(kernel_initializer="glorot_uniform", bias_initializer="zeros")
        self.qkv_kernel = self.add_weight(name="qkv_kernel", shape=(d, 3 * d),
                                          initializer=dense["kernel_initializer"])
        self.qkv_bias = self.add_weight(name="qkv_bias", shape=(3 * d,), initializer="zeros")
        self.output_kernel = self.add_weight(name="output_kernel", shape=(d, d),
                                             initializer=dense["kernel_initializer"])
        self.output_bias = self.add_weight(name="output_bias", shape=(d,), initializer="zeros")
        super().build(input_shape)

    def _split_heads(self, x, parts):
        # (B, T, parts*D) -> parts x (B, T, H, Dh)
        shape = tf.shape(x)
        x = tf.reshape(x, [shape[0], shape[1], parts, self.num_heads, self.head_dim])
        return tf.unstack(x, num=parts, axis=2)

    def call(self, query, context=None, mask=None, context_mask=None):
        d = self.model_dim
        kernel = tf.cast(self.qkv_kernel, self.compute_dtype)
        bias = tf.cast(self.qkv_bias, self.compute_dtype)
        if context is None:  # self-attention: one fused QKV matmul
            qkv = linear(query, kernel, bias)  # (B, T, 3D)
            q, k, v = self._split_heads(qkv, 3)
            context_mask = mask
        else:
            q = linear(query, kernel[:, :d], bias[:d])  # (B, Tq, D)
            (q,) = self._split_heads(q, 1)
            kv = linear(context, kernel[:, d:], bias[d:])  # (B, Tk, 2D)
            k, v = self._split_heads(kv, 2)
        with tf.name_scope("attention"):
            out = masked_attention(q, k, v, mask, context_mask, impl=self.attention_impl)
        shape = tf.shape(out)
        out = tf.reshape(out, [shape[0], shape[1], d])  # (B, Tq, D)
        return linear(out, tf.cast(self.output_kernel, self.compute_dtype),
                      tf.cast(self.output_bias, self.compute_dtype))

    def get_config(self):
        return {**super().get_config(), "model_dim": self.model_dim,
                "num_heads": self.num_heads, "attention_impl": self.attention_impl}
