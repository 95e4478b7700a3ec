"""Train an MSA model: `python -m msa_xla.train` (built-in data, CPU) or `--tpu=local --data_dir=...`.

Reads top to bottom in sections: flags, logging, strategy, input, the seeds (each trained by
loop.py: model, step, checkpoint, fit, eval), results. The pieces live in named modules beside
this one: config.py (the run config), inputs.py, step.py (what XLA compiles), checkpointing.py,
callbacks.py, results.py.

Exit codes (msa_xla/cli.py): 0 done; 2 bad flags / missing data / no TPU / batch not divisible /
locked or mismatched workdir (one `error: ...` line on stderr); 3 loss became NaN; 4 another
worker of a multi-worker run died (rerun every worker to resume); 143 preempted by SIGTERM after
saving a checkpoint (rerun the same command to resume).
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from msa_xla import cli  # noqa: E402
from msa_xla.errors import UserError  # noqa: E402
from msa_xla.runtime.allocator import prefer_pooled_cpu_allocator  # noqa: E402
from msa_xla.trainer.config import CHOICES, DEFAULT_EPOCHS, TrainConfig  # noqa: E402

prefer_pooled_cpu_allocator()  # before TF creates its devices (runtime/allocator.py: why)

# ----------------------------------------------------------------------------------------------
# flags
# ----------------------------------------------------------------------------------------------
_D = TrainConfig()
flags.DEFINE_string("data_dir", None, "Folder of TFRecords + metadata.json (tools/"
                    "convert_to_tfrecord.py). Default: the built-in synthetic MOSI-shaped dataset, "
                    "created on first use.")
flags.DEFINE_bool("skip_corrupt", _D.skip_corrupt, "Skip damaged TFRecord records with a "
                  "warning and an exact count per file, instead of stopping with an error naming "
                  "the file. Non-finite values always stop the run (naming the clip).")
flags.DEFINE_enum("text_input", _D.text_input, CHOICES["text_input"],
                  "Text as float features, or token ids (datasets converted with --tokenize).")
flags.DEFINE_enum("model", _D.model, CHOICES["model"], "Model from msa_xla.models.MODELS.")
flags.DEFINE_integer("model_dim", _D.model_dim, "Transformer width (divisible by num_heads).")
flags.DEFINE_integer("num_heads", _D.num_heads, "Attention heads.")
flags.DEFINE_integer("ff_dim", _D.ff_dim, "Feed-forward width.")
flags.DEFINE_integer("n_layers_mod", _D.n_layers_mod, "Encoder layers per modality.")
flags.DEFINE_integer("n_layers_fuse", _D.n_layers_fuse, "Fusion layers.")
flags.DEFINE_float("dropout_rate", _D.dropout_rate, "Dropout probability.")
flags.DEFINE_bool("bidirectional_fusion", _D.bidirectional_fusion,
                  "seqlevel: audio/video also attend to text.")
flags.DEFINE_enum("pooling_method", _D.pooling_method, CHOICES["pooling_method"],
                  "seqlevel: pooling of the fusion head.")
flags.DEFINE_enum("attention_impl", _D.attention_impl, CHOICES["attention_impl"],
                  "Attention kernel: fused (one XLA unit), reference (einsum), chunked (O(T) mem).")
flags.DEFINE_string("tpu", None, "TPU name or address; 'local' for the TPU attached to this VM.")
flags.DEFINE_enum("strategy", _D.strategy, CHOICES["strategy"],
                  "auto: TPU if --tpu, else all GPUs if >1, else one device. cpu: one CPU device. "
                  "one_device: the first GPU, else the CPU. "
                  "mirrored: all GPUs, else all logical CPUs (see --cpu_replicas). multi_worker: "
                  "MultiWorkerMirroredStrategy from TF_CONFIG. tpu: TPUStrategy.")
flags.DEFINE_integer("cpu_replicas", 0, "Split the CPU into this many logical devices before TF "
                     "starts (for --strategy=mirrored on a CPU-only host; 0 = leave as is).")
flags.DEFINE_enum("precision", _D.precision, CHOICES["precision"],
                  "auto: mixed_bfloat16 on TPU, mixed_float16 (+ loss scaling) on GPU, float32 on "
                  "CPU.")
flags.DEFINE_enum("jit_compile", _D.jit_compile, CHOICES["jit_compile"],
                  "auto/true: XLA-compile the whole train step where the platform has XLA "
                  "collectives (1 replica, TPU, GPU); with several CPU replicas, compile the "
                  "per-replica forward+backward and keep all-reduce and update outside. false: "
                  "no step compilation (the fused attention kernel is still XLA).")
flags.DEFINE_integer("steps_per_execution", _D.steps_per_execution,
                     "Train steps per call into the compiled function (>1 cuts host overhead on "
                     "TPU/GPU). 0 = auto: min(100, steps per epoch) on TPU and GPU, 1 on CPU.")
flags.DEFINE_integer("epochs", DEFAULT_EPOCHS, "Maximum epochs (early stopping may end sooner).")
flags.DEFINE_integer("batch_size", _D.batch_size, "Global batch size (over all replicas).")
flags.DEFINE_float("learning_rate", _D.learning_rate, "Adam learning rate.")
flags.DEFINE_float("clipnorm", _D.clipnorm, "Clip each gradient's norm to this (0 = off).")
flags.DEFINE_integer("early_stopping_patience", _D.early_stopping_patience,
                     "Epochs without a better val_MAE before stopping (best weights restored).")
flags.DEFINE_integer("lr_plateau_patience", _D.lr_plateau_patience,
                     "Epochs without a better val_MAE before the LR is multiplied by "
                     "--lr_plateau_factor.")
flags.DEFINE_float("lr_plateau_factor", _D.lr_plateau_factor, "ReduceLROnPlateau factor.")
flags.DEFINE_list("seeds", [str(s) for s in _D.seeds], "Comma-separated seeds; one run each, "
                  "results as mean and std.")
flags.DEFINE_bool("deterministic", _D.deterministic, "Deterministic ops "
                  "(tf.config.experimental.enable_op_determinism): a resumed run then ends with "
                  "the same weights as an uninterrupted one.")
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard, models, results.json. Default "
                    "runs/<model>-<timestamp>. Rerun with the same workdir to resume.")
flags.DEFINE_integer("checkpoint_every", _D.checkpoint_every,
                     "Checkpoint every N train steps (0 = only at epoch ends; always at epoch "
                     "ends and on SIGTERM).")
flags.DEFINE_integer("verbose", _D.verbose, "Keras verbosity: 1 progress bar, 2 one line per "
                     "epoch, 0 silent; -1 = 1 on a terminal else 2.")
flags.DEFINE_list("profile_steps", [], "A,B: profile train steps A..B (steps count from 0).")
flags.DEFINE_string("profile_dir", None, "Where profiles go (default profiles/<run name>, the "
                    "run name being the last part of --workdir).")
flags.DEFINE_integer("profiler_port", 0, "Start a profiler server on this port (0 = off).")
FLAGS = flags.FLAGS


# ----------------------------------------------------------------------------------------------
# logging
# ----------------------------------------------------------------------------------------------
def log(message: str) -> None:
    print(f"[msa_xla.train] {message}", flush=True)


def _setup_cpu_devices(count: int) -> None:
    """Logical CPU devices must exist before TF initialises (tests, --strategy=mirrored on CPU)."""
    if count > 1:
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        if len(tf.config.get_logical_device_configuration(cpu) or ()) == count:
            return  # already split so (e.g. a second run in this process)
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)])
        except RuntimeError:  # "Virtual devices cannot be modified after being initialized"
            raise UserError(f"--cpu_replicas={count}: TensorFlow already started in this "
                            "process with other CPU devices") from None


def run(cfg: TrainConfig, cpu_replicas: int = 0) -> int:
    """The whole job; returns the exit code. User errors raise (see main)."""
    _setup_cpu_devices(cpu_replicas)
    import tensorflow as tf
    import tf_keras as keras

    from msa_xla.data import ensure_builtin_dataset, load_metadata
    from msa_xla.runtime import distribute, precision, storage
    from msa_xla.trainer.inputs import usable_metadata
    from msa_xla.trainer.results import hardware_info

    # ------------------------------------------------------------------------------------------
    # strategy (first: MultiWorkerMirroredStrategy must exist before other TF ops)
    # ------------------------------------------------------------------------------------------
    strategy = distribute.get_strategy(cfg.strategy, cfg.tpu)
    replicas = strategy.num_replicas_in_sync
    distribute.check_global_batch(cfg.batch_size, replicas)  # before anything is built
    chief = distribute.is_chief(strategy)
    policy = precision.resolve_precision(cfg.precision, strategy)
    precision.apply_precision(policy)
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    # Dropout through tf.random.Generator: seeded under XLA too, and its state is checkpointed.
    keras.backend.experimental.enable_tf_random_generator()

    # ------------------------------------------------------------------------------------------
    # input (metadata only here; the datasets are built per seed in the loop)
    # ------------------------------------------------------------------------------------------
    if cfg.data_dir is None:
        cfg.data_dir = ensure_builtin_dataset()
    cfg.data_dir = storage.absolute(cfg.data_dir)  # local paths only: gs://b/x stays a URL
    meta = usable_metadata(load_metadata(cfg.data_dir), cfg.data_dir, cfg.skip_corrupt)
    counts = {split: meta["splits"][split]["count"] for split in ("train", "valid", "test")}
    steps_per_epoch = counts["train"] // cfg.batch_size
    if steps_per_epoch < 1:
        raise UserError(f"--batch_size={cfg.batch_size} is larger than the "
                         f"{counts['train']} training clips")

    workdir = storage.absolute(cfg.resolved_workdir())
    cfg.workdir = workdir
    own_dir = (workdir if chief
               else storage.join(workdir, f".worker-{distribute.worker_index(strategy)}"))
    from msa_xla.trainer.checkpointing import WorkdirLock

    lock = WorkdirLock(own_dir).acquire()
    if chief:
        log(f"data {cfg.data_dir} ({counts['train']}/{counts['valid']}/{counts['test']} clips); "
            f"workdir {workdir}")
        log(f"strategy {type(strategy).__name__} x{replicas} on "
            f"{distribute.device_platform(strategy)}; precision {policy}")
    from msa_xla.trainer.loop import best_result, train_one_seed

    per_seed = []
    # The best seed's model so far, kept to export it without reading its file back: only a
    # one-device model, whose variables are plain (a distributed model's are per replica).
    trained = {}
    keep_models = isinstance(strategy, tf.distribute.OneDeviceStrategy)
    try:
        for seed in cfg.seeds:
            outcome = train_one_seed(cfg, seed=seed, strategy=strategy, meta=meta,
                                     own_dir=own_dir, chief=chief, log=log if chief else None)
            if outcome is None:  # preempted: checkpoint saved
                log("preempted (SIGTERM): checkpoint saved; rerun the same command to resume")
                return cli.EXIT_PREEMPTED
            result, model = outcome
            per_seed.append(result)
            if keep_models and model is not None and best_result(per_seed) is result:
                trained = {seed: model}
    finally:
        lock.release()

    # ------------------------------------------------------------------------------------------
    # results
    # ------------------------------------------------------------------------------------------
    if not chief:
        storage.rmtree(own_dir, ignore_errors=True)  # workers' copies; the chief has the real ones
        return cli.EXIT_OK
    from msa_xla.trainer.loop import export_best_model
    from msa_xla.trainer.results import build_results, format_table, write_results

    best_paths = export_best_model(per_seed, workdir, trained)
    results = build_results(
        config=cfg.to_dict(), metadata=meta, per_seed=per_seed,
        run_info={"strategy": type(strategy).__name__, "replicas": replicas,
                  "platform": distribute.device_platform(strategy), "precision": policy,
                  "jit": per_seed[0]["jit"], "hardware": hardware_info(),
                  "best_model": best_paths})
    write_results(storage.join(workdir, "results.json"), results)
    print("\nTest results (accuracies and F1 in %):")
    print(format_table(results), flush=True)
    log(f"results: {storage.join(workdir, 'results.json')}; best model: {best_paths['keras']}")
    return cli.EXIT_OK


def main(argv) -> int:
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # TF's checkpoint/SavedModel INFO lines are noise here
    if len(argv) > 1:
        return cli.report_error(f"unexpected arguments {argv[1:]} (flags are --name=value)")
    from msa_xla.runtime.distribute import lost_worker_message
    from msa_xla.trainer.callbacks import TrainingDiverged

    try:
        cfg = TrainConfig.from_flags(FLAGS)
        if cfg.profile_steps:  # before XLA's first compilation reads XLA_FLAGS
            from msa_xla.profiling.capture import enable_xla_trace_events

            enable_xla_trace_events()
        start = time.time()
        code = run(cfg, FLAGS.cpu_replicas)
        if code == cli.EXIT_OK:
            log(f"done in {time.time() - start:.0f} s")
        return code
    except TrainingDiverged as error:
        return cli.report_error(error, cli.EXIT_DIVERGED)
    except (UserError, FileNotFoundError) as error:  # a flag, setting, file or dataset: one line
        return cli.report_error(error)
    except Exception as error:  # a collective aborted because another worker died
        message = lost_worker_message(error)
        if message is None:
            raise
        return cli.report_error(message, cli.EXIT_LOST_WORKER)


def entry_point():
    app.run(main, flags_parser=cli.absl_flags_parser(FLAGS))


if __name__ == "__main__":
    entry_point()
