"""The record layout: hand-written serialisation equals protobuf's, metadata is checked, and a damaged
file is reported by name."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from msa_xla.data import DataError, load_metadata, num_examples, schema


def _clip(seed=0, shapes=((3, 4), (2, 5), (6, 1))):
    rng = np.random.default_rng(seed)
    feats = {m: rng.standard_normal(s).astype(np.float32) for m, s in zip(schema.MODALITIES, shapes)}
    return feats, {"text": 2, "audio": 1, "video": 6}


def test_serialize_example_equals_protobuf_message():
    feats, lengths = _clip()
    ids = np.array([5, 300, 0, 0])
    raw = schema.serialize_example(feats, lengths, -1.4, "vid$_$3", ids, 2)
    ours = tf.train.Example.FromString(raw)
    feature = {
        "label": tf.train.Feature(float_list=tf.train.FloatList(value=[-1.4])),
        "id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"vid$_$3"])),
        "text_ids": tf.train.Feature(int64_list=tf.train.Int64List(value=ids)),
        "text_ids_len": tf.train.Feature(int64_list=tf.train.Int64List(value=[2])),
    }
    for m in schema.MODALITIES:
        feature[m] = tf.train.Feature(float_list=tf.train.FloatList(value=feats[m].reshape(-1)))
        feature[f"{m}_len"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[lengths[m]]))
    assert ours == tf.train.Example(features=tf.train.Features(feature=feature))


def test_feature_spec_parses_serialized_batch():
    feats, lengths = _clip()
    meta = {"modalities": {"text": {"dim": 4, "seq_len": 3}, "audio": {"dim": 5, "seq_len": 2},
                           "video": {"dim": 1, "seq_len": 6}}}
    raw = [schema.serialize_example(feats, lengths, 0.5, "a"),
           schema.serialize_example(feats, lengths, -3.0, "b")]
    parsed = tf.io.parse_example(tf.constant(raw), schema.feature_spec(meta))
    np.testing.assert_array_equal(parsed["audio"][1].numpy(), feats["audio"].reshape(-1))
    assert parsed["id"].numpy().tolist() == [b"a", b"b"]
    assert parsed["video_len"].numpy().tolist() == [6, 6]


def test_load_metadata_errors_name_the_file(tmp_path):
    path = os.path.join(tmp_path, "metadata.json")
    with pytest.raises(DataError, match=f"{path}: not found"):
        load_metadata(tmp_path)
    (tmp_path / "metadata.json").write_text("{not json")
    with pytest.raises(DataError, match=f"{path}: cannot read metadata"):
        load_metadata(tmp_path)
    (tmp_path / "metadata.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(DataError, match="format_version=99"):
        load_metadata(tmp_path)


def test_metadata_round_trip(tmp_path):
    meta = schema.build_metadata(
        dims={"text": 300, "audio": 74, "video": 47}, seq_lens={"text": 50, "audio": 375, "video": 500},
        source_format="mmsa", source_path="x.pkl",
        splits={"train": {"count": 3, "shards": [{"file": "train-00000-of-00001.tfrecord",
                                                  "count": 3}]}})
    schema.write_metadata(meta, tmp_path)
    loaded = load_metadata(tmp_path)
    assert loaded["seq_len"] == [50, 375, 500] and loaded["aligned"] is False
    assert loaded["modalities"]["video"] == {"dim": 47, "seq_len": 500}
    assert num_examples(tmp_path, "train") == 3
    with pytest.raises(DataError, match="no split 'valid'"):
        num_examples(tmp_path, "valid")
