"""The trainer's callbacks and the one function that lists them (the seam for profiling).

Order matters: the epoch-end callbacks that change state (early stopping, LR plateau) run
before CheckpointCallback, which saves that state.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time

import tf_keras as keras

from msa_xla.checkpointing import CheckpointCallback

MONITOR = "val_MAE"


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


class EarlyStoppingBest(keras.callbacks.Callback):
    """EarlyStopping on `val_MAE` (min), best weights saved to disk and restored at the end.

    Unlike keras.callbacks.EarlyStopping the best weights live in a file (so they survive a
    crash and a resume) and are restored whenever training ends, stopped early or not.
    """

    def __init__(self, patience: int, best_path: str, monitor: str = MONITOR):
        super().__init__()
        self.patience, self.best_path, self.monitor = int(patience), best_path, monitor
        self.best, self.best_epoch, self.wait, self.stopped_epoch = math.inf, -1, 0, -1
        self._pending = None

    def get_state(self):
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait}

    def set_state(self, state):
        self._pending = dict(state)

    def on_train_begin(self, logs=None):
        if self._pending:
            self.best, self.best_epoch = self._pending["best"], self._pending["best_epoch"]
            self.wait, self._pending = self._pending["wait"], None

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or not math.isfinite(value):
            return
        if value < self.best:
            self.best, self.best_epoch, self.wait = float(value), epoch, 0
            self.model.save_weights(self.best_path)
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def restore_best(self):
        if self.best_epoch >= 0:
            self.model.load_weights(self.best_path)


class PlateauLR(keras.callbacks.ReduceLROnPlateau):
    """ReduceLROnPlateau whose counters survive a resume (the LR itself is in the optimizer)."""

    _pending = None

    def get_state(self):
        return {"wait": self.wait, "best": float(self.best),
                "cooldown_counter": self.cooldown_counter}

    def set_state(self, state):
        self._pending = dict(state)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)  # resets the counters ...
        if self._pending:  # ... so a resumed run puts its own back afterwards
            self.wait, self.best = self._pending["wait"], self._pending["best"]
            self.cooldown_counter, self._pending = self._pending["cooldown_counter"], None


class NanGuard(keras.callbacks.Callback):
    """Stops with a clear message when the training loss is NaN or infinite."""

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            step = int(self.model.optimizer.iterations.numpy())
            raise TrainingDiverged(
                f"training loss is {loss} at step {step}; stopped (try a lower --learning_rate "
                "or --clipnorm=1.0)")


class Throughput(keras.callbacks.Callback):
    """Training samples/s, excluding the first execution (tracing and XLA compilation)."""

    def __init__(self, global_batch: int):
        super().__init__()
        self.global_batch = global_batch
        self.steps, self.seconds, self._start, self._last_step = 0, 0.0, None, None

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()
        self._step_before = int(self.model.optimizer.iterations.numpy())

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())  # syncs: the step really finished
        if self._last_step is not None:
            self.steps += step - self._step_before
            self.seconds += time.perf_counter() - self._start
        self._last_step = step

    @property
    def samples_per_second(self) -> float:
        return self.steps * self.global_batch / self.seconds if self.seconds else 0.0


def _profile_callback(cfg, chief: bool):
    """msa_xla.profiling.make_profile_callback(...) when that module exists, else None."""
    if (not (cfg.profile_steps or cfg.profiler_port)
            or importlib.util.find_spec("msa_xla.profiling") is None):
        return None
    from msa_xla import profiling

    return profiling.make_profile_callback(
        profile_steps=cfg.profile_steps, profile_dir=cfg.profile_dir,
        profiler_port=cfg.profiler_port, is_chief=chief,
        run_name=os.path.basename(os.path.normpath(cfg.workdir or "run")))


def build_callbacks(cfg, *, seed_dir: str, run_checkpoint, steps_per_epoch: int, chief: bool):
    """Every callback of one seed's fit, in order; returns (list, named handles)."""
    early = EarlyStoppingBest(cfg.early_stopping_patience, os.path.join(seed_dir, "best", "weights"))
    plateau = PlateauLR(monitor=MONITOR, mode="min", factor=cfg.lr_plateau_factor,
                        patience=cfg.lr_plateau_patience, verbose=1 if chief else 0)
    throughput = Throughput(cfg.batch_size)
    callbacks = [NanGuard(), throughput, early, plateau]
    if chief:
        callbacks.append(keras.callbacks.TensorBoard(
            os.path.join(seed_dir, "tensorboard"), update_freq="epoch", profile_batch=0))
    profile = _profile_callback(cfg, chief)
    if profile is not None:
        callbacks.append(profile)
    checkpoint = CheckpointCallback(run_checkpoint, cfg.checkpoint_every,
                                    {"early_stopping": early, "plateau": plateau},
                                    epoch_of_step=lambda step: step // steps_per_epoch)
    callbacks.append(checkpoint)  # last: saves the state the others just updated
    return callbacks, {"early": early, "plateau": plateau, "throughput": throughput,
                       "checkpoint": checkpoint}
