"""Round trips source -> writer -> make_dataset for each format, with inputs written here."""
import json
import os
import pickle

import h5py
import numpy as np
import pytest

from msa_xla.data import DataError, load_metadata, make_dataset, sources, writer

SPLIT_SIZES = {"train": 7, "valid": 3, "test": 4}


def _clips(rng, n, max_len, dim, lengths=None):
    """(N, max_len, dim) float64 zero-padded at the end, and the lengths used."""
    if lengths is None:
        lengths = rng.integers(1, max_len + 1, size=n)
    array = np.zeros((n, max_len, dim))
    for i, length in enumerate(lengths):
        array[i, :length] = rng.standard_normal((length, dim)) + 0.1  # never an all-zero row
    return array, np.asarray(lengths)


def mmsa_dict(seed=0, sizes=SPLIT_SIZES, dims=(8, 5, 6), seq=(6, 9, 11)):
    """An MMSA-layout dict: unaligned audio/vision with *_lengths, text with trailing zero rows."""
    rng = np.random.default_rng(seed)
    data = {}
    for split, n in sizes.items():
        text, _ = _clips(rng, n, seq[0], dims[0])
        audio, audio_len = _clips(rng, n, seq[1], dims[1])
        vision, vision_len = _clips(rng, n, seq[2], dims[2])
        data[split] = {
            "raw_text": np.array([f"clip {split} {i} was good" for i in range(n)], dtype=object),
            "text": text, "audio": audio, "vision": vision,
            "audio_lengths": list(audio_len), "vision_lengths": list(vision_len),
            "id": [f"vid{i % 3}$_${i}" for i in range(n)],
            "regression_labels": rng.uniform(-3, 3, n).round(1).astype(np.float32),
        }
    return data


def with_text_bert(data, seed=0):
    """Adds MMSA's text_bert (N, 3, T): [CLS] ids [SEP], 0-padded; mask; segment ids."""
    rng = np.random.default_rng(seed)
    for part in data.values():
        n, length = part["text"].shape[:2]
        lengths = rng.integers(2, length + 1, n)
        ids, mask = np.zeros((n, length)), np.zeros((n, length))
        for i, size in enumerate(lengths):
            ids[i, :size] = rng.integers(1000, 30522, size)
            ids[i, 0], ids[i, size - 1] = 101, 102
            mask[i, :size] = 1
        part["text_bert"] = np.stack([ids, mask, np.zeros((n, length))], axis=1)
    return data


def mult_dict(seed=1, sizes=SPLIT_SIZES, dims=(7, 4, 3), seq=5):
    rng = np.random.default_rng(seed)
    data = {}
    for split, n in sizes.items():
        data[split] = {
            "text": _clips(rng, n, seq, dims[0])[0].astype(np.float32),
            "audio": _clips(rng, n, seq, dims[1])[0].astype(np.float32),
            "vision": _clips(rng, n, seq, dims[2])[0].astype(np.float32),
            "labels": rng.uniform(-3, 3, (n, 1, 1)).astype(np.float32),
            "id": np.array([[f"v{i}".encode(), b"0", b"1"] for i in range(n)]),
        }
    return data


def write_pickle(path, data):
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return str(path)


def write_csd(path, root, entries):
    with h5py.File(path, "w") as f:
        group = f.create_group(root)
        for key, features in entries.items():
            entry = group.create_group(f"data/{key}")
            entry["features"] = features
            entry["intervals"] = np.stack([np.arange(len(features)), np.arange(len(features)) + 1], 1)
        group.create_group("metadata")["root name"] = root


def csd_folder(folder, n=12, dims=(6, 4, 3), with_splits=True, seed=2):
    rng = np.random.default_rng(seed)
    ids = [f"video{i // 2}[{i % 2}]" for i in range(n)]
    for name, dim in zip(("text", "audio", "video"), dims):
        write_csd(os.path.join(folder, f"{name}.csd"), name,
                  {k: rng.standard_normal((int(rng.integers(1, 9)), dim)) for k in ids})
    write_csd(os.path.join(folder, "labels.csd"), "labels",
              {k: rng.uniform(-3, 3, (1, 1)) for k in ids})
    if with_splits:
        with open(os.path.join(folder, "splits.json"), "w") as f:
            json.dump({"train": ids[:6], "valid": ids[6:8] + ["missing[0]"], "test": ids[8:]}, f)
    return str(folder)


def read_all(data_dir, split):
    """Whole split as numpy arrays, in source order."""
    count = load_metadata(data_dir)["splits"][split]["count"]
    ds = make_dataset(data_dir, split, count, shuffle=False)
    (inputs, label), = list(ds)
    return [x.numpy() for x in inputs], label.numpy()


def expected(rows, seq_len):
    """Source rows after the writer's float32 cast, repair, truncation and padding."""
    with np.errstate(over="ignore"):
        kept = np.asarray(rows, np.float64)[:seq_len].astype(np.float32)
    kept[~np.isfinite(kept)] = 0
    out = np.zeros((seq_len, np.shape(rows)[1]), np.float32)
    out[:len(kept)] = kept
    return out, len(kept)


def check_round_trip(splits, out_dir):
    meta = load_metadata(out_dir)
    for split, data in splits.items():
        inputs, label = read_all(out_dir, split)
        np.testing.assert_allclose(label[:, 0], np.asarray(data.labels, np.float32))
        for m, name in enumerate(("text", "audio", "video")):
            seq_len = meta["modalities"][name]["seq_len"]
            for i, rows in enumerate(data.features[name]):
                want, length = expected(rows, seq_len)
                np.testing.assert_array_equal(inputs[m][i], want)
                np.testing.assert_array_equal(inputs[3 + m][i], np.arange(seq_len) < length)
    return meta


def test_mmsa_round_trip_unaligned_with_inf_audio(tmp_path):
    data = mmsa_dict()
    # Two -inf inside valid audio rows (counted and repaired), one in padding (dropped, not counted),
    # one float64 overflow on the float32 cast in vision.
    data["train"]["audio"][0, 0, 1] = -np.inf
    data["train"]["audio"][1, 0, 2] = -np.inf
    data["train"]["audio_lengths"][2] = 5
    data["train"]["audio"][2, 6, 0] = -np.inf
    data["test"]["vision"][0, 0, 0] = 1e300
    path = write_pickle(tmp_path / "unaligned.pkl", data)
    splits = sources.read_source("mmsa", path)
    # Lengths absent for text: rows up to the last non-zero row.
    assert [len(r) for r in splits["train"].features["audio"]] == data["train"]["audio_lengths"]
    out = tmp_path / "out"
    writer.convert(splits, out, source_format="mmsa", source_path=path, seq_len=(6, 7, 11),
                   shards=2, log=lambda line: None)
    meta = check_round_trip(splits, str(out))
    assert meta["splits"]["train"]["nonfinite_repaired"] == {"text": 0, "audio": 2, "video": 0}
    assert meta["splits"]["test"]["nonfinite_repaired"] == {"text": 0, "audio": 0, "video": 1}
    truncated = sum(int(n > 7) for n in data["train"]["audio_lengths"])
    assert meta["splits"]["train"]["truncated"]["audio"] == truncated
    assert meta["seq_len"] == [6, 7, 11] and meta["modalities"]["audio"] == {"dim": 5, "seq_len": 7}
    assert len(meta["splits"]["train"]["shards"]) == 2


def test_mult_round_trip_with_n11_labels_and_array_ids(tmp_path):
    path = write_pickle(tmp_path / "mosi_data.pkl", mult_dict())
    splits = sources.read_source("mult", path)
    assert splits["train"].ids[0] == "v0_0_1"
    assert splits["train"].labels.shape == (7,)
    out = tmp_path / "out"
    writer.convert(splits, out, source_format="mult", source_path=path, log=lambda line: None)
    meta = check_round_trip(splits, str(out))
    assert meta["seq_len"] == 5  # the source's own longest clip


def test_csd_round_trip_with_split_file(tmp_path):
    folder = csd_folder(tmp_path)
    splits = sources.read_source("csd", folder)
    assert {s: len(d) for s, d in splits.items()} == {"train": 6, "valid": 2, "test": 4}
    out = tmp_path / "out"
    writer.convert(splits, out, source_format="csd", source_path=folder, seq_len=5,
                   log=lambda line: None)
    check_round_trip(splits, str(out))


def test_csd_seeded_split_keeps_videos_together(tmp_path):
    folder = csd_folder(tmp_path, n=40, with_splits=False)
    splits = sources.read_source("csd", folder, split_seed=3)
    videos = [{i.split("[")[0] for i in splits[s].ids} for s in ("train", "valid", "test")]
    assert sum(len(d) for d in splits.values()) == 40
    assert not (videos[0] & videos[1] or videos[0] & videos[2] or videos[1] & videos[2])
    assert splits["train"].ids == sources.read_source("csd", folder, split_seed=3)["train"].ids


@pytest.mark.parametrize("breakage, message", [
    (lambda d: d["valid"].pop("vision"), "split 'valid' lacks key 'vision' (expected MMSA layout"),
    (lambda d: d.pop("test"), "missing split key 'test'"),
    (lambda d: d["train"].update(audio=np.zeros((7, 9))), "train.audio has shape (7, 9)"),
])
def test_bad_mmsa_pickles_name_the_problem(tmp_path, breakage, message):
    data = mmsa_dict()
    breakage(data)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sources.read_source("mmsa", write_pickle(tmp_path / "x.pkl", data))


def test_csd_label_entry_with_many_values_is_refused(tmp_path):
    folder = csd_folder(tmp_path)
    write_csd(os.path.join(folder, "labels.csd"), "labels", {"video0[0]": np.zeros((3, 1))})
    with pytest.raises(DataError, match="expected one label per entry"):
        sources.read_source("csd", folder)
