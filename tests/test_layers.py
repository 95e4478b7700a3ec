"""The reusable layers: config round trip, jit train step, dtypes under mixed precision, masks."""
import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from msa_xla import (
    AdaptiveFusionHead,
    CrossAttentionBlock,
    CrossModalFusion,
    LearnablePositionalEmbedding,
    ModalityEncoder,
    TransformerBlock,
    create_padding_mask,
)
from msa_xla.layers import MaskedMultiHeadAttention, masked_mean
from tests.model_checks import POLICIES, assert_config_round_trip

D = 16


def _sequences(batch=4, lengths=(6, 8, 10), seed=0):
    rng = np.random.default_rng(seed)
    seqs = [tf.constant(rng.normal(size=(batch, t, D)), tf.float32) for t in lengths]
    masks = [tf.constant(np.arange(t)[None] < rng.integers(1, t + 1, size=(batch, 1)))
             for t in lengths]
    return seqs, masks


# Each case: a factory and a function calling the layer on (sequences, masks) -> tensor.
CASES = {
    "positional": (lambda: LearnablePositionalEmbedding(seq_len=10, model_dim=D),
                   lambda layer, s, m, training: layer(s[0])),
    "attention": (lambda: MaskedMultiHeadAttention(D, 4),
                  lambda layer, s, m, training: layer(s[0], context=s[1], mask=m[0],
                                                      context_mask=m[1])),
    "transformer_block": (lambda: TransformerBlock(D, 4, 32, 0.1),
                          lambda layer, s, m, training: layer(s[0], mask=m[0], training=training)),
    "cross_attention_block": (
        lambda: CrossAttentionBlock(D, 4, 32, 0.1, norm_first=True),
        lambda layer, s, m, training: layer(s[0], s[1], m[0], m[1], training=training)),
    "modality_encoder": (lambda: ModalityEncoder(D, 4, 32, 1, seq_len=10),
                         lambda layer, s, m, training: layer(s[2], mask=m[2], training=training)),
    "cross_modal_fusion": (
        lambda: CrossModalFusion(D, 4, 32, n_layers=1, bidirectional=True),
        lambda layer, s, m, training: tf.concat(layer(
            text_seq=s[0], audio_seq=s[1], video_seq=s[2], text_mask=m[0], audio_mask=m[1],
            video_mask=m[2], training=training), axis=1)),
    "adaptive_fusion_head": (
        lambda: AdaptiveFusionHead(D, 3, pooling_method="attention"),
        lambda layer, s, m, training: layer(modality_sequences=s, masks=m, training=training)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_round_trip_rebuilds_an_equal_layer(case):
    make, call = CASES[case]
    layer = make()
    seqs, masks = _sequences()
    out = call(layer, seqs, masks, False)
    clone = assert_config_round_trip(layer, type(layer))
    call(clone, seqs, masks, False)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(call(clone, seqs, masks, False), out, atol=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_jit_compiled_train_step_updates_every_weight(case):
    make, call = CASES[case]
    layer = make()
    seqs, masks = _sequences()
    call(layer, seqs, masks, False)
    before = [w.numpy() for w in layer.trainable_weights]
    optimizer = keras.optimizers.SGD(0.1)
    # A random projection of the output: unlike a constant target, it is not invariant
    # under the final LayerNormalization, so every weight gets a gradient.
    projection = tf.random.stateless_normal(call(layer, seqs, masks, False).shape, seed=[1, 2])

    @tf.function(jit_compile=True)
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(call(layer, seqs, masks, True) * projection)
        grads = tape.gradient(loss, layer.trainable_weights)
        optimizer.apply_gradients(zip(grads, layer.trainable_weights))
        return loss

    assert np.isfinite(step())
    unchanged = [w.name for b, w in zip(before, layer.trainable_weights)
                 if np.allclose(b, w.numpy()) and not _zero_gradient_by_construction(w)]
    assert not unchanged, f"weights that did not learn: {unchanged}"


def _zero_gradient_by_construction(weight):
    """An attention-pooling score's bias shifts every step's logit alike, and a softmax is
    invariant to that shift: its exact gradient is 0 (what the step computes is rounding noise)."""
    return "/pool_" in weight.name and weight.name.endswith("/bias:0")


# Same weights, inputs rounded to the half type: layer outputs are O(1) (|out| <= 5 here), and
# a few ulps of the half type per matmul and normalisation give bfloat16 (eps 2^-8) within 5e-2
# and float16 (eps 2^-11) within 1e-2 absolute of float32. Measured worst cases over the seven
# layers: 0.031 (bfloat16, modality_encoder) and 0.0031 (float16, cross_attention_block).
HALF_TOLERANCE = {"mixed_bfloat16": 5e-2, "mixed_float16": 1e-2}


@pytest.mark.parametrize("policy", POLICIES[1:])
@pytest.mark.parametrize("case", sorted(CASES))
def test_mixed_precision_computes_in_half_keeps_float32_weights_and_matches_float32(case, policy):
    make, call = CASES[case]
    seqs, masks = _sequences()
    reference = make()  # float32 (the fixture's policy)
    want = call(reference, seqs, masks, False).numpy()
    keras.mixed_precision.set_global_policy(policy)
    layer = make()
    half = tf.bfloat16 if policy == "mixed_bfloat16" else tf.float16
    half_seqs = [tf.cast(s, half) for s in seqs]
    out = call(layer, half_seqs, masks, False)
    assert out.dtype == half
    assert all(w.dtype == tf.float32 for w in layer.weights)
    layer.set_weights(reference.get_weights())
    out = tf.cast(call(layer, half_seqs, masks, False), tf.float32).numpy()
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, want, rtol=0, atol=HALF_TOLERANCE[policy])


def test_create_padding_mask_marks_all_zero_steps():
    x = tf.constant([[[1.0, 0.0], [0.0, 0.0], [0.0, -2.0]]])
    np.testing.assert_array_equal(create_padding_mask(x), [[True, False, True]])


def test_fusion_head_weights_are_softmax_and_pooling_ignores_padding():
    head = AdaptiveFusionHead(D, 3, pooling_method="mean")
    seqs, masks = _sequences()
    out = head(modality_sequences=seqs, masks=masks)
    weights = head.modality_weights.numpy()
    np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-6)
    want = sum(w * masked_mean(s, m) for w, s, m in zip(weights, seqs, masks))
    np.testing.assert_allclose(out, want, atol=1e-6)
    noisy = [tf.where(m[:, :, None], s, 1e4) for s, m in zip(seqs, masks)]
    np.testing.assert_allclose(head(modality_sequences=noisy, masks=masks), out, atol=1e-4)


def test_masked_mean_of_an_all_padding_sequence_is_zero():
    x = tf.fill((2, 3, D), float("inf"))
    mask = tf.constant([[False] * 3, [True, False, False]])
    out = masked_mean(tf.where(mask[:, :, None], tf.ones_like(x), x), mask).numpy()
    np.testing.assert_array_equal(out[0], 0.0)
    np.testing.assert_array_equal(out[1], 1.0)


def test_fusion_is_unidirectional_by_default():
    fusion = CrossModalFusion(D, 4, 32, n_layers=1)
    seqs, masks = _sequences()
    text, audio, video = fusion(text_seq=seqs[0], audio_seq=seqs[1], video_seq=seqs[2])
    assert text.shape == seqs[0].shape
    assert audio is seqs[1] and video is seqs[2]


@pytest.mark.parametrize("make,pattern", [
    (lambda: TransformerBlock(30, 4, 32), "model_dim=30 is not divisible by num_heads=4"),
    (lambda: CrossAttentionBlock(D, 4, 32, attention_impl="xla"), "attention_impl='xla'"),
    (lambda: AdaptiveFusionHead(D, 3, pooling_method="max"), "pooling_method='max'"),
    (lambda: TransformerBlock(D, 4, 32, dropout_rate=1.5), "dropout_rate=1.5"),
])
def test_bad_hyperparameters_fail_at_construction(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


class _UsersLayer(keras.layers.Layer):
    """A researcher's own layer around one of ours, in the researcher's module."""

    def __init__(self):
        super().__init__()
        self.block = TransformerBlock(D, 4, 32, 0.1)

    def call(self, x, mask, training=None):
        if training:  # Python control flow in the user's code: AutoGraph rewrites this call
            return self.block(x, mask=mask, training=True)
        return self.block(x, mask=mask, training=False)


def test_autograph_rewrites_users_code_but_not_the_packages(monkeypatch):
    # Every function AutoGraph rewrites passes through transform_function (cached ones too).
    from tensorflow.python.autograph.pyct import transpiler

    rewritten = []
    original = transpiler.PyToPy.transform_function

    def recording(self, fn, *args, **kwargs):
        rewritten.append(f"{fn.__module__}.{fn.__qualname__}")
        return original(self, fn, *args, **kwargs)

    monkeypatch.setattr(transpiler.PyToPy, "transform_function", recording)
    layer = _UsersLayer()
    (x, *_), (mask, *_) = _sequences()
    tf.function(lambda x, mask: layer(x, mask, training=True))(x, mask)
    assert f"{__name__}._UsersLayer.call" in rewritten, rewritten
    assert [name for name in rewritten if name.startswith("msa_xla")] == []
