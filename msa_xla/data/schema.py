"""The one definition of the TFRecord layout, shared by the writer and the reader.

One `tf.train.Example` per clip. For each modality `m` in `MODALITIES`:

    m            float list, fixed length seq_len[m] * dim[m]  (row-major (T, D), zero-padded)
    m_len        int64, the true number of rows before padding (after truncation)

plus `label` (float), `id` (bytes, the clip id) and, for datasets converted with `--tokenize`,
`text_ids` (int64 list of fixed length tokens.seq_len, 0-padded) and `text_ids_len` (int64).

`metadata.json` beside the shards records the shapes, so the reader builds its parse spec from the
same place the writer took them from: writer and reader cannot drift.

A dataset folder may be local or remote (gs://...): files are read and written through
msa_xla.runtime.storage.
"""
import json
import os

import numpy as np

from msa_xla.errors import UserError
from msa_xla.options import MODALITIES
from msa_xla.runtime import storage

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
LABEL_KEY = "label"
ID_KEY = "id"
TOKENS_KEY = "text_ids"


class DataError(UserError):
    """Bad input data or a bad dataset folder; the message is one line meant for the user."""


def length_key(name):
    """Name of the int feature holding the true length of `name` (a modality or `text_ids`)."""
    return f"{name}_len"


def shard_filename(split, index, num_shards):
    return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


def feature_spec(metadata, *, modalities=MODALITIES, tokens=False):
    """`tf.io.parse_example` spec for a dataset described by `metadata` (see `build_metadata`)."""
    import tensorflow as tf  # Imported lazily: the writer's error paths need no TF.

    spec = {
        LABEL_KEY: tf.io.FixedLenFeature([], tf.float32),
        ID_KEY: tf.io.FixedLenFeature([], tf.string),
    }
    for name in modalities:
        info = metadata["modalities"][name]
        spec[name] = tf.io.FixedLenFeature([info["seq_len"] * info["dim"]], tf.float32)
        spec[length_key(name)] = tf.io.FixedLenFeature([], tf.int64)
    if tokens:
        spec[TOKENS_KEY] = tf.io.FixedLenFeature([metadata["tokens"]["seq_len"]], tf.int64)
        spec[length_key(TOKENS_KEY)] = tf.io.FixedLenFeature([], tf.int64)
    return spec


# --- Serialisation ---------------------------------------------------------------------------
# Why hand-written protobuf: building `tf.train.FloatList(value=array)` costs ~3 ms a clip (0.8 ms
# via .tolist()), which makes converting MOSEI or generating the built-in dataset slow. The Example
# wire format is tiny and stable, so we emit it directly (~20 us a clip). tests/test_data_schema.py
# checks the bytes parse to the same message as protobuf's own serializer.

def _varint(value):
    value &= (1 << 64) - 1  # int64 wire format: a negative value is its 64-bit two's complement
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _len_field(tag, payload):
    return tag + _varint(len(payload)) + payload


def _float_feature(values):
    payload = np.ascontiguousarray(values, dtype="<f4").tobytes()
    return _len_field(b"\x12", _len_field(b"\x0a", payload))  # Feature.float_list{value packed}


def _int64_feature(values):
    payload = b"".join(_varint(int(v)) for v in np.asarray(values, np.int64).reshape(-1))
    return _len_field(b"\x1a", _len_field(b"\x0a", payload))  # Feature.int64_list{value packed}


def _bytes_feature(value):
    return _len_field(b"\x0a", _len_field(b"\x0a", value))  # Feature.bytes_list{value}


def _map_entry(key, feature):
    return _len_field(b"\x0a", _len_field(b"\x0a", key.encode()) + _len_field(b"\x12", feature))


def serialize_example(features, lengths, label, clip_id, text_ids=None, text_ids_len=None):
    """Serialise one clip.

    Args:
      features: modality -> float32 array (seq_len, dim), already padded/truncated and finite.
      lengths: modality -> int true length (<= seq_len).
      label: float.
      clip_id: str.
      text_ids: optional int array (tokens seq_len,), 0-padded; `text_ids_len` its true length.
    Returns:
      bytes of a serialized `tf.train.Example`.
    """
    entries = [
        _map_entry(LABEL_KEY, _float_feature([label])),
        _map_entry(ID_KEY, _bytes_feature(str(clip_id).encode("utf-8"))),
    ]
    for name in MODALITIES:
        entries.append(_map_entry(name, _float_feature(features[name])))
        entries.append(_map_entry(length_key(name), _int64_feature([lengths[name]])))
    if text_ids is not None:
        entries.append(_map_entry(TOKENS_KEY, _int64_feature(text_ids)))
        entries.append(_map_entry(length_key(TOKENS_KEY), _int64_feature([text_ids_len])))
    return _len_field(b"\x0a", b"".join(entries))  # Example.features


# --- metadata.json ---------------------------------------------------------------------------

def build_metadata(*, dims, seq_lens, source_format, source_path, splits, tokens=None, extra=None):
    """The metadata dict written beside the shards.

    Keys readers use: `modalities[m] = {"dim", "seq_len"}`, `seq_len` (int when all modalities share
    one length, else [text, audio, video]), `splits[s] = {"count", "shards": [{"file", "count"}],
    "label": {"min", "max", "mean"}, "truncated": {m: n}, "nonfinite_repaired": {m: n}}`, and
    `tokens` (None, or {"vocab_file", "vocab_size", "seq_len", "pad_id", "unk_id"}).
    """
    lens = [int(seq_lens[m]) for m in MODALITIES]
    meta = {
        "format_version": FORMAT_VERSION,
        "source": {"format": source_format, "path": str(source_path)},
        "modalities": {m: {"dim": int(dims[m]), "seq_len": int(seq_lens[m])} for m in MODALITIES},
        "seq_len": lens[0] if len(set(lens)) == 1 else lens,
        "aligned": len(set(lens)) == 1,
        "splits": splits,
        "tokens": tokens,
    }
    if extra:
        meta.update(extra)
    return meta


def write_metadata(meta, folder):
    path = storage.join(os.fspath(folder), METADATA_FILE)
    storage.write_text(path, json.dumps(meta, indent=2) + "\n")
    return path


# Largest float count of one modality per clip that metadata may declare (a 1 GiB record): a
# damaged metadata.json must fail with a message, not make the parser allocate terabytes.
MAX_FEATURE_VALUES = 1 << 28


def _is_int(value, low=0):
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def validate_metadata(meta, path="metadata.json"):
    """Raise DataError naming `path` unless `meta` has the keys and types readers rely on.

    Checks every field a reader uses (types, signs, sizes, split counts = sum of shard counts), so a
    truncated, bit-flipped or hand-edited file fails here with one line, never later with a
    KeyError/TypeError or inside TF.
    """
    def bad(why):
        raise DataError(f"{path}: invalid metadata ({why})")

    if not isinstance(meta, dict):
        bad("not a JSON object")
    version = meta.get("format_version")
    if not _is_int(version) or version != FORMAT_VERSION:
        bad(f"format_version={version!r}, this reader expects {FORMAT_VERSION}; "
            "re-run tools/convert_to_tfrecord.py")
    modalities = meta.get("modalities")
    if not isinstance(modalities, dict):
        bad("'modalities' must be an object")
    for name in MODALITIES:
        info = modalities.get(name)
        if not isinstance(info, dict) or not all(_is_int(info.get(k), 1) for k in ("dim", "seq_len")):
            bad(f"modalities.{name} needs positive int 'dim' and 'seq_len'")
        if info["dim"] * info["seq_len"] > MAX_FEATURE_VALUES:
            bad(f"modalities.{name}: seq_len*dim={info['dim'] * info['seq_len']} is implausibly large")
    splits = meta.get("splits")
    if not isinstance(splits, dict) or not splits:
        bad("no 'splits'")
    for split, info in splits.items():
        if not isinstance(info, dict) or not _is_int(info.get("count")) \
                or not isinstance(info.get("shards"), list):
            bad(f"splits.{split} needs int 'count' >= 0 and list 'shards'")
        for shard in info["shards"]:
            if not isinstance(shard, dict) or not isinstance(shard.get("file"), str) \
                    or not _is_int(shard.get("count")):
                bad(f"splits.{split}.shards entries need 'file' and int 'count' >= 0")
            name = shard["file"]
            if not name or os.path.basename(name) != name or name in (".", ".."):
                bad(f"splits.{split}.shards: {name!r} is not a file name")
        total = sum(shard["count"] for shard in info["shards"])
        if total != info["count"]:
            bad(f"splits.{split}.count={info['count']} but its shards hold {total}")
    tokens = meta.get("tokens")
    if tokens is not None:
        if not isinstance(tokens, dict) or not _is_int(tokens.get("seq_len"), 1) \
                or not _is_int(tokens.get("vocab_size"), 1):
            bad("tokens needs positive int 'seq_len' and 'vocab_size'")
        if tokens["seq_len"] > MAX_FEATURE_VALUES:
            bad(f"tokens.seq_len={tokens['seq_len']} is implausibly large")
    return meta


def load_metadata(data_dir):
    """Read and validate `data_dir/metadata.json` (local or remote); errors name the file."""
    path = storage.join(os.fspath(data_dir), METADATA_FILE)
    try:
        found = storage.isfile(path)
    except OSError as err:  # e.g. no permission on the bucket
        raise DataError(f"{path}: cannot read metadata ({err})") from None
    if not found:
        raise DataError(f"{path}: not found (is {data_dir} a folder written by "
                        "tools/convert_to_tfrecord.py?)")
    try:
        meta = storage.read_json(path)
    except (OSError, ValueError, RecursionError) as err:  # ValueError: JSON and UTF-8 errors
        raise DataError(f"{path}: cannot read metadata ({err})") from None
    return validate_metadata(meta, path)


def _split_info(data_dir, meta, split):
    if split not in meta["splits"]:
        raise DataError(f"{storage.join(os.fspath(data_dir), METADATA_FILE)}: no split {split!r} "
                        f"(has {sorted(meta['splits'])})")
    return meta["splits"][split]


def num_examples(data_dir, split):
    """Number of clips in `split` according to metadata.json."""
    return _split_info(data_dir, load_metadata(data_dir), split)["count"]


def shard_paths(data_dir, meta, split):
    """[(path, record count)] of the shards of `split` that metadata.json lists; DataError naming a
    missing one. Shared by make_dataset and the integrity scan."""
    data_dir = os.fspath(data_dir)
    paths = []
    for shard in _split_info(data_dir, meta, split)["shards"]:
        path = storage.join(data_dir, shard["file"])
        try:
            found = storage.isfile(path)
        except OSError as err:
            raise DataError(f"{path}: cannot read shard ({err})") from None
        if not found:
            raise DataError(f"{path}: shard listed in metadata.json is missing")
        paths.append((path, shard["count"]))
    return paths
