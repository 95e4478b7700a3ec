"""Kernels: the masked attention core and the affine map shared by every layer."""

from msa_xla.kernels.attention import ATTENTION_IMPLS, masked_attention, validate_impl
from msa_xla.kernels.projection import linear

__all__ = ["ATTENTION_IMPLS", "linear", "masked_attention", "validate_impl"]
