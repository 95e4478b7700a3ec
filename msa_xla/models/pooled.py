"""The early-pooling family (MSAModel, ImprovedMSAModel, BalancedMSAModel) share this body.

encoders -> masked mean per modality -> (B, 3, D) modality tokens -> transformer over the
three tokens -> concatenation (or adaptive weights) -> MLP -> Dense(1) in float32.
"""

import tensorflow as tf
import tf_keras as keras

from msa_xla.errors import UserError
from msa_xla.layers.blocks import TransformerBlock
from msa_xla.layers.dropout import Dropout
from msa_xla.layers.encoders import ModalityEncoder
from msa_xla.layers.fusion import AdaptiveFusionHead
from msa_xla.layers.pooling import masked_mean
from msa_xla.layers.positional import LearnablePositionalEmbedding
from msa_xla.models.base import MSABaseModel, output_layer
from msa_xla.options import MODALITIES


class PooledFusionModel(MSABaseModel):
    """Shared body; every improvement is a switch (see ImprovedMSAModel for what each does)."""

    def __init__(self, seq_len, text_dim, audio_dim, video_dim, model_dim=128, num_heads=4,
                 ff_dim=256, n_layers_mod=2, n_layers_fuse=1, dropout_rate=0.1,
                 use_adaptive_fusion=False, norm_first=False, use_positional=False,
                 modality_dropout=0.0, gated_fusion=False, modality_embeddings=False,
                 attention_impl="fused", text_input="features", vocab_size=None, **kwargs):
        super().__init__(seq_len, text_dim, audio_dim, video_dim, model_dim, num_heads,
                         attention_impl=attention_impl, text_input=text_input,
                         vocab_size=vocab_size, **kwargs)
        if not 0.0 <= modality_dropout < 1.0:
            raise UserError(f"modality_dropout={modality_dropout} must be in [0, 1)")
        self.ff_dim, self.n_layers_mod = int(ff_dim), int(n_layers_mod)
        self.n_layers_fuse, self.dropout_rate = int(n_layers_fuse), float(dropout_rate)
        self.use_adaptive_fusion, self.norm_first = bool(use_adaptive_fusion), bool(norm_first)
        self.use_positional, self.modality_dropout = bool(use_positional), float(modality_dropout)
        self.gated_fusion, self.modality_embeddings = bool(gated_fusion), bool(modality_embeddings)
        self.encoders = [
            ModalityEncoder(model_dim, num_heads, ff_dim, n_layers_mod, length, dropout_rate,
                            use_positional=use_positional, norm_first=norm_first,
                            attention_impl=attention_impl, name=f"{name}_encoder")
            for name, length in zip(MODALITIES, self.seq_lens)]
        # Drops whole modality tokens per sample (noise broadcast over the feature axis).
        self.modality_dropout_layer = keras.layers.Dropout(modality_dropout,
                                                           noise_shape=(None, 3, 1))
        self.gate = (keras.layers.Dense(3 * model_dim, activation="sigmoid", name="gate")
                     if gated_fusion else None)
        self.fusion_blocks = [
            TransformerBlock(model_dim, num_heads, ff_dim, dropout_rate, norm_first=norm_first,
                             attention_impl=attention_impl, name=f"fusion_block_{i}")
            for i in range(self.n_layers_fuse)]
        # One learned vector per token position = one per modality.
        self.modality_embedding = (
            LearnablePositionalEmbedding(3, model_dim, name="modality_embedding")
            if modality_embeddings else None)
        self.fusion_head = (AdaptiveFusionHead(model_dim, 3, "mean", name="fusion_head")
                            if use_adaptive_fusion else None)
        self.hidden = keras.layers.Dense(model_dim, activation="relu", name="hidden")
        self.head_dropout = Dropout(dropout_rate)
        self.output_layer = output_layer()

    def encode(self, sequences, masks, training=None):
        """Returns the three pooled (B, D) modality vectors."""
        return [masked_mean(encoder(x, mask=m, training=training), m)
                for encoder, x, m in zip(self.encoders, sequences, masks)]

    def fuse(self, pooled, training=None):
        """(B, D) x 3 -> prediction (B, 1) float32."""
        tokens = tf.stack(pooled, axis=1)  # (B, 3, D)
        if self.modality_dropout:
            tokens = self.modality_dropout_layer(tokens, training=training)
        if self.gate is not None:
            gates = self.gate(tf.reshape(tokens, [-1, 3 * self.model_dim]))  # (B, 3D)
            tokens = tokens * tf.reshape(gates, [-1, 3, self.model_dim])
        if self.modality_embedding is not None:
            tokens = self.modality_embedding(tokens)
        with tf.name_scope("fusion"):
            for block in self.fusion_blocks:
                tokens = block(tokens, training=training)
        if self.fusion_head is not None:
            fused = self.fusion_head(tf.split(tokens, 3, axis=1), training=training)  # (B, D)
        else:
            fused = tf.reshape(tokens, [-1, 3 * self.model_dim])  # (B, 3D)
        hidden = self.head_dropout(self.hidden(fused), training=training)
        return self.output_layer(hidden)

    def forward(self, sequences, masks, training=None):
        pooled = self.encode(sequences, masks, training=training)
        return self.fuse(pooled, training=training), {"pooled": pooled}

    def get_config(self):
        return {**super().get_config(), "ff_dim": self.ff_dim, "n_layers_mod": self.n_layers_mod,
                "n_layers_fuse": self.n_layers_fuse, "dropout_rate": self.dropout_rate,
                "use_adaptive_fusion": self.use_adaptive_fusion}


_IMPROVEMENTS = ("norm_first", "use_positional", "modality_dropout", "gated_fusion",
                 "modality_embeddings")


@keras.saving.register_keras_serializable(package="msa_xla")
class MSAModel(PooledFusionModel):
    """The original model: early pooling after each encoder, fusion over pooled vectors.

    Encoders have no positional embeddings (post-norm blocks); each modality is mean-pooled
    over valid steps; a transformer runs over the three pooled vectors; their concatenation
    (or, with `use_adaptive_fusion`, a learned softmax-weighted sum) feeds an MLP head.

    Args: seq_len, text_dim, audio_dim, video_dim, model_dim=128, num_heads=4, ff_dim=256,
      n_layers_mod=2, n_layers_fuse=1, dropout_rate=0.1, use_adaptive_fusion=False,
      attention_impl='fused', text_input='features', vocab_size=None.

    Example:
      >>> model = MSAModel(seq_len=20, text_dim=300, audio_dim=74, video_dim=47, model_dim=64)
      >>> model((tf.zeros((2, 20, 300)), tf.zeros((2, 20, 74)), tf.zeros((2, 20, 47)))).shape
      TensorShape([2, 1])
    """

    def __init__(self, *args, **kwargs):
        unknown = [k for k in _IMPROVEMENTS if k in kwargs]
        if unknown:
            raise TypeError(f"MSAModel takes no {', '.join(unknown)}: use ImprovedMSAModel")
        super().__init__(*args, **kwargs)


@keras.saving.register_keras_serializable(package="msa_xla")
class ImprovedMSAModel(PooledFusionModel):
    """MSAModel with five improvements, each on by default and switchable:

    - `norm_first=True`: pre-norm blocks (plus a final norm per encoder): steadier gradients,
      trains without warm-up at higher learning rates.
    - `use_positional=True`: learnable positional embeddings in every encoder; the original
      has none, so its encoders cannot tell order.
    - `modality_dropout=0.1`: during training each sample loses a whole modality token with
      this probability, so the head cannot lean on one modality only.
    - `gated_fusion=True`: a sigmoid gate computed from all three pooled vectors scales each
      feature of each modality token before fusion (lets noisy modalities be turned down
      per sample).
    - `modality_embeddings=True`: a learned type vector per modality token, so the fusion
      transformer knows which token is which.

    Args: those of MSAModel plus the five switches above.

    Example:
      >>> model = ImprovedMSAModel(seq_len=20, text_dim=300, audio_dim=74, video_dim=47,
      ...                          model_dim=64, gated_fusion=False)
      >>> model((tf.zeros((2, 20, 300)), tf.zeros((2, 20, 74)), tf.zeros((2, 20, 47)))).shape
      TensorShape([2, 1])
    """

    def __init__(self, *args, norm_first=True, use_positional=True, modality_dropout=0.1,
                 gated_fusion=True, modality_embeddings=True, **kwargs):
        super().__init__(*args, norm_first=norm_first, use_positional=use_positional,
                         modality_dropout=modality_dropout, gated_fusion=gated_fusion,
                         modality_embeddings=modality_embeddings, **kwargs)

    def get_config(self):
        return {**super().get_config(), **{k: getattr(self, k) for k in _IMPROVEMENTS}}
