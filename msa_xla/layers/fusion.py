"""Sequence-level cross-modal fusion and the adaptive (learned modality weights) fusion head."""

import tensorflow as tf
import tf_keras as keras

from msa_xla.errors import UserError
from msa_xla.layers.blocks import CrossAttentionBlock
from msa_xla.layers.pooling import AttentionPooling, masked_mean, validate_pooling


@keras.saving.register_keras_serializable(package="msa_xla")
class CrossModalFusion(keras.layers.Layer):
    """Cross-attention between modalities at sequence level (no pooling).

    Each layer updates text from audio then from video (text queries, the other modality's
    keys/values); with `bidirectional`, audio and video also attend to text.

    Args:
      model_dim: D of all three sequences.
      num_heads: attention heads; must divide D.
      ff_dim: feed-forward inner size.
      n_layers: fusion layers.
      bidirectional: also update audio <- text and video <- text.
      dropout_rate: dropout in each block.
      norm_first: pre-norm blocks.
      attention_impl: 'reference', 'fused' or 'chunked'.

    Call args:
      text_seq, audio_seq, video_seq: (B, T_m, D). text_mask, audio_mask, video_mask:
      optional (B, T_m) bool. training: bool.

    Returns:
      (text_fused, audio_fused, video_fused); audio and video pass through unchanged
      unless `bidirectional`.

    Example:
      >>> fusion = CrossModalFusion(model_dim=64, num_heads=4, ff_dim=128, n_layers=1)
      >>> t, a, v = fusion(text_seq=tf.zeros((2, 10, 64)), audio_seq=tf.zeros((2, 20, 64)),
      ...                  video_seq=tf.zeros((2, 30, 64)))
      >>> t.shape, a.shape
      (TensorShape([2, 10, 64]), TensorShape([2, 20, 64]))
    """

    def __init__(self, model_dim, num_heads, ff_dim, n_layers=1, bidirectional=False,
                 dropout_rate=0.1, norm_first=False, attention_impl="fused", **kwargs):
        super().__init__(**kwargs)
        self.model_dim, self.num_heads, self.ff_dim = int(model_dim), int(num_heads), int(ff_dim)
        self.n_layers, self.bidirectional = int(n_layers), bool(bidirectional)
        self.dropout_rate, self.norm_first = float(dropout_rate), bool(norm_first)
        self.attention_impl = attention_impl
        directions = ["text_from_audio", "text_from_video"]
        if bidirectional:
            directions += ["audio_from_text", "video_from_text"]
        self.directions = tuple(directions)
        # A flat list (not a dict per layer) so every block's weights are saved and restored.
        self.cross_blocks = [
            CrossAttentionBlock(model_dim, num_heads, ff_dim, dropout_rate, norm_first=norm_first,
                                attention_impl=attention_impl, name=f"layer_{i}_{direction}")
            for i in range(self.n_layers) for direction in directions]

    def call(self, text_seq, audio_seq, video_seq, text_mask=None, audio_mask=None,
             video_mask=None, training=None):
        sequences = {"text": text_seq, "audio": audio_seq, "video": video_seq}
        masks = {"text": text_mask, "audio": audio_mask, "video": video_mask}
        blocks = iter(self.cross_blocks)
        for _ in range(self.n_layers):
            layer_input = dict(sequences)  # audio/video attend to this layer's input text
            for direction in self.directions:  # text <- audio, text <- video, then the reverse
                target, source = direction.split("_from_")
                context = sequences[source] if target == "text" else layer_input[source]
                with tf.name_scope(direction):
                    sequences[target] = next(blocks)(sequences[target], context, masks[target],
                                                     masks[source], training=training)
        return sequences["text"], sequences["audio"], sequences["video"]

    def get_config(self):
        return {**super().get_config(), "model_dim": self.model_dim, "num_heads": self.num_heads,
                "ff_dim": self.ff_dim, "n_layers": self.n_layers,
                "bidirectional": self.bidirectional, "dropout_rate": self.dropout_rate,
                "norm_first": self.norm_first, "attention_impl": self.attention_impl}


@keras.saving.register_keras_serializable(package="msa_xla")
class AdaptiveFusionHead(keras.layers.Layer):
    """Pools each modality (mask-aware) and sums them with learned softmax weights.

    Args:
      model_dim: D of every modality sequence.
      num_modalities: how many sequences are fused.
      pooling_method: 'mean' (masked mean) or 'attention' (learned weights over steps).

    Call args:
      modality_sequences: list of (B, T_m, D). masks: optional list of (B, T_m) bool
      (or None entries). training: bool.

    Returns:
      (B, D). The current weights are readable as `modality_weights`.

    Example:
      >>> head = AdaptiveFusionHead(model_dim=64, num_modalities=3)
      >>> head(modality_sequences=[tf.zeros((2, 10, 64))] * 3).shape
      TensorShape([2, 64])
    """

    def __init__(self, model_dim, num_modalities=3, pooling_method="mean", **kwargs):
        super().__init__(**kwargs)
        self.model_dim, self.num_modalities = int(model_dim), int(num_modalities)
        self.pooling_method = validate_pooling(pooling_method)
        self.poolers = ([AttentionPooling(name=f"pool_{i}") for i in range(self.num_modalities)]
                        if pooling_method == "attention" else None)

    def build(self, input_shape):
        self.modality_logits = self.add_weight(name="modality_logits",
                                               shape=(self.num_modalities,), initializer="zeros")
        super().build(input_shape)

    @property
    def modality_weights(self):
        """(num_modalities,) softmax weights, summing to 1."""
        return tf.nn.softmax(tf.cast(self.modality_logits, tf.float32))

    def call(self, modality_sequences, masks=None, training=None):
        if len(modality_sequences) != self.num_modalities:
            raise UserError(f"{self.name}: expected {self.num_modalities} modality sequences, "
                             f"received {len(modality_sequences)}")
        masks = list(masks) if masks is not None else [None] * self.num_modalities
        pooled = []
        for i, (sequence, mask) in enumerate(zip(modality_sequences, masks)):
            if self.poolers is not None:
                pooled.append(self.poolers[i](sequence, mask=mask))
            else:
                pooled.append(masked_mean(sequence, mask))
        stacked = tf.stack(pooled, axis=1)  # (B, M, D)
        weights = tf.cast(self.modality_weights, stacked.dtype)
        return tf.einsum("bmd,m->bd", stacked, weights)

    def get_config(self):
        return {**super().get_config(), "model_dim": self.model_dim,
                "num_modalities": self.num_modalities, "pooling_method": self.pooling_method}
