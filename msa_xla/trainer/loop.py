"""One seed of a training run: model, step, checkpoint, eval, loop (the trainer's middle).

`train_one_seed` builds the model under the strategy, restores the latest checkpoint of
`<workdir>/seed_<s>/` if there is one, trains with model.fit to the configured number of epochs
(or early stop), restores the best validation weights, evaluates on test and saves the model.
A seed that already finished (its result.json exists) is not trained again.
"""

from __future__ import annotations

import math
import os

import tf_keras as keras

from msa_xla.metrics import MSAMetrics
from msa_xla.models import MODELS
from msa_xla.models.serving import export_for_serving
from msa_xla.options import MODALITIES
from msa_xla.runtime import compat, storage
from msa_xla.trainer.callbacks import build_callbacks
from msa_xla.trainer.checkpointing import (
    RunCheckpoint,
    check_identity,
    sync_from_chief,
    write_json,
)
from msa_xla.trainer.inputs import eval_data, train_data
from msa_xla.trainer.step import install_split_step, make_optimizer, plan_jit, steps_per_execution_for


def _build_model(cfg, meta, strategy, seed):
    """Model + optimizer under the strategy, compiled for the chosen XLA plan."""
    steps_per_epoch = meta["splits"]["train"]["count"] // cfg.batch_size
    steps_per_execution = steps_per_execution_for(cfg.steps_per_execution, strategy,
                                                  steps_per_epoch)
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    per_replica = cfg.batch_size // strategy.num_replicas_in_sync
    with strategy.scope():
        model = MODELS[cfg.model](**cfg.model_kwargs(meta), name=cfg.model)
        model(model.example_inputs(per_replica), training=False)  # creates the variables
        optimizer = make_optimizer(cfg.learning_rate, cfg.clipnorm)
        plan = plan_jit(cfg.jit_compile, strategy, model)
        model.compile(optimizer=optimizer, loss="mae", weighted_metrics=[MSAMetrics()],
                      jit_compile=plan.compile_jit, steps_per_execution=steps_per_execution)
        # Per-replica logs: without merge_call (GPUs under XLA) every replica returns the
        # already all-reduced metric values, which tf_keras' default "sum" would add up; with
        # merge_call they are one value. "first" is right in both cases.
        model.distribute_reduction_method = "first"
        # Slots now, so a checkpoint restores into existing variables (exact resume).
        model.optimizer.build(model.trainable_variables)
    if plan.mode == "split_step":
        install_split_step(model)
    return model, plan, steps_per_execution


def _verbosity(cfg, chief):
    if not chief:
        return 0
    if cfg.verbose >= 0:
        return cfg.verbose
    return 1 if os.isatty(1) else 2


def train_one_seed(cfg, *, seed, strategy, meta, own_dir, chief, log=None):
    """Trains one seed; returns (its result dict, the trained model or None for a seed finished
    by an earlier run), or None when preempted (checkpoint saved)."""
    log = log or (lambda message: None)
    seed_dir = storage.join(own_dir, f"seed_{seed}")
    if not chief:  # every worker resumes from the chief's state (checkpointing.py)
        sync_from_chief(storage.join(cfg.workdir, f"seed_{seed}"), seed_dir)
    # Before the finished-seed shortcut: a finished workdir rerun with other flags is refused
    # too (else results.json would pair the old model's metrics with the new config).
    identity = {**cfg.checkpoint_identity(), "seed": seed,
                "dims": [meta["modalities"][m]["dim"] for m in MODALITIES]}
    check_identity(storage.join(seed_dir, "checkpoints"), identity)
    result_path = storage.join(seed_dir, "result.json")
    if storage.isfile(result_path):
        log(f"seed {seed}: already finished ({result_path})")
        return storage.read_json(result_path), None
    counts = {s: meta["splits"][s]["count"] for s in ("train", "valid", "test")}
    steps_per_epoch = counts["train"] // cfg.batch_size
    total_steps = steps_per_epoch * cfg.epochs

    # ---- model and step -----------------------------------------------------------------------
    model, plan, steps_per_execution = _build_model(cfg, meta, strategy, seed)
    log(f"seed {seed}: {cfg.model} with {model.count_params():,} parameters; XLA: "
        f"{plan.description}; {steps_per_execution} step(s) per execution")

    # ---- checkpoint ---------------------------------------------------------------------------
    run_checkpoint = RunCheckpoint(storage.join(seed_dir, "checkpoints"), model, identity)
    state = run_checkpoint.restore_latest()
    step = run_checkpoint.step
    callbacks, handles = build_callbacks(cfg, seed_dir=seed_dir, run_checkpoint=run_checkpoint,
                                         steps_per_epoch=steps_per_epoch, chief=chief)
    stopped_early = False
    if state is not None:
        handles["early"].set_state(state["callbacks"]["early_stopping"])
        handles["plateau"].set_state(state["callbacks"]["plateau"])
        stopped_early = state["callbacks"]["early_stopping"]["wait"] >= cfg.early_stopping_patience
        log(f"seed {seed}: resumed from step {step} (epoch {step // steps_per_epoch + 1}, "
            f"step {step % steps_per_epoch} of {steps_per_epoch})")

    # ---- input --------------------------------------------------------------------------------
    train = train_data(cfg.data_dir, cfg.batch_size, strategy, seed=seed, start_step=step,
                       text_input=cfg.text_input, skip_corrupt=cfg.skip_corrupt)
    valid = eval_data(cfg.data_dir, "valid", cfg.batch_size, strategy, text_input=cfg.text_input,
                      skip_corrupt=cfg.skip_corrupt)
    valid_steps = math.ceil(counts["valid"] / cfg.batch_size)

    # ---- loop ---------------------------------------------------------------------------------
    history = {}
    if step < total_steps and not stopped_early:
        initial_epoch, initial_step = divmod(step, steps_per_epoch)
        # Mid-epoch resume: fit starts its first epoch at initial_step; the data stream itself
        # was already advanced by skip(step).
        compat.start_fit_at(model, initial_epoch, initial_step)
        fit = model.fit(train, epochs=cfg.epochs, initial_epoch=initial_epoch,
                  steps_per_epoch=steps_per_epoch, validation_data=valid,
                  validation_steps=valid_steps, callbacks=callbacks,
                  verbose=_verbosity(cfg, chief))
        # Per epoch: the losses, the LR, and BalancedMSAModel's modulation coefficients.
        history = {key: [float(v) for v in values] for key, values in fit.history.items()
                   if key in ("loss", "val_loss", "val_MAE", "lr") or key.startswith("coeff_")}
        if handles["checkpoint"].preempted:
            return None
    traces = (model.train_function.experimental_get_tracing_count()
              if model.train_function is not None else 0)

    # ---- eval ---------------------------------------------------------------------------------
    steps_trained = int(model.optimizer.iterations.numpy())
    # Read before restore_best: the best epoch's weights carry its optimizer state too, LR
    # included, which would hide every plateau reduction made after the best epoch.
    final_learning_rate = float(keras.backend.get_value(model.optimizer.learning_rate))
    handles["early"].restore_best()
    test = eval_data(cfg.data_dir, "test", cfg.batch_size, strategy, text_input=cfg.text_input,
                      skip_corrupt=cfg.skip_corrupt)
    test_logs = model.evaluate(test, steps=math.ceil(counts["test"] / cfg.batch_size),
                               return_dict=True, verbose=0)
    keras_path = storage.join(seed_dir, "model.keras")
    model.save(keras_path)
    result = {
        "seed": seed,
        "test": {k: float(v) for k, v in test_logs.items() if k != "loss"},
        "best_val_MAE": float(handles["early"].best),
        "best_epoch": int(handles["early"].best_epoch) + 1,
        "steps": steps_trained,
        "final_learning_rate": final_learning_rate,
        "samples_per_second": handles["throughput"].samples_per_second or None,
        "train_function_traces": int(traces),
        "history": history,  # per epoch of this process (a resumed run: from the resume on)
        "jit": plan.mode,
        "jit_description": plan.description,
        "steps_per_execution": steps_per_execution,
        "model_path": keras_path,
    }
    write_json(result_path, result)
    log(f"seed {seed}: test MAE {result['test']['MAE']:.4f}, Non0_acc_2 "
        f"{100 * result['test']['Non0_acc_2']:.2f}% (best val_MAE {result['best_val_MAE']:.4f} "
        f"at epoch {result['best_epoch']})")
    return result, model


def best_result(per_seed):
    """The result of the best seed: the lowest best validation MAE (the first of equals)."""
    return min(per_seed, key=lambda run: run["best_val_MAE"])


def export_best_model(per_seed, workdir, trained=None):
    """Copies the best seed's model (lowest val MAE) as .keras and as a SavedModel for serving
    (msa_xla/models/serving.py). `trained`: {seed: model still in memory, with the weights its
    model.keras holds}; the best seed's is exported without loading its file again."""
    best = best_result(per_seed)
    paths = {"seed": best["seed"], "keras": storage.join(workdir, "best_model.keras"),
             "savedmodel": storage.join(workdir, "best_model_savedmodel")}
    storage.copy(best["model_path"], paths["keras"], overwrite=True)  # the file, byte for byte
    model = (trained or {}).get(best["seed"])
    if model is None:
        model = keras.models.load_model(best["model_path"])
    export_for_serving(model, paths["savedmodel"])
    return paths
