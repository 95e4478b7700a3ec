"""msa_xla: multimodal sentiment analysis in TensorFlow, fast under XLA.

Public names (the spec's `models` package):

    from msa_xla import MSASeqLevelModel, create_padding_mask
    from msa_xla.data import make_dataset
"""

from msa_xla.layers import (
                            AdaptiveFusionHead,
                            CrossAttentionBlock,
                            CrossModalFusion,
                            LearnablePositionalEmbedding,
                            ModalityEncoder,
                            TransformerBlock,
                            create_padding_mask,
)
from msa_xla.models import BalancedMSAModel, ImprovedMSAModel, MSAModel, MSASeqLevelModel, MulTModel
from msa_xla.runtime.compat import skip_autograph

# The package's code is graph-ready: AutoGraph calls it as it is (runtime/compat.py).
skip_autograph(__name__)

__version__ = "0.1.0"

__all__ = ["AdaptiveFusionHead", "BalancedMSAModel", "CrossAttentionBlock", "CrossModalFusion",
           "ImprovedMSAModel", "LearnablePositionalEmbedding", "MSAModel", "MSASeqLevelModel",
           "ModalityEncoder", "MulTModel", "TransformerBlock", "create_padding_mask"]
