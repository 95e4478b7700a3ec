"""Every code block of the spec (seed README), translated: `tf.keras` -> `tf_keras`,
`models` / `utils.data_loader` -> `msa_xla` / `msa_xla.data`. Only the epoch count of the
training example is cut (50 -> 2) and its data folder is written by the test."""
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from msa_xla.data import synthetic, writer


def test_basic_usage():
    from msa_xla import MSASeqLevelModel

    model = MSASeqLevelModel(
        seq_len=64, text_dim=300, audio_dim=74, video_dim=47, model_dim=256, num_heads=4,
        ff_dim=512, n_layers_mod=2, n_layers_fuse=2, bidirectional_fusion=False,
        pooling_method='mean', dropout_rate=0.1)
    batch_size = 4
    text_seq = tf.random.normal((batch_size, 64, 300))
    audio_seq = tf.random.normal((batch_size, 64, 74))
    video_seq = tf.random.normal((batch_size, 64, 47))
    output = model((text_seq, audio_seq, video_seq), training=False)
    assert output.shape == (4, 1)
    model.summary(print_fn=lambda line: None)


@pytest.fixture
def spec_data_dir(tmp_path, monkeypatch):
    """`./data` of the training example: a small synthetic dataset at seq_len 20."""
    splits = synthetic.generate((96, 32, 32), seq_len=20, dims=(300, 74, 47), seed=0)
    writer.convert(splits, tmp_path / "data", source_format="synthetic", source_path="-",
                   log=lambda line: None)
    monkeypatch.chdir(tmp_path)
    return "./data"


@pytest.mark.slow  # trains the spec-sized model: 40-60 s on 2 cores
def test_training_example(spec_data_dir):
    from msa_xla import MSASeqLevelModel
    from msa_xla.data import make_dataset

    model = MSASeqLevelModel(seq_len=20, text_dim=300, audio_dim=74, video_dim=47,
                             model_dim=128, num_heads=4, ff_dim=256, n_layers_mod=2,
                             n_layers_fuse=1)
    model.compile(optimizer=tf_keras.optimizers.Adam(learning_rate=1e-4), loss='mae',
                  metrics=['mae', 'mse'])
    train_data = make_dataset(spec_data_dir, split='train', batch_size=32)
    val_data = make_dataset(spec_data_dir, split='valid', batch_size=32)
    history = model.fit(
        train_data, validation_data=val_data, epochs=2, verbose=0,
        callbacks=[
            tf_keras.callbacks.EarlyStopping(monitor='val_mae', patience=10,
                                             restore_best_weights=True),
            tf_keras.callbacks.ReduceLROnPlateau(monitor='val_mae', factor=0.5, patience=5),
        ])
    test_data = make_dataset(spec_data_dir, split='test', batch_size=32)
    test_results = model.evaluate(test_data, verbose=0)
    assert len(history.history["val_mae"]) == 2
    assert np.isfinite(test_results[1])


def test_explicit_masks():
    from msa_xla import MSASeqLevelModel, create_padding_mask

    model = MSASeqLevelModel(seq_len=64, text_dim=300, audio_dim=74, video_dim=47,
                             model_dim=256, num_heads=4, ff_dim=512, n_layers_mod=2,
                             n_layers_fuse=2)
    text_seq = tf.random.normal((4, 64, 300))
    audio_seq = tf.random.normal((4, 64, 74))
    video_seq = tf.random.normal((4, 64, 47))
    text_mask = create_padding_mask(text_seq)
    audio_mask = create_padding_mask(audio_seq)
    video_mask = create_padding_mask(video_seq)
    output = model((text_seq, audio_seq, video_seq, text_mask, audio_mask, video_mask),
                   training=False)
    assert output.shape == (4, 1)


@pytest.mark.slow  # a mixed_float16 step of the spec-sized model: 40-60 s on 2 cores
def test_mixed_precision_training():
    from tf_keras import mixed_precision

    from msa_xla import MSASeqLevelModel

    policy = mixed_precision.Policy('mixed_float16')
    mixed_precision.set_global_policy(policy)
    model = MSASeqLevelModel(seq_len=64, text_dim=300, audio_dim=74, video_dim=47,
                             model_dim=256, num_heads=4, ff_dim=512, n_layers_mod=2,
                             n_layers_fuse=2)
    optimizer = tf_keras.optimizers.Adam(learning_rate=1e-4)
    optimizer = mixed_precision.LossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer, loss='mae', metrics=['mae'])
    # "Train as usual...": one step proves the loss-scaled update runs: finite loss, and over 90%
    # of the weight tensors moved (a step skipped for a float16 overflow moves none; weights
    # whose gradient is exactly 0 stay, so not "all").
    x = (tf.random.normal((4, 64, 300)), tf.random.normal((4, 64, 74)),
         tf.random.normal((4, 64, 47)))
    assert model(x).dtype == tf.float32
    before = [w.numpy() for w in model.trainable_weights]
    logs = model.train_on_batch(x, tf.ones((4, 1)), return_dict=True)
    assert np.isfinite(logs["loss"])
    after = [w.numpy() for w in model.trainable_weights]
    assert all(np.all(np.isfinite(w)) for w in after)
    moved = sum(not np.array_equal(b, a) for b, a in zip(before, after))
    assert moved > 0.9 * len(before), (moved, len(before))


def test_cross_modal_fusion_independently():
    from msa_xla import CrossModalFusion

    fusion = CrossModalFusion(model_dim=256, num_heads=4, ff_dim=512, n_layers=2,
                              bidirectional=True)
    text = tf.random.normal((4, 64, 256))
    audio = tf.random.normal((4, 64, 256))
    video = tf.random.normal((4, 64, 256))
    text_fused, audio_fused, video_fused = fusion(text_seq=text, audio_seq=audio,
                                                  video_seq=video, training=True)
    assert text_fused.shape == audio_fused.shape == video_fused.shape == (4, 64, 256)


def test_adaptive_fusion_head_independently():
    from msa_xla import AdaptiveFusionHead

    fusion_head = AdaptiveFusionHead(model_dim=256, num_modalities=3,
                                     pooling_method='attention')
    modalities = [tf.random.normal((4, 64, 256)) for _ in range(3)]
    fused_repr = fusion_head(modality_sequences=modalities, training=True)
    assert fused_repr.shape == (4, 256)


def test_custom_architecture_from_reusable_parts():
    from msa_xla import (  # noqa: F401
        AdaptiveFusionHead,
        CrossAttentionBlock,
        CrossModalFusion,
        LearnablePositionalEmbedding,
        TransformerBlock,
    )

    class CustomMSAModel(tf_keras.Model):
        def __init__(self, model_dim=256, **kwargs):
            super().__init__(**kwargs)
            self.text_rnn = tf_keras.layers.LSTM(model_dim, return_sequences=True)
            self.audio_rnn = tf_keras.layers.LSTM(model_dim, return_sequences=True)
            self.video_rnn = tf_keras.layers.LSTM(model_dim, return_sequences=True)
            self.fusion = CrossModalFusion(model_dim=model_dim, num_heads=4, ff_dim=512,
                                           n_layers=1)
            self.adaptive_fusion = AdaptiveFusionHead(model_dim=model_dim, num_modalities=3)
            self.output_layer = tf_keras.layers.Dense(1, dtype='float32')

        def call(self, inputs, training=False):
            text, audio, video = inputs
            text_enc = self.text_rnn(text, training=training)
            audio_enc = self.audio_rnn(audio, training=training)
            video_enc = self.video_rnn(video, training=training)
            text_fused, audio_fused, video_fused = self.fusion(
                text_enc, audio_enc, video_enc, training=training)
            fused = self.adaptive_fusion([text_fused, audio_fused, video_fused],
                                         training=training)
            return self.output_layer(fused)

    model = CustomMSAModel(model_dim=64)
    out = model((tf.random.normal((2, 10, 300)), tf.random.normal((2, 10, 74)),
                 tf.random.normal((2, 10, 47))))
    assert out.shape == (2, 1) and out.dtype == tf.float32
