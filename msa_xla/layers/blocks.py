"""Transformer blocks: self-attention encoder block and cross-modal attention block."""

import tf_keras as keras

from msa_xla.errors import UserError
from msa_xla.layers.attention import MaskedMultiHeadAttention, check_heads
from msa_xla.layers.dense import Dense
from msa_xla.layers.dropout import Dropout


def _check_rate(dropout_rate):
    if not 0.0 <= dropout_rate < 1.0:
        raise UserError(f"dropout_rate={dropout_rate} must be in [0, 1)")


class _ResidualBlockBase(keras.layers.Layer):
    """Shared hyperparameters, feed-forward sublayer and config of the two block types."""

    def __init__(self, model_dim, num_heads, ff_dim, dropout_rate=0.1, norm_first=False,
                 activation="relu", attention_impl="fused", **kwargs):
        super().__init__(**kwargs)
        check_heads(model_dim, num_heads)
        _check_rate(dropout_rate)
        self.model_dim, self.num_heads, self.ff_dim = int(model_dim), int(num_heads), int(ff_dim)
        self.dropout_rate = float(dropout_rate)
        self.norm_first = bool(norm_first)
        self.activation = activation
        self.attention = MaskedMultiHeadAttention(model_dim, num_heads, attention_impl,
                                                  name="attention")
        self.attention_impl = self.attention.attention_impl
        self.attention_norm = keras.layers.LayerNormalization(epsilon=1e-6, name="attention_norm")
        self.ffn_norm = keras.layers.LayerNormalization(epsilon=1e-6, name="ffn_norm")
        self.ffn_inner = Dense(ff_dim, activation=activation, name="ffn_inner")
        self.ffn_outer = Dense(model_dim, name="ffn_outer")
        self.dropout = Dropout(dropout_rate)

    def _residual(self, x, sublayer, norm, training):
        """Post-norm: norm(x + f(x)); pre-norm: x + f(norm(x))."""
        if self.norm_first:
            return x + self.dropout(sublayer(norm(x)), training=training)
        return norm(x + self.dropout(sublayer(x), training=training))

    def _feed_forward(self, x, training):
        return self._residual(x, lambda h: self.ffn_outer(self.ffn_inner(h)),
                              self.ffn_norm, training)

    def get_config(self):
        return {**super().get_config(), "model_dim": self.model_dim, "num_heads": self.num_heads,
                "ff_dim": self.ff_dim, "dropout_rate": self.dropout_rate,
                "norm_first": self.norm_first, "activation": self.activation,
                "attention_impl": self.attention_impl}


@keras.saving.register_keras_serializable(package="msa_xla")
class TransformerBlock(_ResidualBlockBase):
    """Self-attention encoder block: attention and feed-forward, each with residual + norm.

    Args:
      model_dim: D, input and output size.
      num_heads: attention heads; must divide D.
      ff_dim: inner size of the feed-forward sublayer.
      dropout_rate: dropout after each sublayer.
      norm_first: pre-norm (True) or post-norm (False, the original Transformer).
      activation: feed-forward activation.
      attention_impl: 'reference', 'fused' or 'chunked' (see `msa_xla.kernels`).

    Call args:
      x: (B, T, D). mask: optional (B, T) bool, True = valid. training: bool.

    Example:
      >>> block = TransformerBlock(model_dim=64, num_heads=4, ff_dim=128)
      >>> block(tf.zeros((2, 10, 64)), mask=tf.ones((2, 10), tf.bool)).shape
      TensorShape([2, 10, 64])
    """

    def call(self, x, mask=None, training=None):
        x = self._residual(x, lambda h: self.attention(h, mask=mask), self.attention_norm,
                           training)
        return self._feed_forward(x, training)

    def compute_mask(self, inputs, mask=None):
        return mask


@keras.saving.register_keras_serializable(package="msa_xla")
class CrossAttentionBlock(_ResidualBlockBase):
    """Cross-modal block: queries from one sequence, keys and values from another.

    Args: as `TransformerBlock`.

    Call args:
      query_seq: (B, Tq, D), the modality being updated.
      context_seq: (B, Tk, D), the modality attended to.
      query_mask: optional (B, Tq) bool. context_mask: optional (B, Tk) bool.
      training: bool.

    Example:
      >>> block = CrossAttentionBlock(model_dim=64, num_heads=4, ff_dim=128)
      >>> block(tf.zeros((2, 10, 64)), tf.zeros((2, 30, 64))).shape
      TensorShape([2, 10, 64])
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Pre-norm also normalises the context; post-norm has no use for it (no unbuilt layer).
        self.context_norm = (keras.layers.LayerNormalization(epsilon=1e-6, name="context_norm")
                             if self.norm_first else None)

    def call(self, query_seq, context_seq, query_mask=None, context_mask=None, training=None):
        if self.norm_first:
            context_seq = self.context_norm(context_seq)

        def attend(h):
            return self.attention(h, context=context_seq, mask=query_mask,
                                  context_mask=context_mask)

        x = self._residual(query_seq, attend, self.attention_norm, training)
        return self._feed_forward(x, training)
