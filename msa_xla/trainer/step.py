"""The trainer's step section: what XLA compiles under each strategy, decided in one place.

Three plans (`plan_jit`), chosen from `--jit_compile` and the strategy:

- `whole_step`: `model.compile(jit_compile=True)`. Forward, backward, gradient all-reduce,
  optimizer update and metric updates are one XLA computation per replica (train, eval and
  predict functions alike). Used on one replica (CPU, one GPU) and on TPU / multi-GPU, whose XLA
  backends have collectives.
- `split_step`: several replicas on CPU, where XLA has no collectives (docs/ARCHITECTURE.md §3). Per
  replica, forward + loss + backward is one `tf.function(jit_compile=True)` (and the eval
  forward pass another); the cross-replica gradient all-reduce, the optimizer update and the
  metric updates run as ordinary TF ops outside XLA. Works for MirroredStrategy over logical
  CPUs and for MultiWorkerMirroredStrategy (measured on TF 2.21; each replica traces the inner
  function once, with its own variable copies as captures). The models' own `train_step` is
  replaced on the instance; a model with a custom train step (BalancedMSAModel: OGM-GE gradient
  modulation) takes part only if it offers `compute_gradients(x, y, sample_weight)` (and
  `track_step_extras(extras)` for what that returns besides the gradients); else its own step
  runs un-jitted.
- `kernels_only`: `--jit_compile=false` (or the fallback above). The Keras step runs as a plain
  TF graph; with `--attention_impl=fused` the attention kernel is still its own XLA unit.
"""

from __future__ import annotations

import dataclasses
import types

import tensorflow as tf
import tf_keras as keras

from msa_xla.runtime.distribute import device_platform, xla_can_compile_collectives
from msa_xla.trainer.optimizer import FusedAdam


@dataclasses.dataclass(frozen=True)
class JitPlan:
    mode: str  # 'whole_step' | 'split_step' | 'kernels_only'
    description: str

    @property
    def compile_jit(self) -> bool:
        return self.mode == "whole_step"


def plan_jit(jit_flag: str, strategy, model) -> JitPlan:
    """Decides what XLA compiles (see the module docstring)."""
    kernel = ("the attention kernel is its own XLA unit"
              if getattr(model, "attention_impl", "") == "fused" else "no XLA")
    if jit_flag == "false":
        return JitPlan("kernels_only", f"train step not compiled; {kernel}")
    if xla_can_compile_collectives(strategy):
        return JitPlan("whole_step", "whole train step (forward, backward, all-reduce, update, "
                                     "metrics) is one XLA computation")
    custom_step = type(model).train_step is not keras.Model.train_step
    if custom_step and not hasattr(model, "compute_gradients"):
        return JitPlan("kernels_only",
                       f"{type(model).__name__} has its own train_step and no compute_gradients; "
                       f"its step runs un-jitted on {device_platform(strategy)} replicas; {kernel}")
    return JitPlan("split_step", "per-replica forward+loss+backward is one XLA computation; "
                                 "all-reduce, optimizer update and metrics run outside XLA "
                                 f"(no XLA collectives on {device_platform(strategy)})")


AUTO_STEPS_PER_EXECUTION = 100  # Model Garden's Orbit loops run hundreds of steps a host call


def steps_per_execution_for(flag_value: int, strategy, steps_per_epoch: int) -> int:
    """Train steps per host call: the flag if set, else automatic by platform.

    On TPU and GPU each host call into the step costs a round trip the device waits for, so
    'auto' (0) runs up to `AUTO_STEPS_PER_EXECUTION` steps per call, at most one epoch (Keras
    ends an execution at the epoch's end anyway). On CPU the host is the device: 1.
    The batch callbacks then run once per execution (callbacks.EpochStepCounter).

    Example:
      >>> steps_per_execution_for(0, tf.distribute.OneDeviceStrategy("/cpu:0"), 40)
      1
      >>> steps_per_execution_for(8, tf.distribute.OneDeviceStrategy("/cpu:0"), 40)
      8
    """
    if flag_value:
        return int(flag_value)
    if device_platform(strategy) == "CPU":
        return 1
    return max(1, min(AUTO_STEPS_PER_EXECUTION, int(steps_per_epoch)))


def _gradients(model, x, y, sample_weight):
    """Default forward + loss + backward, the Keras train_step up to the update."""
    optimizer = model.optimizer
    scales = isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer)
    with tf.GradientTape() as tape:
        y_pred = model(x, training=True)
        loss = model.compute_loss(x, y, y_pred, sample_weight)
        tape_loss = optimizer.get_scaled_loss(loss) if scales else loss
    grads = tape.gradient(tape_loss, model.trainable_variables)
    if scales:
        grads = optimizer.get_unscaled_gradients(grads)
    return loss, y_pred, grads, {}


def install_split_step(model):
    """Replaces the model's train/test steps by the split (XLA inside, collectives outside) ones."""
    compute = getattr(model, "compute_gradients", None)

    @tf.function(jit_compile=True)
    def xla_gradients(x, y, sample_weight):
        if compute is not None:
            return compute(x, y, sample_weight)
        return _gradients(model, x, y, sample_weight)

    @tf.function(jit_compile=True)
    def xla_forward(x):
        return model(x, training=False)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        _, y_pred, grads, extra = xla_gradients(x, y, sample_weight)
        # Outside XLA: MirroredStrategy / MWMS sum the gradients over replicas here.
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        logs = self.compute_metrics(x, y, y_pred, sample_weight)
        if extra:  # e.g. BalancedMSAModel's coefficients: metric updates stay outside XLA too
            logs.update(self.track_step_extras(extra))
        return logs

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred = xla_forward(x)
        self.compute_loss(x, y, y_pred, sample_weight)
        return self.compute_metrics(x, y, y_pred, sample_weight)

    def predict_step(self, data):
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        return xla_forward(x)

    model.train_step = types.MethodType(train_step, model)
    model.test_step = types.MethodType(test_step, model)
    model.predict_step = types.MethodType(predict_step, model)
    return model


def make_optimizer(learning_rate: float, clipnorm: float):
    """Adam (one fused update op per variable: trainer/optimizer.py); clipnorm > 0 clips each
    gradient tensor's norm (Keras `clipnorm`, as the spec), applied after the cross-replica
    all-reduce (tf_keras aggregates, then clips)."""
    kwargs = {"clipnorm": clipnorm} if clipnorm else {}
    return FusedAdam(learning_rate=learning_rate, **kwargs)
