"""MSASeqLevelModel: sequence-level cross-modal fusion, pooling only at the end."""

import tf_keras as keras

from msa_xla.layers.dropout import Dropout
from msa_xla.layers.encoders import ModalityEncoder
from msa_xla.layers.fusion import AdaptiveFusionHead, CrossModalFusion
from msa_xla.layers.pooling import validate_pooling
from msa_xla.models.base import MSABaseModel, output_layer
from msa_xla.options import MODALITIES


@keras.saving.register_keras_serializable(package="msa_xla")
class MSASeqLevelModel(MSABaseModel):
    """Encoders keep full sequences; text attends to audio and video; adaptive pooled head.

    Flow: per-modality ModalityEncoder (Dense -> positions -> blocks) -> CrossModalFusion
    (text <- audio, text <- video, optionally audio/video <- text) -> AdaptiveFusionHead
    (mask-aware pooling, softmax modality weights) -> Dense(1) in float32.

    Args (the spec's): seq_len (int or (text, audio, video) triple), text_dim, audio_dim,
      video_dim, model_dim, num_heads, ff_dim, n_layers_mod, n_layers_fuse,
      bidirectional_fusion=False, pooling_method='mean'|'attention', dropout_rate=0.1.
      Also attention_impl='fused', text_input='features'|'tokens', vocab_size.

    Example:
      >>> model = MSASeqLevelModel(seq_len=20, text_dim=300, audio_dim=74, video_dim=47,
      ...                          model_dim=64, num_heads=4, ff_dim=128, n_layers_mod=1,
      ...                          n_layers_fuse=1)
      >>> model((tf.zeros((2, 20, 300)), tf.zeros((2, 20, 74)), tf.zeros((2, 20, 47)))).shape
      TensorShape([2, 1])
    """

    def __init__(self, seq_len, text_dim, audio_dim, video_dim, model_dim, num_heads, ff_dim,
                 n_layers_mod, n_layers_fuse, bidirectional_fusion=False, pooling_method="mean",
                 dropout_rate=0.1, attention_impl="fused", text_input="features",
                 vocab_size=None, **kwargs):
        super().__init__(seq_len, text_dim, audio_dim, video_dim, model_dim, num_heads,
                         attention_impl=attention_impl, text_input=text_input,
                         vocab_size=vocab_size, **kwargs)
        self.ff_dim, self.n_layers_mod, self.n_layers_fuse = int(ff_dim), int(n_layers_mod), int(
            n_layers_fuse)
        self.bidirectional_fusion = bool(bidirectional_fusion)
        self.pooling_method = validate_pooling(pooling_method)
        self.dropout_rate = float(dropout_rate)
        self.encoders = [
            ModalityEncoder(model_dim, num_heads, ff_dim, n_layers_mod, length, dropout_rate,
                            use_positional=True, attention_impl=attention_impl,
                            name=f"{name}_encoder")
            for name, length in zip(MODALITIES, self.seq_lens)]
        self.fusion = CrossModalFusion(model_dim, num_heads, ff_dim, n_layers_fuse,
                                       bidirectional_fusion, dropout_rate,
                                       attention_impl=attention_impl, name="fusion")
        self.fusion_head = AdaptiveFusionHead(model_dim, len(MODALITIES), pooling_method,
                                              name="fusion_head")
        self.head_dropout = Dropout(dropout_rate)
        self.output_layer = output_layer()

    def forward(self, sequences, masks, training=None):
        encoded = [encoder(x, mask=m, training=training)
                   for encoder, x, m in zip(self.encoders, sequences, masks)]
        text, audio, video = self.fusion(*encoded, *masks, training=training)
        fused = self.fusion_head([text, audio, video], masks=masks, training=training)
        return self.output_layer(self.head_dropout(fused, training=training)), {}

    def get_config(self):
        return {**super().get_config(), "ff_dim": self.ff_dim, "n_layers_mod": self.n_layers_mod,
                "n_layers_fuse": self.n_layers_fuse,
                "bidirectional_fusion": self.bidirectional_fusion,
                "pooling_method": self.pooling_method, "dropout_rate": self.dropout_rate}
