"""The step-time report on a captured profile, in the terminal (`tools/profile_report.py`).

    report = profile_report("profiles/my-run")   # dict; format_report(report) -> table text

Reads the newest capture with xprof's converter (overview_page, input_pipeline_analyzer,
framework_op_stats) and, from the raw XSpace, how busy the worker threads were and, for
XLA-compiled steps on CPU, XLA's own thunk events; and the step's time by model part
(msa_xla/profiling/parts.py). Imports neither TensorFlow nor tf_keras, so the CLI starts in
about a second. The capture itself is msa_xla/profiling/capture.py.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import json
import math
import os
import re
import sys

if __name__.startswith("msa_xla."):
    from msa_xla import cli
    from msa_xla.profiling import parts
    from msa_xla.runtime import storage
else:  # loaded by tools/profile_report.py without msa_xla/__init__.py (TensorFlow, ~5 s)
    def _load(relative_path):
        package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        spec = importlib.util.spec_from_file_location(
            "msa_xla_" + relative_path.replace("/", "_")[:-3], os.path.join(package_dir, relative_path))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    # None of these imports TensorFlow.
    cli, storage, parts = _load("cli.py"), _load("runtime/storage.py"), _load("profiling/parts.py")

REPORT_TOOLS = ("overview_page", "input_pipeline_analyzer", "framework_op_stats")  # + hlo_stats


class ProfileNotFound(FileNotFoundError):
    """The folder holds no captured profile (`*.xplane.pb`)."""


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
# The op types of the tf.data input pipeline in framework_op_stats (their names start with
# "Iterator::" or are dataset/parse kernels); used to tell whether the model's ops are listed.
_INPUT_OP_TYPES = ("Dataset", "ParseExampleV2", "ParseExample", "IteratorGetNext",
                   "MultiDeviceIteratorFromStringHandle", "TFRecordDataset", "FlatMapDataset",
                   "TensorSliceDataset")
XLA_TRACEME_FLAG = "--xla_cpu_enable_xprof_traceme=true"  # as capture.py (no import: no TF)
_XLA_NOTE = ("the model's ops are (almost) missing above: the train step ran as XLA "
             "computations, whose ops framework_op_stats does not list on CPU; for XLA's own "
             f"breakdown rerun with XLA_FLAGS={XLA_TRACEME_FLAG} (see the XLA thunks table), or "
             "profile with --jit_compile=false --attention_impl=reference (the step time then "
             "differs)")


def find_xplanes(folder: str) -> list[str]:
    """The newest capture under `folder`: its `*.xplane.pb` files (one per host).

    `tf.profiler.experimental.start(logdir)` writes
    `logdir/plugins/profile/<time>/<host>.xplane.pb`; the newest file decides the capture, and
    every host file of that capture is returned.

    Raises:
      ProfileNotFound: the folder does not exist or holds no `*.xplane.pb`.
    """
    if not storage.isdir(folder):
        raise ProfileNotFound(f"no profile in {folder}: the folder does not exist")
    if storage.is_remote(folder):  # gfile's glob has no "**": the layout the profiler writes
        paths = storage.glob(storage.join(folder, "plugins", "profile", "*", "*.xplane.pb"))
    else:
        paths = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)
    paths = [p for p in paths if storage.stat(p).size > 0]
    if not paths:
        raise ProfileNotFound(
            f"no profile in {folder}: no *.xplane.pb found (capture one with "
            "python -m msa_xla.train --profile_steps=A,B)")
    # Newest capture: by modification time, else by the capture folder's name (a timestamp).
    newest = max(paths, key=lambda p: (storage.stat(p).mtime_ns, storage.dirname(p)))
    capture = storage.dirname(newest)
    return sorted(p for p in paths if storage.dirname(p) == capture)


def convert(xplane_paths: list[str], tool: str, quiet: bool = False):
    """One xprof tool's data for a capture, parsed from JSON.

    `xspace_to_tool_data(paths, tool, params)` returns `(data, content_type)`; for the three
    tools used here data is JSON bytes: a list of gviz DataTables (`{"cols", "rows", "p"}`).
    xprof caches its intermediate result next to the capture (`ALL_HOSTS.op_stats_v2.pb`).

    Args:
      quiet: hide the converter's C++ INFO lines (written straight to file descriptor 2); they
        are shown if the conversion fails.
    """
    from xprof.convert.raw_to_tool_data import xspace_to_tool_data

    with _stderr_captured(quiet) as captured:
        data, _ = xspace_to_tool_data(list(xplane_paths), tool, {})
    if not data:
        raise RuntimeError(f"xprof could not convert {xplane_paths} to {tool}: "
                           f"{captured.read().strip()}")
    return json.loads(data)


class _stderr_captured:
    """Redirects file descriptor 2 into a temporary file (C++ logs bypass sys.stderr)."""

    def __init__(self, enabled: bool):
        self.enabled, self.text = enabled, ""

    def __enter__(self):
        if self.enabled:
            import tempfile

            sys.stderr.flush()
            self._file = tempfile.TemporaryFile(mode="w+")
            self._saved = os.dup(2)
            os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        if self.enabled:
            os.dup2(self._saved, 2)
            os.close(self._saved)
            self._file.seek(0)
            self.text = self._file.read()
            self._file.close()
        return False

    def read(self) -> str:
        return self.text


def datatable_rows(table: dict) -> list[dict]:
    """A gviz DataTable's rows as dicts keyed by column id."""
    ids = [col.get("id") for col in table.get("cols", [])]
    return [{name: (cell or {}).get("v") for name, cell in zip(ids, row.get("c", []))}
            for row in table.get("rows", [])]


def _find_table(tables: list, column: str) -> dict:
    for table in tables:
        if any(col.get("id") == column for col in table.get("cols", [])):
            return table
    return {}


def _number(text, default=None):
    try:
        value = float(str(text).rstrip("%"))
    except (TypeError, ValueError):
        return default
    return value if math.isfinite(value) else default


def step_summary(overview: list, input_pipeline: list) -> dict:
    """Step time (ms: mean, std, min, max), input-wait share (%) and compile time (ms)."""
    table = _find_table(input_pipeline, "stepTimeMs") or _find_table(overview, "stepTimeMs")
    steps = datatable_rows(table)
    props = table.get("p", {})
    times = [float(s["stepTimeMs"]) for s in steps if s.get("stepTimeMs") is not None]
    if times:
        mean = sum(times) / len(times)
        std = math.sqrt(sum((t - mean) ** 2 for t in times) / len(times))
        step_ms = {"mean": mean, "std": std, "min": min(times), "max": max(times)}
    else:  # no step markers: xprof's own averages (zero when it found no steps)
        step_ms = {"mean": _number(props.get("steptime_ms_average"), 0.0),
                   "std": _number(props.get("steptime_ms_standard_deviation"), 0.0),
                   "min": _number(props.get("steptime_ms_minimum"), 0.0),
                   "max": _number(props.get("steptime_ms_maximum"), 0.0)}
    total = sum(times)
    input_ms = sum(float(s.get("infeedTimeMs") or 0.0) for s in steps)
    compile_ms = sum(float(s.get("compileTimeMs") or 0.0) for s in steps)
    return {
        "steps": len(times),
        "step_names": [s.get("stepnum") for s in steps],
        "step_time_ms": step_ms,
        # Input = time the step waited for its next batch (xprof's "Input" / infeed part).
        "input_wait_percent": 100.0 * input_ms / total if total else 0.0,
        "compile_time_ms": compile_ms,  # XLA/graph compilation inside the profiled steps
        "hardware": props.get("hardware_type", ""),
        "input_conclusion": props.get("input_conclusion", ""),
    }


def top_ops(op_stats: list, top: int = 10) -> list[dict]:
    """The ops with the most self time, from framework_op_stats' table without IDLE.

    Each op: where (Host/Device), type, name, occurrences, self time (ms) and its share (%) of
    all self time on that side. Device ops come first when the profile has any (TPU, GPU).
    """
    tables = [t for t in op_stats
              if any(c.get("id") == "total_self_time" for c in t.get("cols", []))]
    rows = datatable_rows(tables[-1]) if tables else []  # the last table excludes IDLE
    rows = [r for r in rows if r.get("type") != "IDLE"]
    side_total = {}
    for r in rows:
        where = r["host_or_device"]
        side_total[where] = side_total.get(where, 0.0) + r["total_self_time"]
    rows.sort(key=lambda r: (r["host_or_device"] != "Device", -r["total_self_time"]))
    return [{"where": r["host_or_device"], "type": r["type"], "name": r["operation"],
             "occurrences": int(r.get("occurrences") or 0),
             "self_time_ms": r["total_self_time"] / 1000.0,
             "share_percent": (100.0 * r["total_self_time"] / side_total[r["host_or_device"]]
                               if side_total[r["host_or_device"]] else 0.0)}
            for r in rows[:top]]


def _is_input_op(op: dict) -> bool:
    return op["type"] in _INPUT_OP_TYPES or op["name"].startswith("Iterator::")


# ---- worker threads and XLA thunks on CPU ------------------------------------------------------
# XLA's CPU runtime records every thunk it runs (one per dot, fusion, copy...) as a trace event on
# the Eigen threads: `dot.4`, `add_multiply_fusion.2` (TF 2.21 does by default; elsewhere
# XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true asks for them). framework_op_stats ignores these
# events, so they are read from the raw XSpace here.
_THUNK_BOOKKEEPING = ("ThunkExecutor::Execute", "SlinkyThreadPool::Await")
# TF's threadpool listener marks when a worker thread starts and stops running tasks.
_REGION_START, _REGION_STOP = "ThreadpoolListener::StartRegion", "ThreadpoolListener::StopRegion"
_NOT_THUNKS = _THUNK_BOOKKEEPING + ("ThreadpoolListener::", "end: ")
_MATMUL_PREFIXES = ("dot", "MatMul", "BatchMatMul", "Einsum", "convolution")


@functools.cache  # load once: its descriptors register in protobuf's pool
def _xplane_pb2():
    """TF's XSpace proto module, loaded from its file: importing tensorflow would take ~5 s."""
    package = importlib.util.find_spec("tensorflow")  # locates the package, does not import it
    path = os.path.join(package.submodule_search_locations[0], "tsl", "profiler", "protobuf",
                        "xplane_pb2.py")
    spec = importlib.util.spec_from_file_location("msa_xla_xplane_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=4)  # the thunk tables and the worker activity read the same files
def _planes(xplane_paths: tuple[str, ...]) -> list:
    """Every plane of the captures, parsed (the metadata plane holds the XLA programs' HLO)."""
    pb2 = _xplane_pb2()
    planes = []
    for path in xplane_paths:
        space = pb2.XSpace()
        space.ParseFromString(storage.read_bytes(path))
        planes += list(space.planes)
    return planes


def _host_planes(xplane_paths: tuple[str, ...]) -> list:
    """The planes of the captures that hold events (on CPU: the host's)."""
    return [plane for plane in _planes(xplane_paths) if plane.lines]


def _eigen_lines(xplane_paths: tuple[str, ...]):
    """Yields (line, {metadata id: event name}) for every Eigen worker thread."""
    for plane in _host_planes(xplane_paths):
        names = {key: meta.name for key, meta in plane.event_metadata.items()}
        for line in plane.lines:
            if "Eigen" in line.name:
                yield line, names


def worker_activity(xplane_paths: list[str], steps: int) -> dict | None:
    """How busy TF's Eigen worker threads were during the capture, or None without the data.

    A thread counts as busy between the threadpool listener's StartRegion and StopRegion
    events (it is running a task). On CPU this is where XLA's thunks and TF's kernels run, and
    it includes what no thunk event records: XLA:CPU's dot thunk hands its matmul to Eigen
    with a completion callback, so the thunk's event can end before the matmul's work on the
    pool does.

    Returns:
      {"threads", "busy_ms_per_step" (summed over the threads), "busy_percent" (of threads x
      the capture's duration)}.
    """
    busy_ps, threads, first, last = 0, 0, math.inf, -math.inf
    for line, names in _eigen_lines(tuple(xplane_paths)):
        depth = regions = started = 0  # a task may run another inline: busy while depth > 0
        for event in sorted(line.events, key=lambda e: e.offset_ps):
            name = names.get(event.metadata_id, "")
            if name == _REGION_START:
                started = event.offset_ps if depth == 0 else started
                depth += 1
            elif name == _REGION_STOP and depth:  # a stop without its start began before
                depth -= 1
                if depth == 0:
                    busy_ps += event.offset_ps - started
                    regions += 1
        threads += regions > 0
    if not threads:
        return None
    for plane in _host_planes(tuple(xplane_paths)):  # the capture: all events of the host
        for line in plane.lines:
            for event in line.events:
                first = min(first, line.timestamp_ns * 1000 + event.offset_ps)
                last = max(last, line.timestamp_ns * 1000 + event.offset_ps + event.duration_ps)
    steps = max(int(steps or 1), 1)
    return {"threads": threads, "busy_ms_per_step": round(busy_ps / 1e9 / steps, 3),
            "busy_percent": round(100 * busy_ps / (threads * (last - first)), 1)}


def _thunk_kind(name: str) -> str:
    """`dot.13` -> 'dot (matmul)'; `add_multiply_fusion.2` -> 'add_multiply_fusion'."""
    base = re.sub(r"\.\d+$", "", name)
    return "dot (matmul)" if base.startswith(_MATMUL_PREFIXES) else base


def xla_thunk_kinds(xplane_paths: list[str], steps: int, top: int = 10) -> dict | None:
    """Self time of XLA's CPU thunks by kind, or None when the capture has no thunk events.

    Returns:
      {"total_ms_per_step", "kinds": [{"kind", "ms_per_step", "share_percent", "per_step"}]}:
      thread time summed over the Eigen worker threads (they run thunks side by side), per
      profiled step, the `top` kinds by self time.
    """
    self_ps, counts = {}, {}
    for line, names in _eigen_lines(tuple(xplane_paths)):
        # Self time: an event's duration minus the events nested in it (same thread).
        events = sorted(line.events, key=lambda e: (e.offset_ps, -e.duration_ps))
        open_events = []  # [end_ps, name, self_ps], outermost first
        for event in events + [None]:
            start = math.inf if event is None else event.offset_ps
            while open_events and open_events[-1][0] <= start:
                _, name, own = open_events.pop()
                if not name.startswith(_NOT_THUNKS):
                    kind = _thunk_kind(name)
                    self_ps[kind] = self_ps.get(kind, 0) + own
                    counts[kind] = counts.get(kind, 0) + 1
            if event is None:
                break
            if open_events:
                open_events[-1][2] -= event.duration_ps
            open_events.append([event.offset_ps + event.duration_ps,
                                names.get(event.metadata_id, ""), event.duration_ps])
    if not any(kind.endswith("fusion") or kind == "dot (matmul)" for kind in self_ps):
        return None  # no XLA thunk events (no XLA computation, or not recorded)
    total = sum(self_ps.values())
    steps = max(int(steps or 1), 1)
    kinds = sorted(self_ps, key=self_ps.get, reverse=True)[:top]
    return {"total_ms_per_step": round(total / 1e9 / steps, 3),
            "kinds": [{"kind": kind, "ms_per_step": round(self_ps[kind] / 1e9 / steps, 3),
                       "share_percent": round(100 * self_ps[kind] / total, 1),
                       "per_step": round(counts[kind] / steps, 1)} for kind in kinds]}


def profile_report(folder: str, top: int = 10, quiet: bool = False) -> dict:
    """Reads the newest capture under `folder` and returns the report as plain data.

    Raises:
      ProfileNotFound: no `*.xplane.pb` under the folder.
    """
    paths = find_xplanes(folder)
    overview, input_pipeline, op_stats = (convert(paths, tool, quiet) for tool in REPORT_TOOLS)
    report = {"profile": paths, **step_summary(overview, input_pipeline),
              "top_ops": top_ops(op_stats, top)}
    # When the step's own ops have (almost) no self time in framework_op_stats, the step ran as
    # XLA computations it cannot look into (CPU): say so instead of showing a misleading list.
    model_op_ms = sum(op["self_time_ms"] for op in top_ops(op_stats, top=10 ** 6)
                      if not _is_input_op(op))
    step_ms = report["step_time_ms"]["mean"] * report["steps"]
    report["xla_thunks"] = xla_thunk_kinds(paths, report["steps"], top)
    report["workers"] = worker_activity(paths, report["steps"])
    xla_hidden = bool(step_ms and model_op_ms < 0.1 * step_ms)
    report["notes"] = [_XLA_NOTE] if xla_hidden and report["xla_thunks"] is None else []
    report["model_parts"] = model_parts(paths, folder, report["steps"], op_stats, xla_hidden,
                                        quiet)
    return report


def model_parts(paths, folder, steps, op_stats, xla_hidden, quiet=False):
    """The step's time by model part (msa_xla/profiling/parts.py), from the best source the
    capture has: xprof's per-HLO-op table on TPU/GPU; on CPU, XLA's thunk events mapped to the
    HLO's op names when the step ran under XLA, else TF's own ops (framework_op_stats), whose
    names are the same scopes. None if none of them has data."""
    table = parts.device_model_parts(convert(paths, "hlo_stats", quiet), steps)
    if table is None and xla_hidden:
        table = parts.cpu_model_parts(_planes(tuple(paths)), steps,
                                      hlo_dirs=[os.path.join(folder, "hlo")])
    if table is None:
        ops = [op for op in top_ops(op_stats, top=10 ** 6) if not _is_input_op(op)]
        table = parts.framework_op_parts(ops, steps, _planes(tuple(paths)))
    return table


def format_report(report: dict) -> str:
    """The report as a terminal table."""
    step = report["step_time_ms"]
    lines = [
        f"profile        {', '.join(report['profile'])}",
        f"steps          {report['steps']} ({', '.join(map(str, report['step_names']))})",
        f"step time      mean {step['mean']:.2f} ms  std {step['std']:.2f}  "
        f"min {step['min']:.2f}  max {step['max']:.2f}",
        f"input wait     {report['input_wait_percent']:.1f}% of step time",
        f"compile time   {report['compile_time_ms']:.2f} ms inside the profiled steps"
        + (" (on CPU xprof does not mark tracing/XLA compilation: it shows as step 0's time)"
           if report.get("hardware") == "CPU_ONLY" else ""),
    ]
    if report.get("input_conclusion"):
        lines.append(f"xprof says     {report['input_conclusion']}")
    lines += ["", f"top {len(report['top_ops'])} ops by self time (share of all self time on "
              "host or device)",
              f"{'where':6} {'self ms':>9} {'share':>6} {'count':>5}  {'type':18} name"]
    for op in report["top_ops"]:
        lines.append(f"{op['where']:6} {op['self_time_ms']:9.3f} {op['share_percent']:5.1f}% "
                     f"{op['occurrences']:5d}  {op['type'][:18]:18} {op['name']}")
    workers = report.get("workers")
    if workers:
        lines += ["", f"worker threads {workers['threads']} (TF's Eigen pool) busy "
                  f"{workers['busy_percent']:.1f}% of the capture: "
                  f"{workers['busy_ms_per_step']:.2f} ms a step, summed over the threads"]
    thunks = report.get("xla_thunks")
    if thunks:
        lines += ["", f"XLA thunks on CPU: {thunks['total_ms_per_step']:.2f} ms of thread time a "
                  "step (summed over the worker threads), top kinds by self time",
                  "(a dot's event can end before its matmul does: XLA:CPU hands matmuls to Eigen "
                  "with a completion callback, so the busy time above exceeds the thunks' total)",
                  f"{'ms/step':>9} {'share':>6} {'#/step':>7}  kind"]
        for kind in thunks["kinds"]:
            lines.append(f"{kind['ms_per_step']:9.3f} {kind['share_percent']:5.1f}% "
                         f"{kind['per_step']:7.1f}  {kind['kind']}")
    if report.get("model_parts"):
        lines += [""] + parts.format_parts(report["model_parts"])
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def main(argv=None) -> int:
    """`tools/profile_report.py PROFILE_DIR [--json OUT] [--top N]`; exit 2 without a profile."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="profile_report.py",
        description="Step time, input-wait share, compile time and top ops of the newest "
                    "profile captured under PROFILE_DIR (python -m msa_xla.train "
                    "--profile_steps=A,B), read with xprof's converter.")
    parser.add_argument("profile_dir", help="e.g. profiles/<run name>")
    parser.add_argument("--json", metavar="OUT", help="also write the report as JSON to OUT "
                        "('-' = stdout instead of the table)")
    parser.add_argument("--top", type=int, default=10, help="how many ops to list (default 10)")
    args = parser.parse_args(argv)
    try:
        report = profile_report(args.profile_dir, top=args.top, quiet=True)
    except ProfileNotFound as error:
        return cli.report_error(error)
    if args.json == "-":
        print(json.dumps(report, indent=2))
        return 0
    print(format_report(report))
    if args.json:
        storage.write_text(args.json, json.dumps(report, indent=2))
    return 0
