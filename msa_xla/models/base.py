"""What every MSA model shares: input unpacking and validation, masks, the train step."""

import tensorflow as tf
import tf_keras as keras

from msa_xla.errors import UserError
from msa_xla.kernels import validate_impl
from msa_xla.layers.attention import check_heads
from msa_xla.layers.embedding import TokenEmbedding
from msa_xla.layers.masks import check_mask, create_padding_mask
from msa_xla.options import MODALITIES, TEXT_INPUTS


def normalise_seq_len(seq_len):
    """`seq_len` as a (text, audio, video) triple; accepts one int for aligned data."""
    if isinstance(seq_len, (int,)) or (hasattr(seq_len, "__index__") and not
                                       isinstance(seq_len, (list, tuple))):
        seq_len = (int(seq_len),) * 3
    seq_len = tuple(int(n) for n in seq_len)
    if len(seq_len) != 3 or min(seq_len) <= 0:
        raise UserError(f"seq_len={seq_len} must be a positive int or a "
                         "(text_len, audio_len, video_len) triple")
    return seq_len


class MSABaseModel(keras.Model):
    """Base of the four models: takes (text, audio, video[, masks]) and returns (B, 1) float32.

    Subclasses implement `forward(sequences, masks, training) -> (prediction, extras)` and
    list their constructor arguments in `get_config`.

    Args:
      seq_len: int, or (text_len, audio_len, video_len) for unaligned data.
      text_dim, audio_dim, video_dim: feature sizes the model is built for.
      model_dim, num_heads: checked here (num_heads must divide model_dim).
      attention_impl: 'reference', 'fused' or 'chunked'.
      text_input: 'features' (float (B, T, text_dim)) or 'tokens' (int (B, T) ids, embedded
        to text_dim; id 0 is padding).
      vocab_size: size of the token vocabulary when text_input='tokens'.
    """

    def __init__(self, seq_len, text_dim, audio_dim, video_dim, model_dim, num_heads,
                 attention_impl="fused", text_input="features", vocab_size=None, **kwargs):
        super().__init__(**kwargs)
        check_heads(model_dim, num_heads)
        self.seq_len = seq_len if isinstance(seq_len, int) else list(normalise_seq_len(seq_len))
        self.seq_lens = normalise_seq_len(seq_len)
        self.text_dim, self.audio_dim, self.video_dim = int(text_dim), int(audio_dim), int(video_dim)
        self.feature_dims = (self.text_dim, self.audio_dim, self.video_dim)
        self.model_dim, self.num_heads = int(model_dim), int(num_heads)
        self.attention_impl = validate_impl(attention_impl)
        if text_input not in TEXT_INPUTS:
            raise UserError(f"text_input={text_input!r} is not one of {', '.join(TEXT_INPUTS)}")
        if text_input == "tokens" and not vocab_size:
            raise UserError("text_input='tokens' needs vocab_size (the tokenizer's vocabulary size)")
        self.text_input, self.vocab_size = text_input, vocab_size
        # Dense gradient: a sparse one cannot be all-reduced inside XLA (layers/embedding.py).
        self.token_embedding = (TokenEmbedding(vocab_size, self.text_dim, name="token_embedding")
                                if text_input == "tokens" else None)

    # ---- inputs -------------------------------------------------------------------------
    def _unpack(self, inputs):
        """Validates inputs; returns ([text, audio, video] float sequences, [masks])."""
        if isinstance(inputs, dict):
            inputs = [inputs[k] for k in MODALITIES] + [
                inputs[f"{m}_mask"] for m in MODALITIES if f"{m}_mask" in inputs]
        if not isinstance(inputs, (list, tuple)) or len(inputs) not in (3, 6):
            received = len(inputs) if isinstance(inputs, (list, tuple)) else type(inputs).__name__
            raise UserError(
                f"{self.name}: expected 3 inputs (text, audio, video) or 6 (text, audio, video, "
                f"text_mask, audio_mask, video_mask), received {received}")
        sequences = [tf.convert_to_tensor(x) for x in inputs[:3]]
        token_mask = None
        if self.token_embedding is not None:
            ids = sequences[0]
            if ids.shape.rank != 2:
                raise UserError(f"{self.name}: text_input='tokens' expects int ids of shape "
                                 f"(batch, time), received shape {tuple(ids.shape)}")
            token_mask = tf.not_equal(ids, 0)
            sequences[0] = self.token_embedding(ids)
        for name, x, dim, length in zip(MODALITIES, sequences, self.feature_dims, self.seq_lens):
            if x.shape.rank != 3 or x.shape[-1] != dim:
                raise UserError(
                    f"{self.name}: {name} features: expected shape (batch, time, {dim}) "
                    f"({name}_dim={dim}), received shape {tuple(x.shape)}")
            if x.shape[1] is not None and x.shape[1] > length:
                raise UserError(f"{self.name}: {name} has {x.shape[1]} steps, more than "
                                 f"seq_len={length} the model was built for")
        if len(inputs) == 6:
            masks = [check_mask(m, x, f"{name}_mask")
                     for m, x, name in zip(inputs[3:], sequences, MODALITIES)]
        else:
            masks = [create_padding_mask(x) for x in sequences]
            if token_mask is not None:
                masks[0] = token_mask
        sequences = [tf.cast(x, self.compute_dtype) for x in sequences]
        return sequences, masks

    def call(self, inputs, training=None):
        sequences, masks = self._unpack(inputs)
        prediction, _ = self.forward(sequences, masks, training=training)
        return prediction

    def forward(self, sequences, masks, training=None):
        raise NotImplementedError

    # ---- building and saving --------------------------------------------------------------
    def example_inputs(self, batch_size=1):
        """Zero inputs of the shapes the model was built for (with all-valid masks)."""
        text_len, audio_len, video_len = self.seq_lens
        text = (tf.ones((batch_size, text_len), tf.int32) if self.token_embedding is not None
                else tf.zeros((batch_size, text_len, self.text_dim)))
        audio = tf.zeros((batch_size, audio_len, self.audio_dim))
        video = tf.zeros((batch_size, video_len, self.video_dim))
        masks = tuple(tf.ones((batch_size, n), tf.bool) for n in self.seq_lens)
        return (text, audio, video) + masks

    def build_from_config(self, config):
        # Subclassed models with tuple inputs build by being called once.
        self(self.example_inputs(), training=False)

    def get_build_config(self):
        return {"seq_lens": list(self.seq_lens)}

    def get_config(self):
        return {"seq_len": self.seq_len, "text_dim": self.text_dim, "audio_dim": self.audio_dim,
                "video_dim": self.video_dim, "model_dim": self.model_dim,
                "num_heads": self.num_heads, "attention_impl": self.attention_impl,
                "text_input": self.text_input, "vocab_size": self.vocab_size, "name": self.name}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def output_layer():
    """The regression head's last layer: float32 under every precision policy."""
    return keras.layers.Dense(1, dtype="float32", name="prediction")
