"""The five models: shapes and dtypes under every policy, masks, saving, jit training, static
HLO, and clear errors for bad input."""
import re

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from msa_xla import ImprovedMSAModel, MSAModel, MSASeqLevelModel
from msa_xla.models import MODELS
from msa_xla.models.balanced import modulation_coefficients
from msa_xla.models.mult import DROPOUTS as MULT_DROPOUTS
from tests.model_checks import (
    POLICIES,
    SMALL,
    assert_config_round_trip,
    assert_static_hlo,
    fit_losses,
    hlo_text,
    learnable_targets,
    padded_inputs,
    with_noisy_padding,
)

MODEL_NAMES = sorted(MODELS)


def small_model(name, **overrides):
    kwargs = dict(SMALL, **overrides)
    if name == "mult":  # MulT's own arguments: levels instead of layers, its eight dropouts
        kwargs = {k: v for k, v in kwargs.items() if k not in (
            "ff_dim", "n_layers_mod", "n_layers_fuse", "dropout_rate", "bidirectional_fusion",
            "pooling_method")}
        return MODELS[name](**{"n_levels": 1, **dict.fromkeys(MULT_DROPOUTS, 0.0), **kwargs})
    if name != "seqlevel":
        kwargs = {k: v for k, v in kwargs.items() if k not in ("bidirectional_fusion",
                                                               "pooling_method")}
    return MODELS[name](**kwargs)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_is_batch_by_one_float32_under_each_policy(name, policy):
    keras.mixed_precision.set_global_policy(policy)
    model = small_model(name)
    out = model(padded_inputs(), training=False)
    assert out.shape == (4, 1) and out.dtype == tf.float32
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_padded_positions_do_not_change_the_output(name):
    model = small_model(name, **({"bidirectional_fusion": True, "pooling_method": "attention"}
                                 if name == "seqlevel" else {}))
    inputs = padded_inputs()
    clean = model(inputs, training=False)
    noisy = model(with_noisy_padding(inputs), training=False)
    np.testing.assert_allclose(noisy, clean, atol=1e-5)


def test_three_inputs_derive_masks_from_zero_rows():
    model = small_model("seqlevel")
    inputs = padded_inputs()
    np.testing.assert_allclose(model(inputs[:3]), model(inputs), atol=1e-6)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_config_round_trip_and_summary(name):
    model = small_model(name)
    inputs = padded_inputs()
    model(inputs)
    clone = assert_config_round_trip(model, type(model))
    clone(inputs)
    clone.set_weights(model.get_weights())
    np.testing.assert_allclose(clone(inputs), model(inputs), atol=1e-6)
    lines = []
    model.summary(print_fn=lines.append)
    assert any("Total params" in line for line in lines)
    layer = "text_with_audio" if name == "mult" else "text_encoder"
    assert any(layer in line for line in lines)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_save_and_load_keras_and_savedmodel(name, tmp_path):
    model = small_model(name)
    inputs = padded_inputs()
    want = model(inputs, training=False)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert type(loaded) is type(model)
    np.testing.assert_allclose(loaded(inputs, training=False), want, atol=1e-6)
    model.save(tmp_path / "saved_model", save_format="tf")
    restored = keras.models.load_model(tmp_path / "saved_model")
    np.testing.assert_allclose(restored(inputs, training=False), want, atol=1e-6)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_fit_with_jit_compile_lowers_the_loss(name):
    inputs = padded_inputs(batch=16)
    losses = fit_losses(small_model(name), inputs, learnable_targets(inputs))
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_backward_lowers_to_static_hlo(name):
    model = small_model(name)
    inputs = padded_inputs()
    targets = learnable_targets(inputs)
    model(inputs)

    def forward_backward(inputs, targets):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.abs(model(inputs, training=True) - targets))
        return loss, tape.gradient(loss, model.trainable_variables)

    assert_static_hlo(hlo_text(forward_backward, inputs, targets))


def test_balanced_coefficients_slow_only_the_dominant_modality():
    # text's head has the lowest error -> highest score -> coefficient below 1.
    coeffs = modulation_coefficients([0.2, 1.0, 1.0], alpha=0.5).numpy()
    assert coeffs[0] < 1.0 and np.all(coeffs[1:] == 1.0)
    ratio = (1 / (0.2 + 1e-6)) / (1 / (1.0 + 1e-6))
    np.testing.assert_allclose(coeffs[0], 1 - np.tanh(0.5 * (ratio - 1)), rtol=1e-5)
    # Equal errors: ratio 1 up to float32 rounding, so no modality is slowed.
    np.testing.assert_allclose(modulation_coefficients([0.5] * 3, alpha=0.5), 1.0, atol=1e-6)


def test_balanced_train_step_scales_the_dominant_encoder_gradients():
    inputs = padded_inputs(batch=8)
    targets = learnable_targets(inputs)
    grads = {}
    for alpha in (0.0, 50.0):
        keras.utils.set_random_seed(0)
        model = small_model("balanced", alpha=alpha, gaussian_enhancement=False)
        model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mae")
        model(inputs)
        before = [v.numpy() for v in model.encoders[0].trainable_variables]
        logs = model.train_on_batch(inputs, targets, return_dict=True)
        grads[alpha] = [b - v.numpy() for b, v in zip(before, model.encoders[0].trainable_variables)]
        coeff_text = logs["coeff_text"]
    # With alpha=50 text's update is its unmodulated update times coeff_text (SGD lr=1).
    assert 0.0 <= coeff_text <= 1.0
    for unmodulated, modulated in zip(grads[0.0], grads[50.0]):
        np.testing.assert_allclose(modulated, unmodulated * coeff_text, atol=1e-5)


def test_improved_model_switches_are_in_its_config():
    model = ImprovedMSAModel(**{k: v for k, v in SMALL.items()}, gated_fusion=False,
                             modality_dropout=0.2)
    config = model.get_config()
    assert config["gated_fusion"] is False and config["modality_dropout"] == 0.2
    assert config["norm_first"] is True and config["use_positional"] is True
    with pytest.raises(TypeError, match="use ImprovedMSAModel"):
        MSAModel(**SMALL, norm_first=True)


# ---- bad input ----------------------------------------------------------------------------
def test_model_dim_not_divisible_by_heads_names_both_values():
    with pytest.raises(ValueError, match="model_dim=250 is not divisible by num_heads=4"):
        MSASeqLevelModel(**dict(SMALL, model_dim=250))


@pytest.mark.parametrize("argument,value,pattern", [
    ("pooling_method", "max", "pooling_method='max' is not one of mean, attention"),
    ("attention_impl", "flash", "attention_impl='flash' is not one of reference, fused, chunked"),
])
def test_unknown_choices_are_refused(argument, value, pattern):
    with pytest.raises(ValueError, match=re.escape(pattern)):
        MSASeqLevelModel(**dict(SMALL, **{argument: value}))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_wrong_feature_size_names_expected_and_received(name):
    model = small_model(name)
    inputs = list(padded_inputs())
    inputs[1] = tf.zeros((4, 8, 9))
    with pytest.raises(ValueError, match=re.escape(
            "audio features: expected shape (batch, time, 7) (audio_dim=7), "
            "received shape (4, 8, 9)")):
        model(tuple(inputs))


def test_wrong_number_of_inputs_is_refused():
    model = small_model("msa")
    with pytest.raises(ValueError, match="expected 3 inputs .* or 6 .* received 4"):
        model(padded_inputs()[:4])


def test_mask_of_wrong_shape_is_refused():
    model = small_model("seqlevel")
    inputs = list(padded_inputs())
    inputs[4] = tf.ones((4, 8, 1), tf.bool)
    with pytest.raises(ValueError, match=re.escape(
            "audio_mask: expected a (batch, time) mask of shape (4, 8), received shape (4, 8, 1)")):
        model(tuple(inputs))


def test_sequence_longer_than_seq_len_is_refused():
    model = small_model("seqlevel")
    inputs = list(padded_inputs())
    inputs[0] = tf.zeros((4, 7, 12))
    with pytest.raises(ValueError, match="text has 7 steps, more than seq_len=6"):
        model(tuple(inputs[:3]))


def test_token_text_input_embeds_ids():
    model = MSASeqLevelModel(**SMALL, text_input="tokens", vocab_size=50)
    inputs = padded_inputs()
    ids = tf.constant(np.random.default_rng(0).integers(1, 50, size=(4, 6)), tf.int32)
    out = model((ids,) + inputs[1:], training=False)
    assert out.shape == (4, 1)
    with pytest.raises(ValueError, match="needs vocab_size"):
        MSASeqLevelModel(**SMALL, text_input="tokens")


def test_balanced_logs_coefficients_in_training_only_and_takes_partial_batches():
    inputs = padded_inputs(batch=6)
    data = tf.data.Dataset.from_tensor_slices((inputs, learnable_targets(inputs))).batch(4)
    model = small_model("balanced")  # gaussian_enhancement on; the last batch has 2 clips
    model.compile(optimizer="adam", loss="mae")
    history = model.fit(data, validation_data=data, epochs=1, verbose=0).history
    assert {"coeff_text", "coeff_audio", "coeff_video"} <= set(history)
    assert all(0.0 < history[f"coeff_{m}"][0] <= 1.0 for m in ("text", "audio", "video"))
    assert not any(key.startswith("val_coeff") for key in history)
    assert set(model.evaluate(data, return_dict=True, verbose=0)) == {"loss"}
