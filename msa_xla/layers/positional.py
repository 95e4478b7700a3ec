"""Learnable absolute positional embeddings."""

import tensorflow as tf
import tf_keras as keras

from msa_xla.errors import UserError


@keras.saving.register_keras_serializable(package="msa_xla")
class LearnablePositionalEmbedding(keras.layers.Layer):
    """Adds a trained vector per position to a (B, T, D) sequence.

    Args:
      seq_len: the longest sequence the layer accepts.
      model_dim: D, the feature size of the sequence.

    Example:
      >>> pos = LearnablePositionalEmbedding(seq_len=64, model_dim=128)
      >>> pos(tf.zeros((2, 50, 128))).shape
      TensorShape([2, 50, 128])
    """

    def __init__(self, seq_len, model_dim, **kwargs):
        super().__init__(**kwargs)
        self.seq_len = int(seq_len)
        self.model_dim = int(model_dim)

    def build(self, input_shape):
        self.position_embeddings = self.add_weight(
            name="position_embeddings", shape=(self.seq_len, self.model_dim),
            initializer=keras.initializers.TruncatedNormal(stddev=0.02))
        super().build(input_shape)

    def call(self, x):
        length = x.shape[1]
        if length is not None and length > self.seq_len:
            raise UserError(
                f"{self.name}: sequence length {length} exceeds seq_len={self.seq_len}")
        positions = self.position_embeddings[: tf.shape(x)[1]]  # (T, D)
        return x + tf.cast(positions, x.dtype)[None]

    def get_config(self):
        return {**super().get_config(), "seq_len": self.seq_len, "model_dim": self.model_dim}
