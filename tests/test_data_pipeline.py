"""make_dataset: static shapes and dtypes, masks from lengths, sharding, tokens, damaged shards; and
the synthetic label is learnable; and the built-in dataset is created once."""
import os

import numpy as np
import pytest
import tensorflow as tf

from msa_xla.data import (
    DataError,
    builtin,
    ensure_builtin_dataset,
    load_metadata,
    make_dataset,
    synthetic,
    writer,
)

SIZES = (40, 12, 18)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "synth"
    splits = synthetic.generate(SIZES, seq_len=(8, 12, 16), dims=(6, 5, 4), seed=3)
    writer.convert(splits, out, source_format="synthetic", source_path="-", shards=3,
                   tokenize=True, log=lambda line: None)
    return str(out)


class _Context:  # The two attributes make_dataset reads from tf.distribute.InputContext.
    def __init__(self, n, k):
        self.num_input_pipelines, self.input_pipeline_id = n, k


def test_element_spec_is_static_with_expected_dtypes(data_dir):
    ds = make_dataset(data_dir, "train", 8, seed=1)
    (inputs, label) = ds.element_spec
    assert [tuple(s.shape) for s in inputs] == [(8, 8, 6), (8, 12, 5), (8, 16, 4),
                                                (8, 8), (8, 12), (8, 16)]
    assert [s.dtype for s in inputs] == [tf.float32] * 3 + [tf.bool] * 3
    assert tuple(label.shape) == (8, 1) and label.dtype == tf.float32
    assert len(list(ds)) == SIZES[0] // 8  # drop_remainder


def test_masks_match_lengths_and_padding_is_zero(data_dir):
    (inputs, label), = list(make_dataset(data_dir, "test", SIZES[2], shuffle=False))
    split = synthetic.generate(SIZES, seq_len=(8, 12, 16), dims=(6, 5, 4), seed=3)["test"]
    np.testing.assert_allclose(label.numpy()[:, 0], split.labels.astype(np.float32))
    for m, name in enumerate(("text", "audio", "video")):
        lengths = inputs[3 + m].numpy().sum(axis=1)
        assert lengths.tolist() == [len(r) for r in split.features[name]]
        padding = ~inputs[3 + m].numpy()
        assert np.all(inputs[m].numpy()[padding] == 0)


def test_partial_batch_and_repeat(data_dir):
    batches = list(make_dataset(data_dir, "valid", 5, drop_remainder=False))
    assert [b[1].shape[0] for b in batches] == [5, 5, 2]
    assert make_dataset(data_dir, "valid", 5, drop_remainder=False).element_spec[1].shape[0] is None
    repeated = make_dataset(data_dir, "valid", 5, repeat=True).take(7)
    assert len(list(repeated)) == 7


def test_shuffle_is_seeded_and_covers_the_split(data_dir):
    def labels(seed):
        ds = make_dataset(data_dir, "train", 4, seed=seed)
        return np.concatenate([y.numpy()[:, 0] for _, y in ds])

    first, again = labels(7), labels(7)
    np.testing.assert_array_equal(first, again)
    plain = np.concatenate([y.numpy()[:, 0] for _, y in make_dataset(data_dir, "train", 4,
                                                                     shuffle=False)])
    assert not np.array_equal(first, plain) and np.allclose(np.sort(first), np.sort(plain))


@pytest.mark.parametrize("pipelines", [2, 5])  # fewer pipelines than files, then more
def test_input_context_shards_are_disjoint_and_complete(data_dir, pipelines):
    seen = []
    for k in range(pipelines):
        ds = make_dataset(data_dir, "train", 1, shuffle=False, input_context=_Context(pipelines, k))
        seen.append([float(y.numpy()[0, 0]) for _, y in ds])
    assert sum(len(s) for s in seen) == SIZES[0]
    all_labels = [float(y.numpy()[0, 0]) for _, y in make_dataset(data_dir, "train", 1, shuffle=False)]
    assert sorted(sum(seen, [])) == sorted(all_labels)


def test_tokens_input(data_dir):
    (inputs, _), = list(make_dataset(data_dir, "valid", 4, text_input="tokens").take(1))
    assert inputs[0].dtype == tf.int32 and inputs[0].shape == (4, 8)
    ids, mask = inputs[0].numpy(), inputs[3].numpy()
    assert np.all((ids != 0) == mask)  # ids are 0-padded after the true length
    assert ids.max() < load_metadata(data_dir)["tokens"]["vocab_size"]


def test_tokens_missing_names_the_dir(tmp_path):
    splits = synthetic.generate((4, 4, 4), seq_len=4, dims=(3, 2, 2))
    writer.convert(splits, tmp_path / "d", source_format="synthetic", source_path="-",
                   log=lambda line: None)
    with pytest.raises(DataError, match=f"{tmp_path / 'd'}: text_input='tokens'"):
        make_dataset(tmp_path / "d", "train", 2, text_input="tokens")


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_shard_error_names_the_file(tmp_path, damage):
    splits = synthetic.generate((6, 3, 3), seq_len=4, dims=(3, 2, 2))
    writer.convert(splits, tmp_path / "d", source_format="synthetic", source_path="-",
                   log=lambda line: None)
    path = str(tmp_path / "d" / "train-00000-of-00001.tfrecord")
    data = bytearray(open(path, "rb").read())
    if damage == "truncate":
        data = data[:len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF  # a payload byte: framing intact, record CRC wrong
    open(path, "wb").write(bytes(data))
    with pytest.raises(DataError, match=path):
        make_dataset(tmp_path / "d", "train", 2)


def test_synthetic_label_is_learnable_from_masked_means():
    splits = synthetic.generate((600, 100, 300), seq_len=(20, 30, 40), dims=(30, 12, 10), seed=5)
    train, test = splits["train"], splits["test"]
    assert np.all(np.abs(train.labels) <= 3) and np.any(train.labels == 0)
    assert 0.5 < train.labels.std() < 2.5
    x = np.c_[synthetic.masked_means(train), np.ones(len(train))]
    w = np.linalg.solve(x.T @ x + 1.0 * np.eye(x.shape[1]), x.T @ train.labels)
    pred = np.c_[synthetic.masked_means(test), np.ones(len(test))] @ w
    linear_mae = np.abs(pred - test.labels).mean()
    constant_mae = np.abs(train.labels.mean() - test.labels).mean()
    assert linear_mae < 0.5 * constant_mae, (linear_mae, constant_mae)


def test_builtin_dataset_created_once_and_stale_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("MSA_XLA_DATA_HOME", str(tmp_path))
    stale = tmp_path / builtin.NAME
    stale.mkdir()
    (stale / "metadata.json").write_text("{}")  # e.g. an interrupted copy: must be rebuilt
    path = ensure_builtin_dataset()
    assert path == str(stale)
    meta = load_metadata(path)
    assert {m: (v["dim"], v["seq_len"]) for m, v in meta["modalities"].items()} == {
        "text": (300, 50), "audio": (74, 50), "video": (47, 50)}
    assert [meta["splits"][s]["count"] for s in ("train", "valid", "test")] == [1284, 229, 686]
    stamp = os.stat(os.path.join(path, "metadata.json")).st_mtime_ns
    assert ensure_builtin_dataset() == path
    assert os.stat(os.path.join(path, "metadata.json")).st_mtime_ns == stamp
    assert sorted(os.listdir(tmp_path)) == [builtin.NAME]  # no temp folders left
