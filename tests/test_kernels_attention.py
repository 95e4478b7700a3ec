"""The attention core: fused and chunked match the reference, masks never give NaN."""
import re

import numpy as np
import pytest
import tensorflow as tf

from msa_xla.kernels import ATTENTION_IMPLS, masked_attention

# Relative and absolute, on outputs of O(1) (values are N(0, 1)): float32 rounding, then about
# 4 ulps of bfloat16 (8-bit mantissa, eps 2^-8) and of float16 (11-bit, eps 2^-11).
TOLERANCE = {tf.float32: 1e-5, tf.bfloat16: 2e-2, tf.float16: 4e-3}


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
@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16, tf.float16],
                         ids=["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("q_len,k_len", [(6, 6), (5, 11), (9, 3)])
def test_matches_reference_forward_and_gradient(impl, dtype, q_len, k_len):
    inputs = _random_inputs(3, q_len, k_len, dtype=dtype)
    want_out, want_grads = _forward_and_grads("reference", *inputs)
    got_out, got_grads = _forward_and_grads(impl, *inputs)
    tol = TOLERANCE[dtype]
    assert got_out.dtype == dtype
    assert np.all(np.isfinite(tf.cast(got_out, tf.float32)))
    assert all(np.all(np.isfinite(tf.cast(g, tf.float32))) for g in got_grads)
    np.testing.assert_allclose(tf.cast(got_out, tf.float32), tf.cast(want_out, tf.float32),
                               atol=tol, rtol=tol)
    for got, want in zip(got_grads, want_grads):
        np.testing.assert_allclose(tf.cast(got, tf.float32), tf.cast(want, tf.float32),
                                   atol=tol * 5, rtol=tol * 5)


DTYPES = [tf.float32, tf.bfloat16, tf.float16]


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16", "float16"])
def test_fully_masked_rows_give_exact_zeros_and_finite_gradients_in_every_dtype(impl, dtype):
    # Sample 0: every key is padding; sample 2: every query is padding; the rest is random
    # (some masked queries, some masked keys). No NaN or inf anywhere, forward or backward, and
    # each row with no valid key or no valid query is exactly 0 (not "close to", not NaN).
    q, k, v, q_mask, kv_mask = _random_inputs(3, 5, 7, dtype=dtype)
    q_mask = tf.tensor_scatter_nd_update(q_mask, [[2, i] for i in range(5)], [False] * 5)
    out, grads = _forward_and_grads(impl, q, k, v, q_mask, kv_mask)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    out32 = tf.cast(out, tf.float32).numpy()
    assert np.all(np.isfinite(out32)), impl
    for name, g in zip("qkv", grads):
        assert np.all(np.isfinite(tf.cast(g, tf.float32).numpy())), (impl, name)
    assert not kv_mask.numpy()[0].any() and not q_mask.numpy()[2].any()
    np.testing.assert_array_equal(out32[0], 0.0)  # no valid key
    np.testing.assert_array_equal(out32[2], 0.0)  # no valid query
    masked_queries = ~q_mask.numpy()
    assert masked_queries.sum() > 5  # masked queries in other samples too
    np.testing.assert_array_equal(out32[masked_queries], 0.0)
    # Nothing flows back into a masked query, nor into a key or value that is padding.
    np.testing.assert_array_equal(tf.cast(grads[0], tf.float32).numpy()[masked_queries], 0.0)
    padded_keys = ~kv_mask.numpy()
    for g in grads[1:]:
        np.testing.assert_array_equal(tf.cast(g, tf.float32).numpy()[padded_keys], 0.0)
    # Rows that do have keys and a valid query are not all zero (the test is not vacuous).
    valid = q_mask.numpy() & kv_mask.numpy().any(axis=1, keepdims=True)
    assert np.all(np.abs(out32[valid]).sum(axis=(-1, -2)) > 0)


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
