"""The masked attention core: one function owns the math, layers own the projections.

    out = masked_attention(q, k, v, q_mask, kv_mask, impl="fused",
                           dropout_rate=0.0, dropout_key=None, causal_offset=None)

Shapes: q (B, Tq, H, Dh), k and v (B, Tk, H, Dh), masks (B, T) bool with True = valid.
Optional, with the same semantics in every implementation:
- ``causal_offset``: query i sees key j only if j <= i + offset (MulT's causal mask with
  offset |Tk - Tq|), on top of the key padding mask; built from index iotas, never stored;
- ``dropout_rate`` / ``dropout_key``: dropout on the attention probabilities (torch's),
  ``O = (P * M / keep) V`` with P the masked softmax. The keep mask M is a pure function of
  (key, b, h, q, k) (`msa_xla.kernels.hashing`), so the three implementations draw the same
  mask and ``chunked`` regenerates a block's mask in its backward pass instead of storing it.
  keep = 1 - rate quantised to 1/65536, kept values scaled by its exact inverse.

Three implementations of the same math, chosen by one validated string:

- ``reference``: einsum, float32 softmax, einsum. Readable; the oracle of the tests.
- ``fused``: the same math as one ``tf.function(jit_compile=True)`` unit, so XLA fuses
  scale, mask, softmax and both matmuls even when the surrounding step is not compiled. Its
  hand-written backward pass recomputes the (B, H, Tq, Tk) weights from q and k, so no
  attention map is kept from the forward pass to the backward one.
- ``chunked``: online softmax over key blocks (flash-attention style) with a hand-written
  backward pass that recomputes each block, so forward and backward keep O(Tq x block)
  instead of O(Tq x Tk) activations: each is one ``tf.while_loop`` over the static key
  blocks, so only one block's temporaries are live at a time (under XLA too).
  For long unaligned sequences (MOSI audio 375, video 500).

Masking rules shared by all three (why: bf16 and fully padded rows):
- logits are float32 and masked with ``tf.where`` on a boolean, never by adding large
  negatives (two ``finfo.min`` in bf16 sum to -inf and a fully masked row becomes NaN);
- a query whose keys are all masked (padding or causal), and a masked query, get an output
  of zeros.
"""

import math

import tensorflow as tf

from msa_xla.errors import UserError
from msa_xla.kernels.hashing import counter_keep_mask, quantized_keep_probability
from msa_xla.kernels.scopes import gradient_scope
from msa_xla.options import ATTENTION_IMPLS
from msa_xla.runtime.compat import in_xla_context

DEFAULT_BLOCK_SIZE = 128

# Finite stand-in for -inf on masked logits (float32 only: logits are always float32).
_MASKED_LOGIT = -1e30


def validate_impl(impl):
    """Returns `impl` if it names an attention implementation, else raises ValueError."""
    if impl not in ATTENTION_IMPLS:
        raise UserError(
            f"attention_impl={impl!r} is not one of {', '.join(ATTENTION_IMPLS)}")
    return impl


def masked_attention(q, k, v, q_mask=None, kv_mask=None, *, impl="fused",
                     block_size=DEFAULT_BLOCK_SIZE, dropout_rate=0.0, dropout_key=None,
                     causal_offset=None):
    """Scaled dot-product attention with padding masks, optional causal mask and dropout.

    Args:
      q: (B, Tq, H, Dh) queries.
      k: (B, Tk, H, Dh) keys.
      v: (B, Tk, H, Dh) values.
      q_mask: optional (B, Tq) bool, True = valid query; masked queries output zeros.
      kv_mask: optional (B, Tk) bool, True = valid key.
      impl: one of ``ATTENTION_IMPLS``.
      block_size: key block length for ``chunked``.
      dropout_rate: Python float in [0, 1), dropout on the attention probabilities. 0: none.
      dropout_key: int tensor of 2 values, needed when ``dropout_rate > 0``; the same key
        gives the same mask (draw a fresh one per training step).
      causal_offset: optional Python int; query i then sees key j only if j <= i + offset.

    Returns:
      (B, Tq, H, Dh) in the dtype of ``v``.

    Example:
      >>> q = tf.random.normal((2, 5, 4, 8)); kv = tf.random.normal((2, 7, 4, 8))
      >>> masked_attention(q, kv, kv, kv_mask=tf.sequence_mask([7, 3], 7)).shape
      TensorShape([2, 5, 4, 8])
      >>> masked_attention(q, kv, kv, impl="chunked", block_size=4, dropout_rate=0.1,
      ...                  dropout_key=tf.constant([1, 2]), causal_offset=2).shape
      TensorShape([2, 5, 4, 8])
    """
    validate_impl(impl)
    dropout = _validate_dropout(dropout_rate, dropout_key)
    if causal_offset is not None:
        causal_offset = int(causal_offset)
    batch, q_len, k_len = tf.shape(q)[0], tf.shape(q)[1], tf.shape(k)[1]
    if q_mask is None:
        q_mask = tf.ones((batch, q_len), tf.bool)
    if kv_mask is None:
        kv_mask = tf.ones((batch, k_len), tf.bool)
    q_mask = tf.cast(q_mask, tf.bool)
    kv_mask = tf.cast(kv_mask, tf.bool)
    if impl == "reference":
        return _reference(q, k, v, q_mask, kv_mask, dropout, causal_offset)
    if impl == "fused":
        return _fused(q, k, v, q_mask, kv_mask, dropout, causal_offset)
    return _chunked(q, k, v, q_mask, kv_mask, block_size, dropout, causal_offset)


def _shape(t):
    """t's shape as a list: static ints where known, scalar tensors elsewhere."""
    dynamic = tf.shape(t)
    return [d if d is not None else dynamic[i] for i, d in enumerate(t.shape.as_list())]


def _validate_dropout(rate, key):
    """(rate, int32 key) for dropout on the probabilities, or None for no dropout."""
    rate = float(rate)
    if not 0.0 <= rate < 1.0:
        raise UserError(f"dropout_rate={rate} must be in [0, 1)")
    if rate == 0.0:
        return None
    if quantized_keep_probability(rate) <= 0.0:
        raise UserError(f"dropout_rate={rate} drops every weight (keep probability 0 at 1/65536)")
    if key is None:
        raise UserError(f"dropout_rate={rate} needs a dropout_key (2 ints)")
    return rate, tf.cast(key, tf.int32)


def _allowed_keys(kv_valid, q_len, k_start, k_count, causal_offset):
    """Keys each query may see, (B, 1, Tq or 1, k_count) bool, for keys k_start .. +k_count.

    kv_valid: (B, k_count) padding mask of those keys. The causal part comes from iotas
    (query i, key j: j <= i + offset), so no (Tq, Tk) tensor is stored.
    """
    allowed = kv_valid[:, None, None, :]
    if causal_offset is not None:
        queries = tf.range(q_len)[:, None]
        keys = k_start + tf.range(k_count)[None, :]
        allowed = tf.logical_and(allowed, (keys <= queries + causal_offset)[None, None])
    return allowed


def _dropout_keep(dropout, shape, k_start, k_len):
    """Keep mask (B, H, Tq, k_count) for keys k_start .. k_start + k_count - 1.

    Element (b, h, i, j) is decided by the counter ((b * H + h) * Tq + i) * Tk + j of its
    global position (Tk the unpadded key length): the same decision in every implementation
    and every block. Counters are int32 arithmetic, unique modulo 2^32: masks would repeat
    only past 4.3e9 elements B * H * Tq * Tk (MOSI unaligned at batch 32, 10 heads: 8e7 at most).
    """
    rate, key = dropout
    batch, heads, q_len, k_count = shape
    index = ((tf.range(batch)[:, None, None, None] * heads
              + tf.range(heads)[None, :, None, None]) * q_len
             + tf.range(q_len)[None, None, :, None]) * k_len
    counter = index + (k_start + tf.range(k_count))[None, None, None, :]
    return counter_keep_mask(counter, rate, key)


def _reference(q, k, v, q_mask, kv_mask, dropout, causal_offset):
    out_dtype = v.dtype
    q, k, v = (tf.cast(t, tf.float32) for t in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = tf.einsum("bqhd,bkhd->bhqk", q * scale, k)  # (B, H, Tq, Tk)
    q_len, k_len = _shape(q)[1], _shape(k)[1]
    key_valid = _allowed_keys(kv_mask, q_len, 0, k_len, causal_offset)  # (B, 1, 1|Tq, Tk)
    logits = tf.where(key_valid, logits, _MASKED_LOGIT)
    probs = tf.nn.softmax(logits, axis=-1)
    # A row with no valid key would be uniform over padding: zero it instead.
    probs = tf.where(key_valid, probs, 0.0)
    if dropout is not None:
        keep = _dropout_keep(dropout, _shape(probs), 0, k_len)
        probs = tf.where(keep, probs * (1.0 / quantized_keep_probability(dropout[0])), 0.0)
    out = tf.einsum("bhqk,bkhd->bqhd", probs, v)  # (B, Tq, H, Dh)
    out = tf.where(q_mask[:, :, None, None], out, 0.0)
    return tf.cast(out, out_dtype)


def _attention_math(q, k, v, q_mask, kv_mask, dropout_key=None, dropout_rate=0.0,
                    causal_offset=None):
    """The fused path: matmuls in the input dtype, logits and softmax in float32.

    A custom gradient: the backward pass recomputes the (B, H, Tq, Tk) weights from q and k
    (one matmul and one exp) instead of keeping them, and the dropout mask from its key, so
    no attention map outlives the forward pass. Stored instead: the row max and normaliser
    (B, H, Tq) and the output. Autodiff kept the weights and, with dropout, the dropped
    weights as well: two float32 maps per attention, most of a MulT step's memory on long
    unaligned sequences.
    """
    inv_keep = 1.0 / quantized_keep_probability(dropout_rate) if dropout_rate else 1.0
    q_len, k_len = _shape(q)[1], _shape(k)[1]

    def matmul_inputs(q, k):
        # float16 tops out at 65504: q.k of activations in the hundreds overflows to inf and
        # the softmax gives NaN. bfloat16 has float32's range and keeps its fast matmul.
        if q.dtype == tf.float16:
            return tf.cast(q, tf.float32), tf.cast(k, tf.float32)
        return q, k

    def masked_logits(q, k, scale):
        logits = tf.cast(tf.einsum("bqhd,bkhd->bhqk", q * scale, k), tf.float32)
        key_valid = _allowed_keys(kv_mask, q_len, 0, k_len, causal_offset)  # (B, 1, 1|Tq, Tk)
        return tf.where(key_valid, logits, _MASKED_LOGIT)

    def dropped(weights):
        """`weights` where the dropout mask keeps them, else 0 (no mask without dropout)."""
        if not dropout_rate:
            return weights
        keep = _dropout_keep((dropout_rate, dropout_key), _shape(weights), 0, k_len)
        return tf.where(keep, weights, 0.0)

    @tf.custom_gradient
    def attention(q, k, v):
        qc, kc = matmul_inputs(q, k)
        scale = tf.cast(1.0 / math.sqrt(q.shape[-1]), qc.dtype)
        # The row max keeps exp in range and cancels in the normalisation. No second mask: a
        # masked logit's exp(-1e30 - max) is exactly 0, unless the row has no valid key at all
        # (max -1e30, every weight 1); `has_key` zeroes those rows through `inv`.
        logits = masked_logits(qc, kc, scale)  # (B, H, Tq, Tk)
        row_max = tf.reduce_max(logits, axis=-1, keepdims=True)
        weights = tf.exp(logits - row_max)
        has_key = row_max[..., 0] > 0.5 * _MASKED_LOGIT  # (B, H, Tq)
        # Normalise after the value matmul: (B, Tq, H, 1) divisions instead of (B, H, Tq, Tk).
        # inv is 1 / row sum of the undropped weights (dropout on P), 0 for rows that output 0.
        valid_row = tf.logical_and(has_key, q_mask[:, None, :])
        inv = tf.where(valid_row, 1.0 / tf.reduce_sum(weights, axis=-1), 0.0)
        out = tf.einsum("bhqk,bkhd->bqhd", tf.cast(dropped(weights), v.dtype), v)
        out = out * tf.cast(tf.transpose(inv * inv_keep, [0, 2, 1])[..., None], v.dtype)
        scope = gradient_scope()  # the backward ops' names (kernels/scopes.py)

        def grad(d_out):
            with tf.name_scope(scope):
                return _grad(d_out)

        def _grad(d_out):
            # P = softmax of the masked logits (rows of 0 where `inv` is 0), P~ = P * M / keep
            # the dropped probabilities, O = P~ V. Then dV = P~^T dO, dP~ = dO V^T and
            # dS = P~ * dP~ - P * D, with D = sum_j P~_j (dO . V_j) = dO . O one scalar per
            # row, computed from the stored output.
            qb, kb = _after(matmul_inputs(q, k), d_out)  # recompute once dO exists
            weights = tf.exp(masked_logits(qb, kb, scale) - row_max)
            probs = weights * inv[..., None]
            probs_dropped = dropped(probs) * inv_keep  # inv_keep is 1.0 without dropout
            d_probs = tf.cast(tf.einsum("bqhd,bkhd->bhqk", d_out, v), tf.float32)
            row_dot = tf.reduce_sum(tf.cast(d_out, tf.float32) * tf.cast(out, tf.float32),
                                    axis=-1)  # (B, Tq, H)
            d_logits = (probs_dropped * d_probs
                        - probs * tf.transpose(row_dot, [0, 2, 1])[..., None])
            d_logits = tf.cast(d_logits, qb.dtype)
            d_q = tf.einsum("bhqk,bkhd->bqhd", d_logits, kb) * scale
            d_k = tf.einsum("bhqk,bqhd->bkhd", d_logits, qb) * scale
            d_v = tf.einsum("bhqk,bqhd->bkhd", tf.cast(probs_dropped, v.dtype), d_out)
            return tf.cast(d_q, q.dtype), tf.cast(d_k, k.dtype), d_v

        return out, grad

    return attention(q, k, v)


def _after(tensors, gradient):
    """`tensors` plus a zero computed from `gradient`: the same values, which XLA can neither
    compute before `gradient` exists nor merge (CSE) with the forward pass's identical ops, so
    a recomputation in a custom gradient really happens in the backward pass. (XLA:CPU drops
    optimization barriers before its CSE: with one, the recomputed weights merged back into
    the forward's and were stored after all.) XLA does not fold `x * 0` for floats (NaN
    semantics); a non-finite gradient element counts as 0, so the values never change."""
    first = tf.reduce_sum(tf.reshape(gradient, [-1])[:1])
    zero = tf.where(tf.math.is_finite(first), first, tf.zeros_like(first)) * 0
    return tuple(t + tf.cast(zero, t.dtype) for t in tensors)


_fused_xla = tf.function(_attention_math, jit_compile=True, autograph=False,
                         reduce_retracing=False)


def _fused(q, k, v, q_mask, kv_mask, dropout, causal_offset):
    # Inside an XLA cluster the math is inlined: the surrounding compilation fuses it anyway,
    # and a nested jit_compile function there made XLA treat every argument of the train step
    # (the batch and all weights) as a compile-time constant, so the step recompiled on every
    # call (~10 s a step on CPU; see tools/bench.py's retrace and DeviceCompiler logs).
    rate, key = dropout if dropout is not None else (0.0, None)
    fn = _attention_math if in_xla_context() else _fused_xla
    return fn(q, k, v, q_mask, kv_mask, key, rate, causal_offset)


def _chunked(q, k, v, q_mask, kv_mask, block_size, dropout, causal_offset):
    if block_size <= 0:
        raise UserError(f"block_size={block_size} must be positive")
    k_len = k.shape[1]
    if k_len is None:
        raise UserError("chunked attention needs a static key length (pad to a fixed seq_len)")
    block_size = min(int(block_size), max(k_len, 1))  # one block needs no padding
    # Pad keys to whole blocks; padded keys are masked like any other padding.
    num_blocks = -(-k_len // block_size)
    pad = num_blocks * block_size - k_len
    if pad:
        k = tf.pad(k, [[0, 0], [0, pad], [0, 0], [0, 0]])
        v = tf.pad(v, [[0, 0], [0, pad], [0, 0], [0, 0]])
        kv_mask = tf.pad(kv_mask, [[0, 0], [0, pad]], constant_values=False)
    out = _make_online_softmax_attention(kv_mask, block_size, k_len, dropout,
                                         causal_offset)(q, k, v)
    return out * tf.cast(q_mask, out.dtype)[:, :, None, None]


def _to_blocks(t, block_size):
    """(B, n * block, ...) -> (n, B, block, ...): block-major, so key block i is ``t[i]``."""
    num_blocks = t.shape[1] // block_size
    t = tf.reshape(t, [-1, num_blocks, block_size] + t.shape[2:].as_list())
    return tf.transpose(t, [1, 0] + list(range(2, t.shape.rank)))


def _from_blocks(t):
    """(n, B, block, ...) -> (B, n * block, ...): the inverse of `_to_blocks`."""
    t = tf.transpose(t, [1, 0] + list(range(2, t.shape.rank)))
    return tf.reshape(t, [-1, t.shape[1] * t.shape[2]] + t.shape[3:].as_list())


def _for_each_block(num_blocks, body, state):
    """``state = body(i, *state)`` for i in 0 .. num_blocks - 1; returns the final state.

    One ``tf.while_loop`` with a static trip count (``maximum_iterations``, so it compiles
    under XLA and on TPU), not a Python loop: unrolled blocks were separate ops whose
    temporaries XLA kept alive all at once (0.85x the reference's peak memory at T=2048).
    A loop body holds one block's. ``parallel_iterations=1`` keeps the graph-mode (non-XLA)
    executor from running several blocks at once for the same reason; XLA ignores it.
    One block needs no loop.
    """
    if num_blocks == 1:
        return tuple(body(tf.constant(0), *state))
    _, *state = tf.while_loop(
        lambda i, *_: i < num_blocks,
        lambda i, *s: (i + 1, *body(i, *s)),
        (tf.constant(0), *state),
        maximum_iterations=num_blocks, parallel_iterations=1)
    return tuple(state)


def _make_online_softmax_attention(kv_mask, block_size, k_len, dropout, causal_offset):
    """Builds the custom-gradient attention over q, k, v for one key mask and block size.

    The mask (and the dropout key) are closed over rather than passed, so the custom
    gradient's inputs are exactly the three differentiable tensors. k, v and the mask must
    already be padded to whole blocks; k_len is the unpadded key length (the dropout
    counters' stride, so every block draws the reference's mask).
    """
    mask_blocks = _to_blocks(kv_mask, block_size)  # (n, B, blk)
    num_blocks = mask_blocks.shape[0]

    @tf.custom_gradient
    def online_softmax_attention(q, k, v):
        """Flash-style forward; returns the output and a block-recomputing backward.

        Only the output and the per-row log-sum-exp survive the forward pass, so memory
        stays O(Tq x block) in both directions. Forward and backward are each one
        ``tf.while_loop`` over the static key blocks (see `_for_each_block`), indexing
        block i of k and v reshaped to (num_blocks, B, block, H, Dh).
        """
        dtype = v.dtype
        scale = 1.0 / math.sqrt(q.shape[-1])
        inv_keep = 1.0 / quantized_keep_probability(dropout[0]) if dropout is not None else 1.0
        q32 = tf.cast(q, tf.float32) * scale
        k_blocks, v_blocks = _to_blocks(k, block_size), _to_blocks(v, block_size)

        q_len = _shape(q)[1]

        def key_block(i):
            """Block i as float32 k and v (B, blk, H, Dh) and the keys each query may see
            (B, 1, 1 or Tq, blk): padding and, if asked, the causal mask from iotas."""
            return (tf.cast(tf.gather(k_blocks, i), tf.float32),
                    tf.cast(tf.gather(v_blocks, i), tf.float32),
                    _allowed_keys(tf.gather(mask_blocks, i), q_len, i * block_size,
                                  block_size, causal_offset))

        def block_keep(i, logits):
            """Block i's dropout keep mask (B, H, Tq, blk), regenerated from the key."""
            return _dropout_keep(dropout, _shape(logits), i * block_size, k_len)

        def forward_block(i, row_max, row_sum, acc):
            k32, v32, valid = key_block(i)
            logits = tf.einsum("bqhd,bkhd->bhqk", q32, k32)
            logits = tf.where(valid, logits, _MASKED_LOGIT)
            new_max = tf.maximum(row_max, tf.reduce_max(logits, axis=-1))
            correction = tf.exp(row_max - new_max)  # rescales what was summed so far
            weights = tf.where(valid, tf.exp(logits - new_max[..., None]), 0.0)
            row_sum = row_sum * correction + tf.reduce_sum(weights, axis=-1)  # undropped
            if dropout is not None:  # dropped numerator / undropped sum: dropout on P
                weights = tf.where(block_keep(i, logits), weights, 0.0)
            acc = (acc * tf.transpose(correction, [0, 2, 1])[..., None]
                   + tf.einsum("bhqk,bkhd->bqhd", weights, v32))
            return new_max, row_sum, acc

        acc = tf.zeros_like(q32)  # running numerator (B, Tq, H, Dh)
        row_sum = tf.transpose(tf.zeros_like(q32[..., 0]), [0, 2, 1])  # running sum l (B, H, Tq)
        row_max = tf.fill(tf.shape(row_sum), _MASKED_LOGIT)  # running max m
        row_max, row_sum, acc = _for_each_block(num_blocks, forward_block,
                                                (row_max, row_sum, acc))
        has_key = row_sum > 0.0  # False where every key is padding
        inv = tf.math.divide_no_nan(1.0, row_sum)
        if dropout is not None:
            inv = inv * inv_keep
        out32 = acc * tf.transpose(inv, [0, 2, 1])[..., None]  # (B, Tq, H, Dh)
        # log-sum-exp per row; 0 where the row has no key (its weights are all masked anyway).
        lse = tf.where(has_key, row_max + tf.math.log(tf.where(has_key, row_sum, 1.0)), 0.0)

        scope = gradient_scope()  # the backward ops' names (kernels/scopes.py)

        def grad(d_out):
            with tf.name_scope(scope):
                return _grad(d_out)

        def _grad(d_out):
            d_out = tf.cast(d_out, tf.float32)
            # D_i = sum_d dO_i * O_i: the softmax Jacobian term, one scalar per row.
            # With dropout (P~ = P * M / keep, O = P~ V): dV = P~^T dO, dP~ = dO V^T,
            # dP = dP~ * M / keep, dS = P * (dP - sum_j P_j dP_j), and
            # sum_j P_j dP_j = sum_j P~_j (dO . V_j) = dO . (P~ V) = dO . O = D_i:
            # the same row scalar from the (dropped-out) output, so nothing else is stored.
            row_dot = tf.transpose(tf.reduce_sum(d_out * out32, axis=-1), [0, 2, 1])  # (B, H, Tq)

            def backward_block(i, d_q, d_k, d_v):
                k32, v32, valid = key_block(i)
                logits = tf.einsum("bqhd,bkhd->bhqk", q32, k32)
                probs = tf.where(valid, tf.exp(tf.minimum(logits - lse[..., None], 0.0)), 0.0)
                d_probs = tf.einsum("bqhd,bkhd->bhqk", d_out, v32)
                if dropout is None:
                    dropped = probs
                else:
                    keep = block_keep(i, logits)  # the forward's mask, regenerated
                    dropped = tf.where(keep, probs * inv_keep, 0.0)
                    d_probs = tf.where(keep, d_probs * inv_keep, 0.0)
                d_v = d_v.write(i, tf.einsum("bhqk,bqhd->bkhd", dropped, d_out))
                d_logits = probs * (d_probs - row_dot[..., None])
                d_q += tf.einsum("bhqk,bkhd->bqhd", d_logits, k32)
                d_k = d_k.write(i, tf.einsum("bhqk,bqhd->bkhd", d_logits, q32))
                return d_q, d_k, d_v

            # dK and dV of block i go to slot i: (n, B, blk, H, Dh), reshaped back at the end.
            block_grads = [tf.TensorArray(tf.float32, size=num_blocks,
                                          element_shape=k_blocks.shape[1:])
                           for _ in range(2)]
            d_q, d_k, d_v = _for_each_block(num_blocks, backward_block,
                                            (tf.zeros_like(q32), *block_grads))
            d_k, d_v = _from_blocks(d_k.stack()), _from_blocks(d_v.stack())
            return (tf.cast(d_q * scale, q.dtype), tf.cast(d_k, k.dtype),
                    tf.cast(d_v, v.dtype))

        return tf.cast(out32, dtype), grad

    return online_softmax_attention
