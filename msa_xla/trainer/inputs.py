"""The trainer's input section: the same global batches on 1 or N replicas, resumable mid-run.

Why not `strategy.experimental_distribute_dataset`: its auto-sharding splits *records* among
workers before each worker shuffles, so a 2-worker run would see other batches than a 1-replica
run. Here every input pipeline builds the same seeded stream of *global* batches and keeps its
own slice of each one, so replica r of worker w always gets rows
[(w * R_local + r) * b, ... + b) of global batch t, exactly the rows a 1-replica run sees in its
batch t (b = per-replica batch). That makes "N replicas == 1 replica with the same global batch"
testable, and resuming after a crash is `skip(step)` on a stream that is a pure function of the
seed (the shuffle reshuffles each epoch from that seed; no state is lost with the process).

Evaluation batches are padded to the global batch with zero-weight clips, so every clip of the
split is scored while every shape stays static (MSAMetrics and the loss ignore weight-0 clips).
"""

from __future__ import annotations

import tensorflow as tf

from msa_xla.data import make_dataset
from msa_xla.data.integrity import scan_shards


def _pad_to_batch(batch_size):
    """(x, y) of <= batch_size rows -> (x, y, weight) of exactly batch_size rows."""

    def pad(inputs, label):
        rows = tf.shape(label)[0]
        missing = batch_size - rows

        def fill(tensor):
            paddings = [[0, missing]] + [[0, 0]] * (tensor.shape.rank - 1)
            padded = tf.pad(tensor, paddings)  # zeros; False for masks
            padded.set_shape([batch_size] + tensor.shape.as_list()[1:])
            return padded

        weight = tf.concat([tf.ones([rows]), tf.zeros([missing])], axis=0)
        weight.set_shape([batch_size])
        return tuple(fill(t) for t in inputs), fill(label), weight

    return pad


def _slice_for_replicas(global_batch, num_replicas, input_context):
    """Keeps this pipeline's rows of each global batch, one element per local replica."""
    pipelines = input_context.num_input_pipelines if input_context else 1
    pipeline = input_context.input_pipeline_id if input_context else 0
    local = num_replicas // pipelines
    per_replica = global_batch // num_replicas
    start = pipeline * local * per_replica

    def split(*element):
        def rows(tensor):  # (B, ...) -> (local, b, ...)
            part = tensor[start:start + local * per_replica]
            return tf.reshape(part, [local, per_replica] + tensor.shape.as_list()[1:])

        return tf.data.Dataset.from_tensor_slices(tf.nest.map_structure(rows, element))

    return split


def _distribute(strategy, build, global_batch):
    """`build()` -> dataset of global batches; distributed by slicing when replicas > 1."""
    replicas = strategy.num_replicas_in_sync
    if replicas == 1:
        return build()

    def dataset_fn(input_context):
        dataset = build()
        dataset = dataset.flat_map(_slice_for_replicas(global_batch, replicas, input_context))
        return dataset.prefetch(tf.data.AUTOTUNE)

    # Replicas of one worker take consecutive elements round-robin (MultiDeviceIterator).
    options = tf.distribute.InputOptions(experimental_fetch_to_device=True)
    return strategy.distribute_datasets_from_function(dataset_fn, options)


def usable_metadata(meta, data_dir, skip_corrupt):
    """metadata.json as the run will see it: with `skip_corrupt`, the split counts are the records
    that survive (the epoch and evaluation step counts come from them, so evaluation never runs
    out of data), and `skipped_corrupt` says how many were left out per split."""
    if not skip_corrupt:
        return meta
    splits = {name: dict(info) for name, info in meta["splits"].items()}
    skipped = {}
    for name in splits:
        report = scan_shards(data_dir, name)  # cached: make_dataset reuses this scan
        splits[name]["count"], skipped[name] = report.good, report.skipped
    return {**meta, "splits": splits, "skipped_corrupt": skipped}


def train_data(data_dir, global_batch, strategy, *, seed, start_step=0, text_input="features",
               skip_corrupt=False):
    """Endless shuffled global batches from `start_step` on (the batches a fresh run sees then)."""

    def build():
        dataset = make_dataset(data_dir, "train", global_batch, shuffle=True, repeat=True,
                               seed=seed, text_input=text_input, skip_corrupt=skip_corrupt)
        return dataset.skip(start_step) if start_step else dataset

    return _distribute(strategy, build, global_batch)


def eval_data(data_dir, split, global_batch, strategy, *, text_input="features",
              skip_corrupt=False):
    """Every clip of `split` in source order, as zero-weight-padded global batches."""

    def build():
        dataset = make_dataset(data_dir, split, global_batch, shuffle=False,
                               drop_remainder=False, text_input=text_input,
                               skip_corrupt=skip_corrupt)
        return dataset.map(_pad_to_batch(global_batch))

    return _distribute(strategy, build, global_batch)
