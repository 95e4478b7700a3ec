"""The attention core: fused and chunked match the reference, masks never give NaN."""
import re

import numpy as np
import pytest
import tensorflow as tf

from msa_xla.kernels import ATTENTION_IMPLS, masked_attention
from msa_xla.runtime.allocator import cpu_allocator

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


def _chunked_hlo(k_len, block_size=4, **options):
    """Pre-optimisation XLA HLO of chunked attention forward + backward (w.r.t. q, k, v)."""
    q, k, v, q_mask, kv_mask = _random_inputs(2, 6, k_len)

    @tf.function(jit_compile=True)
    def step(q, k, v):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            out = masked_attention(q, k, v, q_mask, kv_mask, impl="chunked",
                                   block_size=block_size, **options)
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


# ---- dropout on the attention probabilities and the causal mask -------------------------------
KEY = tf.constant([12345, 678])
RATE = 0.3


def _options(option, q_len, k_len):
    """masked_attention keyword arguments: dropout, MulT's causal mask (|Tk - Tq|), or both."""
    dropout = dict(dropout_rate=RATE, dropout_key=KEY)
    causal = dict(causal_offset=abs(k_len - q_len))
    return {"dropout": dropout, "causal": causal, "both": {**dropout, **causal},
            # A negative offset: the first queries see no key at all (rows of zeros).
            "both_strict": {**dropout, "causal_offset": -2}}[option]


def _grads_with(impl, inputs, block_size=4, **options):
    q, k, v, q_mask, kv_mask = inputs
    with tf.GradientTape() as tape:
        tape.watch([q, k, v])
        out = masked_attention(q, k, v, q_mask, kv_mask, impl=impl, block_size=block_size,
                               **options)
        weights = tf.reshape(tf.range(tf.size(out), dtype=tf.float32), out.shape) / 100.0
        loss = tf.reduce_sum(tf.cast(out, tf.float32) * weights)
    return out, tape.gradient(loss, [q, k, v])


def _assert_close(got, want, tol=1e-5):
    got_out, got_grads = got
    want_out, want_grads = want
    np.testing.assert_allclose(got_out, want_out, atol=tol, rtol=tol)
    for name, g, w in zip("qkv", got_grads, want_grads):
        np.testing.assert_allclose(g, w, atol=5 * tol, rtol=5 * tol, err_msg=f"d{name}")


@pytest.mark.parametrize("option", ["dropout", "causal", "both", "both_strict"])
@pytest.mark.parametrize("impl,q_len,k_len,block_size", [
    ("fused", 6, 6, None), ("fused", 5, 11, None), ("fused", 9, 3, None),
    ("chunked", 6, 6, 4), ("chunked", 5, 11, 4), ("chunked", 5, 11, 3),  # 3 does not divide 11
    ("chunked", 9, 3, 2), ("chunked", 5, 11, 16)])  # Tq > Tk; one block longer than Tk
def test_dropout_and_causal_match_reference_forward_and_gradient(impl, q_len, k_len, block_size,
                                                                 option):
    inputs = _random_inputs(3, q_len, k_len)
    options = _options(option, q_len, k_len)
    want = _grads_with("reference", inputs, **options)
    _assert_close(_grads_with(impl, inputs, block_size=block_size or 4, **options), want)
    if "dropout" in option or option.startswith("both"):  # dropout really dropped something
        plain = masked_attention(*inputs, impl="reference",
                                 causal_offset=options.get("causal_offset"))
        assert not np.allclose(want[0], plain, atol=1e-3)


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
@pytest.mark.parametrize("offset", [-2, 0, 6])
def test_causal_offset_lets_query_i_see_keys_up_to_i_plus_offset(impl, offset):
    # Independent of the core's own mask code: row i equals the reference without the causal
    # mask, given the padding mask with keys j > i + offset removed.
    q, k, v, q_mask, kv_mask = _random_inputs(3, 5, 11)
    got = masked_attention(q, k, v, q_mask, kv_mask, impl=impl, block_size=3,
                           causal_offset=offset).numpy()
    for i in range(5):
        row_mask = kv_mask & (np.arange(11) <= i + offset)[None]
        want = masked_attention(q[:, i:i + 1], k, v, q_mask[:, i:i + 1], row_mask,
                                impl="reference")
        np.testing.assert_allclose(got[:, i:i + 1], want, atol=1e-6)


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
def test_dropout_and_causal_match_reference_under_jit_compile(impl):
    inputs = _random_inputs(3, 5, 11)
    options = _options("both", 5, 11)
    want = _grads_with("reference", inputs, **options)  # eager
    step = tf.function(lambda: _grads_with(impl, inputs, block_size=3, **options),
                       jit_compile=True)
    _assert_close(step(), want)


def _probabilities(impl, key, rate=RATE, batch=2, heads=2, q_len=5, k_len=7, **options):
    """The (dropped-out) attention probabilities P~ as the output, (B, Tq, H, Tk): values are
    one-hot rows (Dh = Tk), so output[b, i, h, j] = P~[b, h, i, j]."""
    q, k, _, _, _ = _random_inputs(batch, q_len, k_len, heads=heads, depth=k_len)
    v = tf.tile(tf.eye(k_len)[None, :, None, :], [batch, 1, heads, 1])
    return masked_attention(q, k, v, impl=impl, block_size=3, dropout_rate=rate,
                            dropout_key=key, **options).numpy()


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
def test_dropout_is_torchs_on_the_probabilities_and_reproducible_per_key(impl):
    probs = _probabilities(impl, KEY, rate=0.0)  # no dropout: P, every entry > 0
    assert np.all(probs > 0)
    dropped = _probabilities(impl, KEY)
    keep = dropped != 0
    keep_probability = 1 - round(RATE * 65536) / 65536  # quantised to 1/65536
    np.testing.assert_allclose(dropped[keep], probs[keep] / keep_probability, rtol=1e-6)
    assert 0 < keep.sum() < keep.size
    np.testing.assert_array_equal(_probabilities(impl, KEY), dropped)  # same key, same mask
    other = _probabilities(impl, tf.constant([12345, 679])) != 0  # second word changed
    assert np.mean(other != keep) > 0.2  # independent masks differ in 2 p (1 - p) = 42%
    # The mask is the same in every implementation (a function of key and position).
    np.testing.assert_array_equal(keep, _probabilities("reference", KEY) != 0)


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
def test_empirical_keep_fraction_is_near_one_minus_rate(impl):
    # 4 * 4 * 64 * 64 = 65536 decisions; the fraction's std is sqrt(0.3 * 0.7 / 65536) = 0.0018,
    # so 0.01 is more than 5 standard deviations.
    dropped = _probabilities(impl, KEY, batch=4, heads=4, q_len=64, k_len=64)
    assert abs(np.mean(dropped != 0) - (1 - RATE)) < 0.01


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
def test_rate_zero_is_exactly_no_dropout(impl):
    inputs = _random_inputs(3, 5, 11)
    plain = masked_attention(*inputs, impl=impl, block_size=3, causal_offset=6)
    zero = masked_attention(*inputs, impl=impl, block_size=3, causal_offset=6, dropout_rate=0.0,
                            dropout_key=KEY)
    np.testing.assert_array_equal(zero, plain)


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
@pytest.mark.parametrize("dtype", [tf.bfloat16, tf.float16], ids=["bfloat16", "float16"])
def test_fully_masked_rows_stay_zero_and_finite_with_dropout_and_causal(impl, dtype):
    # As the test without dropout, with dropout and a causal offset of -2 on top: sample 0 has
    # no valid key, sample 2 no valid query, and queries 0 and 1 see no key at all.
    q, k, v, q_mask, kv_mask = _random_inputs(3, 5, 7, dtype=dtype)
    q_mask = tf.tensor_scatter_nd_update(q_mask, [[2, i] for i in range(5)], [False] * 5)
    inputs = (q, k, v, q_mask, kv_mask)
    out, grads = _grads_with(impl, inputs, block_size=3, **_options("both_strict", 5, 7))
    assert out.dtype == dtype
    out32 = tf.cast(out, tf.float32).numpy()
    assert np.all(np.isfinite(out32))
    assert all(np.all(np.isfinite(tf.cast(g, tf.float32).numpy())) for g in grads)
    np.testing.assert_array_equal(out32[0], 0.0)
    np.testing.assert_array_equal(out32[2], 0.0)
    np.testing.assert_array_equal(out32[:, :2], 0.0)  # causal: no key for queries 0 and 1
    np.testing.assert_array_equal(out32[~q_mask.numpy()], 0.0)
    assert np.abs(out32[1, 2:]).sum() > 0


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
def test_dropout_preserves_the_output_in_expectation(impl):
    # The same clip repeated over the batch: every copy draws its own mask (the counter holds
    # the batch index), so the batch mean estimates E[output] = the output without dropout.
    # One draw of output (b, i, h, d) is sum_j P_ij M_j / keep V_jd, with variance
    # (1 - keep) / keep * sum_j P_ij^2 V_jd^2; the mean of n draws has that over n. Every
    # element must lie within 5 of its standard deviations (a chance of ~6e-7 each to fail for
    # independent masks; 40 elements). Without the 1 / keep scale the mean would be 0.7x the
    # output, off by 15 or more standard deviations for most elements.
    n = 2048
    q, k, v, _, _ = _random_inputs(2, 4, 6, heads=2, depth=5)
    q, k, v = (tf.tile(t[:1], [n, 1, 1, 1]) for t in (q, k, v))
    want = masked_attention(q[:1], k[:1], v[:1], impl="reference").numpy()[0]
    out = masked_attention(q, k, v, impl=impl, block_size=4, dropout_rate=RATE,
                           dropout_key=KEY).numpy()
    keep = 1 - round(RATE * 65536) / 65536
    probs = tf.nn.softmax(tf.einsum("qhd,khd->hqk", q[0], k[0]) / np.sqrt(5.0)).numpy()
    second_moment = np.einsum("hqk,khd->qhd", probs ** 2, v[0].numpy() ** 2)
    std = np.sqrt((1 - keep) / keep * second_moment / n)
    assert np.all(np.abs(out.mean(axis=0) - want) < 5 * std + 1e-6)
    assert np.mean(np.abs(0.7 * want - want) > 5 * std) > 0.5  # the check has teeth


def test_dropout_needs_a_key_and_a_rate_below_one():
    q, k, v, _, _ = _random_inputs(2, 2, 2)
    with pytest.raises(ValueError, match="dropout_rate=0.1 needs a dropout_key"):
        masked_attention(q, k, v, dropout_rate=0.1)
    with pytest.raises(ValueError, match=r"dropout_rate=1.0 must be in \[0, 1\)"):
        masked_attention(q, k, v, dropout_rate=1.0, dropout_key=KEY)


def test_chunked_with_dropout_and_causal_stores_no_full_attention_map():
    # Forward and backward with dropout and the causal mask: still one while loop each, and no
    # (B, H, Tq, Tk) tensor anywhere in the program (masks are made per block from iotas and
    # the key), only (B, H, Tq, block) ones.
    hlo = _chunked_hlo(k_len=23, dropout_rate=RATE, dropout_key=KEY, causal_offset=17)
    assert len(re.findall(r"\bwhile\(", hlo)) == 2
    assert "[2,2,6,4]" in hlo
    for k_len in (23, 24):  # unpadded and padded to whole blocks
        assert f"[2,2,6,{k_len}]" not in hlo and f"[2,6,{k_len}]" not in hlo


def test_fused_backward_recomputes_the_attention_maps_instead_of_storing_them():
    # Eight attentions with dropout in a row, forward and backward as one XLA program. Stored
    # for the backward pass, their (B, H, Tq, Tk) float32 maps would take 8 maps of memory or
    # more (autodiff's gradient kept two per attention, and XLA's buffers peaked at 32 maps);
    # recomputed in the backward, only the attention being differentiated has maps alive
    # (peak 4 maps). XLA allocates its temporaries from TF's allocator, whose peak only the BFC
    # pool tracks (conftest.py asks for it).
    assert cpu_allocator() == "bfc", "needs TF_CPU_ALLOCATOR_USE_BFC=true (conftest.py)"
    batch, heads, length, depth, layers = 4, 4, 256, 8, 8
    attention_map = batch * heads * length * length * 4  # bytes
    x = tf.random.normal((batch, length, heads, depth))
    mask = tf.sequence_mask(tf.fill([batch], length - 3), length)

    @tf.function(jit_compile=True)
    def forward_and_backward(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            h = x
            for i in range(layers):
                h = h + masked_attention(h, h, h, mask, mask, impl="fused", dropout_rate=RATE,
                                         dropout_key=tf.constant([i, 7]))
            loss = tf.reduce_sum(h * h)
        return tape.gradient(loss, x)

    forward_and_backward(x)  # compiles
    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    forward_and_backward(x)
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"] - before
    assert attention_map < peak < layers * attention_map, peak / attention_map
