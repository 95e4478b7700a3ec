"""Per-modality transformer encoder: Dense -> positional embedding -> TransformerBlocks."""

import tf_keras as keras

from msa_xla.errors import UserError
from msa_xla.layers.blocks import TransformerBlock
from msa_xla.layers.dense import Dense
from msa_xla.layers.dropout import Dropout
from msa_xla.layers.masks import zero_padding
from msa_xla.layers.positional import LearnablePositionalEmbedding


@keras.saving.register_keras_serializable(package="msa_xla")
class ModalityEncoder(keras.layers.Layer):
    """Encodes one modality's (B, T, F) features into a (B, T, D) sequence (no pooling).

    Args:
      model_dim: D.
      num_heads: attention heads; must divide D.
      ff_dim: feed-forward inner size.
      n_layers: number of TransformerBlocks.
      seq_len: longest sequence (size of the positional table).
      dropout_rate: dropout in each block.
      use_positional: add learnable positional embeddings (MSAModel uses none).
      norm_first: pre-norm blocks.
      attention_impl: 'reference', 'fused' or 'chunked'.

    Call args:
      x: (B, T, F) features. mask: optional (B, T) bool, True = valid. training: bool.

    Example:
      >>> enc = ModalityEncoder(model_dim=64, num_heads=4, ff_dim=128, n_layers=2, seq_len=50)
      >>> enc(tf.zeros((2, 50, 74))).shape
      TensorShape([2, 50, 64])
    """

    def __init__(self, model_dim, num_heads, ff_dim, n_layers, seq_len, dropout_rate=0.1,
                 use_positional=True, norm_first=False, attention_impl="fused", **kwargs):
        super().__init__(**kwargs)
        if n_layers < 0:
            raise UserError(f"n_layers={n_layers} must be >= 0")
        self.model_dim, self.num_heads, self.ff_dim = int(model_dim), int(num_heads), int(ff_dim)
        self.n_layers, self.seq_len = int(n_layers), int(seq_len)
        self.dropout_rate = float(dropout_rate)
        self.use_positional, self.norm_first = bool(use_positional), bool(norm_first)
        self.attention_impl = attention_impl
        self.projection = Dense(model_dim, name="projection")
        self.positional = (LearnablePositionalEmbedding(seq_len, model_dim, name="positional")
                           if use_positional else None)
        self.input_dropout = Dropout(dropout_rate)
        self.blocks = [
            TransformerBlock(model_dim, num_heads, ff_dim, dropout_rate, norm_first=norm_first,
                             attention_impl=attention_impl, name=f"block_{i}")
            for i in range(n_layers)]
        self.final_norm = (keras.layers.LayerNormalization(epsilon=1e-6, name="final_norm")
                           if norm_first else None)

    def call(self, x, mask=None, training=None):
        if mask is not None:
            x = zero_padding(x, mask)  # padding may hold anything; it must not reach a sum
        h = self.projection(x)
        if self.positional is not None:
            h = self.positional(h)
        h = self.input_dropout(h, training=training)
        for block in self.blocks:
            h = block(h, mask=mask, training=training)
        if self.final_norm is not None:
            h = self.final_norm(h)
        return h

    def compute_mask(self, inputs, mask=None):
        return mask

    def get_config(self):
        return {**super().get_config(), "model_dim": self.model_dim, "num_heads": self.num_heads,
                "ff_dim": self.ff_dim, "n_layers": self.n_layers, "seq_len": self.seq_len,
                "dropout_rate": self.dropout_rate, "use_positional": self.use_positional,
                "norm_first": self.norm_first, "attention_impl": self.attention_impl}
