"""Profiling end to end: a short CPU training run with --profile_steps leaves a profile under
profiles/<run name>/, and the report on it (msa_xla.profiling.report, tools/profile_report.py)
gives step time, input-wait share and the model's attention ops; a folder without a profile
exits 2.

The run uses --jit_compile=false --attention_impl=reference: on CPU, framework_op_stats lists no
ops from inside an XLA computation, so with the whole step (or the fused attention kernel) under
XLA the attention ops could not be found in its table. For XLA runs the report reads XLA's own
thunk events instead (a second run, jit on).
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from msa_xla.profiling import capture as profiling
from msa_xla.profiling import report as profile_report
from tests.train_helpers import TINY, make_tiny_dataset, without_xla_cache

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
                          env=without_xla_cache({**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}))
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
    # The step by model part: XLA's thunks mapped to the HLO's TF op names (the model's scopes).
    table = report["model_parts"]
    assert table["source"] == "XLA:CPU thunk events"
    kinds = {k["kind"]: k for k in table["kinds"]}
    core = kinds["attention core"]
    assert core["share_percent"] > 0 and core["forward_ms"] > 0 and core["backward_ms"] > 0
    names = {p["part"]: p for p in table["parts"]}
    assert {"text_encoder", "audio_encoder", "video_encoder", "fusion/text_from_audio",
            "fusion/text_from_video", "optimizer update"} <= set(names)
    assert sum(p["forward_ms"] for p in table["parts"]) > 0
    assert sum(p["backward_ms"] for p in table["parts"]) > 0
    assert names["optimizer update"]["update_ms"] > 0
    # The rows sum to the measured busy time (the worker threads' tasks, plus thunks run inline
    # on TF's own threads); what no op name covers is its own rows, with its share.
    total = table["total_ms_per_step"]
    assert total >= workers["busy_ms_per_step"] - 0.01
    assert sum(p["ms_per_step"] for p in table["parts"]) == pytest.approx(total, abs=0.02)
    assert sum(p["share_percent"] for p in table["parts"]) == pytest.approx(100, abs=0.2)
    attributed = sum(p["ms_per_step"] for p in table["parts"]
                     if not p["part"].startswith("unattributed"))
    assert attributed == pytest.approx(total * (1 - table["unattributed_percent"] / 100),
                                       abs=0.02)
    # At this size (d=16, T=8: ~2 ms of thunks a step) XLA's executor between ~400 thunks is
    # most of the rest: measured 45-58% unattributed here, 9% on the default model.
    assert table["unattributed_percent"] < 75
    assert "step by model part" in profile_report.format_report(report)


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
@pytest.mark.xdist_group("profiled_run")  # shares one module fixture
def test_training_run_leaves_a_profile_in_profiles_run_name(profiled_run):
    _, folder = profiled_run
    paths = profile_report.find_xplanes(str(folder))
    assert len(paths) == 1 and paths[0].endswith(".xplane.pb") and os.path.getsize(paths[0]) > 0


@pytest.mark.slow
@pytest.mark.xdist_group("profiled_run")  # shares one module fixture
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
    # (Whether an attention op is among the 10 slowest depends on the load: with a second test
    # process on the 2 cores the input pipeline's ops filled the top 10. Every op is checked below.)
    assert all(0 <= op["share_percent"] <= 100 and op["self_time_ms"] >= 0
               for op in report["top_ops"])
    # The named scopes make each part attributable: the attention core inside an encoder
    # layer's attention, and each fusion direction.
    every = [op["name"]
             for op in profile_report.profile_report(str(folder), top=10 ** 6)["top_ops"]]
    assert any("text_encoder/block_0/attention/attention/" in name for name in every)
    assert any("fusion/text_from_audio/" in name for name in every)
    assert any("fusion/text_from_video/" in name for name in every)
    # Without XLA the step by model part comes from the same names in TF's op table.
    table = report["model_parts"]
    assert table["source"].startswith("TF ops (framework_op_stats)")
    core = {k["kind"]: k for k in table["kinds"]}["attention core"]
    assert core["share_percent"] > 0 and core["forward_ms"] > 0 and core["backward_ms"] > 0
    parts_seen = {p["part"] for p in table["parts"]}
    assert {"text_encoder", "fusion/text_from_audio", "optimizer update"} <= parts_seen
    assert sum(p["share_percent"] for p in table["parts"]) == pytest.approx(100, abs=0.2)


@pytest.mark.slow
@pytest.mark.xdist_group("profiled_run")  # shares one module fixture
def test_report_cli_prints_table_and_writes_json(profiled_run, tmp_path):
    cwd, folder = profiled_run
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, REPORT_CLI, str(folder), "--json", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "step time" in done.stdout and "input wait" in done.stdout
    report = json.loads(out.read_text())
    # The model's scopes reach the terminal in the step-by-part table (the top-10 op list may be
    # the input pipeline's under load).
    assert "text_encoder" in done.stdout and "fusion/text_from_audio" in done.stdout
    assert report["step_time_ms"]["mean"] > 0 and len(report["top_ops"]) == 10
    assert "step by model part" in done.stdout and "attention core" in done.stdout
    assert report["model_parts"]["parts"] and report["model_parts"]["kinds"]


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.xdist_group("profiled_run")  # shares one module fixture
def test_tensorboard_lists_the_capture_and_its_profile_tools(profiled_run):
    """`tensorboard --logdir profiles` as a user starts it: its profile plugin's HTTP API
    (/data/plugin/profile/runs, /run_tools) returns this capture and its tools."""
    cwd, folder = profiled_run
    screenshot_tool = _load_tool("profile_screenshot")
    session = os.path.basename(os.path.dirname(profile_report.find_xplanes(str(folder))[0]))
    with screenshot_tool.TensorBoard(str(cwd / "profiles"), timeout=120) as board:
        runs = board.profile_runs()
        assert f"{RUN_NAME}/{session}" in runs, (runs, board.output()[-2000:])
        tools = board.run_tools(f"{RUN_NAME}/{session}")
        listing = screenshot_tool.get_json(board.url + "/data/plugins_listing")
    assert {"overview_page", "framework_op_stats", "trace_viewer@", "hlo_stats"} <= set(tools)
    assert listing["profile"]["enabled"]
    assert board.process.poll() is not None  # stopped


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


# ---- the step by model part (msa_xla/profiling/parts.py) ----------------------------------------
parts = profile_report.parts

# Op names as they appear in a capture of the default model (XLA's HLO metadata).
_OP_NAMES = {
    "seqlevel/text_encoder/block_0/attention/attention/einsum/Einsum":
        ("text_encoder", "attention core", "forward"),
    "gradient_tape/seqlevel/audio_encoder/block_1/attention/attention/Exp/mul":
        ("audio_encoder", "attention core", "backward"),
    "seqlevel/video_encoder/block_0/attention/MatMul": ("video_encoder", "attention projections",
                                                         "forward"),
    "gradient_tape/seqlevel/fusion/text_from_audio/layer_0_text_from_audio/ffn_inner/MatMul":
        ("fusion/text_from_audio", "feed-forward", "backward"),
    "seqlevel/fusion/text_from_video/layer_0_text_from_video/attention_norm/batchnorm/mul":
        ("fusion/text_from_video", "layer norm", "forward"),
    "seqlevel/video_encoder/block_0/dropout_4/SelectV2": ("video_encoder", "dropout", "forward"),
    "seqlevel/text_encoder/projection/MatMul": ("text_encoder", "other", "forward"),
    "seqlevel/fusion_head/Sum_1": ("head", "other", "forward"),
    "seqlevel/prediction/MatMul": ("head", "other", "forward"),
    "gradient_tape/mean_absolute_error/sub": ("loss", "other", "backward"),
    "Adam/mul_5": ("optimizer update", "other", "update"),
    "AssignAddVariableOp_5": ("other (metrics, step bookkeeping)", "other", "forward"),
    "fused_attention/attention/attention/einsum/Einsum":
        ("fused attention core (caller not recorded)", "attention core", "forward"),
}


@pytest.mark.parametrize("op_name", sorted(_OP_NAMES))
def test_op_names_map_to_part_kind_and_pass(op_name):
    assert parts.classify(op_name) == _OP_NAMES[op_name]


def test_hlo_proto_is_read_without_tensorflow_and_its_field_numbers_match_xla():
    from tensorflow.compiler.xla import xla_data_pb2
    from tensorflow.compiler.xla.service import hlo_pb2

    for key, number in parts.HLO_FIELDS.items():
        message, field = key.split(".")
        cls = getattr(xla_data_pb2 if message == "OpMetadata" else hlo_pb2, message)
        assert cls.DESCRIPTOR.fields_by_name[field].number == number, key
    proto = hlo_pb2.HloProto()
    proto.hlo_module.name = "a_inference_run_step_1__.2"
    computation = proto.hlo_module.computations.add(name="main")
    computation.instructions.add(name="dot.2", opcode="dot").metadata.op_name = "seqlevel/x/Einsum"
    computation.instructions.add(name="copy.1", opcode="copy")  # no op name
    assert parts.hlo_op_names(proto.SerializeToString()) == (
        "a_inference_run_step_1__.2", {"dot.2": "seqlevel/x/Einsum"})


def test_hlo_text_dump_is_read_when_the_capture_has_no_hlo(tmp_path):
    (tmp_path / "module_0001.a_inference_run_step_7__.3.cpu_after_optimizations.txt").write_text(
        "HloModule a_inference_run_step_7__.3, entry_computation_layout={()->f32[]}\n\n"
        "ENTRY %main () -> f32[] {\n"
        '  %dot.2 = f32[8,8]{1,0} dot(%a, %b), metadata={op_type="Einsum" '
        'op_name="seqlevel/text_encoder/block_0/attention/attention/einsum/Einsum" '
        'source_file="x.py" source_line=3}\n'
        "  %copy.1 = f32[8]{0} copy(%c)\n"
        '  ROOT %add_fusion = f32[] fusion(%dot.2), kind=kLoop, metadata={op_name="Adam/add"}\n'
        "}\n")
    assert parts.hlo_modules_in_dump(str(tmp_path)) == {"a_inference_run_step_7__.3": {
        "dot.2": "seqlevel/text_encoder/block_0/attention/attention/einsum/Einsum",
        "add_fusion": "Adam/add"}}


def _xspace_with_thunks(path):
    """One host plane: an Eigen worker thread busy 0..1000 us running thunks with XLA's stats,
    and a tf_Compute thread that runs one thunk inline."""
    pb2 = profile_report._xplane_pb2()
    space = pb2.XSpace()
    plane = space.planes.add(name="/host:CPU")
    stat_ids = {}

    def stat_id(name):
        if name not in stat_ids:
            stat_ids[name] = len(stat_ids) + 1
            plane.stat_metadata[stat_ids[name]].id = stat_ids[name]
            plane.stat_metadata[stat_ids[name]].name = name
        return stat_ids[name]

    event_ids = {}

    def add(line, name, start_us, duration_us, **stats):
        event_ids.setdefault(name, len(event_ids) + 1)
        plane.event_metadata[event_ids[name]].id = event_ids[name]
        plane.event_metadata[event_ids[name]].name = name
        event = line.events.add(metadata_id=event_ids[name], offset_ps=start_us * 10 ** 6,
                                duration_ps=duration_us * 10 ** 6)
        for key, value in stats.items():
            stat = event.stats.add(metadata_id=stat_id(key))
            if isinstance(value, str):
                stat.str_value = value
            else:
                stat.uint64_value = value

    def thunk(line, name, start_us, duration_us, context):
        add(line, name, start_us, duration_us, hlo_op=name, hlo_module="step", _p=context)

    worker = plane.lines.add(name="tf_numa_-1_Eigen/1", timestamp_ns=0)
    add(worker, "ThreadpoolListener::StartRegion", 0, 0)
    add(worker, "ThunkExecutor::Execute", 0, 1000)
    thunk(worker, "dot.1", 100, 100, 7)            # hands its matmul to Eigen at 200 us ...
    thunk(worker, "call.2", 300, 100, 8)           # a call thunk running a nested one
    thunk(worker, "shift_fusion.3", 320, 50, 9)    # (no op name: takes call.2's)
    thunk(worker, "copy.4", 400, 20, 10)           # no op name anywhere
    add(worker, "end: dot.1", 600, 0, _c=7)        # ... and the matmul is done at 600 us
    add(worker, "ThreadpoolListener::StopRegion", 1000, 0)
    compute = plane.lines.add(name="tf_Compute/5", timestamp_ns=0)
    thunk(compute, "MatMul.5", 2000, 40, 11)
    path.write_bytes(space.SerializeToString())
    return list(space.planes)


def test_thunk_time_goes_to_op_names_with_the_async_matmul_to_its_dot(tmp_path):
    planes = _xspace_with_thunks(tmp_path / "host.xplane.pb")
    modules = {"step": {"dot.1": "seqlevel/text_encoder/block_0/attention/attention/einsum/Einsum",
                        "call.2": "seqlevel/text_encoder/block_0/dropout_1/StatelessRandom",
                        "MatMul.5": "gradient_tape/seqlevel/text_encoder/block_0/ffn_inner/MatMul"}}
    timed = parts.thunk_units(planes, modules)
    by_name = {}
    for op_name, ps, _ in timed["units"]:
        by_name[op_name] = by_name.get(op_name, 0) + ps / 1e6  # us
    # dot: 100 us event + the busy time no thunk covers while its matmul is in flight:
    # 200..600 us minus call.2 (300..400) and copy.4 (400..420) = 280 us.
    assert by_name == {
        modules["step"]["dot.1"]: 100 + 280,
        modules["step"]["call.2"]: 50 + 50,  # its own 50 us + the nested fusion's 50 us
        None: 20,  # copy.4
        modules["step"]["MatMul.5"]: 40}
    assert timed["busy_ps"] / 1e6 == 1000 + 40  # the worker's region + the inline thunk
    table = parts.aggregate(timed["units"], timed["busy_ps"], steps=2, source="test",
                            total_is="busy", outside_ps=timed["busy_ps"] - 1e6 * (380 + 100
                                                                                  + 20 + 40))
    shares = {p["part"]: p["share_percent"] for p in table["parts"]}
    assert shares["unattributed: outside thunk events"] == round(100 * 500 / 1040, 2)
    assert shares["unattributed: no op name"] == round(100 * 20 / 1040, 2)
    kinds = {k["kind"]: k for k in table["kinds"]}
    assert kinds["attention core"]["forward_ms"] == 0.19  # 380 us over 2 steps
    assert kinds["feed-forward"]["backward_ms"] == 0.02
    assert sum(p["ms_per_step"] for p in table["parts"]) == pytest.approx(0.52, abs=0.002)


def _hlo_stats_fixture():
    """xprof's hlo_stats tool output on a device capture, hand-written: a gviz DataTable with
    the tool's columns (as the installed xprof returns them, rows empty, on a CPU capture)
    and rows as a TPU/GPU capture fills them (`total_self_time` in us)."""
    ids = ["rank", "program_id", "category", "hlo_op_name", "hlo_op_expression", "tf_op_name",
           "occurrences", "total_time", "avg_time", "total_self_time", "avg_self_time",
           "total_self_time_percent"]
    rows = [
        ("fusion.1", "seqlevel/text_encoder/block_0/attention/attention/einsum/Einsum", 4, 300.0),
        ("fusion.2", "gradient_tape/seqlevel/text_encoder/block_0/attention/attention/Exp", 4,
         200.0),
        ("convolution.3", "seqlevel/text_encoder/block_0/ffn_inner/MatMul", 4, 250.0),
        ("fusion.4", "Adam/mul_3", 4, 150.0),
        ("copy.5", "", 4, 100.0),
    ]
    return {"cols": [{"id": i, "label": i, "type": "string"} for i in ids],
            "rows": [{"c": [{"v": n}, {"v": "1"}, {"v": "convolution"}, {"v": name}, {"v": ""},
                            {"v": tf_op}, {"v": count}, {"v": us}, {"v": us / count},
                            {"v": us}, {"v": us / count}, {"v": 0.0}]}
                     for n, (name, tf_op, count, us) in enumerate(rows)],
            "p": {}}


def test_device_captures_use_xprofs_per_hlo_op_table():
    table = parts.device_model_parts(_hlo_stats_fixture(), steps=4)
    assert table["source"] == "xprof hlo_stats" and table["total_ms_per_step"] == 0.25
    kinds = {k["kind"]: k for k in table["kinds"]}
    assert kinds["attention core"]["share_percent"] == 50.0
    assert (kinds["attention core"]["forward_ms"], kinds["attention core"]["backward_ms"]) == (
        0.075, 0.05)
    part_shares = {p["part"]: p["share_percent"] for p in table["parts"]}
    assert part_shares == {"text_encoder": 75.0, "optimizer update": 15.0,
                           "unattributed: no op name": 10.0}
    assert table["unattributed_percent"] == 10.0
    # A CPU capture's hlo_stats has the columns but no rows: no table from it.
    assert parts.device_model_parts(dict(_hlo_stats_fixture(), rows=[]), steps=4) is None


def test_profiling_asks_xla_for_thunk_events_once():
    environ = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    assert profiling.enable_xla_trace_events(environ)
    assert environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_cpu_enable_xprof_traceme=true"
    assert not profiling.enable_xla_trace_events(environ)
    kept = {"XLA_FLAGS": "--xla_cpu_enable_xprof_traceme=false"}
    assert not profiling.enable_xla_trace_events(kept)
    assert kept["XLA_FLAGS"] == "--xla_cpu_enable_xprof_traceme=false"
    assert profiling.XLA_TRACEME_FLAG == profile_report.XLA_TRACEME_FLAG


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
                      epochs=1, verbose=0, checkpoint_every=0, profiler_port=port,
                      jit_compile="false")  # the server is under test, not XLA
    try:
        assert run(cfg) == 0
    finally:
        keras.backend.experimental.disable_tf_random_generator()
    assert f"profiler server on port {port}" in capsys.readouterr().out
    assert _accepts_tcp(port)
