#!/usr/bin/env python
"""Convert MSA features to fixed-shape sharded TFRecords for msa_xla.data.make_dataset.

    python tools/convert_to_tfrecord.py --format mmsa --input aligned_50.pkl --output tfrecords/mosi_aligned
    python tools/convert_to_tfrecord.py --format mult --input mosi_data_noalign.pkl \
        --output tfrecords/mosi_unaligned --seq_len 50,375,500 --shards 4
    python tools/convert_to_tfrecord.py --format csd --input cmu_mosi_csd/ --output tfrecords/mosi_csd
    python tools/convert_to_tfrecord.py --format synthetic --output tfrecords/synth --tokenize
    python tools/convert_to_tfrecord.py --format mmsa --input aligned_50.pkl --output gs://bucket/mosi

All the work lives in msa_xla.data.writer (layout in msa_xla.data.schema, which the reader uses too).
Errors print one `error: ...` line and exit with code 2, leaving no output folder behind. The
output may be local or remote (gs://...); --input is read from local disk.
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Keep TF's start-up chatter off the terminal.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Run from a checkout.

from msa_xla.data.writer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
