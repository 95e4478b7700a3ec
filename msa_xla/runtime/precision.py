"""Precision policy: float32 | mixed_bfloat16 | mixed_float16, and loss scaling for float16 only.

    policy = resolve_precision(flags.precision, strategy)   # 'auto' -> per platform
    apply_precision(policy)                                 # before building the model
    optimizer = wrap_optimizer(optimizer, policy)           # custom loops; compile() wraps itself

Why 'auto' picks float32 on CPU: on this project's CPU host `mixed_bfloat16` with
`jit_compile=True` trained 2x slower than float32 (docs/ARCHITECTURE.md §3); bfloat16 pays off on TPU
(native) and float16 on GPU (tensor cores).
"""

from __future__ import annotations

import tf_keras as keras

from msa_xla.errors import UserError
from msa_xla.options import POLICIES
from msa_xla.runtime.distribute import device_platform

_AUTO_POLICY = {"TPU": "mixed_bfloat16", "GPU": "mixed_float16", "CPU": "float32"}


class PrecisionError(UserError):
    """An unknown precision name, or one the platform cannot run."""


def _check_policy_name(policy_name, allow_auto: bool = False) -> str:
    choices = ("auto",) + POLICIES if allow_auto else POLICIES
    if not isinstance(policy_name, str) or policy_name.lower() not in choices:
        raise PrecisionError(
            f"unknown precision {policy_name!r}; choose one of {', '.join(choices)}"
        )
    return policy_name.lower()


def resolve_precision(precision: str = "auto", strategy=None) -> str:
    """Turns a precision flag into a concrete Keras policy name.

    Args:
      precision: 'auto' or one of `POLICIES`. 'auto' gives 'mixed_bfloat16' on TPU,
        'mixed_float16' on GPU and 'float32' on CPU.
      strategy: the `tf.distribute.Strategy` whose devices decide 'auto'; None looks at the
        devices visible to TF.

    Returns:
      One of `POLICIES`.

    Raises:
      PrecisionError: unknown name, or 'mixed_float16' on TPU (TPUs compute in bfloat16).

    Example:
      >>> resolve_precision("auto")   # on a CPU-only host
      'float32'
    """
    precision = _check_policy_name(precision, allow_auto=True)
    platform = device_platform(strategy)
    if precision == "auto":
        return _AUTO_POLICY[platform]
    if precision == "mixed_float16" and platform == "TPU":
        raise PrecisionError(
            "precision mixed_float16 is not supported on TPU; use mixed_bfloat16 or float32"
        )
    return precision


def apply_precision(policy_name: str) -> keras.mixed_precision.Policy:
    """Sets the tf_keras global dtype policy; call it before building the model.

    Layers built afterwards compute in the policy's compute dtype and keep float32 variables.

    Args:
      policy_name: one of `POLICIES` (resolve 'auto' with `resolve_precision` first).

    Returns:
      The policy now global.

    Example:
      >>> apply_precision("mixed_bfloat16").compute_dtype
      'bfloat16'
    """
    policy_name = _check_policy_name(policy_name)
    keras.mixed_precision.set_global_policy(policy_name)
    return keras.mixed_precision.global_policy()


def wrap_optimizer(optimizer, policy_name: str):
    """Wraps `optimizer` in a dynamic `LossScaleOptimizer` for 'mixed_float16' only.

    float16 has 5 exponent bits, so small gradients underflow without loss scaling; bfloat16
    keeps float32's exponent range and needs none. `model.compile()` already wraps the
    optimizer itself under a global mixed_float16 policy; this is for custom training loops,
    and an optimizer that is already wrapped is returned as it is.

    Args:
      optimizer: a tf_keras optimizer.
      policy_name: one of `POLICIES`.

    Returns:
      `optimizer`, or a `keras.mixed_precision.LossScaleOptimizer` around it.

    Example:
      >>> opt = wrap_optimizer(keras.optimizers.Adam(1e-3), "mixed_float16")
      >>> isinstance(opt, keras.mixed_precision.LossScaleOptimizer)
      True
    """
    policy_name = _check_policy_name(policy_name)
    if policy_name != "mixed_float16":
        return optimizer
    if isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer):
        return optimizer
    return keras.mixed_precision.LossScaleOptimizer(optimizer)
