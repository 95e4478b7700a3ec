"""Readers of the feature files researchers already hold, each producing `{split: SplitData}`.

Formats (facts in docs/ARCHITECTURE.md §4):
  mmsa  MMSA pickle (aligned_50.pkl, unaligned_50.pkl, ...): {'train'|'valid'|'test': {'text' (N,T,768),
        'audio' (N,T,D), 'vision' (N,T,D), 'regression_labels' (N,), optional 'id', 'raw_text',
        'audio_lengths', 'vision_lengths', 'text_bert' (N,3,T)}}. 'text_bert' holds BERT WordPiece
        ids, attention mask and segment ids (bert-base-uncased: vocabulary 30522); its ids and mask
        become the token ids and their lengths (what `text_input='tokens'` reads).
  mult  MulT pickle (mosi_data.pkl, ...): {'train'|'valid'|'test': {'text', 'audio', 'vision',
        'labels' (N,1,1), optional 'id'}}.
  csd   a folder with CMU-MultimodalSDK files text.csd, audio.csd, video.csd, labels.csd and an
        optional splits.json {"train": [ids], "valid": [...], "test": [...]}. The SDK's standard
        folds (`standard_train_fold`, ... also accepted as keys) list video ids, while sequences
        aligned to the labels are keyed per clip, `<video id>[<clip index>]`: an id selects the
        entry of that name, or else every clip of that video. A split that selects nothing is an
        error.

True lengths: taken from '<modality>_lengths' when the pickle has them; otherwise a clip's length is
the number of rows up to and including its last row that is not all zeros (padding is assumed at the
end, as MMSA writes it). Readers only reshape; padding, truncation, casting and non-finite repair
happen once, in writer.py, for every format alike. Pickles also report their padded length per
modality (`SplitData.padded_lens`), the writer's default `seq_len`, so a converted MMSA pickle has
the shapes MMSA's own loader yields (tools/bench_peers.py --check-data compares them value for
value).

Pickles are untrusted: they are read with safe_pickle's restricted unpickler (numpy arrays and
plain containers only; any other global stops the read before it is called) unless the caller
passes trust_pickle=True for a file the user vouches for.
"""
import dataclasses
import json
import os

import numpy as np

from msa_xla.data import safe_pickle
from msa_xla.data.schema import DataError
from msa_xla.options import MODALITIES, SPLITS

FORMATS = ("mmsa", "mult", "csd", "synthetic")
BERT_VOCAB_SIZE = 30522  # bert-base-uncased, MMSA's English text_bert
CSD_FILES = {"text": "text.csd", "audio": "audio.csd", "video": "video.csd", "labels": "labels.csd"}
CSD_SPLITS_FILE = "splits.json"
# The CMU-MultimodalSDK's names of the standard folds (mmdatasdk.cmu_mosi.standard_folds).
CSD_FOLD_KEYS = {"train": "standard_train_fold", "valid": "standard_valid_fold",
                 "test": "standard_test_fold"}

_MMSA_LAYOUT = ("MMSA layout: dict with 'train'/'valid'/'test', each with 'text' (N,T,768), "
                "'audio' (N,T,D), 'vision' (N,T,D), 'regression_labels' (N,), optional 'id', "
                "'raw_text', 'audio_lengths', 'vision_lengths'")
_MULT_LAYOUT = ("MulT layout: dict with 'train'/'valid'/'test', each with 'text' (N,T,D), "
                "'audio' (N,T,D), 'vision' (N,T,D), 'labels' (N,1,1), optional 'id'")
_PICKLE_KEYS = {"text": "text", "audio": "audio", "video": "vision"}


@dataclasses.dataclass
class SplitData:
    """One split in memory: per modality a list of (true_len, dim) arrays, labels, ids, raw text.

    Optional: `token_ids` (N, T) int64 text token ids given by the source (MMSA's text_bert) with
    `token_lengths` (N,) and `vocab_size`; `padded_lens` {modality: T}, the source's padded length.
    """
    features: dict
    labels: np.ndarray
    ids: list
    raw_text: list = None
    token_ids: np.ndarray = None
    token_lengths: np.ndarray = None
    vocab_size: int = None
    padded_lens: dict = None

    def __len__(self):
        return len(self.ids)


def read_source(fmt, path, *, split_seed=0, trust_pickle=False):
    """Dispatch on the format name; every error is a DataError with one line for the user.

    trust_pickle: read mmsa/mult pickles with plain pickle.load, which runs any code the file
    carries; only for a file the user vouches for (default: safe_pickle's restricted reader).
    """
    if fmt not in ("mmsa", "mult", "csd"):
        raise DataError(f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
    if not os.path.exists(path):
        raise DataError(f"input not found: {path}")
    if fmt == "csd":
        return read_csd(path, split_seed=split_seed)
    return read_pickle(path, fmt, trust_pickle=trust_pickle)


def _load_pickle(path, trusted=False):
    if not os.path.isfile(path):
        raise DataError(f"{path}: expected a pickle file")
    try:
        try:
            with open(path, "rb") as f:
                return safe_pickle.load(f, trusted=trusted)
        except UnicodeDecodeError:  # Pickles written by Python 2 (some MulT releases).
            with open(path, "rb") as f:
                return safe_pickle.load(f, encoding="latin1", trusted=trusted)
    except safe_pickle.RefusedGlobal as err:
        raise DataError(f"{path}: {err}; nothing in it was run (--trust_pickle reads it with "
                        "plain pickle, which runs any code it carries: only for a file you "
                        "trust)") from None
    except Exception as err:  # pickle raises many types; all mean "not a readable pickle".
        raise DataError(f"{path}: cannot read pickle ({type(err).__name__}: {err})") from None


def _as_text(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.ndim > 0:  # MulT ids: arrays of [video, start, end].
        return "_".join(_as_text(v) for v in value.reshape(-1))
    return str(value.item() if isinstance(value, np.generic) else value)


def _lengths_from_rows(array):
    """Rows up to the last non-all-zero row, per clip: (N,T,D) -> (N,)."""
    nonzero = np.any(array != 0, axis=-1)  # (N, T); NaN and -inf count as non-zero.
    last = array.shape[1] - np.argmax(nonzero[:, ::-1], axis=1)
    return np.where(nonzero.any(axis=1), last, 0)


def _bert_tokens(path, split, text_bert, count):
    """MMSA's text_bert (N, 3, T): ids, attention mask, segment ids -> ids (N, T), lengths (N,)."""
    where = f"{path}: {split}.text_bert"
    array = np.asarray(text_bert)
    if array.ndim != 3 or array.shape[0] != count or array.shape[1] != 3:
        raise DataError(f"{where} has shape {array.shape}, expected ({count}, 3, T): token ids, "
                        "attention mask, segment ids")
    ids, mask = array[:, 0, :], array[:, 1, :]
    if not (np.all(np.isfinite(ids)) and np.all(ids == np.round(ids)) and ids.min(initial=0) >= 0):
        raise DataError(f"{where}: token ids must be non-negative integers")
    lengths = np.sum(mask == 1, axis=1).astype(np.int64)
    prefix = np.arange(array.shape[2])[None, :] < lengths[:, None]
    if not np.array_equal(mask, prefix.astype(mask.dtype)):
        bad = int(np.argmax(np.any(mask != prefix, axis=1)))
        raise DataError(f"{where}: the attention mask of clip {bad} is not 1s followed by 0s")
    return ids.astype(np.int64), lengths


def read_pickle(path, fmt, *, trust_pickle=False):
    """MMSA or MulT pickle -> {split: SplitData} (restricted unpickling unless trust_pickle)."""
    layout = _MMSA_LAYOUT if fmt == "mmsa" else _MULT_LAYOUT
    label_key = "regression_labels" if fmt == "mmsa" else "labels"
    data = _load_pickle(path, trusted=trust_pickle)
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level is {type(data).__name__}, expected {layout}")
    out = {}
    for split in SPLITS:
        if split not in data:
            raise DataError(f"{path}: missing split key '{split}' (expected {layout})")
        part = data[split]
        for key in (*_PICKLE_KEYS.values(), label_key):
            if not isinstance(part, dict) or key not in part:
                raise DataError(f"{path}: split '{split}' lacks key '{key}' (expected {layout})")
        features, padded_lens = {}, {}
        count = None
        for name, key in _PICKLE_KEYS.items():
            array = np.asarray(part[key])
            if array.ndim != 3:
                raise DataError(f"{path}: {split}.{key} has shape {array.shape}, expected (N, T, D)")
            if count is not None and array.shape[0] != count:
                raise DataError(f"{path}: {split}.{key} has {array.shape[0]} clips, "
                                f"{split}.text has {count}")
            count = array.shape[0]
            lengths = part.get(f"{key}_lengths")
            if lengths is None:
                lengths = _lengths_from_rows(array)
            lengths = np.asarray(lengths).reshape(-1).astype(np.int64)
            if lengths.shape[0] != count or lengths.min(initial=0) < 0 \
                    or lengths.max(initial=0) > array.shape[1]:
                raise DataError(f"{path}: {split}.{key}_lengths must be {count} values in "
                                f"[0, {array.shape[1]}]")
            features[name] = [array[i, :lengths[i]] for i in range(count)]
            padded_lens[name] = int(array.shape[1])
        labels = np.asarray(part[label_key], dtype=np.float64)
        if labels.size != count:
            raise DataError(f"{path}: {split}.{label_key} has shape {labels.shape}, expected one "
                            f"value per clip ({count},) or ({count}, 1, 1)")
        ids = part.get("id")
        ids = ([_as_text(v) for v in ids] if ids is not None
               else [f"{split}_{i:06d}" for i in range(count)])
        raw = part.get("raw_text")
        raw = [_as_text(v) for v in raw] if raw is not None else None
        out[split] = SplitData(features, labels.reshape(-1), ids, raw, padded_lens=padded_lens)
        if fmt == "mmsa" and part.get("text_bert") is not None:
            token_ids, token_lengths = _bert_tokens(path, split, part["text_bert"], count)
            out[split].token_ids, out[split].token_lengths = token_ids, token_lengths
            out[split].vocab_size = max(BERT_VOCAB_SIZE, int(token_ids.max(initial=0)) + 1)
    with_tokens = [s for s in SPLITS if out[s].token_ids is not None]
    if with_tokens and len(with_tokens) != len(SPLITS):
        missing = sorted(set(SPLITS) - set(with_tokens))
        raise DataError(f"{path}: 'text_bert' in {', '.join(with_tokens)} but not in "
                        f"{', '.join(missing)}: every split needs it, or none")
    return out


def _read_csd(path):
    """One .csd file -> {entry_id: features array}."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            roots = list(f.keys())
            if len(roots) != 1 or "data" not in f[roots[0]]:
                raise DataError(f"{path}: expected one root group holding 'data' "
                                f"(/<root>/data/<id>/features), found {roots}")
            data = f[roots[0]]["data"]
            return {key: np.asarray(data[key]["features"]) for key in data}
    except (OSError, KeyError) as err:
        raise DataError(f"{path}: cannot read .csd ({err})") from None


def _seeded_split(ids, seed):
    """70/10/20 split by video (the part of the id before '['), so no video spans two splits."""
    videos = sorted({_video_of(i) for i in ids})
    np.random.default_rng(seed).shuffle(videos)
    n_train, n_valid = round(0.7 * len(videos)), round(0.1 * len(videos))
    bounds = {"train": set(videos[:n_train]), "valid": set(videos[n_train:n_train + n_valid]),
              "test": set(videos[n_train + n_valid:])}
    return {s: [i for i in ids if _video_of(i) in bounds[s]] for s in SPLITS}


def _video_of(entry_id):
    """'videoid[3]' -> 'videoid' (the SDK's clip keys); an id without '[' is its own video."""
    return entry_id.split("[")[0]


def _clip_order(entry_id):
    """Sort key: by video, then by clip index as a number (vid[2] before vid[10])."""
    video, _, rest = entry_id.partition("[")
    index = rest.rstrip("]")
    return (video, 0, int(index), "") if index.isdigit() else (video, 1, 0, rest)


def _listed_splits(split_path, available):
    """splits.json -> {split: [entry ids]}: an id names an entry, or else a video's clips."""
    try:
        with open(split_path, encoding="utf-8") as f:
            listed = json.load(f)
        listed = {s: listed[s] if s in listed else listed[CSD_FOLD_KEYS[s]] for s in SPLITS}
        listed = {s: [str(i) for i in ids] for s, ids in listed.items()}
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{split_path}: expected {{\"train\": [ids], \"valid\": [...], "
                        f"\"test\": [...]}} or the SDK's standard_train_fold / "
                        f"standard_valid_fold / standard_test_fold ({type(err).__name__}: "
                        f"{err})") from None
    entries = set(available)
    clips_of_video = {}
    for entry in available:  # already in clip order
        clips_of_video.setdefault(_video_of(entry), []).append(entry)
    out = {}
    for split, ids in listed.items():
        selected = []
        for i in ids:
            selected.extend([i] if i in entries else clips_of_video.get(i, []))
        out[split] = list(dict.fromkeys(selected))  # once each, in the listed order
        if not out[split]:
            example = f" (entries look like '{available[0]}')" if available else ""
            raise DataError(f"{split_path}: split '{split}' selects no clip: none of its "
                            f"{len(ids)} ids is an entry of all four .csd files or a video "
                            f"with clips there{example}")
    return out


def read_csd(folder, *, split_seed=0):
    """Folder of CMU-MultimodalSDK files -> {split: SplitData}; one .csd entry is one clip."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: --format csd expects a folder holding "
                        f"{', '.join(CSD_FILES.values())} (+ optional {CSD_SPLITS_FILE})")
    tables = {}
    for name, file in CSD_FILES.items():
        path = os.path.join(folder, file)
        if not os.path.isfile(path):
            raise DataError(f"{path}: not found (csd folder needs {', '.join(CSD_FILES.values())})")
        tables[name] = _read_csd(path)
    labels_path = os.path.join(folder, CSD_FILES["labels"])
    for key, value in tables["labels"].items():
        if value.size != 1:
            raise DataError(f"{labels_path}: entry '{key}' holds {value.shape} values, expected one "
                            "label per entry (align the SDK dataset to the labels first)")
    common = sorted(set.intersection(*(set(t) for t in tables.values())), key=_clip_order)
    split_path = os.path.join(folder, CSD_SPLITS_FILE)
    if os.path.isfile(split_path):
        split_ids = _listed_splits(split_path, common)
    else:
        split_ids = _seeded_split(common, split_seed)
        for split, ids in split_ids.items():
            if not ids:
                raise DataError(f"{folder}: the split by video drawn with --split_seed "
                                f"{split_seed} leaves split '{split}' empty ({len(common)} clips "
                                f"in all four .csd files); add {CSD_SPLITS_FILE}")
    out = {}
    for split, ids in split_ids.items():
        features = {m: [tables[m][i] for i in ids] for m in MODALITIES}
        labels = np.array([float(tables["labels"][i].reshape(-1)[0]) for i in ids], np.float64)
        out[split] = SplitData(features, labels, ids, None)
    return out
