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
from msa_xla.models.serving import export_for_serving
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
from tests.train_helpers import served

MODEL_NAMES = sorted(MODELS)
# Where each case costs an XLA compile or a SavedModel export (10-80 s on 2 cores), the quick tier
# runs the default model and the slow tier the others; MulT's eager calls are slow-tier too.
BY_COST = [pytest.param(name, marks=() if name == "seqlevel" else pytest.mark.slow)
           for name in MODEL_NAMES]


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


# Model outputs are O(1) (|y| <= 2.4 here): with the same weights the half-precision result may
# differ from float32 by a few ulps of the half type per layer: bfloat16 (eps 2^-8) within 0.05
# absolute, float16 (eps 2^-11) within 0.01. Measured worst cases (seqlevel, msa, improved,
# balanced): 0.028 bfloat16 (improved), 0.0018 float16 (balanced); mult passes both.
POLICY_TOLERANCE = {"float32": 0.0, "mixed_bfloat16": 5e-2, "mixed_float16": 1e-2}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "mult" else n
                                  for n in MODEL_NAMES])
def test_output_under_each_policy_is_float32_and_matches_float32_with_the_same_weights(name,
                                                                                     policy):
    inputs = padded_inputs()
    reference = small_model(name)
    want = reference(inputs, training=False).numpy()
    keras.mixed_precision.set_global_policy(policy)
    model = small_model(name)
    out = model(inputs, training=False)
    assert out.shape == (4, 1) and out.dtype == tf.float32
    assert all(w.dtype == tf.float32 for w in model.weights)
    model.set_weights(reference.get_weights())
    out = model(inputs, training=False).numpy()
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, want, rtol=0, atol=POLICY_TOLERANCE[policy])


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


@pytest.mark.parametrize("name", BY_COST)
def test_save_and_load_keras_and_the_serving_savedmodel(name, tmp_path):
    model = small_model(name)
    inputs = padded_inputs()
    want = model(inputs, training=False)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert type(loaded) is type(model)
    np.testing.assert_allclose(loaded(inputs, training=False), want, atol=1e-6)
    # The SavedModel the trainer writes (models/serving.py): its signature, reloaded without
    # msa_xla's classes, gives the model's predictions on padded inputs.
    export_for_serving(model, str(tmp_path / "served"))
    np.testing.assert_allclose(served(tmp_path / "served", inputs), want, atol=1e-6)


# The default model here; every other model trains under jit_compile through the trainer:
# improved in test_train, msa in test_predict, balanced in test_steps_per_execution (and on two
# replicas in test_accelerator), mult in test_mult.
@pytest.mark.parametrize("name", ["seqlevel"])
def test_fit_with_jit_compile_learns_to_half_the_constant_predictors_error(name):
    inputs = padded_inputs(batch=16)
    targets = learnable_targets(inputs)
    losses = fit_losses(small_model(name), inputs, targets)
    y = targets.numpy()
    constant = float(np.mean(np.abs(y - np.median(y))))  # MAE of the best constant: 2.07
    # Measured (8 epochs): the last epoch's MAE is 0.14-0.30 of the constant's, per model.
    assert losses[-1] < 0.5 * constant, (losses, constant)


@pytest.mark.parametrize("name", BY_COST)
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


def test_balanced_gradients_scale_each_dominant_encoder_by_exactly_its_coefficient():
    # compute_gradients is the step's gradient computation (train_step applies its result; the
    # split-step plan XLA-compiles it per replica). Eager here: one trace-free pass per case.
    inputs = padded_inputs(batch=8)
    targets = learnable_targets(inputs)
    model = small_model("balanced", gaussian_enhancement=False)
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mae")
    model(inputs)
    sequences, masks = model._unpack(inputs)
    _, extras = model.forward(sequences, masks, training=True)  # dropout 0: deterministic
    errors = np.array([np.mean(np.abs(targets.numpy() - u.numpy())) for u in extras["unimodal"]],
                      np.float32)
    scores = 1.0 / (errors + np.float32(1e-6))
    ratios = scores / ((scores.sum() - scores) / np.float32(2.0))
    top = int(np.argmax(ratios))
    assert ratios[top] > 1.0 and np.any(ratios < 1.0), ratios
    # alpha * (ratio - 1) = 0.5 for the most dominant modality: its coefficient is
    # 1 - tanh(0.5) = 0.538, strictly inside (0, 1), so neither "no modulation" (1) nor "frozen
    # encoder" (0) passes; any other modality above the mean of the others gets its own.
    alpha = float(0.5 / (ratios[top] - 1.0))
    want = np.where(ratios > 1.0, 1.0 - np.tanh(alpha * (ratios - 1.0)), 1.0)
    np.testing.assert_allclose(want[top], 1.0 - np.tanh(0.5), rtol=1e-6)
    assert np.all(want[ratios > 1.0] < 0.99)

    model.alpha = 0.0  # unmodulated gradients of the same weights and batch
    _, _, plain, plain_extras = model.compute_gradients(inputs, targets)
    np.testing.assert_array_equal(plain_extras["coefficients"], 1.0)
    model.alpha = alpha
    _, _, grads, extras = model.compute_gradients(inputs, targets)
    coeffs = extras["coefficients"].numpy()
    np.testing.assert_allclose(coeffs, want, rtol=1e-4)
    np.testing.assert_array_equal(coeffs[ratios < 1.0], 1.0)

    owners = model._modality_of_variables()
    assert set(owners) == {-1, 0, 1, 2}
    for owner, variable, got, unmodulated in zip(owners, model.trainable_variables, grads, plain):
        unmodulated = unmodulated.numpy()
        assert np.any(unmodulated != 0), variable.name  # every weight has a gradient
        if owner >= 0 and coeffs[owner] < 1.0:
            expected = unmodulated * coeffs[owner]
        else:  # non-dominant encoders and everything outside the encoders: untouched
            expected = unmodulated
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=0,
                                   err_msg=variable.name)


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


def test_token_text_input_is_the_embedding_lookup_with_id_0_as_padding():
    # The same model fed float features equals the token model once its text features are
    # the embedding rows of the ids, looked up by hand, and its text mask is ids != 0.
    tokens = MSASeqLevelModel(**SMALL, text_input="tokens", vocab_size=50)
    features = MSASeqLevelModel(**SMALL)
    inputs = padded_inputs()
    ids = np.random.default_rng(0).integers(1, 50, size=(4, 6))
    ids[:, 4:] = 0  # padding after 4 steps
    ids[2, 1:] = 0  # one clip of a single token
    out = tokens((tf.constant(ids, tf.int32),) + inputs[1:3], training=False)
    features(inputs, training=False)
    table = tokens.token_embedding.embeddings.numpy()
    assert table.shape == (50, SMALL["text_dim"])

    def key(variable):  # the path below the model's own (auto-numbered) name
        return variable.name.split("/", 1)[1]

    shared = {key(v): v for v in tokens.weights if v is not tokens.token_embedding.embeddings}
    assert sorted(shared) == sorted(key(v) for v in features.weights)
    for variable in features.weights:
        variable.assign(shared[key(variable)])
    by_hand = tf.constant(table[ids], tf.float32)  # (4, 6, text_dim)
    mask = tf.constant(ids != 0)
    want = features((by_hand,) + inputs[1:3] + (mask,) + inputs[4:], training=False)
    assert out.shape == (4, 1)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs vocab_size"):
        MSASeqLevelModel(**SMALL, text_input="tokens")


@pytest.mark.slow  # fit + evaluate of the balanced model under XLA: ~50 s on 2 cores
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
