"""Conversion of in-memory splits (see sources.py) into sharded, fixed-shape TFRecords.

Steps, identical for every source format:
  1. validate: no empty split, one feature dim per modality across all clips and splits, finite labels;
  2. per clip and modality: cast to float32, keep the first `seq_len` rows (counting truncated clips),
     count non-finite values (COVAREP -inf, float64 -> float32 overflow) and repair them to 0 or refuse,
     zero-pad to `seq_len`;
  3. write `{split}-{i:05d}-of-{n:05d}.tfrecord` shards, `metadata.json` and (with tokens) `vocab.txt`
     into a temporary sibling folder, then rename it to the output name. An interrupted conversion
     therefore leaves no folder that looks complete.

A remote output (gs://bucket/data) is written the same way through tf.io.gfile, but an object store
has no folder rename: the files are renamed one by one from the temporary sibling prefix into the
output, metadata.json last. Why not write straight into the output with metadata.json last: a
failed conversion with --overwrite would then already have destroyed the old dataset, and a
half-written folder would stand under the output's name; staging keeps both like the local case,
and GCS renames within a bucket are server-side copies (no data passes through this host). Readers
need metadata.json, so until it lands they see "not found", never half a dataset; a failure while
files move removes the partial output.

`main(argv)` is the CLI behind tools/convert_to_tfrecord.py: errors print one `error: ...` line on
stderr and exit with code 2. Pickles are read with the restricted unpickler of safe_pickle.py
(numpy arrays and plain containers only: a file naming any other global is refused before anything
in it runs); `--trust_pickle` opts out for a file the user vouches for.
"""
import argparse
import os
import shutil
import sys
import tempfile
import uuid

import numpy as np

from msa_xla import cli
from msa_xla.data import schema
from msa_xla.data.schema import DataError
from msa_xla.options import MODALITIES, SPLITS
from msa_xla.runtime import storage

NONFINITE_POLICIES = ("zero", "error")


def parse_seq_len(text):
    """'50' -> 50; '50,375,500' -> (50, 375, 500) for (text, audio, video)."""
    try:
        values = [int(v) for v in str(text).split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 3) or min(values) < 1:
        raise DataError(f"--seq_len {text!r}: expected a positive int or three like 50,375,500")
    return values[0] if len(values) == 1 else tuple(values)


def _validate(splits):
    """Dims per modality (dict) after checking the splits are usable."""
    dims = {}
    for split in SPLITS:
        data = splits.get(split)
        if data is None or len(data) == 0:
            raise DataError(f"split '{split}' is empty")
        labels = np.asarray(data.labels, np.float64)
        bad = ~np.isfinite(labels)
        if bad.any():
            first = data.ids[int(np.argmax(bad))]
            raise DataError(f"split '{split}' has {int(bad.sum())} non-finite (NaN/inf) labels, "
                            f"first at clip '{first}'")
        for name in MODALITIES:
            for clip_id, rows in zip(data.ids, data.features[name]):
                shape = np.shape(rows)
                if len(shape) != 2:
                    raise DataError(f"split '{split}' {name} clip '{clip_id}' has shape {shape}, "
                                    "expected (length, dim)")
                if dims.setdefault(name, shape[1]) != shape[1]:
                    raise DataError(f"{name} feature dim differs across clips/splits: {dims[name]} "
                                    f"vs {shape[1]} (split '{split}', clip '{clip_id}')")
    return dims


def _default_seq_lens(splits):
    """Longest clip per modality, or the source's padded length when it reports one (pickles),
    so a converted MMSA pickle has the shapes MMSA's own loader yields."""
    lens = {m: max(1, max(len(r) for s in SPLITS for r in splits[s].features[m]))
            for m in MODALITIES}
    for split in SPLITS:
        for m, padded in (getattr(splits[split], "padded_lens", None) or {}).items():
            lens[m] = max(lens[m], int(padded))
    return lens


def _prepare(rows, seq_len, dim, nonfinite, where):
    """(len, dim) any dtype -> zero-padded float32 (seq_len, dim), true length, repaired count."""
    length = min(len(rows), seq_len)
    with np.errstate(over="ignore", invalid="ignore"):  # Overflow to inf is counted just below.
        kept = np.asarray(rows[:length]).astype(np.float32)
    finite = np.isfinite(kept)
    repaired = int(kept.size - np.count_nonzero(finite))
    if repaired:
        if nonfinite == "error":
            raise DataError(f"{where}: {repaired} non-finite values (use --nonfinite zero to "
                            "repair them to 0)")
        kept = np.where(finite, kept, np.float32(0))
    out = np.zeros((seq_len, dim), np.float32)
    out[:length] = kept
    return out, length, repaired


def _write_split(folder, split, data, seq_lens, dims, num_shards, nonfinite, tokens, log):
    import tensorflow as tf

    count = len(data)
    num_shards = max(1, min(num_shards, count))
    stats = {"truncated": dict.fromkeys(MODALITIES, 0), "nonfinite_repaired": dict.fromkeys(MODALITIES, 0)}
    shards = []
    every = max(1000, count // 10)
    done = 0
    for index, clip_range in enumerate(np.array_split(np.arange(count), num_shards)):
        name = schema.shard_filename(split, index, num_shards)
        path = storage.join(folder, name)
        with storage.as_oserror(path), tf.io.TFRecordWriter(path) as records:
            for i in clip_range:
                features, lengths = {}, {}
                for m in MODALITIES:
                    rows = data.features[m][i]
                    where = f"split '{split}' modality '{m}' clip '{data.ids[i]}'"
                    features[m], lengths[m], repaired = _prepare(
                        rows, seq_lens[m], dims[m], nonfinite, where)
                    stats["truncated"][m] += int(len(rows) > seq_lens[m])
                    stats["nonfinite_repaired"][m] += repaired
                ids = None if tokens is None else tokens[0][i]
                ids_len = None if tokens is None else tokens[1][i]
                records.write(schema.serialize_example(
                    features, lengths, float(data.labels[i]), data.ids[i], ids, ids_len))
                done += 1
                if done % every == 0 and done < count:
                    log(f"  {split}: {done}/{count} clips")
        shards.append({"file": name, "count": len(clip_range)})
    log(f"  {split}: {count}/{count} clips in {num_shards} shard(s)")
    labels = np.asarray(data.labels, np.float64)
    stats.update(count=count, shards=shards, label={
        "min": float(labels.min()), "max": float(labels.max()), "mean": float(labels.mean()),
        "zeros": int(np.count_nonzero(labels == 0))})
    if tokens is not None:
        stats["truncated"]["text_ids"] = int(tokens[2])
    return stats


def _source_tokens(splits, seq_len, log):
    """Token ids the source carries (MMSA's text_bert), padded or truncated to `seq_len`."""
    out = {}
    for split in SPLITS:
        data = splits[split]
        ids = np.zeros((len(data), seq_len), np.int64)
        kept = min(seq_len, data.token_ids.shape[1])
        ids[:, :kept] = data.token_ids[:, :kept]
        lengths = np.minimum(data.token_lengths, seq_len)
        ids[np.arange(seq_len)[None, :] >= lengths[:, None]] = 0  # nothing past the length
        out[split] = (ids, lengths, int(np.count_nonzero(data.token_lengths > seq_len)))
    vocab_size = max(int(splits[s].vocab_size) for s in SPLITS)
    log(f"  token ids: the source's BERT WordPiece ids (vocabulary {vocab_size})")
    info = {"vocab_file": None, "vocab_size": vocab_size, "seq_len": int(seq_len), "pad_id": 0,
            "unk_id": 100, "source": "text_bert"}  # [UNK] in BERT's vocab
    return out, info


def _tokenize(splits, folder, seq_len, log):
    from msa_xla.data import text

    for split in SPLITS:
        if splits[split].raw_text is None:
            raise DataError(f"--tokenize needs raw_text, and split '{split}' has none")
    vocab = text.build_vocab(splits["train"].raw_text)
    vocab_path = text.save_vocab(vocab, folder)
    log(f"  vocabulary: {len(vocab)} WordPiece tokens from the training split")
    out = {}
    for split in SPLITS:
        raw = splits[split].raw_text
        with storage.as_oserror(vocab_path):  # the tokenizer reads the vocabulary through TF
            ids, lengths, full = text.tokenize(raw, vocab_path, seq_len)
        out[split] = (ids, lengths, int(np.count_nonzero(full > seq_len)))
    info = {"vocab_file": text.VOCAB_FILE, "vocab_size": len(vocab), "seq_len": int(seq_len),
            "pad_id": text.PAD_ID, "unk_id": text.UNK_ID}
    return out, info


def _refuse_existing(output):
    raise DataError(f"{output} already exists (pass --overwrite to replace it)")


def _publish(tmp, output, overwrite):
    """Rename the finished temp folder to `output` (replacing it only when `overwrite`)."""
    if storage.is_remote(output):
        _publish_remote(tmp, output, overwrite)
    elif os.path.exists(output):
        if not overwrite:
            _refuse_existing(output)
        trash = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.old-",
                                 dir=os.path.dirname(output))
        os.rename(output, os.path.join(trash, "old"))
        os.rename(tmp, output)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, output)


def _publish_remote(tmp, output, overwrite):
    """Move the files of remote folder `tmp` into `output` one by one, metadata.json last (see the
    module docstring); on failure remove what was moved, so no partial dataset is left."""
    if storage.exists(output):
        if not overwrite:
            _refuse_existing(output)
        old_meta = storage.join(output, schema.METADATA_FILE)
        if storage.exists(old_meta):  # first, so no reader takes the old folder for complete
            storage.remove(old_meta)
        if storage.isdir(output):
            storage.rmtree(output)
        else:
            storage.remove(output)
    names = sorted(storage.listdir(tmp), key=lambda name: name == schema.METADATA_FILE)
    storage.makedirs(output)
    try:
        for name in names:
            storage.rename(storage.join(tmp, name), storage.join(output, name))
    except BaseException:
        storage.rmtree(output, ignore_errors=True)
        raise
    storage.rmtree(tmp, ignore_errors=True)


def _make_temp_folder(output):
    """A new, empty temporary sibling folder of `output` (same filesystem: renames stay cheap)."""
    parent, base = storage.dirname(output), storage.basename(output)
    storage.makedirs(parent)
    if storage.is_remote(output):
        tmp = storage.join(parent, f".{base}.tmp-{uuid.uuid4().hex[:12]}")
        storage.makedirs(tmp)  # explicitly: ram:// lists and deletes only folders made this way
        return tmp
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the dataset is an ordinary folder.
    return tmp


def convert(splits, output, *, source_format, source_path, seq_len=None, shards=1,
            nonfinite="zero", tokenize=False, overwrite=False, extra_metadata=None, log=None):
    """Write `splits` ({split: SplitData}) as a TFRecord dataset folder; returns its metadata."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    if nonfinite not in NONFINITE_POLICIES:
        raise DataError(f"nonfinite={nonfinite!r}: expected one of {NONFINITE_POLICIES}")
    if int(shards) < 1:
        raise DataError(f"--shards {shards}: expected >= 1")
    output = storage.absolute(output)
    if not overwrite and storage.exists(output):
        _refuse_existing(output)
    dims = _validate(splits)
    if seq_len is None:
        seq_lens = _default_seq_lens(splits)
    elif isinstance(seq_len, int):
        seq_lens = dict.fromkeys(MODALITIES, int(seq_len))
    else:
        seq_lens = dict(zip(MODALITIES, (int(t) for t in seq_len)))
    tmp = _make_temp_folder(output)
    try:
        tokens, token_info = {}, None
        if all(getattr(splits[s], "token_ids", None) is not None for s in SPLITS):
            tokens, token_info = _source_tokens(splits, seq_lens["text"], log)  # also --tokenize
        elif tokenize:
            tokens, token_info = _tokenize(splits, tmp, seq_lens["text"], log)
        split_stats = {}
        for split in SPLITS:
            log(f"{split}: {len(splits[split])} clips")
            split_stats[split] = _write_split(tmp, split, splits[split], seq_lens, dims,
                                              int(shards), nonfinite, tokens.get(split), log)
        meta = schema.build_metadata(
            dims=dims, seq_lens=seq_lens, source_format=source_format, source_path=source_path,
            splits=split_stats, tokens=token_info,
            extra={"nonfinite_policy": nonfinite, **(extra_metadata or {})})
        schema.write_metadata(meta, tmp)
        _publish(tmp, output, overwrite)
    except BaseException:  # Includes KeyboardInterrupt: never leave the temp folder behind.
        storage.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def summary_table(meta):
    """Plain-text table: one row per split with counts, label stats, truncations and repairs."""
    head = ["split", "clips", "shards", "label min", "max", "mean", "truncated t/a/v",
            "repaired t/a/v"]
    rows = [head]
    for split, info in meta["splits"].items():
        trunc = "/".join(str(info["truncated"][m]) for m in MODALITIES)
        fixed = "/".join(str(info["nonfinite_repaired"][m]) for m in MODALITIES)
        lab = info["label"]
        rows.append([split, str(info["count"]), str(len(info["shards"])), f"{lab['min']:.2f}",
                     f"{lab['max']:.2f}", f"{lab['mean']:.3f}", trunc, fixed])
    widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    shapes = ", ".join(f"{m} {v['seq_len']}x{v['dim']}" for m, v in meta["modalities"].items())
    return "\n".join(lines + [f"shapes: {shapes}" + (
        f"; tokens: {meta['tokens']['seq_len']} ids, vocab {meta['tokens']['vocab_size']}"
        if meta.get("tokens") else "")])


# --- CLI -------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse that reports bad flags as one `error:` line (exit 2), without the usage dump."""

    def error(self, message):
        raise DataError(message)


def build_parser():
    from msa_xla.data.sources import CSD_FILES, CSD_SPLITS_FILE, FORMATS

    parser = _Parser(
        prog="convert_to_tfrecord.py",
        description="Convert MMSA/MulT pickles, CMU-MultimodalSDK .csd files or synthetic clips "
                    "into fixed-shape sharded TFRecords (+ metadata.json) for msa_xla.data.make_dataset.",
        epilog=f"--format csd: --input is a folder holding {', '.join(CSD_FILES.values())} "
               f"(one entry per clip, labels one value per entry) and optionally {CSD_SPLITS_FILE} "
               '({"train": [ids], "valid": [...], "test": [...]}); without it a 70/10/20 split by '
               "video is drawn with --split_seed. --format mmsa/mult: true lengths come from "
               "'audio_lengths'/'vision_lengths' when present, else a clip ends at its last row "
               "that is not all zeros. --format synthetic needs no --input.")
    parser.add_argument("--format", required=True, choices=FORMATS, help="source layout")
    parser.add_argument("--input", help="pickle file (mmsa, mult) or folder (csd)")
    parser.add_argument("--output", required=True,
                        help="output folder (must not exist); local or gs://bucket/path")
    parser.add_argument("--seq_len", help="T or Tt,Ta,Tv; default: longest clip per modality")
    parser.add_argument("--shards", type=int, default=1, help="shards per split (default 1)")
    parser.add_argument("--nonfinite", choices=NONFINITE_POLICIES, default="zero",
                        help="repair NaN/inf features to 0 (default) or refuse")
    parser.add_argument("--tokenize", action="store_true",
                        help="also store WordPiece ids of raw_text (vocab.txt from train); an "
                             "MMSA pickle with text_bert stores its BERT ids in any case")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--trust_pickle", action="store_true",
                        help="read the --input pickle with plain pickle.load, which can run "
                             "arbitrary code the file carries: only for a file you trust. By "
                             "default a pickle may hold only numpy arrays and plain containers, "
                             "and any other global stops the conversion before it is called")
    parser.add_argument("--split_seed", type=int, default=0, help="csd split without splits.json")
    parser.add_argument("--synthetic_sizes", default="1284,229,686",
                        help="synthetic clips per split (default MOSI's)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic generator seed")
    return parser


def _read(args, seq_len):
    from msa_xla.data import sources, synthetic

    if args.format == "synthetic":
        try:
            sizes = tuple(int(v) for v in args.synthetic_sizes.split(","))
            assert len(sizes) == 3 and min(sizes) >= 0
        except (ValueError, AssertionError):
            raise DataError(f"--synthetic_sizes {args.synthetic_sizes!r}: expected three counts "
                            "like 1284,229,686") from None
        return synthetic.generate(sizes, seq_len=seq_len or 50, seed=args.seed), "generated"
    if not args.input:
        raise DataError(f"--format {args.format} needs --input")
    return sources.read_source(args.format, args.input, split_seed=args.split_seed,
                               trust_pickle=args.trust_pickle), args.input


def main(argv=None):
    """CLI entry point; returns 0, or exits with 2 after one `error:` line on stderr."""
    try:
        args = build_parser().parse_args(argv)
        seq_len = parse_seq_len(args.seq_len) if args.seq_len else None
        output = storage.absolute(args.output)
        if not args.overwrite and storage.exists(output):
            _refuse_existing(output)
        print(f"reading {args.format} {args.input or ''}".rstrip(), file=sys.stderr, flush=True)
        splits, source_path = _read(args, seq_len)
        meta = convert(splits, output, source_format=args.format, source_path=source_path,
                       seq_len=seq_len, shards=args.shards, nonfinite=args.nonfinite,
                       tokenize=args.tokenize, overwrite=args.overwrite)
    except (DataError, OSError) as err:  # OSError: unwritable output, full disk, ...: still one line
        sys.exit(cli.report_error(err))
    print(summary_table(meta))
    print(f"wrote {output}")
    return 0
