"""Padding masks: derived from features, validated against the sequences they describe."""

import tensorflow as tf

from msa_xla.errors import UserError


def create_padding_mask(x):
    """Returns (B, T) bool, True where a time step holds data.

    A step is padding when every feature in it is exactly 0 (how padded clips are written).

    Args:
      x: (B, T, D) features.

    Example:
      >>> x = tf.constant([[[1.0, 0.0], [0.0, 0.0]]])
      >>> create_padding_mask(x).numpy()
      array([[ True, False]])
    """
    return tf.reduce_any(tf.not_equal(x, 0), axis=-1)


def check_mask(mask, sequence, name):
    """Casts `mask` to bool after checking it is (B, T) for `sequence` (B, T, ...).

    Raises:
      ValueError naming `name`, the expected and the received shape.
    """
    mask = tf.convert_to_tensor(mask)
    expected = sequence.shape[:2]
    received = mask.shape
    if received.rank != 2 or not received.is_compatible_with(expected):
        raise UserError(
            f"{name}: expected a (batch, time) mask of shape {tuple(expected)}, "
            f"received shape {tuple(received)}")
    return tf.cast(mask, tf.bool)


def zero_padding(sequence, mask):
    """Sets padded steps to exactly 0, so non-finite or large padding cannot leak into sums."""
    return tf.where(mask[:, :, None], sequence, tf.zeros_like(sequence))
