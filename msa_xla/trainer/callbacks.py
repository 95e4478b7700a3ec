"""The trainer's callbacks and the one function that lists them (the seam for profiling).

Order matters: the epoch-end callbacks that change state (early stopping, LR plateau) run
before CheckpointCallback, which saves that state.
"""

from __future__ import annotations

import math
import signal
import time

import tf_keras as keras

from msa_xla.runtime import compat, storage
from msa_xla.trainer.checkpointing import RunCheckpoint

MONITOR = "val_MAE"


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


class EarlyStoppingBest(keras.callbacks.Callback):
    """EarlyStopping on `val_MAE` (min), best weights saved to disk and restored at the end.

    Unlike keras.callbacks.EarlyStopping the best weights live in files (so they survive a
    crash and a resume) and are restored whenever training ends, stopped early or not.
    Each new best is written under a new name, `<best_dir>/epoch-<e>`, never over the last
    one: a crash mid-write leaves the previous best intact, and object stores and TF's ram://
    need no overwrite (ram:// appends to a file written twice). The two newest are kept: the
    checkpoint that records `best_epoch` is written just after, so a resumed run may name
    either.
    """

    def __init__(self, patience: int, best_dir: str, monitor: str = MONITOR):
        super().__init__()
        self.patience, self.best_dir, self.monitor = int(patience), best_dir, monitor
        self.best, self.best_epoch, self.wait, self.stopped_epoch = math.inf, -1, 0, -1
        self._pending = None

    def weights_path(self, epoch: int) -> str:
        return storage.join(self.best_dir, f"epoch-{epoch}")

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
            # Files of this epoch can only be left over from a run interrupted after them and
            # before its checkpoint (e.g. preempted: Keras still ends the epoch); no state names
            # them. Removed first, as ram:// would append to them.
            for stale in storage.glob(self.weights_path(epoch) + ".*"):
                storage.remove(stale)
            self.model.save_weights(self.weights_path(epoch))
            self._remove_older_than_two()
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def _remove_older_than_two(self):
        files = storage.glob(storage.join(self.best_dir, "epoch-*"))
        epochs = sorted({int(storage.basename(f)[len("epoch-"):].split(".")[0]) for f in files})
        for path in files:
            if int(storage.basename(path)[len("epoch-"):].split(".")[0]) in epochs[:-2]:
                storage.remove(path)

    def restore_best(self):
        if self.best_epoch >= 0:
            self.model.load_weights(self.weights_path(self.best_epoch))


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


class EpochStepCounter(keras.callbacks.Callback):
    """Counts global train steps from Keras' batch indices, never by reading the device.

    With `steps_per_execution=k`, tf_keras calls the batch hooks once per execution of k
    steps, with `batch` = the epoch-relative index of the execution's last step (and of its
    first in `on_train_batch_begin`; a mid-epoch resume starts the epoch at its resume step).
    Reading `optimizer.iterations` instead would be one more blocking device read per
    execution: on TPU, a host round trip that stalls the next execution.
    `keep_logs_as_tensors`: the logs stay tensors; tf_keras converts every log to numpy on each
    batch as soon as one batch callback does not declare this.
    """

    def __init__(self):
        super().__init__()
        compat.keep_logs_as_tensors(self)  # after Callback.__init__, which resets it
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def steps_done(self, batch: int) -> int:
        """Global steps completed once the execution ending at epoch-relative `batch` is done."""
        return self._epoch * self.params["steps"] + batch + 1


class NanGuard(EpochStepCounter):
    """Stops with a clear message when the training loss is NaN or infinite.

    Checked once per execution: its one read of the loss is the only host synchronisation of
    the trainer's batch hooks (callbacks after it see a finished execution).
    """

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        loss = float(loss)  # waits for the execution: the one read per execution
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"training loss is {loss} at step {self.steps_done(batch)}; stopped (try a lower "
                "--learning_rate or --clipnorm=1.0)")


class Throughput(EpochStepCounter):
    """Training samples/s, excluding the first execution (tracing and XLA compilation).

    Times each execution from its batch-begin hook to its batch-end hook; it must come after
    NanGuard in the callback list, whose read of the loss is what waits for the execution.
    """

    def __init__(self, global_batch: int):
        super().__init__()
        self.global_batch = global_batch
        self.steps, self.seconds = 0, 0.0
        self._start, self._first_batch, self._executions = None, None, 0

    def on_train_batch_begin(self, batch, logs=None):
        self._start, self._first_batch = time.perf_counter(), batch

    def on_train_batch_end(self, batch, logs=None):
        if self._executions:
            self.steps += batch - self._first_batch + 1
            self.seconds += time.perf_counter() - self._start
        self._executions += 1

    @property
    def samples_per_second(self) -> float:
        return self.steps * self.global_batch / self.seconds if self.seconds else 0.0


class CheckpointCallback(EpochStepCounter):
    """Saves every `every` steps, at each epoch end and on SIGTERM; goes last in the list.

    A mid-epoch checkpoint is written at the end of the first execution after which at least
    `every` steps have passed since the last save: with `steps_per_execution=k` the batch hooks
    run once per k steps, so a save test of `step % every == 0` would skip every checkpoint
    whose step is not a multiple of k. Steps are counted from Keras' batch indices (no device
    read per execution; see EpochStepCounter).

    Args:
      run_checkpoint: the seed's RunCheckpoint.
      every: steps between mid-epoch checkpoints (0: epoch ends only).
      stateful_callbacks: {name: callback with get_state()/set_state()} saved alongside.
      epoch_of_step: step -> epochs completed (to record progress).
    """

    def __init__(self, run_checkpoint: RunCheckpoint, every: int, stateful_callbacks: dict,
                 epoch_of_step):
        super().__init__()
        self.run_checkpoint, self.every = run_checkpoint, int(every)
        self.stateful_callbacks, self.epoch_of_step = stateful_callbacks, epoch_of_step
        self.preempted = False
        self.saved_steps = []  # steps of the checkpoints this callback wrote, in order
        self._sigterm = False
        self._last_saved = None
        self._previous_handler = None

    def _state(self) -> dict:
        return {"epochs_done": self.epoch_of_step(self.run_checkpoint.step),
                "callbacks": {name: cb.get_state()
                              for name, cb in self.stateful_callbacks.items()}}

    def save(self):
        step = self.run_checkpoint.step  # a device read, once per save
        if step != self._last_saved:
            self.run_checkpoint.save(self._state())
            self._last_saved = step
            self.saved_steps.append(step)

    def on_train_begin(self, logs=None):
        self._last_saved = self.run_checkpoint.step
        try:
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:  # not the main thread: no preemption handling
            self._previous_handler = None

    def _on_sigterm(self, signum, frame):
        self._sigterm = True  # acted on at the end of the current execution

    def on_train_batch_end(self, batch, logs=None):
        if self._sigterm:
            self.save()
            self.preempted = True
            self.model.stop_training = True
            return
        if self.every and self.steps_done(batch) - self._last_saved >= self.every:
            self.save()

    def on_epoch_end(self, epoch, logs=None):
        self.save()

    def on_train_end(self, logs=None):
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)


def _profile_callback(cfg, chief: bool):
    """The profiler window callback when --profile_steps or --profiler_port asks for one."""
    if not (cfg.profile_steps or cfg.profiler_port):
        return None
    from msa_xla.profiling import capture as profiling  # xprof's import costs; only when asked

    return profiling.make_profile_callback(
        profile_steps=cfg.profile_steps, profile_dir=cfg.profile_dir,
        profiler_port=cfg.profiler_port, is_chief=chief,
        run_name=storage.basename(cfg.workdir or "run"))


def build_callbacks(cfg, *, seed_dir: str, run_checkpoint, steps_per_epoch: int, chief: bool):
    """Every callback of one seed's fit, in order; returns (list, named handles)."""
    early = EarlyStoppingBest(cfg.early_stopping_patience, storage.join(seed_dir, "best"))
    plateau = PlateauLR(monitor=MONITOR, mode="min", factor=cfg.lr_plateau_factor,
                        patience=cfg.lr_plateau_patience, verbose=1 if chief else 0)
    throughput = Throughput(cfg.batch_size)
    callbacks = [NanGuard(), throughput, early, plateau]
    if chief:
        callbacks.append(keras.callbacks.TensorBoard(
            storage.join(seed_dir, "tensorboard"), update_freq="epoch", profile_batch=0))
    profile = _profile_callback(cfg, chief)
    if profile is not None:
        callbacks.append(profile)
    checkpoint = CheckpointCallback(run_checkpoint, cfg.checkpoint_every,
                                    {"early_stopping": early, "plateau": plateau},
                                    epoch_of_step=lambda step: step // steps_per_epoch)
    callbacks.append(checkpoint)  # last: saves the state the others just updated
    return callbacks, {"early": early, "plateau": plateau, "throughput": throughput,
                       "checkpoint": checkpoint}
