"""What a TPU or multi-GPU run executes, emulated on CPU (the accelerator-semantics tier).

- MirroredStrategy over the two logical CPUs of the test process (tests/conftest.py) with each
  mixed policy: the trainer's own split-step path, end to end.
- MirroredStrategy's GPU path: on GPUs under XLA, MirroredStrategy skips `merge_call`
  (`MirroredExtended._use_merge_call` is False inside an XLA context on all-GPU devices), so
  metrics, loss scaling and the gradient all-reduce run inside the replica function. Forcing
  `_use_merge_call` to False here runs that same Python path on two logical CPUs (without XLA:
  XLA:CPU has no collectives).
"""
import json
import math
import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from msa_xla.data import load_metadata
from msa_xla.runtime.compat import fresh_collective_keys
from msa_xla.trainer.config import TrainConfig
from tests.train_helpers import make_tiny_dataset, results

pytestmark = pytest.mark.accelerator



@pytest.fixture(scope="module")
def token_data(tmp_path_factory):
    """A tiny dataset with both float text features and token ids."""
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny", tokenize=True)


@pytest.fixture(autouse=True)
def _legacy_rng_after():
    yield
    keras.backend.experimental.disable_tf_random_generator()  # run() enables it process-wide


def tiny_config(data_dir, workdir, **overrides):
    values = dict(data_dir=data_dir, workdir=str(workdir), model_dim=16, num_heads=2, ff_dim=32,
                  n_layers_mod=1, n_layers_fuse=1, batch_size=8, learning_rate=3e-3, epochs=1,
                  verbose=0, checkpoint_every=0)
    values.update(overrides)
    return TrainConfig(**values)


def gpu_like_mirrored_strategy():
    """MirroredStrategy over the two logical CPUs with merge_call disabled, as on GPUs + XLA."""
    fresh_collective_keys()  # several strategies in one process
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    strategy.extended._use_merge_call = lambda: False
    return strategy


# ---- 1: mixed precision under MirroredStrategy, through the trainer -------------------------------
@pytest.mark.slow
# Each policy once: float16 with loss scaling on the default step, bfloat16 on the balanced
# model's own step (its compute_gradients in the split step).
@pytest.mark.parametrize("model, policy", [("seqlevel", "mixed_float16"),
                                           ("balanced", "mixed_bfloat16")])
def test_mirrored_two_cpus_with_mixed_precision_trains_and_writes_results(token_data, tmp_path,
                                                                          model, policy):
    # The reproduction: epoch-end metrics of a mixed policy used to raise
    # NotImplementedError (AutoCastVariable metric state read in a sync-on-read context).
    from msa_xla.trainer.main import run

    cfg = tiny_config(token_data, tmp_path / "run", model=model, strategy="mirrored",
                      precision=policy)
    assert run(cfg, cpu_replicas=2) == 0
    res = results(tmp_path / "run")
    assert res["replicas"] == 2 and res["precision"] == policy and res["jit"] == "split_step"
    assert all(math.isfinite(v) for v in res["per_seed"][0]["test"].values())
    if model == "balanced":
        # BalancedMSAModel's OGM-GE step joins the per-replica XLA computation through
        # compute_gradients; its coefficients must still reach the logs (updated outside XLA,
        # averaged over the epoch).
        history = res["per_seed"][0]["history"]
        coefficients = {k: v[-1] for k, v in history.items() if k.startswith("coeff_")}
        assert set(coefficients) == {"coeff_text", "coeff_audio", "coeff_video"}, history
        assert all(0.0 < value <= 1.0 for value in coefficients.values()), coefficients
        assert min(coefficients.values()) < 1.0  # one modality dominates and is slowed


# ---- 1, 2, 6: the GPU path (no merge_call) for every model, policy and text input ---------------
# Each model once; each policy with each text input once (a pairwise cover of the 16 combinations:
# the policy x text-input interactions are where the dtype bugs were; a model's own code does not
# depend on which of them the others ran with).
GPU_PATH_CASES = [("seqlevel", "mixed_bfloat16", "features"), ("msa", "mixed_float16", "tokens"),
                  ("improved", "mixed_bfloat16", "tokens"), ("balanced", "mixed_float16", "features")]
def _build(cfg, strategy):
    from msa_xla.trainer.loop import _build_model

    meta = load_metadata(cfg.data_dir)
    return _build_model(cfg, meta, strategy, seed=3)[0], meta


def _op_types(concrete_function):
    """Every op type of a traced function, nested functions (step, while bodies) included."""
    graph_def = concrete_function.graph.as_graph_def()
    types = {node.op for node in graph_def.node}
    for function in graph_def.library.function:
        types.update(node.op for node in function.node_def)
    return types


@pytest.mark.slow
@pytest.mark.parametrize("model, policy, text_input", GPU_PATH_CASES)
def test_gpu_path_fit_and_evaluate(token_data, tmp_path, model, policy, text_input):
    from msa_xla.runtime import precision
    from msa_xla.trainer.inputs import eval_data, train_data

    precision.apply_precision(policy)
    strategy = gpu_like_mirrored_strategy()
    cfg = tiny_config(token_data, tmp_path / "run", model=model, precision=policy,
                      text_input=text_input, jit_compile="false")
    built, meta = _build(cfg, strategy)
    train = train_data(cfg.data_dir, 8, strategy, seed=1, text_input=text_input)
    valid = eval_data(cfg.data_dir, "valid", 8, strategy, text_input=text_input)
    history = built.fit(train, epochs=1, steps_per_epoch=2, verbose=0)
    assert all(math.isfinite(v[0]) for v in history.history.values()), history.history
    logs = built.evaluate(valid, steps=2, return_dict=True, verbose=0)
    assert all(math.isfinite(v) for v in logs.values()), logs
    # All-reduce of a sparse (IndexedSlices) gradient is a CollectiveGatherV2, which XLA on GPU
    # cannot compile: the token embedding's gradient must be dense.
    (step,) = built.train_function._list_all_concrete_functions()
    op_types = _op_types(step)
    assert "CollectiveReduceV2" in op_types  # the gradient all-reduce is in the traced step
    assert "CollectiveGatherV2" not in op_types


def test_gpu_path_progress_logs_are_not_multiplied_by_the_replica_count(token_data, tmp_path):
    # Without merge_call every replica returns the all-reduced metric values; tf_keras' default
    # "sum" reduction of per-replica logs would add them up (x2 here).
    strategy = gpu_like_mirrored_strategy()
    cfg = tiny_config(token_data, tmp_path / "run", jit_compile="false", learning_rate=1e-9)
    built, _ = _build(cfg, strategy)
    from msa_xla.trainer.inputs import eval_data

    valid = eval_data(cfg.data_dir, "valid", 8, strategy)
    seen = []
    batch_logs = keras.callbacks.LambdaCallback(
        on_test_batch_end=lambda batch, logs: seen.append(float(logs["MAE"])))
    logs = built.evaluate(valid, steps=2, return_dict=True, verbose=0, callbacks=[batch_logs])
    predictions = []
    labels = []
    for inputs, label, _weight in eval_data(cfg.data_dir, "valid", 8,
                                           tf.distribute.get_strategy()).take(2):
        predictions.append(built(inputs, training=False).numpy()[:, 0])
        labels.append(label.numpy().ravel())
    expected = float(np.mean(np.abs(np.concatenate(predictions) - np.concatenate(labels))))
    assert seen[-1] == pytest.approx(expected, rel=1e-4)
    assert logs["MAE"] == pytest.approx(expected, rel=1e-4)


# ---- 7: CPU-only rewrites stay on CPU; dropout and attention numerics in 16-bit ------------------
def _trace_linear_gradient(device=None, tpu=False):
    """(platform seen, op types) of a jit-compiled `linear` forward + backward, traced (not run)
    inside a device scope or a TPU replicate context, as the strategies trace a replica."""
    import contextlib

    from msa_xla.kernels import linear
    from msa_xla.runtime.compat import xla_target_platform

    platforms = []

    @tf.function(jit_compile=True)
    def step(x, kernel, bias):
        scope = tf.device(device) if device else contextlib.nullcontext()
        context = None
        if tpu:  # what TPUStrategy.run traces the replica function in
            from tensorflow.python.tpu import tpu_replication

            context = tpu_replication.TPUReplicateContext(b"cluster", 1, pivot=tf.no_op())
            context.Enter()
        try:
            with scope:
                platforms.append(xla_target_platform())
                with tf.GradientTape() as tape:
                    tape.watch([kernel, bias])
                    out = linear(x, kernel, bias)
                return tape.gradient(out, [kernel, bias])
        finally:
            if context is not None:
                context.Exit()

    args = (tf.TensorSpec([2, 5, 4]), tf.TensorSpec([4, 3]), tf.TensorSpec([3]))
    graph = step.get_concrete_function(*args).graph
    return platforms[0], {op.type for op in graph.get_operations()}


def test_projection_bias_gradient_rewrite_runs_on_xla_cpu_only(monkeypatch):
    # The [x, 1] concatenation is the XLA:CPU rewrite (kernels/projection.py).
    platform, ops = _trace_linear_gradient()
    assert platform == "CPU" and "ConcatV2" in ops and "Sum" not in ops
    platform, ops = _trace_linear_gradient(device="/device:GPU:0")
    assert platform == "GPU" and "ConcatV2" not in ops and "Sum" in ops
    platform, ops = _trace_linear_gradient(tpu=True)
    assert platform == "TPU" and "ConcatV2" not in ops and "Sum" in ops
    # No device scope (a jit-compiled step runs where its caller is placed): a host with GPUs
    # places it on the first GPU.
    real = tf.config.list_logical_devices
    monkeypatch.setattr(tf.config, "list_logical_devices",
                        lambda kind=None: ["/GPU:0"] if kind == "GPU" else real(kind))
    platform, ops = _trace_linear_gradient()
    assert platform == "GPU" and "ConcatV2" not in ops


@pytest.mark.parametrize("dtype", [tf.bfloat16, tf.float16])
def test_hashed_dropout_keeps_the_mean_in_16_bit(dtype):
    # Against the mask actually drawn: kept values must be x / keep_probability up to the
    # rounding of each value (unbiased), not x times a scale rounded to 16 bits (1/0.899994 is
    # 1.109375 in bfloat16: every kept value 0.16% too small).
    from msa_xla.layers import Dropout
    from msa_xla.layers.dropout import quantized_keep_probability

    policy = "mixed_bfloat16" if dtype == tf.bfloat16 else "mixed_float16"
    layer = Dropout(0.1, dtype=policy)  # computes in `dtype`, as inside a mixed-precision model
    x = tf.cast(tf.random.stateless_uniform([256, 4096], seed=[1, 2], minval=1.0, maxval=2.0),
                dtype)
    out = tf.function(lambda x: layer(x, training=True), jit_compile=True)(x)
    assert out.dtype == dtype
    kept = (out != 0).numpy()
    assert 0.89 < kept.mean() < 0.91
    x64, out64 = x.numpy().astype(np.float64), out.numpy().astype(np.float64)
    expected = x64[kept].sum() / quantized_keep_probability(0.1)
    assert abs(out64.sum() / expected - 1.0) < 2e-4


@pytest.mark.parametrize("impl", ["fused", "reference", "chunked"])
def test_attention_logits_beyond_float16_range_stay_finite(impl):
    from msa_xla.kernels import masked_attention

    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 6, 2, 8)) * 200.0  # |q.k| / sqrt(8) ~ 1e5 > 65504
    k = rng.normal(size=(2, 7, 2, 8)) * 200.0
    v = rng.normal(size=(2, 7, 2, 8))
    kv_mask = tf.sequence_mask([7, 4], 7)
    expected = masked_attention(*(tf.constant(t, tf.float32) for t in (q, k, v)),
                                kv_mask=kv_mask, impl="reference")
    out = masked_attention(*(tf.constant(t, tf.float16) for t in (q, k, v)), kv_mask=kv_mask,
                           impl=impl)
    assert out.dtype == tf.float16
    assert np.isfinite(out.numpy()).all()
    np.testing.assert_allclose(out.numpy().astype(np.float32), expected.numpy(), atol=2e-2)


# ---- 5: remote storage: data, workdir and profiles on ram:// (TF's in-memory gfile, like gs://) --
@pytest.mark.slow
def test_run_on_ram_filesystem_trains_checkpoints_resumes_and_writes_results(capsys,
                                                                             monkeypatch):
    import signal
    import uuid

    from msa_xla.data import synthetic, writer
    from msa_xla.trainer import loop
    from msa_xla.trainer.main import run
    from tests.train_helpers import DIMS, SEQ_LEN, SIZES

    root = f"ram://accelerator-{uuid.uuid4().hex}"
    data_dir, workdir, profile_dir = f"{root}/data", f"{root}/run", f"{root}/profile"
    writer.convert(synthetic.generate(SIZES, seq_len=SEQ_LEN, dims=DIMS, seed=5), data_dir,
                   source_format="synthetic", source_path="-", log=lambda line: None)
    # Storage is under test, not XLA: no compile (the capture then holds TF's op events).
    cfg = dict(epochs=2, checkpoint_every=3, profile_steps=(2, 3), profile_dir=profile_dir,
               jit_compile="false")

    # First run: preempted (SIGTERM) after step 5 of 16, as a TPU VM's maintenance event would.
    real_build = loop.build_callbacks

    def with_preemption(*args, **kwargs):
        callbacks, handles = real_build(*args, **kwargs)
        preempt = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: (
            os.kill(os.getpid(), signal.SIGTERM) if batch == 4 else None))
        return [preempt] + callbacks, handles

    monkeypatch.setattr(loop, "build_callbacks", with_preemption)
    assert run(tiny_config(data_dir, workdir, **cfg)) == 143
    monkeypatch.setattr(loop, "build_callbacks", real_build)
    assert not os.path.exists("ram:")  # os.path.abspath("ram://x") would be ./ram:/x
    checkpoints = tf.io.gfile.listdir(f"{workdir}/seed_1111/checkpoints")
    assert {"ckpt-3.index", "ckpt-5.index", "trainer-5.json", "identity.json"} <= set(
        checkpoints), checkpoints
    from msa_xla.profiling import report as profile_report

    assert profile_report.find_xplanes(profile_dir)[0].startswith(f"{profile_dir}/plugins/")
    capsys.readouterr()

    # Second run, same command: resumes at step 5 and finishes.
    assert run(tiny_config(data_dir, workdir, **cfg)) == 0
    assert "resumed from step 5" in capsys.readouterr().out
    res = json.loads(tf.io.gfile.GFile(f"{workdir}/results.json").read())
    assert res["per_seed"][0]["steps"] == 16
    assert res["best_model"]["keras"] == f"{workdir}/best_model.keras"
    assert tf.io.gfile.exists(f"{workdir}/best_model_savedmodel/saved_model.pb")
    loaded = keras.models.load_model(res["best_model"]["keras"])
    assert loaded.count_params() > 0
