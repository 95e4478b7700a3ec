"""Reusable layers of the MSA models (one concern a file)."""

from msa_xla.layers.attention import MaskedMultiHeadAttention
from msa_xla.layers.blocks import CrossAttentionBlock, TransformerBlock
from msa_xla.layers.dense import Dense
from msa_xla.layers.dropout import Dropout
from msa_xla.layers.embedding import TokenEmbedding
from msa_xla.layers.encoders import ModalityEncoder
from msa_xla.layers.fusion import AdaptiveFusionHead, CrossModalFusion
from msa_xla.layers.masks import create_padding_mask
from msa_xla.layers.pooling import AttentionPooling, masked_mean
from msa_xla.layers.positional import LearnablePositionalEmbedding

__all__ = ["AdaptiveFusionHead", "AttentionPooling", "CrossAttentionBlock", "CrossModalFusion",
           "Dense", "Dropout", "LearnablePositionalEmbedding", "MaskedMultiHeadAttention",
           "ModalityEncoder", "TokenEmbedding", "TransformerBlock", "create_padding_mask", "masked_mean"]
