"""msa_xla.kernels.linear (kernels/projection.py) and msa_xla.layers.Dense: inside XLA the bias
gradient comes out of the weight-gradient matmul; values and all three gradients equal the
plain ops' (and keras Dense's)."""
import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from msa_xla.kernels import linear, projection
from msa_xla.layers.dense import Dense


def _value_and_grads(fn, x, kernel, bias, jit):
    dy = tf.random.stateless_normal(x.shape[:-1] + [kernel.shape[1]], seed=(3, 4))

    def run(x, kernel, bias):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel, bias])
            y = fn(x, kernel, bias)
        return (y,) + tuple(tape.gradient(y, [x, kernel, bias], output_gradients=dy))

    return tf.function(run, jit_compile=jit)(x, kernel, bias)


@pytest.mark.parametrize("shape", [(6, 5), (3, 7, 5), (2, 3, 4, 5)])
def test_linear_in_xla_equals_plain_matmul_and_its_gradients(shape):
    x = tf.random.stateless_normal(shape, seed=(1, 2))
    kernel = tf.random.stateless_normal((shape[-1], 9), seed=(5, 6))
    bias = tf.random.stateless_normal((9,), seed=(7, 8))
    plain = _value_and_grads(lambda x, k, b: tf.einsum("...i,io->...o", x, k) + b,
                             x, kernel, bias, jit=False)
    ours = _value_and_grads(linear, x, kernel, bias, jit=True)
    for name, a, b in zip(("y", "dx", "dkernel", "dbias"), plain, ours):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5, err_msg=name)


def test_linear_takes_the_folded_bias_gradient_path_only_inside_xla(monkeypatch):
    calls = []
    folded = projection._linear_bias_grad_in_matmul
    monkeypatch.setattr(projection, "_linear_bias_grad_in_matmul",
                        lambda *args: calls.append(1) or folded(*args))
    x, kernel, bias = tf.ones((2, 3, 4)), tf.ones((4, 5)), tf.zeros((5,))
    linear(x, kernel, bias)  # eager
    tf.function(linear)(x, kernel, bias)  # graph, no XLA
    assert calls == []
    tf.function(linear, jit_compile=True)(x, kernel, bias)
    assert calls == [1]


@pytest.mark.parametrize("jit", [False, True])
def test_dense_matches_keras_dense_with_the_same_weights(jit):
    x = tf.random.stateless_normal((4, 6, 8), seed=(9, 10))
    ours, stock = Dense(5, activation="relu"), keras.layers.Dense(5, activation="relu")
    ours.build(x.shape)
    stock.build(x.shape)
    stock.set_weights([w + 0.1 for w in ours.get_weights()])
    ours.set_weights(stock.get_weights())

    def value_and_grads(layer):
        def run(x):
            with tf.GradientTape() as tape:
                y = layer(x)
                loss = tf.reduce_sum(y * tf.range(5, dtype=tf.float32))
            return [y] + tape.gradient(loss, layer.trainable_variables)
        return tf.function(run, jit_compile=jit)(x)

    for a, b in zip(value_and_grads(stock), value_and_grads(ours)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5)
    assert [w.name.split("/")[-1] for w in ours.weights] == ["kernel:0", "bias:0"]
    assert Dense.from_config(ours.get_config()).units == 5
