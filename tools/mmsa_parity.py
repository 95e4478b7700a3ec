#!/usr/bin/env python
"""Does `--format mmsa` yield what MMSA's own `MMDataLoader` yields for the same pickle?

    python tools/mmsa_parity.py aligned_50.pkl       # or: python tools/bench_peers.py --check-data
    # needs the optional extra: pip install -e '.[peers]'

The pickle is converted as `tools/convert_to_tfrecord.py --format mmsa` would (default flags,
one shard, into a temporary folder) and read back with `make_dataset` (+ the clip ids of
`msa_xla.predict.clip_ids`). MMSA's loader is run on the same file through its own code,
`MMSA.data_loader.MMDataLoader` (unaligned when every split has `audio_lengths` and
`vision_lengths`, as MMSA's MulT config reads MOSI; aligned otherwise), and every batch it yields
is put back in place by its `index`. Then, per split and clip, value for value:

- text, audio, vision features (MMSA: float32 casts of the padded arrays with audio -inf set to
  0; msa_xla: the same after its float32 cast, repair and zero padding);
- audio and vision lengths (what MMSA yields for unaligned data) against msa_xla's masks;
- labels (`regression_labels` as float32) and ids;
- with `text_bert` in the pickle, MMSA's `use_bert` text (ids, attention mask) against msa_xla's
  token ids and token mask (what `--text_input=tokens` trains on).

Prints one line per split and field that differs, with the count and the first clip, and exits
1 when anything differs (0 when all agree). Where they cannot agree: MMSA passes NaN, +inf and
non-audio -inf on to the model, and inf from a float64 value too large for float32; msa_xla
repairs all of those to 0 (counted in metadata.json), and such a file is reported as different.
"""
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_DIR)

import numpy as np  # noqa: E402

from msa_xla import cli  # noqa: E402
from msa_xla.options import SPLITS  # noqa: E402


def mmsa_view(path, use_bert, aligned):
    """{split: {field: array (N, ...)}} exactly as MMSA's MMDataLoader yields the clips."""
    try:
        from easydict import EasyDict
        from MMSA.data_loader import MMDataLoader
    except ImportError as err:
        sys.exit(f"error: {err.name} is not installed: pip install -e '.[peers]'")
    args = EasyDict(dataset_name="mosi", featurePath=path, custom_feature="", feature_T="",
                    feature_A="", feature_V="", use_bert=use_bert, need_data_aligned=aligned,
                    need_normalized=False, data_missing=False, feature_dims=[0, 0, 0],
                    batch_size=64, seq_lens=[0, 0, 0], train_mode="regression")
    loaders = MMDataLoader(args, num_workers=0)
    out = {}
    for split in SPLITS:
        count = len(loaders[split].dataset)
        fields = {}
        for batch in loaders[split]:
            index = batch["index"].numpy()
            values = {"text": batch["text"], "audio": batch["audio"], "vision": batch["vision"],
                      "label": batch["labels"]["M"].reshape(-1)}
            if not aligned:
                values["audio_lengths"] = batch["audio_lengths"]
                values["vision_lengths"] = batch["vision_lengths"]
            for key, value in values.items():
                value = np.asarray(value)
                if key not in fields:
                    fields[key] = np.zeros((count,) + value.shape[1:], value.dtype)
                fields[key][index] = value
            ids = fields.setdefault("id", [None] * count)
            for i, clip in zip(index, batch["id"]):
                ids[i] = str(clip)
        out[split] = fields
    return out


def msa_xla_view(path, folder):
    """{split: {field: array}} of `--format mmsa` read back through make_dataset."""
    from msa_xla.data import load_metadata, make_dataset, sources, writer
    from msa_xla.predict import clip_ids

    splits = sources.read_source("mmsa", path)
    writer.convert(splits, folder, source_format="mmsa", source_path=path, log=lambda line: None)
    meta = load_metadata(folder)
    out = {}
    for split in SPLITS:
        count = meta["splits"][split]["count"]
        (inputs, label), = list(make_dataset(folder, split, count, shuffle=False))
        text, audio, video, text_mask, audio_mask, video_mask = (x.numpy() for x in inputs)
        fields = {"text": text, "audio": audio, "vision": video, "label": label.numpy()[:, 0],
                  "audio_lengths": audio_mask.sum(axis=1), "vision_lengths": video_mask.sum(axis=1),
                  "id": clip_ids(folder, split)}
        if meta.get("tokens"):
            (tokens, _), = list(make_dataset(folder, split, count, shuffle=False,
                                             text_input="tokens"))
            fields["token_ids"] = tokens[0].numpy()
            fields["token_mask"] = tokens[3].numpy()
        out[split] = fields
    return out, meta


def _first_difference(want, got):
    """(count of clips that differ, first such clip index) for arrays (N, ...) or lists."""
    if isinstance(want, list):
        bad = [i for i, (a, b) in enumerate(zip(want, got)) if a != b]
        return len(bad), (bad[0] if bad else None)
    want, got = np.asarray(want), np.asarray(got)
    if want.shape != got.shape:
        return len(want), f"shapes differ: MMSA {want.shape}, msa_xla {got.shape}"
    same = (want == got) | (np.isnan(want) & np.isnan(got)) if want.dtype.kind == "f" \
        else want == got
    bad = ~same.reshape(len(want), -1).all(axis=1)
    return int(bad.sum()), (int(np.argmax(bad)) if bad.any() else None)


def compare(theirs, ours, fields):
    """Lines naming each (split, field) that differs; empty when MMSA and msa_xla agree."""
    problems = []
    for split in SPLITS:
        if len(theirs[split]["id"]) != len(ours[split]["id"]):
            problems.append(f"{split}: MMSA yields {len(theirs[split]['id'])} clips, msa_xla "
                            f"{len(ours[split]['id'])}")
            continue
        for mmsa_field, ours_field in fields:
            if mmsa_field not in theirs[split]:
                continue
            want, got = theirs[split][mmsa_field], ours[split][ours_field]
            count, first = _first_difference(want, got)
            if count:
                where = first if isinstance(first, str) else \
                    f"first at clip {first} ('{ours[split]['id'][first]}')"
                problems.append(f"{split}.{mmsa_field}: {count} clips differ, {where}")
    return problems


def check_data(path, log=print):
    """Compares the two views of the pickle at `path`; returns the exit code (0 = identical)."""
    from msa_xla.data import DataError, safe_pickle

    try:
        with open(path, "rb") as f:
            data = safe_pickle.load(f)
        unaligned = all("audio_lengths" in data[s] and "vision_lengths" in data[s]
                        for s in SPLITS)
        has_bert = all(data[s].get("text_bert") is not None for s in SPLITS)
        with tempfile.TemporaryDirectory() as tmp:
            ours, meta = msa_xla_view(path, os.path.join(tmp, "converted"))
    except (DataError, OSError, KeyError, TypeError) as err:
        return cli.report_error(f"{path}: {err}")
    log(f"{path}: {'unaligned' if unaligned else 'aligned'}, text_bert "
        f"{'present' if has_bert else 'absent'}; msa_xla shapes "
        + ", ".join(f"{m} {v['seq_len']}x{v['dim']}" for m, v in meta["modalities"].items()))
    fields = [("text", "text"), ("audio", "audio"), ("vision", "vision"), ("label", "label"),
              ("id", "id"), ("audio_lengths", "audio_lengths"),
              ("vision_lengths", "vision_lengths")]
    problems = compare(mmsa_view(path, use_bert=False, aligned=not unaligned), ours, fields)
    checked = [f for f, _ in fields if unaligned or not f.endswith("_lengths")]
    if has_bert:
        bert = mmsa_view(path, use_bert=True, aligned=not unaligned)
        for split in SPLITS:
            bert[split]["token_ids"] = bert[split]["text"][:, 0, :].astype(np.int64)
            bert[split]["token_mask"] = bert[split]["text"][:, 1, :] == 1
        problems += compare(bert, ours, [("token_ids", "token_ids"),
                                         ("token_mask", "token_mask")])
        checked += ["text_bert ids", "text_bert mask"]
    counts = "/".join(str(len(ours[s]["id"])) for s in SPLITS)
    for line in problems:
        print(f"DIFFERENT {line}")
    print(f"check-data: {'DIFFERENT' if problems else 'identical'} ({counts} clips; compared "
          f"{', '.join(checked)})")
    return 1 if problems else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.split("\n\n")[1])
    sys.exit(check_data(sys.argv[1]))
