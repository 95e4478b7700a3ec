"""The compiled step's time by model part: which share of a step is the attention core, the
feed-forward blocks, layer norm, each fusion direction, the loss, the optimizer update.

    table = cpu_model_parts(planes, steps=5, busy_ps=...)   # XLA:CPU thunk events
    table = device_model_parts(hlo_stats_json, steps=5)     # TPU/GPU: xprof's hlo_stats tool

Called by report.py (`tools/profile_report.py`); imports neither TensorFlow nor tf_keras.

How. XLA keeps each HLO instruction's TensorFlow op name in its metadata
(`metadata={op_name="seqlevel/text_encoder/block_0/attention/attention/einsum/Einsum"}`), and
the op names follow the model's scopes (its layers' names and the `tf.name_scope`s of
layers/attention.py and layers/fusion.py). So every timed unit of a capture is mapped to its
HLO instruction, the instruction to its op name, and the op name to a part:

- XLA:CPU: one trace event per thunk on the Eigen worker threads (`dot.2`,
  `subtract_exponential_fusion.5`), carrying the instruction's name (`hlo_op`) and module
  (`hlo_module`); self time = the event's duration minus the events nested in it. The
  optimized HLO of each program is in the capture (xprof stores it: the `/host:metadata`
  plane, one `HloProto` per program id); when it is not, from XLA's text dump
  (`XLA_FLAGS=--xla_dump_to=<profile dir>/hlo --xla_dump_hlo_as_text`: the
  `*after_optimizations.txt` files). An instruction without an op name (a thunk inside a
  called computation, e.g. the random-bits kernel under `call.2`) takes its caller's.
- TPU/GPU: xprof's `hlo_stats` tool already lists every HLO op with its framework op name
  (`tf_op_name`) and self time; the same aggregation runs on its rows.

The total of the table: on CPU the worker threads' busy time (report.py `worker_activity`),
which also holds what no thunk event covers (XLA's executor between thunks, and matmul work
Eigen finishes after the dot thunk's event has ended: XLA:CPU hands a matmul to Eigen with a
completion callback); that remainder is the unattributed row "outside thunk events". On
TPU/GPU the total is the HLO ops' self time. Units whose instruction has no op name (copies of
the step's arguments, buffers XLA adds) are the unattributed row "no op name".

Op name -> pass (the package's own names; TF prefixes gradients with `gradient_tape/`, and
kernels/projection.py and kernels/attention.py name their custom gradients the same way):
  `gradient_tape/...` -> backward; the optimizer's scope (`Adam/...`) -> update; else forward.

Op name (without `gradient_tape/`) -> top-level part:
  `<model>/<m>_encoder/...`                  -> `<m>_encoder` (models/*.py: `{m}_encoder`)
  `<model>/fusion/<target>_from_<source>/..` -> `fusion/<target>_from_<source>` (layers/fusion.py)
  `<model>/fusion_block_<i>/...`, `<model>/<t>_with_<s>/...`, `<model>/<t>_memory/...`
                                             -> that name (pooled.py, mult.py fusion layers)
  any other `<model>/<layer>/...`            -> `head` (fusion_head, prediction, the head's
                                                dropout, hidden, gate, pooling, embeddings)
  `mean_absolute_error/...` (the `loss="mae"` of trainer/loop.py), `<model>/.../loss...`
                                             -> `loss`
  `Adam/...` (trainer/step.py make_optimizer: clipping included) -> `optimizer update`
  any other op name (metrics' sums and counters, the step counter, input casts)
                                             -> `other (metrics, step bookkeeping)`
where `<model>` is one of options.MODEL_NAMES (the Keras model's name).

Op name -> kind of layer (the first rule that matches a scope component after the part):
  `.../attention/attention/...` (the `tf.name_scope("attention")` around the masked core in
      layers/attention.py and models/mult.py, inside the layer named `attention`)
                                             -> attention core (kernels/attention.py)
  `.../attention/...` (MaskedMultiHeadAttention / MulTAttention: QKV and output projections,
      head split and merge)                  -> attention projections
  `ffn_inner`, `ffn_outer` (layers/blocks.py, mult.py)  -> feed-forward
  `*_norm` (`attention_norm`, `ffn_norm`, `final_norm`, `context_norm`) -> layer norm
  `dropout*` (tf_keras' automatic names of layers/dropout.py's Dropout) -> dropout
  anything else (input projections, positions, masks, pooling, the head's dense layers)
                                             -> other
"""

from __future__ import annotations

import bisect
import glob
import importlib.util
import math
import os
import re

if __name__.startswith("msa_xla."):
    from msa_xla import options
else:  # loaded by file path (report.py's CLI): options.py imports nothing
    _spec = importlib.util.spec_from_file_location(
        "msa_xla_options", os.path.join(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))), "options.py"))
    options = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(options)

PASSES = ("forward", "backward", "update")
KINDS = ("attention core", "attention projections", "feed-forward", "layer norm", "dropout",
         "other")
OPTIMIZER_SCOPES = ("Adam",)  # trainer/step.py make_optimizer
LOSS_SCOPES = ("mean_absolute_error",)  # trainer/loop.py: loss="mae"
HEAD, LOSS, UPDATE, OTHER = "head", "loss", "optimizer update", "other (metrics, step bookkeeping)"
# Without a whole-step compile (--jit_compile=false) the `fused` attention core is an XLA
# program of its own (kernels/attention.py `_attention_math`, jit_compile=True; XLA names its
# programs `a_forward__attention_math_...`, `a_inference___backward__attention_math_...`). Its
# op names are relative to that function, and the capture does not record which layer called
# it: its thunks are one part of their own.
FUSED_CORE_PROGRAM, FUSED_CORE_SCOPE = "_attention_math_", "fused_attention"
FUSED_CORE_PART = "fused attention core (caller not recorded)"
NO_OP_NAME = "unattributed: no op name"
OUTSIDE_THUNKS = "unattributed: outside thunk events"
_GRADIENT = "gradient_tape/"


# ----------------------------------------------------------------------------------------------
# op name -> (part, kind, pass)
# ----------------------------------------------------------------------------------------------
def classify(op_name: str) -> tuple[str, str, str]:
    """`(part, kind, pass)` of a TensorFlow op name (the rules of the module docstring).

    >>> classify("gradient_tape/seqlevel/text_encoder/block_0/attention/attention/einsum/Einsum")
    ('text_encoder', 'attention core', 'backward')
    >>> classify("seqlevel/fusion/text_from_audio/layer_0_text_from_audio/ffn_inner/MatMul")
    ('fusion/text_from_audio', 'feed-forward', 'forward')
    >>> classify("Adam/mul_5")
    ('optimizer update', 'other', 'update')
    """
    backward = op_name.startswith(_GRADIENT)
    scopes = op_name[len(_GRADIENT):].split("/") if backward else op_name.split("/")
    first = scopes[0]
    if first == FUSED_CORE_SCOPE:
        return FUSED_CORE_PART, "attention core", "backward" if backward else "forward"
    if _base(first) in OPTIMIZER_SCOPES:
        return UPDATE, "other", "update"
    direction = "backward" if backward else "forward"
    if _base(first) in LOSS_SCOPES:
        return LOSS, "other", direction
    if first not in options.MODEL_NAMES or len(scopes) < 3:
        return OTHER, "other", direction
    layer, rest = scopes[1], scopes[2:]
    if layer.endswith("_encoder") or layer.startswith("fusion_block") or "_with_" in layer \
            or layer.endswith("_memory"):
        part = layer
    elif layer == "fusion" and len(rest) > 1 and "_from_" in rest[0]:
        part, rest = f"fusion/{rest[0]}", rest[1:]
    elif layer == "fusion":
        part = "fusion"
    elif "loss" in layer:
        part = LOSS
    else:
        part = HEAD
    return part, layer_kind(rest[:-1]), direction  # the last component is the op itself


def layer_kind(scopes: list[str]) -> str:
    """The kind of layer a scope path (below the part, without the op) belongs to."""
    for i, scope in enumerate(scopes):
        if scope == "attention":
            if i + 1 < len(scopes) and scopes[i + 1] == "attention":
                return "attention core"
            return "attention projections"
        if _base(scope) in ("ffn_inner", "ffn_outer"):
            return "feed-forward"
        if _base(scope).endswith("_norm"):
            return "layer norm"
        if _base(scope) == "dropout":
            return "dropout"
    return "other"


def _base(scope: str) -> str:
    """`dropout_4` -> `dropout`, `Adam_1` -> `Adam` (Keras and TF uniquify names with _N)."""
    return re.sub(r"_\d+$", "", scope)


# ----------------------------------------------------------------------------------------------
# aggregation: (op name, self time) units -> the table
# ----------------------------------------------------------------------------------------------
def aggregate(units, total_ps: float, steps: int, source: str, total_is: str,
              outside_ps: float = 0.0) -> dict:
    """The parts table from `units`, an iterable of (op name or None, self ps, count).

    Args:
      total_ps: the denominator of the shares (the busy time on CPU).
      outside_ps: time in the total that no unit covers (its own unattributed row).

    Returns:
      {"source", "total_is", "total_ms_per_step", "steps",
       "parts": [{"part", "ms_per_step", "share_percent", "forward_ms", "backward_ms",
                  "update_ms"}],      # largest first, the unattributed rows last
       "kinds": [{"kind", "ms_per_step", "share_percent", "forward_ms", "backward_ms"}],
       "rows": [{"part", "kind", "pass", "ms_per_step", "share_percent", "count_per_step"}],
       "attributed_percent", "unattributed_percent"}
    """
    steps = max(int(steps or 1), 1)
    cells = {}  # (part, kind, pass) -> [ps, count]
    for op_name, self_ps, count in units:
        key = classify(op_name) if op_name else (NO_OP_NAME, "other", "-")
        cell = cells.setdefault(key, [0.0, 0])
        cell[0] += self_ps
        cell[1] += count
    if outside_ps > 0:
        cells[(OUTSIDE_THUNKS, "other", "-")] = [outside_ps, 0]
    total_ps = float(total_ps) or sum(c[0] for c in cells.values()) or 1.0

    def ms(ps):
        return round(ps / 1e9 / steps, 3)

    def share(ps):
        return round(100.0 * ps / total_ps, 2)

    def grouped(index):
        groups = {}
        for key, (ps, _) in cells.items():
            group = groups.setdefault(key[index], {p: 0.0 for p in PASSES + ("-",)})
            group[key[2]] += ps
        return groups

    unattributed = (NO_OP_NAME, OUTSIDE_THUNKS)
    parts = []
    for part, by_pass in grouped(0).items():
        ps = sum(by_pass.values())
        parts.append({"part": part, "ms_per_step": ms(ps), "share_percent": share(ps),
                      **{f"{p}_ms": ms(by_pass[p]) for p in PASSES}, "_ps": ps})
    parts.sort(key=lambda p: (p["part"] in unattributed, -p["_ps"]))
    kinds = []
    for kind, by_pass in grouped(1).items():
        if kind == "other":  # the unattributed rows are not a kind of layer
            by_pass = dict(by_pass, **{"-": 0.0})
        ps = sum(by_pass.values())
        kinds.append({"kind": kind, "ms_per_step": ms(ps), "share_percent": share(ps),
                      "forward_ms": ms(by_pass["forward"]),
                      "backward_ms": ms(by_pass["backward"]), "_ps": ps})
    kinds.sort(key=lambda k: KINDS.index(k["kind"]))
    rows = [{"part": part, "kind": kind, "pass": pass_, "ms_per_step": ms(ps),
             "share_percent": share(ps), "count_per_step": round(count / steps, 1)}
            for (part, kind, pass_), (ps, count) in
            sorted(cells.items(), key=lambda item: -item[1][0])]
    unattributed_ps = sum(ps for (part, _, _), (ps, _) in cells.items() if part in unattributed)
    for entry in parts + kinds:
        del entry["_ps"]
    return {"source": source, "total_is": total_is, "steps": steps,
            "total_ms_per_step": ms(total_ps), "parts": parts, "kinds": kinds, "rows": rows,
            "attributed_percent": share(sum(c[0] for c in cells.values()) - unattributed_ps),
            "unattributed_percent": share(unattributed_ps)}


def format_parts(table: dict) -> list[str]:
    """The table as terminal lines (report.py prints them)."""
    lines = [f"step by model part ({table['source']}): {table['total_ms_per_step']:.2f} ms a "
             f"step = {table['total_is']}; {table['unattributed_percent']:.1f}% unattributed",
             f"{'ms/step':>9} {'share':>6} {'fwd ms':>8} {'bwd ms':>8} {'upd ms':>8}  part"]
    for p in table["parts"]:
        lines.append(f"{p['ms_per_step']:9.3f} {p['share_percent']:5.1f}% {p['forward_ms']:8.3f} "
                     f"{p['backward_ms']:8.3f} {p['update_ms']:8.3f}  {p['part']}")
    if table["source"].startswith("XLA:CPU"):
        lines.append(f"({OUTSIDE_THUNKS}: XLA's executor between thunks and other work on the "
                     "worker threads; matmul work Eigen finished after a dot's event is counted "
                     f"in the dot's part: {table.get('async_matmul_ms_per_step', 0):.2f} ms a "
                     "step)")
    lines += ["", "by kind of layer (all parts)",
              f"{'ms/step':>9} {'share':>6} {'fwd ms':>8} {'bwd ms':>8}  kind"]
    for k in table["kinds"]:
        lines.append(f"{k['ms_per_step']:9.3f} {k['share_percent']:5.1f}% {k['forward_ms']:8.3f} "
                     f"{k['backward_ms']:8.3f}  {k['kind']}")
    return lines


# ----------------------------------------------------------------------------------------------
# HLO: instruction -> op name (protobuf wire format read by hand: no TensorFlow import)
# ----------------------------------------------------------------------------------------------
# Field numbers of xla/service/hlo.proto and xla/xla_data.proto (tests check them against
# tensorflow.compiler.xla's generated classes).
HLO_FIELDS = {"HloProto.hlo_module": 1, "HloModuleProto.name": 1,
              "HloModuleProto.computations": 3, "HloComputationProto.instructions": 2,
              "HloInstructionProto.name": 1, "HloInstructionProto.metadata": 7,
              "OpMetadata.op_name": 2}


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(buf: bytes):
    """Yields (field number, value) of a serialized message: int for varints, bytes else."""
    i, end = 0, len(buf)
    while i < end:
        key, i = _varint(buf, i)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, i = _varint(buf, i)
        elif wire_type == 2:
            length, i = _varint(buf, i)
            value, i = buf[i:i + length], i + length
        elif wire_type == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire_type == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        yield number, value


def _field(buf: bytes, number: int, default=b""):
    for n, value in _fields(buf):
        if n == number:
            return value
    return default


def hlo_op_names(hlo_proto: bytes) -> tuple[str, dict[str, str]]:
    """(module name, {instruction name: TF op name}) of a serialized `xla.HloProto`;
    instructions without an op name are left out."""
    f = HLO_FIELDS
    module = memoryview(_field(bytes(hlo_proto), f["HloProto.hlo_module"]))
    name, op_names = "", {}
    for number, value in _fields(module):
        if number == f["HloModuleProto.name"]:
            name = bytes(value).decode()
        elif number == f["HloModuleProto.computations"]:
            for n, instruction in _fields(value):
                if n != f["HloComputationProto.instructions"]:
                    continue
                instruction_name = op_name = ""
                for m, v in _fields(instruction):
                    if m == f["HloInstructionProto.name"]:
                        instruction_name = bytes(v).decode()
                    elif m == f["HloInstructionProto.metadata"]:
                        op_name = bytes(_field(v, f["OpMetadata.op_name"])).decode()
                if op_name:
                    op_names[instruction_name] = op_name
    return name, op_names


def hlo_modules_in_xspace(planes) -> dict[str, dict[str, str]]:
    """{module name: {instruction: op name}} from the capture's `/host:metadata` plane, where
    xprof stores each XLA program's optimized `HloProto` (stat "Hlo Proto")."""
    modules = {}
    for plane in planes:
        if not plane.name.endswith(":metadata"):
            continue
        stat_names = {key: meta.name for key, meta in plane.stat_metadata.items()}
        for event_meta in plane.event_metadata.values():
            for stat in event_meta.stats:
                if stat_names.get(stat.metadata_id) == "Hlo Proto" and stat.bytes_value:
                    name, op_names = hlo_op_names(stat.bytes_value)
                    modules[name] = op_names
    return modules


_TEXT_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*?'
                               r'op_name="((?:[^"\\]|\\.)*)"')
_TEXT_MODULE = re.compile(r"^HloModule\s+([\w.\-]+)")


def hlo_modules_in_dump(folder: str) -> dict[str, dict[str, str]]:
    """{module name: {instruction: op name}} from XLA's text dumps of optimized HLO in `folder`
    (`--xla_dump_to=folder --xla_dump_hlo_as_text`: `*after_optimizations.txt`)."""
    modules = {}
    for path in sorted(glob.glob(os.path.join(folder, "*after_optimizations.txt"))):
        name, op_names = None, {}
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if name is None:
                    found = _TEXT_MODULE.match(line)
                    if found:
                        name = found.group(1).rstrip(",")
                    continue
                found = _TEXT_INSTRUCTION.match(line)
                if found:
                    op_names[found.group(1)] = found.group(2)
        if name:
            modules[name] = op_names
    return modules


# ----------------------------------------------------------------------------------------------
# XLA:CPU: thunk events -> units
# ----------------------------------------------------------------------------------------------
_REGION_START, _REGION_STOP = "ThreadpoolListener::StartRegion", "ThreadpoolListener::StopRegion"
_END = "end: "  # XLA:CPU's completion marker of a thunk ("end: dot.2"), same context id


def _stat(event, stat_names, wanted):
    for stat in event.stats:
        if stat_names.get(stat.metadata_id) == wanted:
            return stat.str_value or stat_names.get(stat.ref_value) or stat.uint64_value \
                or stat.int64_value
    return None


def thunk_units(planes, modules: dict[str, dict[str, str]]) -> dict:
    """The capture's XLA:CPU thunk time as units (op name or None, self ps, count).

    Three parts, in ps over the capture:
    - thunk self time: each thunk event on an Eigen worker thread minus the events nested in
      it; a nested thunk (inside a `call`, `while` or `conditional`) whose instruction has no
      op name takes its caller's;
    - asynchronous work: a dot's event ends when XLA:CPU has handed the matmul to Eigen, and
      its completion marker (`end: dot.N`, same context id) comes when the matmul is done. The
      worker threads' busy time covered by no thunk event between those two points is the
      matmul's; it goes to the thunks in flight then (split evenly when several are);
    - the rest of the busy time (XLA's executor between thunks, TF's runtime) is left out.
    A thunk is an event with an `hlo_op` stat; they run on the Eigen worker threads and, inline,
    on the TF thread that launched the program (`tf_Compute`).

    Returns:
      {"units": [...], "thunk_ps", "async_ps", "busy_ps"}: busy is the worker threads' task
      regions (the threadpool listener's) plus the thunks on other threads.
    """
    units, thunk_ps, busy_ps = [], 0.0, 0.0
    uncovered, in_flight = [], []  # [(start, end)] absolute ps; [(start, end, op name)]
    for plane in planes:
        stat_names = {key: meta.name for key, meta in plane.stat_metadata.items()}
        event_names = {key: meta.name for key, meta in plane.event_metadata.items()}
        completions, thunks = {}, []  # context id -> completion ps; [(ctx, event end, op)]
        hlo_stat_ids = {key for key, name in stat_names.items() if name == "hlo_op"}
        for line in plane.lines:
            workers = "Eigen" in line.name  # TF's worker pool: the listener marks busy time
            if not workers and not any(stat.metadata_id in hlo_stat_ids
                                       for event in line.events for stat in event.stats):
                continue  # neither a worker thread nor one that ran XLA (tf_Compute)
            base = line.timestamp_ns * 1000
            events = sorted(line.events, key=lambda e: (e.offset_ps, -e.duration_ps))
            open_events, covered, regions = [], [], []  # open: [end, op name, self, is thunk]
            depth = region_start = 0
            for event in events + [None]:
                at = math.inf if event is None else base + event.offset_ps
                while open_events and open_events[-1][0] <= at:
                    done = open_events.pop()
                    if done[3]:
                        units.append((done[1], done[2], 1))
                        thunk_ps += done[2]
                if event is None:
                    break
                name = event_names.get(event.metadata_id, "")
                if name == _REGION_START:
                    region_start = at if depth == 0 else region_start
                    depth += 1
                elif name == _REGION_STOP and depth:
                    depth -= 1
                    if depth == 0:
                        regions.append((region_start, at))
                if name.startswith(_END):
                    completions[_stat(event, stat_names, "_c")] = at
                if not any(stat.metadata_id in hlo_stat_ids for stat in event.stats):
                    thunk, op_name = False, None  # bookkeeping, a TF op, a listener mark
                else:
                    thunk = True
                    module = _stat(event, stat_names, "hlo_module")
                    instruction = _stat(event, stat_names, "hlo_op") or name
                    op_name = modules.get(module, {}).get(instruction)
                    if op_name and FUSED_CORE_PROGRAM in str(module):
                        op_name = program_scope(str(module)) + op_name
                    if op_name is None:  # a thunk inside another takes its caller's op name
                        callers = [e for e in open_events if e[3] and e[1]]
                        op_name = callers[-1][1] if callers else None
                    if not any(e[3] for e in open_events):  # outermost thunk: covers time
                        covered.append((at, at + event.duration_ps))
                    thunks.append((_stat(event, stat_names, "_p"), at + event.duration_ps,
                                   op_name))
                if open_events:
                    open_events[-1][2] -= event.duration_ps
                open_events.append([at + event.duration_ps, op_name, float(event.duration_ps),
                                    thunk])
            if workers:
                busy_ps += sum(b - a for a, b in regions)
                uncovered += _subtract(regions, covered)
            else:  # the thread that called the program (tf_Compute) runs thunks inline too
                busy_ps += sum(b - a for a, b in covered)
        for context, event_end, op_name in thunks:
            done = completions.get(context)
            if context is not None and done is not None and done > event_end:
                in_flight.append((event_end, done, op_name))
    async_units = _share_out(uncovered, in_flight)
    return {"units": units + async_units, "thunk_ps": thunk_ps,
            "async_ps": sum(u[1] for u in async_units), "busy_ps": busy_ps}


def program_scope(module: str) -> str:
    """The scope prefix for the op names of a stand-alone fused attention program."""
    backward = "_backward_" in module
    return ("gradient_tape/" if backward else "") + FUSED_CORE_SCOPE + "/"


def _subtract(intervals, holes):
    """`intervals` minus the union of `holes` (both lists of (start, end))."""
    holes = sorted(holes)
    out = []
    for start, end in sorted(intervals):
        cursor = start
        for hole_start, hole_end in holes:
            if hole_end <= cursor:
                continue
            if hole_start >= end:
                break
            if hole_start > cursor:
                out.append((cursor, hole_start))
            cursor = max(cursor, hole_end)
        if cursor < end:
            out.append((cursor, end))
    return out


def _share_out(segments, windows) -> list:
    """Units (op name, ps, 0): each segment's overlap with the windows (start, end, op name),
    split evenly among the windows open at each moment."""
    if not segments or not windows:
        return []
    points = sorted({p for w in windows for p in w[:2]})
    # Elementary intervals between consecutive points, with the windows open over each.
    open_over = [[] for _ in points]
    for start, end, op_name in windows:
        i = _bisect(points, start)
        while points[i] < end:
            open_over[i].append(op_name)
            i += 1
    totals = {}
    for start, end in segments:
        i = max(_bisect(points, start) - 1, 0)
        while i < len(points) - 1 and points[i] < end:
            overlap = min(end, points[i + 1]) - max(start, points[i])
            if overlap > 0 and open_over[i]:
                for op_name in open_over[i]:
                    totals[op_name] = totals.get(op_name, 0.0) + overlap / len(open_over[i])
            i += 1
    return [(op_name, ps, 0) for op_name, ps in totals.items()]


def _bisect(points, value):
    return bisect.bisect_left(points, value)


def cpu_model_parts(planes, steps: int, hlo_dirs=()) -> dict | None:
    """The parts table of an XLA:CPU capture, or None without thunk events or HLO.

    The total is the busy time of `thunk_units`: the worker threads' task regions (report.py's
    `worker_activity`) plus the thunks run inline on TF's compute threads.

    Args:
      planes: the capture's XPlanes (all of them: the metadata plane holds the HLO).
      hlo_dirs: folders of XLA text dumps, read when the capture holds no HLO.
    """
    modules = hlo_modules_in_xspace(planes)
    for folder in hlo_dirs:
        if not modules and os.path.isdir(folder):
            modules = hlo_modules_in_dump(folder)
    timed = thunk_units(planes, modules)
    if not timed["units"] or not modules:
        return None
    attributed = timed["thunk_ps"] + timed["async_ps"]
    total = max(timed["busy_ps"], attributed)
    table = aggregate(timed["units"], total, steps, source="XLA:CPU thunk events",
                      total_is="busy thread time (the worker threads' tasks + thunks run "
                      "inline on TF's threads)", outside_ps=total - attributed)
    table["async_matmul_ms_per_step"] = round(timed["async_ps"] / 1e9 / table["steps"], 3)
    return table


# ----------------------------------------------------------------------------------------------
# TPU / GPU: xprof's hlo_stats -> units
# ----------------------------------------------------------------------------------------------
def device_model_parts(hlo_stats: dict | list, steps: int) -> dict | None:
    """The parts table from xprof's `hlo_stats` tool (a gviz DataTable with columns
    `tf_op_name`, `total_self_time` in us, `occurrences`, ...), or None when it has no rows
    (CPU captures: xprof lists no HLO ops there)."""
    tables = hlo_stats if isinstance(hlo_stats, list) else [hlo_stats]
    units = []
    for table in tables:
        ids = [c.get("id") for c in table.get("cols", [])]
        if "tf_op_name" not in ids or "total_self_time" not in ids:
            continue
        for row in table.get("rows") or []:
            cells = dict(zip(ids, (c.get("v") if isinstance(c, dict) else c
                                   for c in row.get("c", []))))
            self_us = float(cells.get("total_self_time") or 0.0)
            if not math.isfinite(self_us) or self_us <= 0:
                continue
            units.append((cells.get("tf_op_name") or None, self_us * 1e6,
                          int(cells.get("occurrences") or 0)))
    if not units:
        return None
    total = sum(u[1] for u in units)
    return aggregate(units, total, steps, source="xprof hlo_stats",
                     total_is="the HLO ops' self time on the device")


# ----------------------------------------------------------------------------------------------
# no XLA: TF's own ops (framework_op_stats) -> units
# ----------------------------------------------------------------------------------------------
def framework_op_parts(ops: list[dict], steps: int, planes=()) -> dict | None:
    """The parts table of a step that ran without a whole-step compile, or None: TF's ops
    (report.py `top_ops` rows without the input pipeline's: `name`, `self_time_ms`,
    `occurrences`) plus the thunks of XLA programs inside it (framework_op_stats does not list
    them on CPU: the `fused` attention core's program under --jit_compile=false)."""
    units = [(op["name"] or None, op["self_time_ms"] * 1e9, op["occurrences"]) for op in ops
             if op["self_time_ms"] > 0]
    source = "TF ops (framework_op_stats)"
    modules = hlo_modules_in_xspace(planes) if planes else {}
    if modules:
        timed = thunk_units(planes, modules)
        if timed["units"]:
            units += timed["units"]
            source += " + XLA:CPU thunk events"
    if not units:
        return None
    return aggregate(units, sum(u[1] for u in units), steps, source=source,
                     total_is="the model's TF ops' and XLA thunks' self time")
