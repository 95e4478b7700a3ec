"""Profiling end to end: a short CPU training run with --profile_steps leaves a profile under
profiles/<run name>/, and the report on it (msa_xla.profiling.report, tools/profile_report.py)
gives step time, input-wait share and the model's attention ops; a folder without a profile
exits 2.

The run uses --jit_compile=false --attention_impl=reference: on CPU, framework_op_stats lists no
ops from inside an XLA computation, so with the whole step (or the fused attention kernel) under
XLA the attention ops could not be found in its table. For XLA runs the report reads XLA's own
thunk events instead (a second run, jit on).
"""
import json
import os
import subprocess
import sys

import pytest

from msa_xla.profiling import capture as profiling
from msa_xla.profiling import report as profile_report
from tests.train_helpers import TINY, make_tiny_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT_CLI = os.path.join(ROOT, "tools", "profile_report.py")
RUN_NAME = "prof-run"


def _profiled_run(cwd, *flags):
    """One tiny training run (1 epoch of 8 steps) profiling steps 2..4; cwd is a temp folder so
    the default profiles/<run name>/ lands there. Returns (cwd, profile folder)."""
    data_dir = make_tiny_dataset(cwd / "data")
    command = [sys.executable, "-m", "msa_xla.train", *TINY, f"--data_dir={data_dir}",
               f"--workdir={cwd / 'runs' / RUN_NAME}", "--epochs=1", "--profile_steps=2,4",
               "--checkpoint_every=0", *flags]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "profiled train steps 2..4" in done.stdout, done.stdout[-2000:]
    return cwd, cwd / "profiles" / RUN_NAME


@pytest.fixture(scope="module")
def profiled_run(tmp_path_factory):
    return _profiled_run(tmp_path_factory.mktemp("profiling"), "--jit_compile=false",
                         "--attention_impl=reference")


@pytest.mark.slow
def test_xla_run_reports_xla_thunks(tmp_path):
    _, folder = _profiled_run(tmp_path, "--jit_compile=true")
    report = profile_report.profile_report(str(folder), quiet=True)
    thunks = report["xla_thunks"]
    assert thunks is not None and thunks["total_ms_per_step"] > 0
    kinds = {k["kind"]: k for k in thunks["kinds"]}
    assert kinds["dot (matmul)"]["share_percent"] > 0
    assert 0 < sum(k["share_percent"] for k in thunks["kinds"]) <= 100.05
    assert "XLA thunks on CPU" in profile_report.format_report(report)
    assert report["notes"] == []  # the XLA table replaces the "ops are missing" note
    # Thunks run inside the worker threads' tasks, so the tasks take at least as long.
    workers = report["workers"]
    assert workers["threads"] >= 1 and 0 < workers["busy_percent"] <= 100
    assert thunks["total_ms_per_step"] <= workers["busy_ms_per_step"]
    assert "worker threads" in profile_report.format_report(report)


def _write_xspace(path, lines):
    """An XSpace file with one host plane; `lines`: thread name -> [(event, start_us, dur_us)]."""
    pb2 = profile_report._xplane_pb2()
    space = pb2.XSpace()
    plane = space.planes.add(name="/host:CPU")
    ids = {}
    for thread, events in lines.items():
        line = plane.lines.add(name=thread, timestamp_ns=1_000)
        for name, start_us, duration_us in events:
            ids.setdefault(name, len(ids) + 1)
            plane.event_metadata[ids[name]].id = ids[name]
            plane.event_metadata[ids[name]].name = name
            line.events.add(metadata_id=ids[name], offset_ps=start_us * 10 ** 6,
                            duration_ps=duration_us * 10 ** 6)
    path.write_bytes(space.SerializeToString())
    return str(path)


def test_worker_activity_sums_task_regions_over_the_capture(tmp_path):
    start, stop = "ThreadpoolListener::StartRegion", "ThreadpoolListener::StopRegion"
    path = _write_xspace(tmp_path / "host.xplane.pb", {
        # The capture spans 0..1000 us (the main thread's event).
        "train.py": [("TraceContext", 0, 1000)],
        # Worker 1: tasks 100..400 and 500..600 us, with a thunk inside the first.
        "tf_numa_-1_Eigen/1": [(start, 100, 0), ("dot.1", 150, 200), (stop, 400, 0),
                               (start, 500, 0), (stop, 600, 0)],
        # Worker 2: one task 0..500 us running another inline at 100..200 us, then one still
        # running when the capture ends.
        "tf_numa_-1_Eigen/2": [(start, 0, 0), (start, 100, 0), (stop, 200, 0), (stop, 500, 0),
                               (start, 900, 0)],
        # Worker 3: only the end of a task that began before the capture.
        "tf_numa_-1_Eigen/3": [(stop, 50, 0)],
        # Not a worker thread: its regions do not count.
        "tf_data_private_threadpool/7": [(start, 0, 0), (stop, 1000, 0)],
    })
    activity = profile_report.worker_activity([path], steps=2)
    # busy 300 + 100 + 500 = 900 us over 2 steps; 900 / (2 threads x 1000 us) = 45%.
    assert activity == {"threads": 2, "busy_ms_per_step": 0.45, "busy_percent": 45.0}
    thunks = profile_report.xla_thunk_kinds([path], steps=2)
    # The listener's events are not thunks.
    assert [k["kind"] for k in thunks["kinds"]] == ["dot (matmul)"]
    assert profile_report.worker_activity(
        [_write_xspace(tmp_path / "none.xplane.pb", {"train.py": [("TraceContext", 0, 10)]})],
        steps=1) is None


@pytest.mark.slow
def test_training_run_leaves_a_profile_in_profiles_run_name(profiled_run):
    _, folder = profiled_run
    paths = profile_report.find_xplanes(str(folder))
    assert len(paths) == 1 and paths[0].endswith(".xplane.pb") and os.path.getsize(paths[0]) > 0


@pytest.mark.slow
def test_report_gives_step_time_input_share_and_attention_ops(profiled_run):
    _, folder = profiled_run
    report = profile_report.profile_report(str(folder), top=10)
    # Exactly the window: steps 2..4 of epoch 0 (fit's own step markers), no validation steps.
    assert report["step_names"] == ["train 2", "train 3", "train 4"]
    step = report["step_time_ms"]
    assert 0 < step["min"] <= step["mean"] <= step["max"] and step["std"] >= 0
    assert 0 <= report["input_wait_percent"] <= 100
    assert report["compile_time_ms"] >= 0 and report["notes"] == []
    assert report["xla_thunks"] is None  # no XLA in this run
    names = [op["name"] for op in report["top_ops"]]
    assert any("/attention/" in name for name in names), names
    assert all(0 <= op["share_percent"] <= 100 and op["self_time_ms"] >= 0
               for op in report["top_ops"])
    # The named scopes make each part attributable: the attention core inside an encoder
    # layer's attention, and each fusion direction.
    every = [op["name"]
             for op in profile_report.profile_report(str(folder), top=10 ** 6)["top_ops"]]
    assert any("text_encoder/block_0/attention/attention/" in name for name in every)
    assert any("fusion/text_from_audio/" in name for name in every)
    assert any("fusion/text_from_video/" in name for name in every)


@pytest.mark.slow
def test_report_cli_prints_table_and_writes_json(profiled_run, tmp_path):
    cwd, folder = profiled_run
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, REPORT_CLI, str(folder), "--json", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "step time" in done.stdout and "input wait" in done.stdout
    assert "/attention/" in done.stdout
    report = json.loads(out.read_text())
    assert report["step_time_ms"]["mean"] > 0 and len(report["top_ops"]) == 10


@pytest.mark.slow
@pytest.mark.parametrize("make", ["empty", "missing"])
def test_report_without_profile_is_one_clear_line_and_exit_2(tmp_path, make):
    folder = tmp_path / "no_profile"
    if make == "empty":
        folder.mkdir()
        (folder / "plugins" / "profile").mkdir(parents=True)
    done = subprocess.run([sys.executable, REPORT_CLI, str(folder)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: no profile in {folder}"), done.stderr
    assert done.stdout == ""


def test_profile_window_only_on_the_chief_and_default_dir():
    assert profiling.make_profile_callback(profile_steps=(1, 2), is_chief=False) is None
    assert profiling.make_profile_callback(profile_steps=(), is_chief=True) is None
    window = profiling.make_profile_callback(profile_steps=(1, 2), is_chief=True, run_name="r1")
    assert (window.first, window.last) == (1, 2)
    assert window.logdir == os.path.join("profiles", "r1")
    with pytest.raises(ValueError, match="0 <= A <= B"):
        profiling.make_profile_callback(profile_steps=(3, 2), is_chief=True)


def _accepts_tcp(port):
    import socket

    with socket.socket() as s:
        s.settimeout(5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_profiler_port_starts_a_server_that_accepts_connections(tmp_path, capsys):
    # In this process (one short run): the server is never stopped, so it keeps its port until
    # the test process ends; no other test starts one here.
    import tf_keras as keras

    from msa_xla.trainer.config import TrainConfig
    from msa_xla.trainer.main import run
    from tests.train_helpers import free_ports

    assert profiling._server_port is None, "a profiler server already runs in this process"
    port = free_ports(1)[0]
    assert not _accepts_tcp(port)
    data_dir = make_tiny_dataset(tmp_path / "data", sizes=(16, 8, 8))
    cfg = TrainConfig(data_dir=data_dir, workdir=str(tmp_path / "run"), model_dim=16,
                      num_heads=2, ff_dim=32, n_layers_mod=1, n_layers_fuse=1, batch_size=8,
                      epochs=1, verbose=0, checkpoint_every=0, profiler_port=port)
    try:
        assert run(cfg) == 0
    finally:
        keras.backend.experimental.disable_tf_random_generator()
    assert f"profiler server on port {port}" in capsys.readouterr().out
    assert _accepts_tcp(port)
