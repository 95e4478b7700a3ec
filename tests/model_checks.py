"""One shared helper for layer and model tests: small inputs with padding, and the checks
every layer and model must pass (config round trip, a jit_compile train step, dtypes)."""
import numpy as np
import tensorflow as tf
import tf_keras as keras

from msa_xla.options import POLICIES  # noqa: F401  (re-exported to the layer and model tests)

SEQ_LENS = (6, 8, 10)
DIMS = (12, 7, 5)
SMALL = dict(seq_len=SEQ_LENS, text_dim=DIMS[0], audio_dim=DIMS[1], video_dim=DIMS[2],
             model_dim=16, num_heads=4, ff_dim=32, n_layers_mod=1, n_layers_fuse=1,
             dropout_rate=0.0)


def padded_inputs(batch=4, seed=0, seq_lens=SEQ_LENS, dims=DIMS):
    """(text, audio, video, text_mask, audio_mask, video_mask): random valid steps, zero
    padding after a per-sample true length (sample 0 of audio is all padding)."""
    rng = np.random.default_rng(seed)
    sequences, masks = [], []
    for m, (length, dim) in enumerate(zip(seq_lens, dims)):
        lengths = rng.integers(1, length + 1, size=batch)
        if m == 1:
            lengths[0] = 0
        mask = np.arange(length)[None, :] < lengths[:, None]
        x = rng.normal(size=(batch, length, dim)).astype("float32") * mask[:, :, None]
        sequences.append(tf.constant(x))
        masks.append(tf.constant(mask))
    return tuple(sequences) + tuple(masks)


def with_noisy_padding(inputs, scale=1e3, seed=1):
    """Same inputs with large random values written into every padded step."""
    rng = np.random.default_rng(seed)
    sequences, masks = inputs[:3], inputs[3:]
    noisy = [tf.where(m[:, :, None], x, tf.constant(rng.normal(size=x.shape) * scale, x.dtype))
             for x, m in zip(sequences, masks)]
    return tuple(noisy) + tuple(masks)


def learnable_targets(inputs):
    """(B, 1) labels that are a fixed function of the text features (so a model can fit them)."""
    text, text_mask = inputs[0], inputs[3]
    mean = tf.reduce_sum(text, axis=[1, 2]) / tf.maximum(
        tf.reduce_sum(tf.cast(text_mask, tf.float32), axis=1), 1.0)
    return tf.tanh(mean)[:, None] * 3.0


def assert_config_round_trip(obj, cls):
    config = obj.get_config()
    clone = cls.from_config(config)
    assert clone.get_config() == config
    return clone


def fit_losses(model, inputs, targets, epochs=8, learning_rate=3e-3):
    """Compiles with jit_compile=True, fits, returns the per-epoch losses."""
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="mae", jit_compile=True)
    data = tf.data.Dataset.from_tensor_slices((inputs, targets)).batch(4, drop_remainder=True)
    return model.fit(data, epochs=epochs, verbose=0).history["loss"]


def hlo_text(fn, *args):
    """HLO of `fn` compiled with jit_compile=True for these arguments."""
    return tf.function(fn, jit_compile=True).experimental_get_compiler_ir(*args)(stage="hlo")


def assert_static_hlo(hlo):
    """No dynamic or bounded-dynamic dimension (`?` or `<=N`) anywhere in the HLO."""
    import re
    dynamic = re.findall(r"\w+\[[^\]]*(?:\?|<=)[^\]]*\]", hlo)
    assert not dynamic, f"dynamic shapes in HLO: {dynamic[:5]}"
    assert "ENTRY" in hlo
