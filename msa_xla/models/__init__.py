"""The model family, and a table from short names to classes (used by the trainer)."""

from msa_xla.models.balanced import BalancedMSAModel
from msa_xla.models.mult import MulTModel
from msa_xla.models.pooled import ImprovedMSAModel, MSAModel
from msa_xla.models.seqlevel import MSASeqLevelModel
from msa_xla.options import MODEL_NAMES

MODELS = {
    "seqlevel": MSASeqLevelModel,
    "msa": MSAModel,
    "improved": ImprovedMSAModel,
    "balanced": BalancedMSAModel,
    "mult": MulTModel,
}
assert tuple(MODELS) == MODEL_NAMES, "msa_xla/options.py MODEL_NAMES must list MODELS' keys"

__all__ = ["BalancedMSAModel", "ImprovedMSAModel", "MODELS", "MSAModel", "MSASeqLevelModel",
           "MulTModel"]
