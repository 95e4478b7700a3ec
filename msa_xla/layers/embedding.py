"""Token embedding whose gradient is a dense tensor, so it all-reduces inside XLA.

Why: `keras.layers.Embedding` looks tokens up with a gather, whose gradient is an
`IndexedSlices`. Under a distribution strategy, a sparse gradient is all-reduced by gathering
every replica's slices (`CollectiveGatherV2`), and XLA has no kernel for that: a multi-GPU run
with `jit_compile=True` and token input fails at its first step. Here the lookup is still a
gather, but its gradient is the dense (vocab_size, dim) sum of the output gradient per id
(`unsorted_segment_sum`), all-reduced like any other weight. Model Garden's
`OnDeviceEmbedding(use_one_hot=True)` gets a dense gradient from a one-hot matmul instead;
the segment sum costs B x T x dim adds rather than B x T x vocab x dim multiplies.
"""

import tensorflow as tf
import tf_keras as keras


@tf.custom_gradient
def _lookup_with_dense_gradient(table, ids):
    vocab_size, dim = table.shape[0], table.shape[1]

    def grad(d_out):
        flat = tf.reshape(d_out, [-1, dim])  # (B * T, dim)
        d_table = tf.math.unsorted_segment_sum(flat, tf.reshape(ids, [-1]), vocab_size)
        return d_table, None

    return tf.gather(table, ids), grad


@keras.saving.register_keras_serializable(package="msa_xla")
class TokenEmbedding(keras.layers.Embedding):
    """`keras.layers.Embedding` (same arguments, weights and config) with a dense gradient.

    Example:
      >>> embed = TokenEmbedding(input_dim=100, output_dim=8)
      >>> ids = tf.constant([[3, 7, 0]])
      >>> with tf.GradientTape() as tape:
      ...     out = embed(ids)
      >>> out.shape
      TensorShape([1, 3, 8])
      >>> type(tape.gradient(out, embed.embeddings)).__name__   # not IndexedSlices
      'EagerTensor'
    """

    def call(self, inputs):
        if isinstance(inputs, tf.SparseTensor) or self.sparse or self._use_one_hot_matmul:
            return super().call(inputs)
        if inputs.dtype not in (tf.int32, tf.int64):
            inputs = tf.cast(inputs, tf.int32)
        out = _lookup_with_dense_gradient(tf.convert_to_tensor(self.embeddings), inputs)
        if self._dtype_policy.compute_dtype != self._dtype_policy.variable_dtype:
            out = tf.cast(out, self._dtype_policy.compute_dtype)  # as keras: cast the output
        return out
