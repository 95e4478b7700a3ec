"""Tests for msa_xla.runtime.precision: policy resolution per platform, global policy, loss scaling."""
import pytest
import tensorflow as tf
import tf_keras as keras

from msa_xla.runtime import precision as precision_module
from msa_xla.runtime.distribute import get_strategy
from msa_xla.runtime.precision import (
    POLICIES,
    PrecisionError,
    apply_precision,
    resolve_precision,
    wrap_optimizer,
)


def test_auto_on_this_cpu_host_is_float32():
    assert resolve_precision() == "float32"
    assert resolve_precision("auto", get_strategy("cpu")) == "float32"


@pytest.mark.parametrize(
    "platform,expected", [("TPU", "mixed_bfloat16"), ("GPU", "mixed_float16"), ("CPU", "float32")]
)
def test_auto_per_platform(monkeypatch, platform, expected):
    # No TPU/GPU here: stand in for the platform probe.
    monkeypatch.setattr(precision_module, "device_platform", lambda strategy=None: platform)
    assert resolve_precision("auto") == expected


@pytest.mark.parametrize("name", POLICIES)
def test_explicit_names_pass_through_and_are_case_insensitive(name):
    assert resolve_precision(name) == name
    assert resolve_precision(name.upper()) == name


def test_mixed_float16_on_tpu_is_rejected(monkeypatch):
    monkeypatch.setattr(precision_module, "device_platform", lambda strategy=None: "TPU")
    with pytest.raises(PrecisionError, match="mixed_float16 is not supported on TPU"):
        resolve_precision("mixed_float16")


@pytest.mark.parametrize("bad", ["bf16", "float16", "", None, 16])
def test_unknown_precision_lists_choices(bad):
    with pytest.raises(
        PrecisionError,
        match="choose one of auto, float32, mixed_bfloat16, mixed_float16$",
    ):
        resolve_precision(bad)


def test_apply_precision_sets_global_policy_for_new_layers():
    policy = apply_precision("mixed_bfloat16")
    assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    assert (policy.compute_dtype, policy.variable_dtype) == ("bfloat16", "float32")
    layer = keras.layers.Dense(2)
    outputs = layer(tf.ones((1, 3)))
    assert outputs.dtype == tf.bfloat16 and layer.kernel.dtype == tf.float32
    assert apply_precision("float32").name == "float32"


def test_apply_precision_rejects_auto_and_unknown():
    with pytest.raises(PrecisionError, match="unknown precision 'auto'; choose one of float32,"):
        apply_precision("auto")
    with pytest.raises(PrecisionError, match="unknown precision 'fp8'"):
        apply_precision("fp8")
    assert keras.mixed_precision.global_policy().name == "float32"  # unchanged


@pytest.mark.parametrize("name", ["float32", "mixed_bfloat16"])
def test_no_loss_scaling_without_float16(name):
    optimizer = keras.optimizers.SGD(0.1)
    assert wrap_optimizer(optimizer, name) is optimizer


def test_float16_gets_dynamic_loss_scaling_once():
    wrapped = wrap_optimizer(keras.optimizers.SGD(0.1), "mixed_float16")
    assert isinstance(wrapped, keras.mixed_precision.LossScaleOptimizer)
    assert wrapped.dynamic
    assert wrap_optimizer(wrapped, "mixed_float16") is wrapped  # not wrapped twice
    with pytest.raises(PrecisionError, match="unknown precision"):
        wrap_optimizer(keras.optimizers.SGD(0.1), "half")


def test_wrapped_optimizer_trains_a_float16_layer():
    apply_precision("mixed_float16")
    layer = keras.layers.Dense(1, kernel_initializer="ones")
    layer.build((None, 2))
    optimizer = wrap_optimizer(keras.optimizers.SGD(0.1), "mixed_float16")
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.cast(layer(tf.ones((4, 2))), tf.float32))  # = 2.0
        scaled_loss = optimizer.get_scaled_loss(loss)
    scaled_gradients = tape.gradient(scaled_loss, layer.trainable_variables)
    gradients = optimizer.get_unscaled_gradients(scaled_gradients)
    optimizer.apply_gradients(zip(gradients, layer.trainable_variables))
    # d loss / d kernel = 1 for each weight: 1 - 0.1 * 1 = 0.9.
    assert layer.kernel.numpy().ravel().tolist() == pytest.approx([0.9, 0.9])
