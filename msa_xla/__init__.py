"""msa_xla: multimodal sentiment analysis in TensorFlow, fast under XLA.

Public names (the spec's `models` package):

    from msa_xla import MSASeqLevelModel, create_padding_mask
"""

__version__ = "0.1.0"
