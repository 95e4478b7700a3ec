"""The attention core: fused and chunked match the reference, masks never give NaN."""
import re

import numpy as np
import pytest
import tensorflow as tf

from msa_xla.kernels import ATTENTION_IMPLS, masked_attention

TOLERANCE = {tf.float32: 1e-5, tf.bfloat16: 2e-2}


def _random_inputs(batch, q_len, k_len, heads=2, depth=8, dtype=tf.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = tf.constant(rng.normal(size=(batch, q_len, heads, depth)), dtype)
    k = tf.constant(rng.normal(size=(batch, k_len, heads, depth)), dtype)
    v = tf.constant(rng.normal(size=(batch, k_len, heads, depth)), dtype)
    q_mask = rng.random((batch, q_len)) > 0.3
    kv_mask = rng.random((batch, k_len)) > 0.3
    kv_mask[0, :] = False  # a sample whose keys are all padding
    q_mask[1, :] = True
    return q, k, v, tf.constant(q_mask), tf.constant(kv_mask)


def _forward_and_grads(impl, q, k, v, q_mask, kv_mask, block_size=4):
    with tf.GradientTape() as tape:
        tape.watch([q, k, v])
        out = masked_attention(q, k, v, q_mask, kv_mask, impl=impl, block_size=block_size)
        # A weighted loss so every output element has a distinct upstream gradient.
        weights = tf.reshape(tf.range(tf.size(out), dtype=tf.float32), out.shape) / 100.0
        loss = tf.reduce_sum(tf.cast(out, tf.float32) * weights)
    return out, tape.gradient(loss, [q, k, v])


@pytest.mark.parametrize("impl", ["fused", "chunked"])
@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("q_len,k_len", [(6, 6), (5, 11), (9, 3)])
def test_matches_reference_forward_and_gradient(impl, dtype, q_len, k_len):
    inputs = _random_inputs(3, q_len, k_len, dtype=dtype)
    want_out, want_grads = _forward_and_grads("reference", *inputs)
    got_out, got_grads = _forward_and_grads(impl, *inputs)
    tol = TOLERANCE[dtype]
    assert got_out.dtype == dtype
    np.testing.assert_allclose(tf.cast(got_out, tf.float32), tf.cast(want_out, tf.float32),
                               atol=tol, rtol=tol)
    for got, want in zip(got_grads, want_grads):
        np.testing.assert_allclose(tf.cast(got, tf.float32), tf.cast(want, tf.float32),
                                   atol=tol * 5, rtol=tol * 5)


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
def test_fully_masked_rows_give_zeros_not_nan(impl):
    q, k, v, q_mask, kv_mask = _random_inputs(3, 5, 7)
    out, grads = _forward_and_grads(impl, q, k, v, q_mask, kv_mask)
    assert np.all(np.isfinite(out)) and all(np.all(np.isfinite(g)) for g in grads)
    np.testing.assert_array_equal(out[0], 0.0)  # sample 0: every key is padding
    masked_queries = ~q_mask.numpy()
    np.testing.assert_array_equal(out.numpy()[masked_queries], 0.0)


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
def test_padded_keys_do_not_change_output(impl):
    q, k, v, q_mask, kv_mask = _random_inputs(3, 5, 7)
    noise = tf.random.normal(k.shape, stddev=100.0)
    padded = ~kv_mask[:, :, None, None]
    k2 = tf.where(padded, noise, k)
    v2 = tf.where(padded, noise, v)
    a = masked_attention(q, k, v, q_mask, kv_mask, impl=impl, block_size=3)
    b = masked_attention(q, k2, v2, q_mask, kv_mask, impl=impl, block_size=3)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_no_masks_equals_softmax_attention():
    q, k, v, _, _ = _random_inputs(2, 4, 6)
    logits = tf.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8.0)
    want = tf.einsum("bhqk,bkhd->bqhd", tf.nn.softmax(logits), v)
    for impl in ATTENTION_IMPLS:
        np.testing.assert_allclose(masked_attention(q, k, v, impl=impl), want, atol=1e-5)


def test_unknown_impl_is_refused_with_choices():
    q, k, v, _, _ = _random_inputs(2, 2, 2)
    with pytest.raises(ValueError, match="attention_impl='flash' is not one of reference, fused, chunked"):
        masked_attention(q, k, v, impl="flash")


def test_chunked_compiles_under_xla_with_static_shapes():
    q, k, v, q_mask, kv_mask = _random_inputs(2, 6, 10)

    @tf.function(jit_compile=True)
    def step(q, k, v):
        with tf.GradientTape() as tape:
            tape.watch(q)
            out = masked_attention(q, k, v, q_mask, kv_mask, impl="chunked", block_size=4)
            loss = tf.reduce_sum(out * out)
        return out, tape.gradient(loss, q)

    out, grad = step(q, k, v)
    with tf.GradientTape() as tape:
        tape.watch(q)
        want = masked_attention(q, k, v, q_mask, kv_mask, impl="reference")
        loss = tf.reduce_sum(want * want)
    np.testing.assert_allclose(out, want, atol=1e-5)
    np.testing.assert_allclose(grad, tape.gradient(loss, q), atol=1e-4)


def _chunked_hlo(k_len, block_size=4):
    """Pre-optimisation XLA HLO of chunked attention forward + backward (w.r.t. q, k, v)."""
    q, k, v, q_mask, kv_mask = _random_inputs(2, 6, k_len)

    @tf.function(jit_compile=True)
    def step(q, k, v):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            out = masked_attention(q, k, v, q_mask, kv_mask, impl="chunked",
                                   block_size=block_size)
            loss = tf.reduce_sum(out * out)
        return tape.gradient(loss, [q, k, v])

    return step.experimental_get_compiler_ir(q, k, v)(stage="hlo")


def test_chunked_loops_over_key_blocks_instead_of_unrolling():
    # Unrolled blocks kept every block's temporaries alive under XLA (0.85x the reference's
    # memory at T=2048); forward and backward must each be one while loop whose body
    # holds one block, so the program does not grow with the number of blocks.
    few, many = _chunked_hlo(k_len=8), _chunked_hlo(k_len=23)  # 2 and 6 blocks (1 padded)
    assert len(re.findall(r"\bwhile\(", many)) == 2  # forward, backward
    dots = [len(re.findall(r"\bdot\(", hlo)) for hlo in (few, many)]
    assert dots[0] == dots[1], dots
