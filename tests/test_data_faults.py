"""Damaged data: a seeded fuzz of shards and metadata.json (truncation, bit flips, shuffled bytes),
hand-made records that do not parse, and non-finite values. Every case must end in a DataError naming
the file, or (skip_corrupt=True) in finite data plus the exact number of skipped records."""
import json
import os
import shutil
import struct
import warnings

import numpy as np
import pytest
import tensorflow as tf

from msa_xla.data import DataError, integrity, make_dataset, schema, synthetic, writer
from msa_xla.data.integrity import CorruptRecordsWarning, scan_shards

SIZES = (8, 3, 3)
SEED = 20240611
SHARD_CASES = 14  # per damage kind
META_CASES = 7  # per damage kind
KINDS = ("truncate", "flip", "shuffle")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "d"
    splits = synthetic.generate(SIZES, seq_len=4, dims=(3, 2, 2), seed=1)
    writer.convert(splits, out, source_format="synthetic", source_path="-", shards=2,
                   log=lambda line: None)
    return out


def _read(data_dir, **kwargs):
    """[(label, text, audio, video)] of the train split, in file order."""
    ds = make_dataset(data_dir, "train", 1, shuffle=False, drop_remainder=False, **kwargs)
    return [(y.numpy()[0, 0],) + tuple(x[m].numpy()[0] for m in range(3)) for x, y in ds]


def _assert_same(items, expected):
    assert len(items) == len(expected)
    for got, want in zip(items, expected):
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)


def _framing(data):
    """[(start, end)] of each record of a TFRecord file's bytes."""
    spans, offset = [], 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        spans.append((offset, offset + 12 + length + 4))
        offset = spans[-1][1]
    return spans


def _damage(rng, data, kind):
    data = bytearray(data)
    if kind == "truncate":
        return bytes(data[:int(rng.integers(0, len(data)))])
    if kind == "flip":
        for _ in range(int(rng.integers(1, 4))):
            data[int(rng.integers(0, len(data)))] ^= 1 << int(rng.integers(0, 8))
        return bytes(data)
    start = int(rng.integers(0, len(data) - 2))
    stop = min(len(data), start + int(rng.integers(2, 33)))
    data[start:stop] = bytes(np.asarray(data[start:stop])[rng.permutation(stop - start)])
    return bytes(data)


def _touched(original, damaged):
    """Indices of the records of `original` that `damaged` lost or changed."""
    spans = _framing(original)
    size = min(len(original), len(damaged))
    changed = np.nonzero(np.frombuffer(original[:size], np.uint8)
                         != np.frombuffer(damaged[:size], np.uint8))[0]
    hit = {i for i, (a, b) in enumerate(spans) if b > len(damaged)}
    for pos in changed:
        hit |= {i for i, (a, b) in enumerate(spans) if a <= pos < b}
    return hit


def _shard_cases():
    rng = np.random.default_rng(SEED)
    return [(kind, int(rng.integers(0, 2)), int(rng.integers(0, 2**31)))
            for kind in KINDS for _ in range(SHARD_CASES)]


def test_shard_fuzz(pristine, tmp_path):
    clean = _read(pristine)
    names = [schema.shard_filename("train", i, 2) for i in range(2)]
    originals = [open(pristine / name, "rb").read() for name in names]
    per_file = [len(_framing(data)) for data in originals]
    outcomes = {"error": 0, "skipped": 0, "unchanged": 0}
    for case, (kind, shard, seed) in enumerate(_shard_cases()):
        folder = tmp_path / f"case{case}"
        shutil.copytree(pristine, folder)
        path = str(folder / names[shard])
        damaged = _damage(np.random.default_rng(seed), originals[shard], kind)
        with open(path, "wb") as f:
            f.write(damaged)
        hit = _touched(originals[shard], damaged)
        where = f"case {case} ({kind}, shard {shard}, seed {seed}, records hit {sorted(hit)})"
        if not hit:  # e.g. bytes shuffled among equal values: the file is intact
            _assert_same(_read(folder), clean)
            outcomes["unchanged"] += 1
            continue
        with pytest.raises(DataError) as err:
            _read(folder)
        assert path in str(err.value), where
        outcomes["error"] += 1

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            items = _read(folder, skip_corrupt=True)
        notes = [str(w.message) for w in caught if issubclass(w.category, CorruptRecordsWarning)]
        assert len(notes) == 1 and notes[0].startswith(
            f"{path}: skipped {len(hit)} of {per_file[shard]} records"), (where, notes)
        report = scan_shards(folder, "train")
        assert report.by_file()[path] == (per_file[shard] - len(hit), len(hit)), where
        assert report.skipped == len(hit), where
        base = sum(per_file[:shard])
        keep = [item for i, item in enumerate(clean) if i - base not in hit or not
                0 <= i - base < per_file[shard]]
        _assert_same(items, keep)  # exactly the undamaged records, bit for bit (so all finite)
        assert all(np.isfinite(a).all() for item in items for a in item)
        outcomes["skipped"] += 1
    assert outcomes["error"] >= 30, outcomes


@pytest.mark.parametrize("kind", KINDS)
def test_metadata_fuzz(pristine, tmp_path, kind):
    clean = _read(pristine)
    original = open(pristine / schema.METADATA_FILE, "rb").read()
    rng = np.random.default_rng([SEED, KINDS.index(kind)])
    errors = 0
    for case in range(META_CASES):
        folder = tmp_path / f"case{case}"
        shutil.copytree(pristine, folder)
        path = str(folder / schema.METADATA_FILE)
        damaged = _damage(rng, original, kind)
        with open(path, "wb") as f:
            f.write(damaged)
        try:
            items = _read(folder)
        except DataError as err:
            assert schema.METADATA_FILE in str(err), (case, str(err))
            errors += 1
            continue
        # Accepted only when the damage hit a field the reader does not use (e.g. label stats).
        _assert_same(items, clean)
        assert json.loads(damaged)["modalities"] == json.loads(original)["modalities"]
    assert errors >= 1


@pytest.mark.parametrize("edit, why", [
    (lambda m: m.pop("modalities"), "modalities"),
    (lambda m: m.update(modalities=[1, 2]), "modalities"),
    (lambda m: m["modalities"]["audio"].update(dim="2"), "modalities.audio"),
    (lambda m: m["modalities"]["audio"].update(dim=True), "modalities.audio"),
    (lambda m: m["modalities"]["video"].update(seq_len=10**12), "implausibly large"),
    (lambda m: m.update(splits=[]), "splits"),
    (lambda m: m["splits"].update(train=[1]), "splits.train"),
    (lambda m: m["splits"]["train"].update(count=-8), "splits.train"),
    (lambda m: m["splits"]["train"].update(count=9), "shards hold 8"),
    (lambda m: m["splits"]["train"]["shards"][0].update(file="../x.tfrecord"), "not a file name"),
    (lambda m: m["splits"]["train"]["shards"].append("x"), "shards entries"),
    (lambda m: m.update(tokens=[1]), "tokens"),
    (lambda m: m.update(tokens={"seq_len": 4}), "tokens"),
    (lambda m: m.update(format_version="1"), "format_version"),
])
def test_metadata_wrong_keys_and_types(pristine, tmp_path, edit, why):
    folder = tmp_path / "d"
    shutil.copytree(pristine, folder)
    meta = json.loads((folder / schema.METADATA_FILE).read_text())
    edit(meta)
    (folder / schema.METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(DataError, match=why) as err:
        make_dataset(folder, "train", 2)
    assert str(err.value).startswith(str(folder / schema.METADATA_FILE))


# --- Hand-made shards --------------------------------------------------------------------------

SEQ, DIMS = 3, {"text": 2, "audio": 2, "video": 1}


def _clip(clip_id, label=0.5, audio_value=1.0, lengths=None, **overrides):
    features = {m: np.full((SEQ, DIMS[m]), 0.25, np.float32) for m in schema.MODALITIES}
    features["audio"][0, 0] = audio_value
    features.update(overrides)
    lengths = lengths or dict.fromkeys(schema.MODALITIES, 2)
    return schema.serialize_example(features, lengths, label, clip_id)


def _hand_made(folder, records):
    os.makedirs(folder)
    name = schema.shard_filename("train", 0, 1)
    with tf.io.TFRecordWriter(str(folder / name)) as out:
        for record in records:
            out.write(record)
    splits = {"train": {"count": len(records), "shards": [{"file": name, "count": len(records)}]}}
    schema.write_metadata(schema.build_metadata(
        dims=DIMS, seq_lens=dict.fromkeys(schema.MODALITIES, SEQ), source_format="test",
        source_path="-", splits=splits), folder)
    return str(folder / name)


@pytest.mark.parametrize("bad", [
    {"audio_value": np.nan}, {"audio_value": -np.inf}, {"label": np.inf},
    {"video": np.full((SEQ, 1), np.nan, np.float32)}])
@pytest.mark.parametrize("skip_corrupt", [False, True])
def test_nonfinite_values_name_the_clip(tmp_path, bad, skip_corrupt):
    path = _hand_made(tmp_path / "d", [_clip("ok_1"), _clip("bad_clip", **bad), _clip("ok_2")])
    with pytest.raises(DataError, match="non-finite") as err:
        make_dataset(tmp_path / "d", "train", 1, skip_corrupt=skip_corrupt)
    assert "bad_clip" in str(err.value) and path in str(err.value) and "record 1" in str(err.value)
    assert "ok_1" not in str(err.value)


def _without(record, key):
    example = tf.train.Example.FromString(record)
    del example.features.feature[key]
    return example.SerializeToString()


@pytest.mark.parametrize("bad_record, why", [
    (lambda: _without(_clip("x"), "video"), "does not parse"),
    (lambda: _without(_clip("x"), "id"), "does not parse"),
    (lambda: _clip("x", audio=np.zeros((SEQ - 1, 2), np.float32)), "does not parse"),
    (lambda: b"\x0a\xff\x01not an example", "does not parse"),
    (lambda: _clip("x", lengths={"text": 2, "audio": SEQ + 1, "video": 2}), "audio_len=4"),
    (lambda: _clip("x", lengths={"text": -1, "audio": 2, "video": 2}), "text_len=-1"),
])
def test_records_that_do_not_parse(tmp_path, bad_record, why):
    path = _hand_made(tmp_path / "d", [_clip("a"), bad_record(), _clip("c", label=-1.0)])
    with pytest.raises(DataError, match=why) as err:
        make_dataset(tmp_path / "d", "train", 1)
    assert str(err.value).startswith(f"{path}: 1 damaged") and "record 1 " in str(err.value)
    with pytest.warns(CorruptRecordsWarning, match=f"{path}: skipped 1 of 3 records"):
        labels = [float(y[0, 0]) for _, y in make_dataset(tmp_path / "d", "train", 1,
                                                           shuffle=False, skip_corrupt=True)]
    assert labels == [0.5, -1.0]


def test_damaged_header_resyncs_to_the_next_record(tmp_path):
    path = _hand_made(tmp_path / "d", [_clip(f"c{i}", label=float(i)) for i in range(5)])
    data = bytearray(open(path, "rb").read())
    second = _framing(bytes(data))[1][0]
    data[second + 2] ^= 0x10  # record 1's length: header CRC fails, its extent is unknown
    open(path, "wb").write(bytes(data))
    with pytest.raises(DataError, match="damaged record header"):
        make_dataset(tmp_path / "d", "train", 1)
    with pytest.warns(CorruptRecordsWarning, match="skipped 1 of 5"):
        ds = make_dataset(tmp_path / "d", "train", 1, shuffle=False, skip_corrupt=True)
    assert [float(y[0, 0]) for _, y in ds] == [0.0, 2.0, 3.0, 4.0]


def test_everything_lost_is_an_error(tmp_path):
    path = _hand_made(tmp_path / "d", [_clip("a"), _clip("b")])
    data = open(path, "rb").read()
    open(path, "wb").write(data[:10])
    with pytest.warns(CorruptRecordsWarning, match="skipped 2 of 2 records.*10 stray bytes"):
        with pytest.raises(DataError, match=f"{path}: no usable records"):
            make_dataset(tmp_path / "d", "train", 1, skip_corrupt=True)


def test_crc_and_cache(tmp_path):
    assert integrity.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    path = _hand_made(tmp_path / "d", [_clip("a"), _clip("b")])
    first = scan_shards(tmp_path / "d", "train")
    assert scan_shards(tmp_path / "d", "train").shards[0] is first.shards[0]  # cached
    os.utime(path, ns=(1, 1))  # a changed file (mtime) is scanned again
    again = scan_shards(tmp_path / "d", "train")
    assert again.shards[0] is not first.shards[0] and again.by_file() == {path: (2, 0)}
