"""`make_dataset`: sharded TFRecords -> a static-shape, batched, prefetched `tf.data.Dataset`.

Element: `((text, audio, video, text_mask, audio_mask, video_mask), label)` with
    text/audio/video  float32 (B, T_m, D_m)     (or text int32 (B, T_tok) ids with text_input='tokens')
    *_mask            bool (B, T_m), True = valid, from the stored true lengths
    label             float32 (B, 1)
Every dimension is static (B too, with drop_remainder=True): XLA compiles the step once.

`data_dir` may be local or remote (gs://...): metadata and the integrity scan go through
msa_xla.runtime.storage, and tf.data's TFRecordDataset reads any tf.io.gfile path itself.
"""
import os

import tensorflow as tf

from msa_xla.data import integrity, schema
from msa_xla.data.integrity import CorruptRecordsWarning, scan_shards  # noqa: F401 (re-exported)
from msa_xla.data.schema import DataError
from msa_xla.options import MODALITIES, TEXT_INPUTS

# Shuffle buffer budget: records are ~84 KB (MOSI aligned) to ~270 KB (unaligned); a buffer of whole
# records costs memory, so it is sized in bytes and never below this many records.
_SHUFFLE_BYTES = 256 << 20
_MIN_SHUFFLE_RECORDS = 1024


def verify_shards(paths, meta=None, *, skip_corrupt=False):
    """Check each (path, count) shard; raise DataError naming a bad file. Returns the usable
    [(path, count)]: the files themselves, or with `skip_corrupt` private copies of damaged ones
    holding only their good records (a CorruptRecordsWarning gives the exact number skipped).

    Why up front: tf.data reports a damaged file as "corrupted record at 421400" with no file name,
    mid-training, and cannot skip it. The scan (msa_xla/data/integrity.py) checks framing and every
    CRC, and with `meta` parses every record and checks lengths and finite values; it runs once per
    file and process (cached per path, size and mtime).
    """
    return integrity.usable_files(integrity.scan_paths(paths, meta), skip_corrupt)


def _parser(meta, batch_size, text_input):
    """Batched parse fn: (B,) serialized -> model inputs. Runs after `batch` (one vectorised op)."""
    tokens = text_input == "tokens"
    modalities = ("audio", "video") if tokens else MODALITIES
    spec = schema.feature_spec(meta, modalities=modalities, tokens=tokens)

    def parse(serialized):
        parsed = tf.io.parse_example(serialized, spec)
        inputs, masks = [], []
        if tokens:
            tok_len = meta["tokens"]["seq_len"]
            ids = tf.cast(parsed[schema.TOKENS_KEY], tf.int32)  # int64 -> int32: TPUs want int32.
            inputs.append(ids)  # (B, T_tok)
            masks.append(tf.sequence_mask(
                tf.cast(parsed[schema.length_key(schema.TOKENS_KEY)], tf.int32), tok_len))
        for name in modalities:
            seq_len, dim = meta["modalities"][name]["seq_len"], meta["modalities"][name]["dim"]
            inputs.append(tf.reshape(parsed[name], (-1, seq_len, dim)))  # (B, T*D) -> (B, T, D)
            lengths = tf.cast(parsed[schema.length_key(name)], tf.int32)
            masks.append(tf.sequence_mask(lengths, seq_len))  # (B, T) bool, True = valid
        label = tf.reshape(parsed[schema.LABEL_KEY], (-1, 1))  # (B, 1)
        outputs = tuple(inputs) + tuple(masks)
        # set_shape pins the batch dim, so every tensor is fully static for XLA.
        for tensor in outputs + (label,):
            tensor.set_shape([batch_size] + tensor.shape.as_list()[1:])
        return outputs, label

    return parse


def make_dataset(data_dir, split, batch_size, *, shuffle=None, repeat=False, drop_remainder=True,
                 input_context=None, seed=None, text_input="features", skip_corrupt=False):
    """Batched examples of one split of a folder written by tools/convert_to_tfrecord.py.

    Args:
      data_dir: folder with `metadata.json` and `{split}-*-of-*.tfrecord` shards.
      split: 'train', 'valid' or 'test'.
      batch_size: examples per batch yielded by this pipeline. Under `input_context` pass the
        per-replica size, `input_context.get_per_replica_batch_size(global_batch_size)`.
      shuffle: None -> shuffle the train split only; True/False; or an int shuffle buffer size.
      repeat: repeat forever (shuffled anew each epoch); batches then span epoch boundaries.
      drop_remainder: keep True for XLA/TPU (static batch dim); False keeps the last partial batch.
      input_context: `tf.distribute.InputContext`; files (or, with fewer files than input
        pipelines, records) are split among input pipelines so each host reads a disjoint part.
      seed: shuffle seed (file order and records), for reproducible runs.
      text_input: 'features' (float text features) or 'tokens' (int32 WordPiece ids; needs a dataset
        converted with --tokenize).
      skip_corrupt: False: any damaged shard (bad framing or CRC, a record that does not parse with
        metadata.json's shapes, a true length out of range) raises DataError naming the file and
        record. True: such records are skipped, with a CorruptRecordsWarning stating the exact count
        per file (`scan_shards(data_dir, split)` returns the counts). Non-finite features or labels
        raise DataError naming the clip either way.
    Returns:
      `tf.data.Dataset` of `((text, audio, video, text_mask, audio_mask, video_mask), label)`.
    """
    data_dir = os.fspath(data_dir)
    if text_input not in TEXT_INPUTS:
        raise DataError(f"text_input={text_input!r}: expected one of {TEXT_INPUTS}")
    if int(batch_size) < 1:
        raise DataError(f"batch_size={batch_size}: expected >= 1")
    meta = schema.load_metadata(data_dir)
    if text_input == "tokens" and not meta.get("tokens"):
        raise DataError(f"{data_dir}: text_input='tokens' but the dataset has no token ids "
                        "(convert it with --tokenize)")
    paths = schema.shard_paths(data_dir, meta, split)
    paths = verify_shards(paths, meta, skip_corrupt=skip_corrupt)  # usable files, good counts
    files = [p for p, _ in paths]
    shuffle = split == "train" if shuffle is None else shuffle
    # Order is reproducible for eval and whenever a seed is given; otherwise tf.data may hand out
    # whichever element is ready first (faster when a read or parse stalls).
    deterministic = not shuffle or seed is not None
    count = sum(c for _, c in paths)

    shard_records = None
    if input_context is not None and input_context.num_input_pipelines > 1:
        n, k = input_context.num_input_pipelines, input_context.input_pipeline_id
        if len(files) >= n:  # Whole files per pipeline: no host reads bytes it then discards.
            files, count = files[k::n], sum(c for _, c in paths[k::n])
        else:  # Too few files: every pipeline reads all, keeps every n-th record.
            shard_records, count = (n, k), len(range(k, count, n))

    if shuffle:
        # Training: shuffle the file order, then read up to 4 shards in parallel, interleaving their
        # records (more mixing than the record buffer alone, and more read throughput).
        dataset = tf.data.Dataset.from_tensor_slices(files)
        dataset = dataset.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
        dataset = dataset.interleave(
            lambda path: tf.data.TFRecordDataset(path, buffer_size=8 << 20),
            cycle_length=min(len(files), 4), block_length=1,
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    else:
        # Evaluation: files one after the other, so batches follow the source clip order (reading is
        # cheap; the parallel work is the parse below).
        dataset = tf.data.TFRecordDataset(files, buffer_size=8 << 20)
    if shard_records is not None:
        dataset = dataset.shard(*shard_records)
    if shuffle:
        if shuffle is True:
            record_bytes = 4 * sum(v["seq_len"] * v["dim"] for v in meta["modalities"].values())
            buffer = max(_MIN_SHUFFLE_RECORDS, _SHUFFLE_BYTES // max(record_bytes, 1))
        else:
            buffer = int(shuffle)
        dataset = dataset.shuffle(min(buffer, max(count, 1)), seed=seed,
                                  reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    # Batch the serialized strings first, then parse the whole batch in one parse_example call:
    # one vectorised op instead of B small ones is several times faster.
    static_batch = int(batch_size) if drop_remainder else None
    dataset = dataset.batch(int(batch_size), drop_remainder=drop_remainder)
    dataset = dataset.map(_parser(meta, static_batch, text_input),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    # Prefetch lets the host prepare the next batches while the device runs the current step.
    return dataset.prefetch(tf.data.AUTOTUNE)
