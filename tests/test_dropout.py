"""msa_xla.layers.dropout: the hashed XLA mask has the right rate, no visible structure, the exact
scale and gradient, and fresh masks per call; outside XLA the layer is keras' Dropout."""
import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from msa_xla.layers.dropout import Dropout, hashed_keep_mask, quantized_keep_probability

RATE = 0.1
ROWS, COLS = 512, 1024  # 524,288 decisions: binomial sd of the keep fraction ~0.0004


def _mask(key, shape=(ROWS, COLS), rate=RATE):
    fn = tf.function(lambda k: hashed_keep_mask(list(shape), rate, k), jit_compile=True)
    return fn(tf.constant(key, tf.int64)).numpy()


def _within(observed, expected, n, sds=5.0):
    sd = np.sqrt(expected * (1 - expected) / n)
    return abs(observed - expected) < sds * sd


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5])
def test_keep_fraction_matches_the_rate(rate):
    keep = _mask([123, 456], rate=rate)
    p = quantized_keep_probability(rate)
    assert abs(p - (1 - rate)) <= 0.5 / 65536
    assert _within(keep.mean(), p, keep.size), keep.mean()


def test_mask_has_no_structure_along_rows_columns_or_word_halves():
    keep = _mask([7, 9])
    p = quantized_keep_probability(RATE)
    flat = keep.reshape(-1)
    # The two decisions of one hash word (elements i and i + size/2) and neighbours are
    # independent.
    half = flat.size // 2
    both = np.mean(flat[:half] & flat[half:])
    assert _within(both, p * p, half), both
    lag1 = np.mean(flat[:-1] & flat[1:])
    assert _within(lag1, p * p, flat.size - 1), lag1
    lag2 = np.mean(flat[:-2] & flat[2:])
    assert _within(lag2, p * p, flat.size - 2), lag2
    # No row or column far off the rate (512 rows / 1024 columns; 5 sd each).
    assert all(_within(m, p, COLS, 5.5) for m in keep.mean(axis=1))
    assert all(_within(m, p, ROWS, 5.5) for m in keep.mean(axis=0))


def test_same_key_same_mask_other_keys_independent():
    a = _mask([1, 2])
    np.testing.assert_array_equal(a, _mask([1, 2]))
    p = quantized_keep_probability(RATE)
    for other in ([1, 3], [2, 2], [0, 0]):
        b = _mask(other)
        agree = np.mean(a == b)  # independent masks agree with probability p^2 + (1-p)^2
        assert _within(agree, p * p + (1 - p) ** 2, a.size), (other, agree)


def test_layer_under_xla_scales_kept_values_exactly_and_its_gradient_is_the_mask():
    layer = Dropout(RATE)
    x = tf.random.stateless_normal([64, 50, 32], seed=[1, 2])

    @tf.function(jit_compile=True)
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            total = tf.reduce_sum(y)
        return y, tape.gradient(total, x)

    y, grad = (t.numpy() for t in step(x))
    scale = np.float32(1.0 / quantized_keep_probability(RATE))
    kept = grad != 0
    np.testing.assert_allclose(y[kept], x.numpy()[kept] * scale, rtol=1e-6)
    assert np.all(y[~kept] == 0)
    np.testing.assert_allclose(grad[kept], scale, rtol=1e-6)
    assert _within(kept.mean(), quantized_keep_probability(RATE), kept.size)
    y2, _ = step(x)
    assert np.mean((y2.numpy() != 0) == kept) < 0.9  # a fresh mask every call


def test_seeded_generator_makes_masks_reproducible():
    keras.backend.experimental.enable_tf_random_generator()
    try:
        masks = []
        for _ in range(2):
            keras.utils.set_random_seed(5)
            layer = Dropout(RATE)
            step = tf.function(lambda x, layer=layer: layer(x, training=True), jit_compile=True)
            x = tf.ones([16, 64])
            masks.append([step(x).numpy() != 0 for _ in range(2)])
    finally:
        keras.backend.experimental.disable_tf_random_generator()
    np.testing.assert_array_equal(masks[0][0], masks[1][0])
    np.testing.assert_array_equal(masks[0][1], masks[1][1])
    assert not np.array_equal(masks[0][0], masks[0][1])


def test_outside_xla_and_at_inference_it_is_keras_dropout():
    x = tf.reshape(tf.range(1.0, 401.0), [20, 20])
    layer = Dropout(0.5, seed=3)
    np.testing.assert_array_equal(layer(x, training=False).numpy(), x.numpy())
    reference = keras.layers.Dropout(0.5, seed=3)
    tf.random.set_seed(11)
    ours = layer(x, training=True).numpy()
    tf.random.set_seed(11)
    np.testing.assert_array_equal(ours, reference(x, training=True).numpy())
    step = tf.function(lambda x: layer(x, training=False), jit_compile=True)
    np.testing.assert_array_equal(step(x).numpy(), x.numpy())


def test_config_round_trip():
    layer = Dropout(0.25, name="drop")
    clone = keras.layers.deserialize(keras.layers.serialize(layer))
    assert type(clone) is Dropout and clone.rate == 0.25 and clone.name == "drop"


def test_a_rate_that_rounds_to_dropping_everything_falls_back_to_keras():
    # Keep probability 7.6e-6 rounds to 0/65536 (no finite hashed scale): under XLA the layer
    # must be keras' Dropout, drawing the same mask from the same seeded generator and
    # scaling kept values by keras' 1 / (1 - rate). 10^6 elements keep ~7.
    rate = 1.0 - 7.6e-6
    assert quantized_keep_probability(rate) <= 0
    x = tf.ones([1000, 1000])
    keras.backend.experimental.enable_tf_random_generator()
    try:
        outs = []
        for make in (Dropout, keras.layers.Dropout):
            keras.utils.set_random_seed(5)
            layer = make(rate, seed=3)
            step = tf.function(lambda x, layer=layer: layer(x, training=True), jit_compile=True)
            outs.append(step(x).numpy())
    finally:
        keras.backend.experimental.disable_tf_random_generator()
    ours, reference = outs
    kept = ours != 0
    assert 0 < kept.sum() < 100, kept.sum()
    np.testing.assert_array_equal(ours, reference)
    np.testing.assert_allclose(ours[kept], 1.0 / (1.0 - rate), rtol=1e-6)
