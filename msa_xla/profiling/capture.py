"""Profiling capture: a window of train steps recorded on the chief (the report on it lives in
msa_xla/profiling/report.py).

What `python -m msa_xla.train --profile_steps=A,B` does:

    callback = make_profile_callback(profile_steps=(5, 8), profile_dir=None,
                                     profiler_port=0, is_chief=True, run_name="my-run")
    model.fit(..., callbacks=[callback])   # -> profiles/my-run/plugins/profile/<time>/*.xplane.pb

The Keras callback class is built on first use (`ProfileWindow`), so importing this module
does not load TensorFlow.

Step numbers are global train steps counted from 0 (the value of `optimizer.iterations` when
the step starts), so they mean the same after a resume. Step 0 also traces the train function and
compiles it with XLA; start the window later to see steady-state step time.
"""

from __future__ import annotations

import os

from msa_xla.errors import UserError

PROFILES_ROOT = "profiles"


# ----------------------------------------------------------------------------------------------
# capture
# ----------------------------------------------------------------------------------------------
def default_profile_dir(run_name: str | None) -> str:
    """`profiles/<run name>/` (the trainer's run name is the last part of its workdir)."""
    return os.path.join(PROFILES_ROOT, run_name or "run")


def enable_xla_trace_events(environ=os.environ) -> bool:
    """Asks XLA:CPU to record one trace event per thunk (what the report's by-part table
    reads), by adding `--xla_cpu_enable_xprof_traceme=true` to XLA_FLAGS. XLA reads XLA_FLAGS
    at its first compilation, so this runs before the model is built (trainer/main.py does so
    when --profile_steps is given); an explicit setting of the flag in XLA_FLAGS is kept.
    Returns True if the flag was added.

    No HLO dump is needed: the capture holds each program's optimized HLO (xprof's metadata
    plane). To dump it anyway, add `--xla_dump_to=<profile dir>/hlo --xla_dump_hlo_as_text`
    (the report reads `<profile dir>/hlo` when the capture holds no HLO).
    """
    flags = environ.get("XLA_FLAGS", "")
    if "--xla_cpu_enable_xprof_traceme" in flags:
        return False
    environ["XLA_FLAGS"] = f"{flags} {XLA_TRACEME_FLAG}".strip()
    return True


XLA_TRACEME_FLAG = "--xla_cpu_enable_xprof_traceme=true"
_server_port = None  # one profiler server per process (a second start would fail)


def start_profiler_server(port: int) -> bool:
    """Starts the on-demand capture server once per process; False if it was already running."""
    global _server_port
    if _server_port is not None:
        return False
    import tensorflow as tf

    tf.profiler.experimental.server.start(int(port))
    _server_port = int(port)
    return True


def _build_window_class():
    """ProfileWindow, a tf_keras callback (built on first use: tf_keras loads TensorFlow)."""
    import tensorflow as tf
    import tf_keras as keras

    from msa_xla.runtime import compat

    class ProfileWindow(keras.callbacks.Callback):
        """Profiles train steps A..B (inclusive) with `tf.profiler.experimental` on this process.

        tf_keras' fit loop already wraps every step in
        `tf.profiler.experimental.Trace("train", epoch_num=..., step_num=..., _r=1)` (the step
        marker xprof's step-time analysis keys on) and calls the batch hooks *inside* it. A
        trace event is only recorded if the profiler runs both when it begins and when it ends,
        so the window is opened and closed *between* steps: the profiler starts in the hook that
        runs just before step A's marker opens (batch end of step A-1, or epoch begin when A
        opens an epoch) and stops in the first hook after step B's marker closed (batch begin of
        step B+1, validation begin, epoch end or train end). A callback cannot wrap the step in a
        context manager of its own, and a second, nested step marker would make xprof count
        steps twice. (Starting inside step A's batch-begin hook, as tf_keras' TensorBoard
        callback does, loses step A's marker: measured here, 2..4 gave one step, not three.)

        Both ends wait for the device first (maxtext's "sync at both ends"): reading
        `optimizer.iterations` returns once the step that updated it has finished and `async_wait`
        drains the eager queue, so the window holds steps A..B and not the tail of step A-1. Under
        MultiWorkerMirroredStrategy each step ends with an all-reduce, so the workers run in
        lock-step and the chief's window covers the same steps on all of them. A window that
        spans an epoch end also holds that epoch's validation pass (its "test" steps).

        Args:
          profile_steps: (A, B), 0 <= A <= B, global train steps (`optimizer.iterations` at the
            start of the step).
          logdir: where `tf.profiler.experimental.start` writes
            (`<logdir>/plugins/profile/<time>/<host>.xplane.pb`).
          log: a callable taking one line, or None.
        """

        def __init__(self, profile_steps, logdir: str, log=None):
            super().__init__()
            compat.keep_logs_as_tensors(self)  # the batch hooks never read the logs
            first, last = (int(s) for s in profile_steps)
            if not 0 <= first <= last:
                raise UserError(f"profile_steps={profile_steps}: expected A,B with 0 <= A <= B")
            self.first, self.last, self.logdir, self._log = first, last, logdir, log
            self.active = False
            self.captured = False  # True once a window was written
            self.steps_captured = None  # (first, last) global steps of the written window
            self._start_step = None
            self._epoch, self._steps_per_execution = 0, 1

        # -- hooks: start just before a step in the window, stop just after the window --------
        # Outside the window no hook reads the device: the next step's number comes from
        # Keras' batch index (one read of `optimizer.iterations` per epoch begin, where a
        # resumed run's first epoch starts mid-way).
        def on_train_begin(self, logs=None):
            self._steps_per_execution = compat.steps_per_execution(self.model)
            self._maybe_start()

        def on_epoch_begin(self, epoch, logs=None):
            self._epoch = epoch
            self._maybe_start()

        def on_train_batch_begin(self, batch, logs=None):
            self._maybe_stop()  # a step after B is about to run (its marker is already open)

        def on_train_batch_end(self, batch, logs=None):
            steps = (self.params or {}).get("steps")
            if steps is not None and batch + 1 < steps:  # the next step is in this epoch
                self._maybe_start(self._epoch * steps + batch + 1)
            # (otherwise validation runs first: start at epoch begin)

        def on_test_begin(self, logs=None):
            self._maybe_stop()

        def on_epoch_end(self, epoch, logs=None):
            self._maybe_stop()

        def on_train_end(self, logs=None):
            self._maybe_stop(force=True)  # training ended inside the window: keep the capture

        # -- the window ------------------------------------------------------------------------
        def _sync(self) -> int:
            """Waits for the device's pending work; returns the next step's number."""
            step = int(self.model.optimizer.iterations.numpy())
            compat.wait_for_device()
            return step

        def _maybe_start(self, step=None):
            """Starts if the execution about to run (from global `step`) reaches the window."""
            if self.active or self.captured:
                return
            if step is None:
                step = int(self.model.optimizer.iterations.numpy())
            # One execution runs steps step .. step+spe-1: start if it reaches into the window.
            if not (step + self._steps_per_execution - 1 >= self.first and step <= self.last):
                return
            self._sync()
            try:
                tf.profiler.experimental.start(self.logdir)
            except tf.errors.AlreadyExistsError as error:  # another profiler session is running
                self.captured = True
                if self._log:
                    self._log(f"profiler not started: {error.message}")
                return
            self.active, self._start_step = True, step

        def _maybe_stop(self, force=False):
            if not self.active:
                return
            step = self._sync()
            if step <= self.last and not force:
                return
            tf.profiler.experimental.stop()
            self.active, self.captured = False, True
            self.steps_captured = (self._start_step, step - 1)
            if self._log:
                self._log(f"profiled train steps {self._start_step}..{step - 1} into "
                          f"{self.logdir} (report: python tools/profile_report.py "
                          f"{self.logdir})")

    return ProfileWindow


_window_class = None


def __getattr__(name):  # PEP 562: `profiling.ProfileWindow` builds the class on first access
    global _window_class
    if name == "ProfileWindow":
        if _window_class is None:
            _window_class = _build_window_class()
        return _window_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_profile_callback(profile_steps=(), profile_dir=None, profiler_port=0, is_chief=True,
                          run_name=None, log=None):
    """The trainer's seam: a ProfileWindow on the chief, or None.

    Starts the profiler server on `profiler_port` (every worker, so each can be captured on
    demand from TensorBoard's Profile tab or `tf.profiler.experimental.client.trace`). Only the
    chief (first worker) captures the window; the others return None.
    """
    log = log or _print_log
    if profiler_port:
        if start_profiler_server(profiler_port):
            log(f"profiler server on port {profiler_port} (capture from TensorBoard: "
                f"Profile > Capture profile > localhost:{profiler_port})")
    if not profile_steps or not is_chief:
        return None
    logdir = profile_dir or default_profile_dir(run_name)
    return __getattr__("ProfileWindow")(profile_steps, logdir, log=log)


def _print_log(line: str) -> None:
    print(f"[msa_xla.profiling.capture] {line}", flush=True)
