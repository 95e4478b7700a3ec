"""Remote storage (gs:// and the like) through tf.io.gfile, with TF's in-memory `ram://`
filesystem as the stand-in for a bucket: it is per-process, so everything here runs in this process.

The data written, read and scanned on ram:// must equal what the local fast paths give."""
import itertools
import json
import os
import struct
import uuid
import warnings

import numpy as np
import pytest
import tensorflow as tf

from msa_xla.data import DataError, integrity, load_metadata, make_dataset, schema, synthetic, writer
from msa_xla.data.integrity import CorruptRecordsWarning, scan_shards
from msa_xla.runtime import storage

SIZES = (20, 6, 9)
SEQ_LEN = (6, 8, 5)
DIMS = (5, 4, 3)


def _ram(name):
    """A fresh ram:// folder of this test run (the filesystem is shared by the whole process)."""
    return f"ram://msa-xla-test-{uuid.uuid4().hex[:12]}/{name}"


def _convert(output, shards=2, tokenize=True, sizes=SIZES, **kwargs):
    splits = synthetic.generate(sizes, seq_len=SEQ_LEN, dims=DIMS, seed=7)
    return writer.convert(splits, output, source_format="synthetic", source_path="-",
                          seq_len=SEQ_LEN, shards=shards, tokenize=tokenize,
                          log=lambda line: None, **kwargs)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same dataset written to a local folder and to a ram:// folder: (local, remote)."""
    local = str(tmp_path_factory.mktemp("remote") / "tiny")
    remote = _ram("tiny")
    _convert(local)
    _convert(remote)
    return local, remote


def _files(folder):
    return {name: storage.read_bytes(storage.join(folder, name))
            for name in storage.listdir(folder)}


def _batches(data_dir, split, batch_size, take=None, **kwargs):
    dataset = make_dataset(data_dir, split, batch_size, **kwargs)
    return [(tuple(x.numpy() for x in inputs), label.numpy())
            for inputs, label in itertools.islice(dataset, take)]


def _assert_same_batches(got, want):
    assert len(got) == len(want) > 0
    for (inputs, label), (want_inputs, want_label) in zip(got, want):
        np.testing.assert_array_equal(label, want_label)
        assert len(inputs) == len(want_inputs)
        for a, b in zip(inputs, want_inputs):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)


# --- The storage helpers ---------------------------------------------------------------------

def test_paths_of_urls_stay_urls():
    assert storage.absolute("gs://b/x") == "gs://b/x"
    assert storage.absolute("gs://b/x/") == "gs://b/x"
    assert storage.absolute("runs/x") == os.path.abspath("runs/x")
    assert storage.is_remote("gs://b/x") and storage.is_remote("ram://x")
    assert not storage.is_remote("/tmp/x") and not storage.is_remote("runs/gs:/x")
    assert storage.join("gs://b/run", "seed_0", "model.keras") == "gs://b/run/seed_0/model.keras"
    assert storage.join("gs://b/run/", "x") == "gs://b/run/x"
    assert storage.dirname("gs://b/run/x") == "gs://b/run"
    assert storage.basename("gs://b/run/x") == "x"


@pytest.mark.parametrize("where", ["local", "ram"])
def test_write_json_atomic(tmp_path, where):
    folder = str(tmp_path) if where == "local" else _ram("json")
    storage.makedirs(folder)
    path = storage.join(folder, "results.json")
    storage.write_json_atomic(path, {"a": 1, "b": [1.5, None]})
    assert storage.read_json(path) == {"a": 1, "b": [1.5, None]}
    storage.write_json_atomic(path, {"z": 2, "a": 0}, indent=1, sort_keys=True)  # replaces it
    assert storage.read_json(path) == {"a": 0, "z": 2}
    assert storage.read_text(path) == json.dumps({"a": 0, "z": 2}, indent=1, sort_keys=True) + "\n"
    assert storage.listdir(folder) == ["results.json"]  # no .tmp left behind


def test_remote_file_operations():
    root = _ram("ops")
    storage.makedirs(storage.join(root, "a", "b"))
    storage.write_text(storage.join(root, "a", "x.txt"), "x")
    storage.write_bytes(storage.join(root, "a", "b", "y.bin"), b"\x00\x01")
    assert storage.exists(root) and storage.isdir(storage.join(root, "a"))
    assert storage.isfile(storage.join(root, "a", "x.txt"))
    assert not storage.isfile(storage.join(root, "a", "b"))
    assert not storage.exists(storage.join(root, "nope"))
    assert storage.listdir(storage.join(root, "a")) == ["b", "x.txt"]
    assert storage.glob(storage.join(root, "a", "*.txt")) == [storage.join(root, "a", "x.txt")]
    assert storage.stat(storage.join(root, "a", "b", "y.bin")).size == 2
    storage.copytree(storage.join(root, "a"), storage.join(root, "copy"))
    assert storage.read_bytes(storage.join(root, "copy", "b", "y.bin")) == b"\x00\x01"
    storage.rename(storage.join(root, "copy", "x.txt"), storage.join(root, "copy", "z.txt"))
    assert storage.listdir(storage.join(root, "copy")) == ["b", "z.txt"]
    with storage.open_file(storage.join(root, "copy", "z.txt")) as f:
        assert f.read() == "x"
    storage.rmtree(storage.join(root, "copy"))
    assert not storage.exists(storage.join(root, "copy", "z.txt"))
    storage.rmtree(storage.join(root, "copy"), ignore_errors=True)  # already gone: no error
    missing = storage.join(root, "missing.json")
    with pytest.raises(FileNotFoundError, match=missing):  # an OSError naming the path
        storage.read_json(missing)


def test_local_file_operations(tmp_path):
    root = str(tmp_path)
    storage.makedirs(storage.join(root, "a", "b"))
    storage.write_text(storage.join(root, "a", "x.txt"), "x")
    storage.copytree(storage.join(root, "a"), storage.join(root, "copy"))
    assert storage.listdir(storage.join(root, "copy")) == ["b", "x.txt"]
    assert storage.glob(storage.join(root, "*", "x.txt")) == [
        storage.join(root, "a", "x.txt"), storage.join(root, "copy", "x.txt")]
    storage.rmtree(storage.join(root, "copy"))
    assert storage.listdir(root) == ["a"]


# --- Writing and reading a dataset on ram:// ----------------------------------------------------

def test_convert_to_ram_writes_the_same_files(pair):
    local, remote = pair
    assert storage.listdir(storage.dirname(remote)) == ["tiny"]  # no temporary sibling left
    local_files, remote_files = _files(local), _files(remote)
    assert sorted(remote_files) == sorted(local_files) == [
        "metadata.json", "test-00000-of-00002.tfrecord", "test-00001-of-00002.tfrecord",
        "train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord",
        "valid-00000-of-00002.tfrecord", "valid-00001-of-00002.tfrecord", "vocab.txt"]
    assert remote_files == local_files  # byte for byte
    assert load_metadata(remote) == load_metadata(local)
    remote_shard = storage.join(remote, "train-00000-of-00002.tfrecord")
    assert sum(1 for _ in tf.data.TFRecordDataset(remote_shard)) == 10


@pytest.mark.parametrize("split, kwargs", [
    ("train", {"seed": 3}),
    ("train", {"seed": 3, "repeat": True, "text_input": "tokens"}),
    ("valid", {}),
    ("test", {"drop_remainder": False}),
])
def test_make_dataset_gives_the_same_batches(pair, split, kwargs):
    local, remote = pair
    take = 8 if kwargs.get("repeat") else None  # 8 batches of 4 span two epochs of 20 clips
    got = _batches(remote, split, 4, take, **kwargs)
    want = _batches(local, split, 4, take, **kwargs)
    _assert_same_batches(got, want)


def test_load_metadata_from_ram(pair):
    _, remote = pair
    meta = load_metadata(remote)
    assert meta["modalities"]["audio"] == {"dim": 4, "seq_len": 8}
    assert [meta["splits"][s]["count"] for s in ("train", "valid", "test")] == list(SIZES)
    assert meta["tokens"]["vocab_file"] == "vocab.txt"
    empty = _ram("empty")
    storage.makedirs(empty)
    with pytest.raises(DataError, match=f"^{empty}/metadata.json: not found"):
        load_metadata(empty)
    storage.write_text(storage.join(empty, "metadata.json"), "{not json")
    with pytest.raises(DataError, match=f"^{empty}/metadata.json: cannot read metadata"):
        load_metadata(empty)
    with pytest.raises(DataError, match=f"^{empty}/sub/metadata.json: not found"):
        make_dataset(storage.join(empty, "sub"), "train", 2)


def test_missing_remote_shard_is_named(tmp_path):
    remote = _ram("d")
    _convert(remote, shards=1, tokenize=False, sizes=(4, 2, 2))
    shard = storage.join(remote, "valid-00000-of-00001.tfrecord")
    storage.remove(shard)
    with pytest.raises(DataError, match=f"^{shard}: shard listed in metadata.json is missing"):
        make_dataset(remote, "valid", 2)
    with pytest.raises(DataError, match=f"^{shard}: cannot read shard \\(.*No such file"):
        integrity.scan_file(shard)  # e.g. deleted between the listing and the scan


def _record_offset(data, index):
    """Byte offset of record `index` of a TFRecord file's bytes."""
    offset = 0
    for _ in range(index):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        offset += 12 + length + 4
    return offset


def _damage(folder, damage):
    """Damages train shard 0 the same way wherever it is (rewriting the file through storage): a
    payload byte of record 2, or the tail of the last record."""
    path = storage.join(folder, "train-00000-of-00002.tfrecord")
    data = bytearray(storage.read_bytes(path))
    if damage == "flip":
        data[_record_offset(bytes(data), 2) + 40] ^= 0xFF  # framing intact, data CRC wrong
    else:
        data = data[:-9]  # the last record loses its tail
    storage.write_bytes(path, bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_integrity_scan_of_ram_matches_local(pair, tmp_path, damage):
    local, remote = pair
    local_copy, remote_copy = str(tmp_path / "tiny"), _ram("tiny")
    storage.copytree(local, local_copy)
    storage.copytree(remote, remote_copy)
    for folder in (local_copy, remote_copy):
        _damage(folder, damage)

    def unrooted(text, root):
        return text.replace(root, "<root>")

    errors = []
    for folder in (local_copy, remote_copy):
        with pytest.raises(DataError, match="skip_corrupt=True") as err:
            make_dataset(folder, "train", 2)
        errors.append(unrooted(str(err.value), folder))
    assert errors[0] == errors[1] and errors[0].startswith("<root>/train-00000-of-00002.tfrecord")

    reports = [scan_shards(folder, "train") for folder in (local_copy, remote_copy)]
    assert [list(r.by_file().values()) for r in reports] == [[(9, 1), (10, 0)]] * 2
    assert [[(s.problems, s.spans) for s in r.shards] for r in reports][0] == \
           [[(s.problems, s.spans) for s in r.shards] for r in reports][1]

    results = []
    for folder in (local_copy, remote_copy):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batches = _batches(folder, "train", 3, shuffle=False, skip_corrupt=True)
        messages = [unrooted(str(w.message), folder) for w in caught
                    if issubclass(w.category, CorruptRecordsWarning)]
        results.append((batches, messages))
    (local_batches, local_messages), (remote_batches, remote_messages) = results
    assert local_messages == remote_messages and len(local_messages) == 1
    assert "skipped 1 of 10 records" in local_messages[0]
    _assert_same_batches(remote_batches, local_batches)
    assert sum(len(label) for _, label in local_batches) == 18  # 19 good clips, full batches of 3


def test_rewritten_remote_shard_is_scanned_again():
    """ram:// has no modification times: the scan cache must not return a stale report."""
    remote = _ram("d")
    _convert(remote, shards=2, tokenize=False)
    assert scan_shards(remote, "train").skipped == 0
    _damage(remote, "flip")
    assert scan_shards(remote, "train").skipped == 1


# --- The writer's guarantees on ram:// -----------------------------------------------------------

def test_existing_output_refused_on_ram(capsys):
    remote = _ram("out")
    _convert(remote, shards=2, tokenize=False, sizes=(4, 2, 2))
    with pytest.raises(DataError, match=f"^{remote} already exists \\(pass --overwrite"):
        _convert(remote, shards=1, tokenize=False, sizes=(4, 2, 2))
    argv = ["--format", "synthetic", "--synthetic_sizes", "4,2,2", "--seq_len", "3",
            "--output", remote]
    with pytest.raises(SystemExit) as exit_info:
        writer.main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (f"error: {remote} already exists "
                                               "(pass --overwrite to replace it)")
    assert writer.main(argv + ["--overwrite", "--shards", "1"]) == 0
    assert f"wrote {remote}" in capsys.readouterr().out
    # The old dataset's files are gone: only the new one's, with metadata.json from the new run.
    assert storage.listdir(remote) == ["metadata.json", "test-00000-of-00001.tfrecord",
                                       "train-00000-of-00001.tfrecord",
                                       "valid-00000-of-00001.tfrecord"]
    assert load_metadata(remote)["seq_len"] == 3
    assert storage.listdir(storage.dirname(remote)) == ["out"]


def test_interrupted_remote_conversion_leaves_nothing(monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer.schema, "write_metadata", boom)
    remote = _ram("out")
    with pytest.raises(KeyboardInterrupt):
        _convert(remote, tokenize=False, sizes=(4, 2, 2))
    assert not storage.exists(remote)
    assert storage.listdir(storage.dirname(remote)) == []


def test_failed_publish_removes_the_partial_output(monkeypatch):
    """A failure while files move into place leaves no folder that looks like a dataset."""
    remote = _ram("out")
    real_rename, moved = storage.rename, []

    def flaky_rename(src, dst, overwrite=False):
        if moved:
            raise OSError(f"{dst}: injected failure")
        moved.append(dst)
        real_rename(src, dst, overwrite)

    monkeypatch.setattr(writer.storage, "rename", flaky_rename)
    with pytest.raises(OSError, match="injected failure"):
        _convert(remote, tokenize=False, sizes=(4, 2, 2))
    assert moved and not storage.exists(remote)
    assert storage.listdir(storage.dirname(remote)) == []


def test_builtin_dataset_on_ram(monkeypatch):
    from msa_xla.data import builtin

    monkeypatch.setattr(builtin.synthetic, "MOSI_SPLIT_SIZES", (6, 3, 3))
    monkeypatch.setattr(builtin.synthetic, "MOSI_DIMS", (5, 4, 3))
    monkeypatch.setattr(builtin, "SEQ_LEN", 4)
    path = _ram(builtin.NAME)
    assert builtin.ensure_builtin_dataset(path) == path
    meta = load_metadata(path)
    assert meta["builtin_version"] == builtin.BUILTIN_VERSION and meta["tokens"]
    stamp = storage.read_bytes(storage.join(path, "metadata.json"))
    monkeypatch.setattr(builtin.writer, "convert", None)  # current: must not be written again
    assert builtin.ensure_builtin_dataset(path) == path
    assert storage.read_bytes(storage.join(path, "metadata.json")) == stamp


# --- predict.py on ram:// ------------------------------------------------------------------------

def _tiny_model(meta):
    import tf_keras as keras

    shapes = [(meta["modalities"][m]["seq_len"], meta["modalities"][m]["dim"])
              for m in schema.MODALITIES]
    features = [keras.Input(shape) for shape in shapes]
    masks = [keras.Input((shape[0],), dtype="bool") for shape in shapes]
    pooled = keras.layers.Concatenate()([keras.layers.GlobalAveragePooling1D()(x)
                                         for x in features])
    return keras.Model(features + masks, keras.layers.Dense(1)(pooled))


def test_predict_reads_and_writes_ram(pair):
    from msa_xla import predict  # defines no absl flags on import (msa_xla.train does)

    local, remote = pair
    model_dir = _ram("run")
    storage.makedirs(model_dir)
    model = _tiny_model(load_metadata(remote))
    model.save(storage.join(model_dir, "best_model.keras"))
    assert predict.find_model_file(model_dir) == storage.join(model_dir, "best_model.keras")
    assert predict.clip_ids(remote, "test") == predict.clip_ids(local, "test")

    assert predict.run(model_dir, remote, "test", batch_size=4) == 0
    csv_path = storage.join(model_dir, "predictions_test.csv")
    lines = storage.read_text(csv_path).splitlines()
    assert lines[0] == "id,prediction,label" and len(lines) == 1 + SIZES[2]
    assert [line.split(",")[0] for line in lines[1:]] == predict.clip_ids(local, "test")
    ids, preds, labels = predict.predict_split(model, local, "test", 4)
    assert [f"{p:.6f}" for p in preds] == [line.split(",")[1] for line in lines[1:]]
