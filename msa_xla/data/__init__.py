"""Data layer: fixed-shape TFRecords for multimodal sentiment analysis.

    from msa_xla.data import make_dataset, load_metadata, ensure_builtin_dataset
    data_dir = ensure_builtin_dataset()
    meta = load_metadata(data_dir)   # meta["modalities"]["text"] == {"dim": 300, "seq_len": 50}
    train = make_dataset(data_dir, "train", batch_size=32, repeat=True)

Convert your own MMSA/MulT pickles or CMU-MultimodalSDK .csd files with tools/convert_to_tfrecord.py.
"""
from msa_xla.data.builtin import default_home, ensure_builtin_dataset
from msa_xla.data.pipeline import make_dataset, verify_shards
from msa_xla.data.schema import (
                                 FORMAT_VERSION,
                                 LABEL_KEY,
                                 DataError,
                                 feature_spec,
                                 load_metadata,
                                 num_examples,
                                 serialize_example,
)
from msa_xla.options import MODALITIES, SPLITS, TEXT_INPUTS  # re-exported: msa_xla.data.SPLITS

__all__ = [
    "DataError", "FORMAT_VERSION", "LABEL_KEY", "MODALITIES", "SPLITS", "TEXT_INPUTS",
    "default_home", "ensure_builtin_dataset", "feature_spec", "load_metadata", "make_dataset",
    "num_examples", "serialize_example", "verify_shards",
]
