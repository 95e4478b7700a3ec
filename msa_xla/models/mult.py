"""MulTModel: the Multimodal Transformer (Tsai et al., ACL 2019) as MMSA trains it, under XLA.

Architecture (MulT's code, yaohungt/Multimodal-Transformer; MMSA `models/singleTask/MULT.py`):

    text, audio, video (B, T_m, F_m)
      -> temporal Conv1d per modality, no bias, F_m -> d            (B, T_m, d)
      -> six crossmodal transformers, each modality attending to each other one:
         text <- audio, text <- video, audio <- text, audio <- video, video <- text, video <- audio
         (n_levels layers each)                                     (B, T_m, d) x 6
      -> per target modality: concatenate its two                  (B, T_m, 2d)
         -> a self-attention "memory" transformer, max(n_levels, 3) layers
         -> the representation at the last step                     (B, 2d)
      -> concatenate the three                                      (B, 6d)
      -> residual two-layer projection (relu, output dropout) -> Dense(1) in float32

Each transformer is MulT's pre-norm encoder: inputs scaled by sqrt(d), sinusoidal positions
added (fairseq's table, positions from 1), embedding dropout (drawn separately for queries,
keys and values, as MulT's code does), `n` layers of [LN -> attention (dropout on the attention
weights) -> residual dropout -> +] and [LN -> Linear 4d -> relu -> dropout -> Linear d ->
residual dropout -> +], then a final LN. In a crossmodal layer one LN (the layer's first)
normalises the queries and the keys/values alike.

Defaults are MMSA's MOSI regression config (`config_regression.json`, 'mult', 'mosi'):
d=50 with 10 heads (`dst_feature_dim_nheads [50, 10]`), `nlevels 4`, attention dropout 0.3 /
0.2 (audio) / 0 (video), relu 0, embedding 0.2, residual 0, output 0.5, text 0.5, Conv1d
kernels 5/5/5. With feature dims 300/74/47 the model has MMSA's parameter count, 2,478,551.

Where this model deliberately differs from the original (which is wrong for padded batches):
- Every attention honours key padding masks (the original attends to padding).
- Convolutions use `same` padding, so each output step stays at its input's position and the
  masks stay aligned (the original's unpadded Conv1d shortens and shifts every sequence).
  Padded steps are zeroed before the convolution, so what padding holds never reaches a
  valid step.
- The pooled "last step" is each clip's last valid step (the original reads `h[-1]`, which is
  padding for any clip shorter than the batch's length); a clip with no valid step pools zeros.
- The causal `attn_mask` of MulT's code (MMSA's config sets `attn_mask: true`) is off by
  default; `causal_mask=True` reproduces it exactly (query i sees keys j <= i + |T_k - T_q|, in
  padded positions), on top of the padding masks.
- Sinusoidal positions are on, as in the paper and MulT's repository; MMSA's copy of the
  encoder builds none (`position_embedding=False`): `positional=False` reproduces that.

The attention dropout rate of a crossmodal transformer is the one of the modality attended to
(MulT's `get_network`: text <- audio uses `attn_dropout_a`, audio <- text uses `attn_dropout`);
the three memory transformers use `attn_dropout`.

Attention: every attention runs `msa_xla.kernels.masked_attention` (the `attention_impl`
given), which applies the dropout on the attention weights (torch's: on the softmax
probabilities, kept ones scaled by 1 / keep) and the causal mask itself, the same way in all
its implementations. With `attention_impl="chunked"` training memory grows with T_q x block,
not T_q x T_k: the causal mask comes from index iotas per key block, and the dropout mask is a
hash of (key, position) that the backward pass regenerates per block. Each training call of an
attention with dropout draws a fresh key from its `weight_dropout` layer's random generator,
which the trainer checkpoints (`rng_state_variables`), so a resumed run draws the same masks.
"""

import math

import numpy as np
import tensorflow as tf
import tf_keras as keras

from msa_xla.errors import UserError
from msa_xla.kernels import linear, masked_attention, validate_impl
from msa_xla.layers.attention import check_heads
from msa_xla.layers.dense import Dense
from msa_xla.layers.dropout import Dropout
from msa_xla.layers.masks import zero_padding
from msa_xla.models.base import MSABaseModel, output_layer
from msa_xla.options import MODALITIES

# Constructor arguments that are dropout rates (MMSA's names).
DROPOUTS = ("attn_dropout", "attn_dropout_a", "attn_dropout_v", "relu_dropout", "embed_dropout",
            "res_dropout", "output_dropout", "text_dropout")
MIN_MEMORY_LAYERS = 3  # MulT: get_network(..., layers=3) -> max(nlevels, 3)
_LN_EPSILON = 1e-5  # torch.nn.LayerNorm's


def _torch_default_init(fan_in):
    """torch.nn.Linear / Conv1d's default init: uniform(+-1/sqrt(fan_in))."""
    return keras.initializers.RandomUniform(-1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))


def sinusoidal_positions(length, dim):
    """fairseq's sinusoidal table as MulT uses it: rows for positions 1..length, (length, dim).

    Columns are [sin(p * f_0..f_{h-1}), cos(p * f_0..f_{h-1})] with h = dim // 2 and
    f_i = 10000^(-i / (h - 1)); an odd dim gets a zero last column.
    """
    half = dim // 2
    scale = math.log(10000) / max(half - 1, 1)
    freqs = np.exp(np.arange(half, dtype=np.float64) * -scale)
    angles = np.arange(1, length + 1, dtype=np.float64)[:, None] * freqs[None, :]
    table = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    if dim % 2:
        table = np.concatenate([table, np.zeros((length, 1))], axis=1)
    return table.astype(np.float32)


def causal_keys(q_len, k_len):
    """MulT's `buffered_future_mask` as booleans: (Tq, Tk), True where query i may see key j.

    The original adds -inf where j - i >= 1 + |Tk - Tq| (`torch.triu(..., 1 + abs(dim2 - dim1))`).
    """
    offset = abs(k_len - q_len)
    return np.arange(k_len)[None, :] <= np.arange(q_len)[:, None] + offset


class MulTAttention(keras.layers.Layer):
    """MulT's multi-head attention: fused (d, 3d) input projection with bias, output projection,
    dropout on the attention weights, optional causal mask (both inside the attention core).

    Weights match torch's `MultiheadAttention` of MulT (in_proj (3d, d) + bias, out_proj):
    4d^2 + 4d parameters. Queries, keys and values may come from three different tensors
    (MulT drops keys and values out separately); the same tensor is projected once.
    """

    def __init__(self, model_dim, num_heads, dropout_rate=0.0, causal=False,
                 attention_impl="fused", **kwargs):
        super().__init__(**kwargs)
        check_heads(model_dim, num_heads)
        self.model_dim, self.num_heads = int(model_dim), int(num_heads)
        self.head_dim = self.model_dim // self.num_heads
        self.dropout_rate, self.causal = float(dropout_rate), bool(causal)
        self.attention_impl = validate_impl(attention_impl)
        # Not applied to a tensor: the source of the core's dropout keys, one per training call,
        # from a random generator the trainer checkpoints like every Dropout layer's.
        self.weight_dropout = Dropout(self.dropout_rate) if self.dropout_rate else None

    def build(self, input_shape):
        d = self.model_dim
        self.in_kernel = self.add_weight(name="in_kernel", shape=(d, 3 * d),
                                         initializer="glorot_uniform")
        self.in_bias = self.add_weight(name="in_bias", shape=(3 * d,), initializer="zeros")
        self.out_kernel = self.add_weight(name="out_kernel", shape=(d, d),
                                          initializer="glorot_uniform")
        self.out_bias = self.add_weight(name="out_bias", shape=(d,), initializer="zeros")
        if self.weight_dropout is not None:
            # A Dropout creates its random generator when built by its first call; this one is
            # never called, so build it here: the model's first (inference) build then holds
            # every RNG state the trainer checkpoints, as with the other dropout layers.
            self.weight_dropout.build(None)
        super().build(input_shape)

    def _heads(self, x):
        shape = tf.shape(x)
        # (B, T, n*d) -> (B, T, n, H, Dh)
        return tf.reshape(x, [shape[0], shape[1], -1, self.num_heads, self.head_dim])

    def call(self, query, key, value, query_mask, key_mask, training=None):
        d = self.model_dim
        kernel = tf.cast(self.in_kernel, self.compute_dtype)
        bias = tf.cast(self.in_bias, self.compute_dtype)
        if key is query and value is query:  # self-attention: one (d, 3d) matmul
            q, k, v = tf.unstack(self._heads(linear(query, kernel, bias)), 3, axis=2)
        else:
            (q,) = tf.unstack(self._heads(linear(query, kernel[:, :d], bias[:d])), 1, axis=2)
            if key is value:
                k, v = tf.unstack(self._heads(linear(key, kernel[:, d:], bias[d:])), 2, axis=2)
            else:
                (k,) = tf.unstack(self._heads(linear(key, kernel[:, d:2 * d], bias[d:2 * d])),
                                  1, axis=2)
                (v,) = tf.unstack(self._heads(linear(value, kernel[:, 2 * d:], bias[2 * d:])),
                                  1, axis=2)
        # q (B, Tq, H, Dh); k, v (B, Tk, H, Dh)
        # MulT's causal mask (see causal_keys): query i sees keys j <= i + |Tk - Tq|.
        offset = abs(k.shape[1] - q.shape[1]) if self.causal else None

        def attend(rate):
            key = self.weight_dropout.draw_key() if rate else None
            return masked_attention(q, k, v, query_mask, key_mask, impl=self.attention_impl,
                                    dropout_rate=rate, dropout_key=key, causal_offset=offset)

        with tf.name_scope("attention"):
            if self.weight_dropout is not None and _training(training):
                # A symbolic training flag becomes a cond; a Python bool picks one branch.
                out = tf.__internal__.smart_cond.smart_cond(
                    training, lambda: attend(self.dropout_rate), lambda: attend(0.0))
            else:
                out = attend(0.0)
        shape = tf.shape(out)
        out = tf.reshape(out, [shape[0], shape[1], d])  # (B, Tq, d)
        return linear(out, tf.cast(self.out_kernel, self.compute_dtype),
                      tf.cast(self.out_bias, self.compute_dtype))

    def get_config(self):
        return {**super().get_config(), "model_dim": self.model_dim, "num_heads": self.num_heads,
                "dropout_rate": self.dropout_rate, "causal": self.causal,
                "attention_impl": self.attention_impl}


def _normalise(x):
    """Layer norm without its scale and offset, in float32: (x - mean) / sqrt(var + eps)."""
    x = tf.cast(x, tf.float32)
    mean, variance = tf.nn.moments(x, axes=[-1], keepdims=True)
    return (x - mean) * tf.math.rsqrt(variance + _LN_EPSILON)


def _maybe_dropout(layer, x, training):
    return x if layer is None else layer(x, training=training)


def _training(training):
    """True unless `training` is None or False (a symbolic flag counts: dropout resolves it)."""
    return training is not None and training is not False


class MulTEncoderLayer(keras.layers.Layer):
    """One pre-norm layer of MulT's TransformerEncoder (12 d^2 + 13 d parameters)."""

    def __init__(self, model_dim, num_heads, attn_dropout=0.0, relu_dropout=0.0, res_dropout=0.0,
                 causal=False, attention_impl="fused", **kwargs):
        super().__init__(**kwargs)
        self.model_dim, self.num_heads = int(model_dim), int(num_heads)
        self.attn_dropout, self.relu_dropout = float(attn_dropout), float(relu_dropout)
        self.res_dropout, self.causal = float(res_dropout), bool(causal)
        self.attention_impl = attention_impl
        d = self.model_dim
        self.attention = MulTAttention(d, num_heads, attn_dropout, causal, attention_impl,
                                       name="attention")
        self.attention_norm = keras.layers.LayerNormalization(epsilon=_LN_EPSILON,
                                                              name="attention_norm")
        self.ffn_norm = keras.layers.LayerNormalization(epsilon=_LN_EPSILON, name="ffn_norm")
        self.ffn_inner = Dense(4 * d, activation="relu", name="ffn_inner")
        self.ffn_outer = Dense(d, name="ffn_outer")
        self.relu_drop = Dropout(self.relu_dropout) if self.relu_dropout else None
        self.res_drop = Dropout(self.res_dropout) if self.res_dropout else None

    def call(self, x, mask, key_norm=None, value_norm=None, key_mask=None, training=None):
        """x (B, Tq, d); key_norm / value_norm: the context's normalised (scale-free) keys and
        values (B, Tk, d) float32, or None for self-attention."""
        h = self.attention_norm(x)
        if key_norm is None:
            attended = self.attention(h, h, h, mask, mask, training=training)
        else:
            # The layer's one LN also normalises keys and values: its statistics were computed
            # once per encoder (the context does not change across layers), its scale and
            # offset are this layer's.
            # (Under a mixed policy the variables read in the compute dtype: back to float32.)
            gamma = tf.cast(self.attention_norm.gamma, tf.float32)
            beta = tf.cast(self.attention_norm.beta, tf.float32)

            def affine(n):
                return tf.cast(n * gamma + beta, self.compute_dtype)

            key = affine(key_norm)
            value = key if value_norm is key_norm else affine(value_norm)
            attended = self.attention(h, key, value, mask, key_mask, training=training)
        x = x + _maybe_dropout(self.res_drop, attended, training)
        h = self.ffn_inner(self.ffn_norm(x))
        h = self.ffn_outer(_maybe_dropout(self.relu_drop, h, training))
        return x + _maybe_dropout(self.res_drop, h, training)

    def get_config(self):
        return {**super().get_config(), "model_dim": self.model_dim, "num_heads": self.num_heads,
                "attn_dropout": self.attn_dropout, "relu_dropout": self.relu_dropout,
                "res_dropout": self.res_dropout, "causal": self.causal,
                "attention_impl": self.attention_impl}


class MulTEncoder(keras.layers.Layer):
    """MulT's TransformerEncoder: crossmodal when called with a context, else self-attention.

    Call args:
      x: (B, Tq, d) queries' sequence. mask: (B, Tq) bool.
      context: optional (B, Tk, d), the modality attended to. context_mask: (B, Tk) bool.
    Returns (B, Tq, d).
    """

    def __init__(self, model_dim, num_heads, num_layers, attn_dropout=0.0, relu_dropout=0.0,
                 res_dropout=0.0, embed_dropout=0.0, positional=True, causal=False,
                 attention_impl="fused", **kwargs):
        super().__init__(**kwargs)
        self.model_dim, self.num_heads = int(model_dim), int(num_heads)
        self.num_layers, self.attn_dropout = int(num_layers), float(attn_dropout)
        self.relu_dropout, self.res_dropout = float(relu_dropout), float(res_dropout)
        self.embed_dropout, self.positional = float(embed_dropout), bool(positional)
        self.causal, self.attention_impl = bool(causal), attention_impl
        self.embed_drop = Dropout(self.embed_dropout) if self.embed_dropout else None
        self.encoder_layers = [
            MulTEncoderLayer(model_dim, num_heads, attn_dropout, relu_dropout, res_dropout,
                             causal, attention_impl, name=f"layer_{i}")
            for i in range(self.num_layers)]
        self.final_norm = keras.layers.LayerNormalization(epsilon=_LN_EPSILON, name="final_norm")

    def _embed(self, x):
        """sqrt(d) * x + positions (MulT's `embed_scale * x_in + embed_positions`)."""
        x = x * tf.cast(math.sqrt(self.model_dim), x.dtype)
        if self.positional:
            x = x + tf.constant(sinusoidal_positions(x.shape[1], self.model_dim), x.dtype)
        return x

    def call(self, x, mask, context=None, context_mask=None, training=None):
        h = _maybe_dropout(self.embed_drop, self._embed(x), training)
        key_norm = value_norm = None
        if context is not None:
            context = self._embed(context)
            dropping = self.embed_drop is not None and _training(training)
            # MulT drops keys and values out separately (two F.dropout calls).
            key_norm = _normalise(_maybe_dropout(self.embed_drop, context, training))
            value_norm = (_normalise(self.embed_drop(context, training=training)) if dropping
                          else key_norm)
        for layer in self.encoder_layers:
            h = layer(h, mask, key_norm, value_norm, context_mask, training=training)
        return self.final_norm(h)

    def get_config(self):
        return {**super().get_config(), "model_dim": self.model_dim, "num_heads": self.num_heads,
                "num_layers": self.num_layers, "attn_dropout": self.attn_dropout,
                "relu_dropout": self.relu_dropout, "res_dropout": self.res_dropout,
                "embed_dropout": self.embed_dropout, "positional": self.positional,
                "causal": self.causal, "attention_impl": self.attention_impl}


def last_valid_step(sequence, mask):
    """(B, T, D) at each clip's last valid step -> (B, D); zeros for a clip with none.

    A one-hot sum, not a gather: static shapes, and its gradient is a product, not a scatter.
    """
    steps = tf.range(tf.shape(mask)[1])[None, :]  # (1, T)
    last = tf.reduce_max(tf.where(mask, steps, -1), axis=1, keepdims=True)  # (B, 1)
    pick = tf.cast(tf.equal(steps, last), sequence.dtype)[:, :, None]  # (B, T, 1)
    return tf.reduce_sum(sequence * pick, axis=1)


@keras.saving.register_keras_serializable(package="msa_xla")
class MulTModel(MSABaseModel):
    """The Multimodal Transformer (MulT), MMSA's MOSI config by default (see the module docstring
    for the architecture and for where it deliberately departs from the original).

    Args:
      seq_len, text_dim, audio_dim, video_dim: as every model (seq_len: int or triple).
      model_dim: d, the common width of the crossmodal transformers (memory ones: 2d). 50.
      num_heads: heads of every attention; must divide d. 10.
      n_levels: layers of each crossmodal transformer; the memory transformers have
        max(n_levels, 3). 4.
      attn_dropout, attn_dropout_a, attn_dropout_v: dropout on the attention weights when
        attending to text, audio, video (and attn_dropout in the memory transformers).
        0.3, 0.2, 0.0.
      relu_dropout, embed_dropout, res_dropout: feed-forward inner, embedding, residual. 0, 0.2, 0.
      output_dropout: in the residual projection head. 0.5.
      text_dropout: on the text features (or token embeddings) before the convolution. 0.5.
      conv_kernel_sizes: (text, audio, video) Conv1d kernel sizes. (5, 5, 5). A modality whose
        feature size already equals d is not projected (as MulT).
      positional: sinusoidal positions (paper, MulT's code); False = MMSA's copy, which has none.
      causal_mask: MulT's causal attention mask (MMSA's `attn_mask: true`), off by default.
      attention_impl, text_input, vocab_size: as every model.

    Example:
      >>> model = MulTModel(seq_len=(20, 30, 25), text_dim=300, audio_dim=74, video_dim=47,
      ...                   model_dim=16, num_heads=4, n_levels=1)
      >>> model((tf.zeros((2, 20, 300)), tf.zeros((2, 30, 74)), tf.zeros((2, 25, 47)))).shape
      TensorShape([2, 1])
    """

    def __init__(self, seq_len, text_dim, audio_dim, video_dim, model_dim=50, num_heads=10,
                 n_levels=4, attn_dropout=0.3, attn_dropout_a=0.2, attn_dropout_v=0.0,
                 relu_dropout=0.0, embed_dropout=0.2, res_dropout=0.0, output_dropout=0.5,
                 text_dropout=0.5, conv_kernel_sizes=(5, 5, 5), positional=True,
                 causal_mask=False, attention_impl="fused", text_input="features",
                 vocab_size=None, **kwargs):
        super().__init__(seq_len, text_dim, audio_dim, video_dim, model_dim, num_heads,
                         attention_impl=attention_impl, text_input=text_input,
                         vocab_size=vocab_size, **kwargs)
        rates = dict(attn_dropout=attn_dropout, attn_dropout_a=attn_dropout_a,
                     attn_dropout_v=attn_dropout_v, relu_dropout=relu_dropout,
                     embed_dropout=embed_dropout, res_dropout=res_dropout,
                     output_dropout=output_dropout, text_dropout=text_dropout)
        for name, rate in rates.items():
            if not 0.0 <= float(rate) < 1.0:
                raise UserError(f"{name}={rate} must be in [0, 1)")
            setattr(self, name, float(rate))
        if int(n_levels) < 1:
            raise UserError(f"n_levels={n_levels} must be >= 1")
        kernels = tuple(int(k) for k in conv_kernel_sizes)
        if len(kernels) != 3 or min(kernels) < 1:
            raise UserError(f"conv_kernel_sizes={conv_kernel_sizes}: expected three positive "
                             "ints (text, audio, video)")
        self.n_levels, self.conv_kernel_sizes = int(n_levels), list(kernels)
        self.positional, self.causal_mask = bool(positional), bool(causal_mask)
        d = self.model_dim
        self.text_drop = Dropout(self.text_dropout) if self.text_dropout else None
        self.text_projection, self.audio_projection, self.video_projection = (
            None if dim == d else keras.layers.Conv1D(
                d, kernel, padding="same", use_bias=False, name=f"{name}_projection",
                kernel_initializer=_torch_default_init(dim * kernel))
            for name, dim, kernel in zip(MODALITIES, self.feature_dims, kernels))
        # Attention dropout of a crossmodal transformer: the rate of the modality attended to.
        attn_rates = dict(zip(MODALITIES, (self.attn_dropout, self.attn_dropout_a,
                                           self.attn_dropout_v)))
        shared = dict(relu_dropout=self.relu_dropout, res_dropout=self.res_dropout,
                      embed_dropout=self.embed_dropout, positional=self.positional,
                      causal=self.causal_mask, attention_impl=self.attention_impl)
        # (target, source) pairs in MulT's order: text <- audio, text <- video, audio <- text, ...
        self.pairs = tuple((t, s) for t in MODALITIES for s in MODALITIES if s != t)
        self.crossmodal = [MulTEncoder(d, num_heads, self.n_levels, attn_rates[source],
                                       name=f"{target}_with_{source}", **shared)
                           for target, source in self.pairs]
        self.memories = [
            MulTEncoder(2 * d, num_heads, max(self.n_levels, MIN_MEMORY_LAYERS),
                        self.attn_dropout, name=f"{target}_memory", **shared)
            for target in MODALITIES]
        combined = 6 * d
        self.proj1, self.proj2 = (
            Dense(combined, activation=activation, name=name,
                  kernel_initializer=_torch_default_init(combined),
                  bias_initializer=_torch_default_init(combined))
            for name, activation in (("proj1", "relu"), ("proj2", None)))
        self.head_drop = Dropout(self.output_dropout) if self.output_dropout else None
        self.output_layer = output_layer()

    def forward(self, sequences, masks, training=None):
        projected = []
        projections = (self.text_projection, self.audio_projection, self.video_projection)
        for m, (x, mask, projection) in enumerate(zip(sequences, masks, projections)):
            x = zero_padding(x, mask)  # padding may hold anything; the convolution reads it
            if m == 0:
                x = _maybe_dropout(self.text_drop, x, training)
            projected.append(x if projection is None else projection(x))  # (B, T_m, d)
        pooled = []
        index = {m: i for i, m in enumerate(MODALITIES)}
        for t, target in enumerate(MODALITIES):
            crossed = [encoder(projected[t], masks[t], projected[index[source]],
                               masks[index[source]], training=training)
                       for encoder, (to, source) in zip(self.crossmodal, self.pairs)
                       if to == target]  # (B, T_t, d) x 2
            memory = self.memories[t](tf.concat(crossed, axis=-1), masks[t],
                                      training=training)  # (B, T_t, 2d)
            pooled.append(last_valid_step(memory, masks[t]))  # (B, 2d)
        last = tf.concat(pooled, axis=-1)  # (B, 6d)
        hidden = self.proj2(_maybe_dropout(self.head_drop, self.proj1(last), training))
        return self.output_layer(hidden + last), {"pooled": pooled}

    def get_config(self):
        return {**super().get_config(), "n_levels": self.n_levels,
                **{name: getattr(self, name) for name in DROPOUTS},
                "conv_kernel_sizes": list(self.conv_kernel_sizes),
                "positional": self.positional, "causal_mask": self.causal_mask}
