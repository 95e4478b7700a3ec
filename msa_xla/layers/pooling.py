"""Mask-aware pooling of (B, T, D) sequences into (B, D) vectors."""

import tensorflow as tf
import tf_keras as keras

from msa_xla.errors import UserError
from msa_xla.options import POOLING_METHODS


def validate_pooling(pooling_method):
    if pooling_method not in POOLING_METHODS:
        raise UserError(
            f"pooling_method={pooling_method!r} is not one of {', '.join(POOLING_METHODS)}")
    return pooling_method


def masked_mean(sequence, mask=None):
    """Mean over valid steps; zeros for a sequence with no valid step.

    Args:
      sequence: (B, T, D). mask: optional (B, T) bool.

    Returns:
      (B, D) in the dtype of `sequence`.
    """
    if mask is None:
        return tf.reduce_mean(sequence, axis=1)
    weights = tf.cast(mask, sequence.dtype)[:, :, None]  # (B, T, 1)
    # tf.where, not a product: padded steps may hold anything, even inf.
    total = tf.reduce_sum(tf.where(mask[:, :, None], sequence, tf.zeros_like(sequence)), axis=1)
    count = tf.reduce_sum(weights, axis=1)
    return total / tf.maximum(count, tf.ones_like(count))


@keras.saving.register_keras_serializable(package="msa_xla")
class AttentionPooling(keras.layers.Layer):
    """Learned softmax weights over valid steps: sum_t softmax(w . x_t) x_t.

    Example:
      >>> AttentionPooling()(tf.zeros((2, 10, 64))).shape
      TensorShape([2, 64])
    """

    def build(self, input_shape):
        self.score = keras.layers.Dense(1, name="score")
        self.score.build(input_shape)
        super().build(input_shape)

    def call(self, sequence, mask=None):
        logits = tf.cast(self.score(sequence)[..., 0], tf.float32)  # (B, T)
        if mask is None:
            mask = tf.ones_like(logits, tf.bool)
        logits = tf.where(mask, logits, -1e30)
        weights = tf.where(mask, tf.nn.softmax(logits, axis=-1), 0.0)  # all-padding -> zeros
        values = tf.where(mask[:, :, None], sequence, tf.zeros_like(sequence))
        return tf.einsum("bt,btd->bd", tf.cast(weights, sequence.dtype), values)
