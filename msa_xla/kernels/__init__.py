"""Attention kernels: the masked attention core shared by every layer."""

from msa_xla.kernels.attention import ATTENTION_IMPLS, masked_attention, validate_impl

__all__ = ["ATTENTION_IMPLS", "masked_attention", "validate_impl"]
