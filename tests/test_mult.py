"""MulTModel: MMSA's parameter count from the layer shapes, masks, last-valid-step pooling, its
attention paths, static HLO in training, learning through the trainer; and the data it reads
from MMSA pickles (text_bert token ids) and CMU-SDK .csd folds of video ids."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from msa_xla import MulTModel
from msa_xla.data import DataError, load_metadata, make_dataset, sources, writer
from msa_xla.kernels import masked_attention
from msa_xla.models.mult import (
    DROPOUTS,
    MulTAttention,
    causal_keys,
    last_valid_step,
    sinusoidal_positions,
)
from msa_xla.options import ATTENTION_IMPLS
from msa_xla.trainer.checkpointing import rng_state_variables
from msa_xla.trainer.config import TrainConfig
from tests.model_checks import (
    assert_static_hlo,
    hlo_text,
    learnable_targets,
    padded_inputs,
    with_noisy_padding,
)
from tests.test_data_sources import csd_folder, mmsa_dict, with_text_bert, write_csd, write_pickle
from tests.train_helpers import make_tiny_dataset, results

# The reference attention core: these tests call the model eagerly, where the fused core would
# compile one XLA program per (Tq, Tk) pair of MulT's nine attentions; the fused core inside MulT
# is covered by test_models' jit-compiled fit of `mult`.
SMALL = dict(seq_len=(6, 8, 10), text_dim=12, audio_dim=7, video_dim=5, model_dim=16,
             num_heads=4, n_levels=1, attention_impl="reference")
NO_DROPOUT = dict.fromkeys(DROPOUTS, 0.0)


def mult_parameters(dims, d, levels, kernels):
    """MulT's parameter count from its layer shapes (MMSA MULT.py / transformer.py)."""
    def encoder_layer(e):
        attention = (3 * e * e + 3 * e) + (e * e + e)  # in_proj (3e, e) + bias, out_proj
        feed_forward = (e * 4 * e + 4 * e) + (4 * e * e + e)  # fc1, fc2
        norms = 2 * 2 * e  # two LayerNorms
        return attention + feed_forward + norms

    def encoder(e, layers):
        return layers * encoder_layer(e) + 2 * e  # + the final LayerNorm

    convs = sum(f * d * k for f, k in zip(dims, kernels) if f != d)  # Conv1d, no bias
    crossmodal = 6 * encoder(d, levels)
    memories = 3 * encoder(2 * d, max(levels, 3))
    combined = 6 * d
    head = 2 * (combined * combined + combined) + (combined + 1)  # proj1, proj2, out_layer
    return convs + crossmodal + memories + head


def test_defaults_have_mmsa_parameter_count():
    model = MulTModel(seq_len=50, text_dim=300, audio_dim=74, video_dim=47)
    model(model.example_inputs())
    expected = mult_parameters((300, 74, 47), d=50, levels=4, kernels=(5, 5, 5))
    assert model.count_params() == expected == 2_478_551
    # MMSA's MOSI regression config is the default.
    config = model.get_config()
    assert (config["model_dim"], config["num_heads"], config["n_levels"]) == (50, 10, 4)
    assert {k: config[k] for k in DROPOUTS} == {
        "attn_dropout": 0.3, "attn_dropout_a": 0.2, "attn_dropout_v": 0.0, "relu_dropout": 0.0,
        "embed_dropout": 0.2, "res_dropout": 0.0, "output_dropout": 0.5, "text_dropout": 0.5}
    assert config["conv_kernel_sizes"] == [5, 5, 5]


def test_parameter_count_follows_the_shapes_at_other_sizes():
    model = MulTModel(**dict(SMALL, seq_len=7, video_dim=16, n_levels=2),
                      conv_kernel_sizes=(3, 1, 5))
    model(model.example_inputs())
    # video_dim == model_dim: no projection for video, as MulT.
    assert model.video_projection is None
    assert model.count_params() == mult_parameters((12, 7, 16), 16, 2, (3, 1, 5))


@pytest.mark.parametrize("causal_mask", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_garbage_in_padded_steps_changes_nothing(causal_mask, training):
    model = MulTModel(**SMALL, **NO_DROPOUT, causal_mask=causal_mask)
    inputs = padded_inputs()  # audio of clip 0 is all padding
    clean = model(inputs, training=training)
    noisy = model(with_noisy_padding(inputs), training=training)
    np.testing.assert_allclose(noisy, clean, atol=1e-5)


def test_convolutions_keep_the_length_and_the_mask_alignment():
    model = MulTModel(**SMALL, **NO_DROPOUT)
    inputs = padded_inputs()
    model(inputs)
    text = inputs[0]
    assert model.text_projection(text).shape == text.shape[:2] + (16,)
    # Conv1d 'same' (k=5): a step's output reads steps t-2..t+2; padding reads as zeros.
    kernel = model.text_projection.get_weights()[0]  # (k, F, d)
    padded = np.pad(text.numpy(), ((0, 0), (2, 2), (0, 0)))
    want = sum(padded[:, j:j + 6] @ kernel[j] for j in range(5))
    np.testing.assert_allclose(model.text_projection(text), want, atol=1e-5)


def test_last_valid_step_picks_each_clips_last_valid_step():
    sequence = tf.reshape(tf.range(2 * 4 * 3, dtype=tf.float32), (2, 4, 3)) + 1.0
    mask = tf.constant([[True, True, True, False], [False, False, False, False]])
    np.testing.assert_array_equal(last_valid_step(sequence, mask), [[7.0, 8.0, 9.0], [0, 0, 0]])


@pytest.mark.parametrize("causal_mask", [False, True])
def test_a_clip_predicts_the_same_whatever_padding_follows_it(causal_mask):
    # Pooling h[-1] (MulT's code) would read padding here; the last valid step does not.
    lengths = (3, 5, 4)
    short = MulTModel(**dict(SMALL, seq_len=lengths), **NO_DROPOUT, causal_mask=causal_mask)
    long = MulTModel(**SMALL, **NO_DROPOUT, causal_mask=causal_mask)
    rng = np.random.default_rng(3)
    clips = [rng.normal(size=(2, n, f)).astype("float32") for n, f in zip(lengths, (12, 7, 5))]
    short_out = short(tuple(tf.constant(c) for c in clips), training=False)
    long(long.example_inputs())
    long.set_weights(short.get_weights())
    padded = [np.pad(c, ((0, 0), (0, t - n), (0, 0)))
              for c, n, t in zip(clips, lengths, SMALL["seq_len"])]
    long_out = long(tuple(tf.constant(p) for p in padded), training=False)
    if causal_mask:  # the original's mask counts padded positions: not padding-invariant
        assert not np.allclose(long_out, short_out, atol=1e-4)
    else:
        np.testing.assert_allclose(long_out, short_out, atol=1e-5)


def _attention_inputs(q_len=5, k_len=7, heads=2, depth=4):
    rng = np.random.default_rng(0)
    q = tf.constant(rng.normal(size=(3, q_len, heads, depth)), tf.float32)
    k = tf.constant(rng.normal(size=(3, k_len, heads, depth)), tf.float32)
    v = tf.constant(rng.normal(size=(3, k_len, heads, depth)), tf.float32)
    q_mask = tf.constant(np.arange(q_len)[None] < np.array([[q_len], [2], [0]]))
    kv_mask = tf.constant(np.arange(k_len)[None] < np.array([[k_len], [0], [3]]))
    return q, k, v, q_mask, kv_mask


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
@pytest.mark.parametrize("q_len,k_len", [(5, 7), (7, 5), (6, 6)])
def test_the_cores_causal_offset_is_mults_mask(impl, q_len, k_len):
    # The core with MulT's offset |Tk - Tq| == the reference core, query by query, over the keys
    # causal_keys (MulT's buffered_future_mask) lets that query see.
    q, k, v, q_mask, kv_mask = _attention_inputs(q_len, k_len)
    got = masked_attention(q, k, v, q_mask, kv_mask, impl=impl, block_size=3,
                           causal_offset=abs(k_len - q_len))
    allowed = causal_keys(q_len, k_len)
    assert not allowed.all()
    for i in range(q_len):
        row_mask = tf.logical_and(kv_mask, allowed[i][None])
        want_row = masked_attention(q[:, i:i + 1], k, v, q_mask[:, i:i + 1], row_mask,
                                    impl="reference")
        np.testing.assert_allclose(got[:, i:i + 1], want_row, atol=1e-6)


def test_causal_mult_attention_sees_the_keys_of_mults_mask():
    # MulTAttention(causal=True), row i == the same layer without the causal mask given the key
    # mask "padding and causal_keys' row i" (the output projection acts on each row alone).
    rng = np.random.default_rng(1)
    query = tf.constant(rng.normal(size=(2, 5, 8)), tf.float32)
    context = tf.constant(rng.normal(size=(2, 7, 8)), tf.float32)
    q_mask = tf.constant([[True] * 5, [True] * 3 + [False] * 2])
    kv_mask = tf.constant([[True] * 7, [True] * 4 + [False] * 3])
    causal = MulTAttention(8, 2, causal=True, attention_impl="chunked")
    plain = MulTAttention(8, 2, attention_impl="reference")
    got = causal(query, context, context, q_mask, kv_mask)
    plain(query, context, context, q_mask, kv_mask)
    plain.set_weights(causal.get_weights())
    allowed = causal_keys(5, 7)
    for i in range(5):
        want = plain(query, context, context, q_mask,
                     tf.logical_and(kv_mask, allowed[i][None]))
        np.testing.assert_allclose(got[:, i], want[:, i], atol=1e-5)
    assert not np.allclose(got, plain(query, context, context, q_mask, kv_mask), atol=1e-3)


def test_training_attention_with_dropout_and_causal_mask_runs_the_core(monkeypatch):
    # Every attention of a training call goes through the core, with the impl asked for, its
    # dropout rate (MMSA's: 0.3 to text, 0.2 to audio, 0 to video; memories 0.3), a fresh key
    # and MulT's causal offset: with `chunked`, no B x H x Tq x Tk tensor is built (the core's
    # own tests check that its chunked program holds none, with dropout and the causal mask).
    calls = []

    def spy(q, k, v, *masks, **options):
        calls.append((q.shape[1], k.shape[1], options))
        return masked_attention(q, k, v, *masks, **options)

    monkeypatch.setattr("msa_xla.models.mult.masked_attention", spy)
    model = MulTModel(**dict(SMALL, attention_impl="chunked"), causal_mask=True)
    model(padded_inputs(), training=True)
    lengths = dict(zip(("text", "audio", "video"), SMALL["seq_len"]))
    rates = {"text": 0.3, "audio": 0.2, "video": 0.0}
    want = sorted([(lengths[t], lengths[s], rates[s]) for t, s in model.pairs]  # 1 level each
                  + [(lengths[t], lengths[t], 0.3) for t in lengths] * 3)  # memories: 3 layers
    assert sorted((tq, tk, o["dropout_rate"]) for tq, tk, o in calls) == want
    for tq, tk, options in calls:
        assert options["impl"] == "chunked" and options["causal_offset"] == abs(tk - tq)
        assert (options["dropout_key"] is None) == (options["dropout_rate"] == 0)
    keys = [o["dropout_key"].numpy().tolist() for _, _, o in calls if o["dropout_rate"]]
    assert len({tuple(key) for key in keys}) == len(keys) == 4 + 9  # a fresh key for each


def test_attention_dropout_keys_come_from_checkpointed_generators():
    # The trainer builds the model with an inference call, then checkpoints the dropout layers'
    # generator states (rng_state_variables): the attention dropout's must be among them, and
    # restoring them must redraw the same masks (exact resume).
    keras.backend.experimental.enable_tf_random_generator()
    try:
        model = MulTModel(**dict(SMALL, attention_impl="chunked"),
                          **dict(NO_DROPOUT, attn_dropout=0.5))
    finally:
        keras.backend.experimental.disable_tf_random_generator()
    inputs = padded_inputs()
    evaluated = model(inputs, training=False)
    states = rng_state_variables(model)
    attentions = [layer for layer in model.submodules if isinstance(layer, MulTAttention)
                  and layer.dropout_rate]
    assert len(attentions) == 2 + 9  # audio <- text, video <- text and the 9 memory layers
    assert len(states) == len(attentions)
    saved = [s.numpy() for s in states]
    first = model(inputs, training=True)
    second = model(inputs, training=True)
    assert not np.allclose(first, second, atol=1e-4)  # fresh keys every call
    assert not np.allclose(first, evaluated, atol=1e-4)
    for state, value in zip(states, saved):
        state.assign(value)
    np.testing.assert_array_equal(model(inputs, training=True), first)
    np.testing.assert_array_equal(model(inputs, training=False), evaluated)


def test_causal_mask_is_mults_buffered_future_mask():
    # torch.triu(-inf, 1 + |Tk - Tq|): query i sees keys j <= i + |Tk - Tq|.
    np.testing.assert_array_equal(causal_keys(3, 3), np.tril(np.ones((3, 3), bool)))
    np.testing.assert_array_equal(causal_keys(2, 4), [[1, 1, 1, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(causal_keys(4, 2), [[1, 1], [1, 1], [1, 1], [1, 1]])


def test_sinusoidal_positions_are_fairseqs_from_position_one():
    table = sinusoidal_positions(4, 6)  # half = 3 frequencies 10000^(-i/2)
    freqs = 10000.0 ** (-np.arange(3) / 2)
    angles = np.arange(1, 5)[:, None] * freqs
    np.testing.assert_allclose(table, np.concatenate([np.sin(angles), np.cos(angles)], 1),
                               atol=1e-6)
    assert sinusoidal_positions(3, 7)[:, -1].tolist() == [0, 0, 0]  # odd dim: zero column


@pytest.mark.slow  # one XLA compile of MulT's forward + backward: ~30 s on 2 cores
def test_training_with_dropout_and_causal_mask_lowers_to_static_hlo():
    model = MulTModel(**SMALL, causal_mask=True)  # every dropout of MMSA's config on
    inputs = padded_inputs()
    targets = learnable_targets(inputs)
    model(inputs)

    def forward_backward(inputs, targets):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.abs(model(inputs, training=True) - targets))
        return loss, tape.gradient(loss, model.trainable_variables)

    assert_static_hlo(hlo_text(forward_backward, inputs, targets))


def test_bad_arguments_name_the_values():
    with pytest.raises(ValueError, match=r"attn_dropout_a=1.0 must be in \[0, 1\)"):
        MulTModel(**SMALL, attn_dropout_a=1.0)
    with pytest.raises(ValueError, match="n_levels=0 must be >= 1"):
        MulTModel(**dict(SMALL, n_levels=0))
    with pytest.raises(ValueError, match="model_dim=16 is not divisible by num_heads=3"):
        MulTModel(**dict(SMALL, num_heads=3))


def test_trainer_builds_mult_from_flags():
    meta = {"modalities": {"text": {"dim": 12, "seq_len": 6}, "audio": {"dim": 7, "seq_len": 8},
                           "video": {"dim": 5, "seq_len": 10}}}
    kwargs = TrainConfig(model="mult", model_dim=16, num_heads=4, n_layers_mod=2).model_kwargs(meta)
    assert kwargs["n_levels"] == 2 and "ff_dim" not in kwargs and "dropout_rate" not in kwargs
    assert MulTModel(**kwargs).n_levels == 2


@pytest.mark.slow
def test_learns_the_tiny_dataset_through_the_trainer(tmp_path):
    # 20 epochs: after 12, test MAE / the constant predictor's MAE was 0.49, 0.63, 0.47 on
    # seeds 1111, 2, 3 with MulT's former attention dropout and 0.53, 0.40, 0.51 with the
    # attention core's (other masks, same distribution): the 0.5 bound was a coin flip. After
    # 20 epochs: 0.45 (seed 1111, the core's masks) and 0.42 (seed 2, the former ones).
    from msa_xla.trainer.main import run

    data_dir = make_tiny_dataset(tmp_path / "data")
    cfg = TrainConfig(data_dir=data_dir, workdir=str(tmp_path / "run"), model="mult",
                      model_dim=16, num_heads=2, n_layers_mod=1, batch_size=8,
                      learning_rate=3e-3, epochs=20, verbose=0, checkpoint_every=0)
    try:
        assert run(cfg) == 0
    finally:
        keras.backend.experimental.disable_tf_random_generator()  # run() enables it
    mae = results(tmp_path / "run")["per_seed"][0]["test"]["MAE"]
    (_, train_labels), = list(make_dataset(data_dir, "train", 64, shuffle=False))
    (_, test_labels), = list(make_dataset(data_dir, "test", 24, shuffle=False))
    constant = float(np.mean(np.abs(test_labels.numpy() - np.median(train_labels.numpy()))))
    assert mae < 0.5 * constant, (mae, constant)


# ---- data: MMSA text_bert and .csd folds ------------------------------------------------------
def test_mmsa_text_bert_becomes_the_token_input(tmp_path):
    data = with_text_bert(mmsa_dict())
    path = write_pickle(tmp_path / "aligned.pkl", data)
    splits = sources.read_source("mmsa", path)
    out = tmp_path / "out"
    writer.convert(splits, out, source_format="mmsa", source_path=path, log=lambda line: None)
    meta = load_metadata(out)
    assert meta["tokens"]["vocab_size"] == 30522 and meta["tokens"]["seq_len"] == 6
    for split in ("train", "test"):
        count = meta["splits"][split]["count"]
        (inputs, _), = list(make_dataset(str(out), split, count, shuffle=False,
                                         text_input="tokens"))
        bert = data[split]["text_bert"]
        np.testing.assert_array_equal(inputs[0], bert[:, 0].astype(np.int32))
        np.testing.assert_array_equal(inputs[3], bert[:, 1] == 1)
    kwargs = TrainConfig(model="mult", text_input="tokens").model_kwargs(meta)
    assert kwargs["vocab_size"] == 30522 and kwargs["seq_len"][0] == 6


def test_mmsa_padded_length_is_the_default_seq_len(tmp_path):
    data = mmsa_dict(seq=(6, 9, 11))
    for part in data.values():  # every clip shorter than the padded 9 / 11 steps
        part["audio_lengths"] = [min(n, 4) for n in part["audio_lengths"]]
        part["vision_lengths"] = [min(n, 4) for n in part["vision_lengths"]]
    path = write_pickle(tmp_path / "unaligned.pkl", data)
    out = tmp_path / "out"
    writer.convert(sources.read_source("mmsa", path), out, source_format="mmsa",
                   source_path=path, log=lambda line: None)
    assert load_metadata(out)["seq_len"] == [6, 9, 11]


def test_text_bert_with_a_broken_mask_is_refused(tmp_path):
    data = with_text_bert(mmsa_dict())
    data["valid"]["text_bert"][1, 1, 0] = 0  # a hole at the start of clip 1's mask
    with pytest.raises(DataError, match=r"valid.text_bert: the attention mask of clip 1 is not"):
        sources.read_source("mmsa", write_pickle(tmp_path / "x.pkl", data))


def _write_splits(folder, splits):
    with open(os.path.join(folder, "splits.json"), "w") as f:
        json.dump(splits, f)


def test_csd_folds_of_video_ids_select_their_clips(tmp_path):
    folder = csd_folder(tmp_path, n=12, with_splits=False)  # clips video0[0] .. video5[1]
    _write_splits(folder, {"standard_train_fold": ["video0", "video1", "video2"],
                           "standard_valid_fold": ["video3", "unknown_video"],
                           "standard_test_fold": ["video4", "video5[1]"]})
    splits = sources.read_source("csd", folder)
    assert splits["train"].ids == ["video0[0]", "video0[1]", "video1[0]", "video1[1]",
                                   "video2[0]", "video2[1]"]
    assert splits["valid"].ids == ["video3[0]", "video3[1]"]
    assert splits["test"].ids == ["video4[0]", "video4[1]", "video5[1]"]
    out = tmp_path / "out"
    writer.convert(splits, out, source_format="csd", source_path=folder, log=lambda line: None)
    assert load_metadata(out)["splits"]["test"]["count"] == 3


def test_csd_clip_order_is_numeric_within_a_video(tmp_path):
    ids = [f"v[{i}]" for i in (0, 1, 2, 10, 11)]
    for name, dim in (("text", 3), ("audio", 2), ("video", 2)):
        write_csd(os.path.join(tmp_path, f"{name}.csd"), name,
                  {k: np.ones((2, dim)) for k in ids})
    write_csd(os.path.join(tmp_path, "labels.csd"), "labels", {k: np.ones((1, 1)) for k in ids})
    _write_splits(tmp_path, {"train": ["v"], "valid": ["v[0]"], "test": ["v[1]"]})
    assert sources.read_source("csd", str(tmp_path))["train"].ids == ids


def test_csd_split_that_selects_nothing_is_one_clear_error(tmp_path, capsys):
    folder = csd_folder(tmp_path, n=12, with_splits=False)
    _write_splits(folder, {"train": ["video0"], "valid": ["nope", "video9"], "test": ["video5"]})
    with pytest.raises(DataError, match=r"split 'valid' selects no clip: none of its 2 ids"):
        sources.read_source("csd", folder)
    with pytest.raises(SystemExit) as exit_info:
        writer.main(["--format", "csd", "--input", folder, "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "selects no clip" in err[-1]
    assert not os.path.exists(tmp_path / "out")
