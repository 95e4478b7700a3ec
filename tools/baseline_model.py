"""The straightforward tf_keras build of MSASeqLevelModel: the baseline of tools/bench.py.

What a user would write from stock layers (`keras.layers.MultiHeadAttention`,
`LayerNormalization`, `Dense`, `Embedding`, `Dropout`) for the same architecture and sizes as
`msa_xla.MSASeqLevelModel` (bidirectional_fusion=False, pooling_method='mean'):

- per modality: zero the padded steps, Dense(D) projection, learnable positions
  (an `Embedding(seq_len, D)` looked up at `range(T)`), dropout, `n_layers_mod` post-norm
  blocks: norm(x + drop(MHA(x, x, mask))), norm(x + drop(Dense(D)(relu Dense(ff)(x));
- `n_layers_fuse` fusion layers, each text <- audio then text <- video (same post-norm block,
  queries from text, keys/values from the other modality);
- masked mean pooling per modality, softmax-weighted sum with three learned logits, dropout,
  Dense(1) in float32.

Masks reach `MultiHeadAttention` as its `attention_mask` (B, Tq, Tk) = query_valid & key_valid,
the documented way. The parameter count equals MSASeqLevelModel's (bench.py asserts it).

Example:
    >>> model = BaselineSeqLevelModel(50, 300, 74, 47, 128, 4, 256, 2, 1)
    >>> model(example_inputs(model, 2)).shape
    TensorShape([2, 1])
"""
import tensorflow as tf
import tf_keras as keras

from msa_xla.options import MODALITIES


class BaselineBlock(keras.layers.Layer):
    """Post-norm transformer block from stock layers; self-attention when `context` is None."""

    def __init__(self, model_dim, num_heads, ff_dim, dropout_rate, **kwargs):
        super().__init__(**kwargs)
        self.attention = keras.layers.MultiHeadAttention(
            num_heads=num_heads, key_dim=model_dim // num_heads, name="attention")
        self.attention_norm = keras.layers.LayerNormalization(epsilon=1e-6, name="attention_norm")
        self.ffn_inner = keras.layers.Dense(ff_dim, activation="relu", name="ffn_inner")
        self.ffn_outer = keras.layers.Dense(model_dim, name="ffn_outer")
        self.ffn_norm = keras.layers.LayerNormalization(epsilon=1e-6, name="ffn_norm")
        self.attention_dropout = keras.layers.Dropout(dropout_rate)
        self.ffn_dropout = keras.layers.Dropout(dropout_rate)

    def call(self, x, context=None, attention_mask=None, training=None):
        context = x if context is None else context
        attended = self.attention(x, context, attention_mask=attention_mask, training=training)
        x = self.attention_norm(x + self.attention_dropout(attended, training=training))
        ffn = self.ffn_outer(self.ffn_inner(x))
        return self.ffn_norm(x + self.ffn_dropout(ffn, training=training))


class ModalityWeights(keras.layers.Layer):
    """Softmax-weighted sum of (B, D) vectors with one learned logit per modality."""

    def build(self, input_shape):
        self.logits = self.add_weight(name="modality_logits", shape=(len(input_shape),),
                                      initializer="zeros")
        super().build(input_shape)

    def call(self, pooled):
        weights = tf.nn.softmax(self.logits)
        return tf.einsum("bmd,m->bd", tf.stack(pooled, axis=1), weights)


def pair_mask(query_mask, key_mask):
    """(B, Tq) and (B, Tk) bool -> (B, Tq, Tk) attention_mask for MultiHeadAttention."""
    return tf.logical_and(query_mask[:, :, None], key_mask[:, None, :])


def masked_mean(x, mask):
    total = tf.reduce_sum(tf.where(mask[:, :, None], x, 0.0), axis=1)
    count = tf.reduce_sum(tf.cast(mask, x.dtype), axis=1, keepdims=True)
    return total / tf.maximum(count, 1.0)


class BaselineSeqLevelModel(keras.Model):
    """Stock-layer MSASeqLevelModel; inputs (text, audio, video, text_mask, audio_mask, video_mask).

    Args: seq_len (int or triple), text_dim, audio_dim, video_dim, model_dim, num_heads, ff_dim,
      n_layers_mod, n_layers_fuse, dropout_rate=0.1 (as MSASeqLevelModel).
    """

    def __init__(self, seq_len, text_dim, audio_dim, video_dim, model_dim, num_heads, ff_dim,
                 n_layers_mod, n_layers_fuse, dropout_rate=0.1, **kwargs):
        super().__init__(**kwargs)
        self.seq_lens = (seq_len,) * 3 if isinstance(seq_len, int) else tuple(seq_len)
        self.feature_dims = (text_dim, audio_dim, video_dim)
        self.projections = [keras.layers.Dense(model_dim, name=f"{m}_projection")
                            for m in MODALITIES]
        self.positions = [keras.layers.Embedding(n, model_dim, name=f"{m}_positions")
                          for m, n in zip(MODALITIES, self.seq_lens)]
        self.input_dropouts = [keras.layers.Dropout(dropout_rate) for _ in MODALITIES]
        self.encoder_blocks = [
            [BaselineBlock(model_dim, num_heads, ff_dim, dropout_rate, name=f"{m}_block_{i}")
             for i in range(n_layers_mod)] for m in MODALITIES]
        self.fusion_blocks = [
            [BaselineBlock(model_dim, num_heads, ff_dim, dropout_rate,
                           name=f"fusion_{i}_text_from_{m}") for m in ("audio", "video")]
            for i in range(n_layers_fuse)]
        self.modality_weights = ModalityWeights(name="modality_weights")
        self.head_dropout = keras.layers.Dropout(dropout_rate)
        self.output_layer = keras.layers.Dense(1, dtype="float32", name="prediction")

    def call(self, inputs, training=None):
        sequences, masks = list(inputs[:3]), [tf.cast(m, tf.bool) for m in inputs[3:]]
        encoded = []
        for i, (x, mask) in enumerate(zip(sequences, masks)):
            x = tf.where(mask[:, :, None], x, 0.0)
            h = self.projections[i](x) + self.positions[i](tf.range(tf.shape(x)[1]))[None]
            h = self.input_dropouts[i](h, training=training)
            self_mask = pair_mask(mask, mask)
            for block in self.encoder_blocks[i]:
                h = block(h, attention_mask=self_mask, training=training)
            encoded.append(h)
        text, audio, video = encoded
        text_mask, audio_mask, video_mask = masks
        for from_audio, from_video in self.fusion_blocks:
            text = from_audio(text, audio, pair_mask(text_mask, audio_mask), training=training)
            text = from_video(text, video, pair_mask(text_mask, video_mask), training=training)
        pooled = [masked_mean(s, m) for s, m in zip((text, audio, video), masks)]
        fused = self.modality_weights(pooled)
        return self.output_layer(self.head_dropout(fused, training=training))


def example_inputs(model, batch_size=1):
    """All-valid zero inputs for `model` (builds it when called)."""
    sequences = tuple(tf.zeros((batch_size, n, d)) for n, d in zip(model.seq_lens,
                                                                   model.feature_dims))
    return sequences + tuple(tf.ones((batch_size, n), tf.bool) for n in model.seq_lens)
