"""Counter-hash dropout masks: a keep decision as a pure function of (key, element counter).

Each element's decision is its integer counter pushed through two keyed rounds of the
`lowbias32` integer hash (xor-shift-multiply; C. Wellons, "Hash function prospector"), keyed by
two 32-bit words, and compared as a 16-bit level with a threshold: ~7 vectorisable integer ops
per element, no random-number state, and the same mask wherever and in whatever order the
elements are computed (so a blocked kernel can regenerate a block's mask in its backward pass
instead of storing it). `msa_xla.layers.dropout` (elementwise dropout) and the attention core's
dropout on attention probabilities (`msa_xla.kernels.attention`) both draw their masks here.

The keep probability is quantised to 1/65536 (rate 0.1 drops with probability
6554/65536 = 0.100006); callers scale kept values by the exact inverse of
`quantized_keep_probability`, so the expectation of every element is unchanged.
"""

import tensorflow as tf

LEVELS = 1 << 16  # decisions are 16-bit levels
_M1, _M2 = 0x7FEB352D, 0x846CA68B  # lowbias32 multipliers


def _lowbias32(x):
    """One round of the lowbias32 integer hash on uint32 (a bijection of 32-bit words)."""
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))
    x = x * tf.constant(_M1, tf.uint32)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 15))
    x = x * tf.constant(_M2, tf.uint32)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))


def hash_words(counter, key):
    """uint32 hash words of an integer counter tensor under a 2-word key (same shape).

    Args:
      counter: int32 or uint32 tensor (int32 is reinterpreted bit for bit).
      key: int32/int64 tensor of 2 values.
    """
    k0, k1 = tf.unstack(tf.bitcast(tf.cast(key, tf.int32), tf.uint32))
    if counter.dtype != tf.uint32:
        counter = tf.bitcast(tf.cast(counter, tf.int32), tf.uint32)
    x = _lowbias32(tf.bitwise.bitwise_xor(counter, k0))
    return _lowbias32(tf.bitwise.bitwise_xor(x, k1))  # second keyed round: keys do not just shift


def keep_threshold(rate):
    """The 16-bit level at or above which an element is kept."""
    return int(round(float(rate) * LEVELS))


def quantized_keep_probability(rate):
    """The keep probability a hashed mask really has for `rate`."""
    return 1.0 - keep_threshold(rate) / LEVELS


def counter_keep_mask(counter, rate, key):
    """Boolean keep mask, one decision per element of `counter` (the low 16 bits of its hash).

    The mask is a pure function of (key, counter value): elements that carry the same counter
    get the same decision, whichever tensor or block they are computed in.

    Example:
      >>> counter = tf.range(100_000)
      >>> keep = counter_keep_mask(counter, 0.25, tf.constant([3, 7]))
      >>> 0.74 < float(tf.reduce_mean(tf.cast(keep, tf.float32))) < 0.76
      True
      >>> bool(tf.reduce_all(keep[10:20] == counter_keep_mask(counter[10:20], 0.25, [3, 7])))
      True
    """
    levels = tf.bitwise.bitwise_and(hash_words(counter, key), LEVELS - 1)
    return levels >= tf.constant(keep_threshold(rate), tf.uint32)
