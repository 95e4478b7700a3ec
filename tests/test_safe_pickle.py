"""Untrusted pickles: crafted files are refused before anything in them runs; real layouts still
load exactly as plain `pickle.load` would load them, at every protocol, Python 2 files included."""
import _compat_pickle
import codecs
import collections
import importlib
import os
import pathlib
import pickle
import re
import shlex
import struct
import subprocess
import types
import warnings

import numpy as np
import pytest

from msa_xla.data import DataError, safe_pickle, sources, writer
from tests.test_convert_cli import run_main
from tests.test_data_sources import check_round_trip, mmsa_dict, mult_dict, with_text_bert

REPO = pathlib.Path(__file__).resolve().parent.parent
PROTOCOLS = list(range(pickle.HIGHEST_PROTOCOL + 1))


# --- crafted files ------------------------------------------------------------------------------

class Call:
    """Pickles as `func(*args)`: what a crafted feature file carries."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payload(kind, marker):
    """(object whose unpickling creates `marker`, the global its pickle names at protocol >= 3)."""
    if kind == "os.system":  # os.system is posix.system on Linux: the pickle names the latter.
        return Call(os.system, f"touch {shlex.quote(str(marker))}"), f"{os.system.__module__}.system"
    if kind == "builtins.eval":
        return Call(eval, f"open({str(marker)!r}, 'w').close()"), "builtins.eval"
    if kind == "subprocess.Popen":
        return Call(subprocess.Popen, ["touch", str(marker)]), "subprocess.Popen"
    raise ValueError(kind)


def named_in(protocol, name):
    """The global as a pickle of `protocol` spells it: protocols 0-2 use Python 2's names, as
    pickle maps them (builtins.eval -> __builtin__.eval, subprocess.Popen -> commands.Popen)."""
    if protocol >= 3:
        return name
    module, name = name.rsplit(".", 1)
    if (module, name) in _compat_pickle.REVERSE_NAME_MAPPING:
        return ".".join(_compat_pickle.REVERSE_NAME_MAPPING[(module, name)])
    return f"{_compat_pickle.REVERSE_IMPORT_MAPPING.get(module, module)}.{name}"


def dump(path, obj, protocol=pickle.DEFAULT_PROTOCOL):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return str(path)


def short_unicode(text):
    raw = text.encode()
    return pickle.SHORT_BINUNICODE + bytes([len(raw)]) + raw


def stack_global(module, name):
    """Protocol 4 opcodes pushing global `module.name` (any strings, newlines included)."""
    return short_unicode(module) + short_unicode(name) + pickle.STACK_GLOBAL


KINDS = ["os.system", "builtins.eval", "subprocess.Popen"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_payloads_are_live_under_plain_pickle(tmp_path, kind):
    """Control: the same bytes do run their command when loaded as trusted (plain pickle.load)."""
    marker = tmp_path / "PWNED"
    obj, _ = payload(kind, marker)
    result = safe_pickle.loads(pickle.dumps(obj), trusted=True)
    if isinstance(result, subprocess.Popen):
        result.wait(timeout=60)
    assert marker.exists()


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("kind", KINDS)
def test_crafted_pickles_are_refused_before_running(tmp_path, kind, protocol):
    marker = tmp_path / "PWNED"
    obj, name = payload(kind, marker)
    with pytest.raises(safe_pickle.RefusedGlobal) as refused:
        safe_pickle.loads(pickle.dumps(obj, protocol=protocol))
    assert refused.value.global_name == named_in(protocol, name)
    assert not marker.exists()


def crafted_inputs(case, marker):
    """(format, object to pickle, protocol, refused global) for the converter cases."""
    obj, name = payload("os.system", marker)
    if case == "split is the payload":  # as in the report: MMSA's 'train' reduces to os.system
        data = mmsa_dict()
        data["train"] = obj
        return "mmsa", data, pickle.DEFAULT_PROTOCOL, name
    if case == "id inside a valid split":
        data = mult_dict()
        data["train"]["id"] = obj
        return "mult", data, pickle.DEFAULT_PROTOCOL, name
    if case == "element of an object array":
        data = mmsa_dict()
        data["valid"]["raw_text"] = np.array(["fine", obj], dtype=object)
        return "mmsa", data, pickle.DEFAULT_PROTOCOL, name
    if case == "eval nested, protocol 0":
        data = mmsa_dict()
        data["test"]["audio_lengths"] = payload("builtins.eval", marker)[0]
        return "mmsa", data, 0, "__builtin__.eval"
    if case == "Popen nested, protocol 5":
        data = mult_dict()
        data["valid"]["labels"] = payload("subprocess.Popen", marker)[0]
        return "mult", data, 5, "subprocess.Popen"
    raise ValueError(case)


@pytest.mark.parametrize("case", ["split is the payload", "id inside a valid split",
                                  "element of an object array", "eval nested, protocol 0",
                                  "Popen nested, protocol 5"])
def test_converter_refuses_crafted_pickle(tmp_path, capsys, case):
    marker = tmp_path / "PWNED"
    fmt, data, protocol, name = crafted_inputs(case, marker)
    path = dump(tmp_path / "features.pkl", data, protocol)
    before = set(os.listdir(tmp_path))
    code, out, err = run_main(["--format", fmt, "--input", path, "--output", tmp_path / "out"],
                              capsys)
    lines = err.splitlines()
    assert code == 2, err
    assert [line for line in lines if line.startswith("error")] == [lines[-1]], err
    assert lines[-1].startswith(f"error: {path}: ") and name in lines[-1], lines[-1]
    assert "Traceback" not in err and out == ""
    assert not marker.exists()  # the command never ran
    assert set(os.listdir(tmp_path)) == before  # no output folder, no temp folder


def test_refusal_message_is_one_line_naming_file_and_global(tmp_path):
    path = dump(tmp_path / "a.pkl", {"train": Call(os.system, "true")})
    with pytest.raises(DataError) as caught:
        sources.read_source("mmsa", path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ") and f"{os.system.__module__}.system" in message
    assert "--trust_pickle" in message


def test_refusal_message_stays_one_line_for_a_global_named_with_newlines(tmp_path, capsys):
    """STACK_GLOBAL takes any strings: the name a file spells is escaped, never printed raw."""
    path = tmp_path / "a.pkl"
    path.write_bytes(b"\x80\x04" + stack_global("os\nerror: all good", "system")
                     + pickle.EMPTY_TUPLE + pickle.REDUCE + pickle.STOP)
    with pytest.raises(safe_pickle.RefusedGlobal) as refused:
        safe_pickle.loads(path.read_bytes())
    assert refused.value.global_name == repr("os\nerror: all good.system")
    code, _, err = run_main(["--format", "mmsa", "--input", path, "--output", tmp_path / "out"],
                            capsys)
    error_lines = [line for line in err.splitlines() if line.startswith("error")]
    assert code == 2 and len(error_lines) == 1 and str(path) in error_lines[0], err
    assert "os\\nerror: all good.system" in error_lines[0]


@pytest.mark.parametrize("key", sorted(safe_pickle.ALLOWED_GLOBALS))
def test_allowed_globals_cannot_be_modified_by_a_pickle(key):
    """A BUILD opcode on a global sets its attributes under plain pickle (numpy's _reconstruct
    has a writable __module__, which decides how arrays pickle later); the restricted loader
    hands out objects nothing can be set on."""
    module, name = key
    with warnings.catch_warnings():  # numpy 2 warns about numpy.core.* names
        warnings.simplefilter("ignore", DeprecationWarning)
        real = getattr(importlib.import_module(module.replace("__builtin__", "builtins")), name)
    before = real.__module__
    state = (pickle.NONE + pickle.EMPTY_DICT + short_unicode("__module__") + short_unicode("posix")
             + pickle.SETITEM + pickle.TUPLE2)
    blob = b"\x80\x04" + stack_global(module, name) + state + pickle.BUILD + pickle.STOP
    with pytest.raises((AttributeError, TypeError)):
        safe_pickle.loads(blob)
    assert real.__module__ == before


def test_codecs_encode_is_latin1_only():
    """`_codecs.encode` is how protocols 0-2 write bytes: (str, 'latin1'); nothing else passes."""
    assert safe_pickle.loads(pickle.dumps(b"\x00\xff\xe9", protocol=2)) == b"\x00\xff\xe9"
    blob = (b"\x80\x02" + b"c_codecs\nencode\n" + short_unicode("eJwDAAAAAAE=")
            + short_unicode("base64") + pickle.TUPLE2 + pickle.REDUCE + pickle.STOP)
    with pytest.raises(pickle.UnpicklingError, match="latin"):
        safe_pickle.loads(blob)


# --- real layouts -------------------------------------------------------------------------------

def mmsa_unaligned():
    """mmsa_dict plus what MMSA's files also hold: -inf audio (COVAREP), text_bert, annotations."""
    data = mmsa_dict()
    data["train"]["audio"][0, 0, 1] = -np.inf
    data["valid"]["audio"][1, 2, 0] = -np.inf
    with_text_bert(data, seed=5)
    for part in data.values():
        n = len(part["id"])
        part["text_bert"] = part["text_bert"].astype(np.float32)  # MMSA stores it as float32
        part["annotations"] = np.array(["Positive"] * n, dtype=object)
        part["classification_labels"] = np.sign(part["regression_labels"]).astype(np.float32)
    return data


def mmsa_aligned():
    """Aligned MMSA: one T for all modalities, no *_lengths (lengths come from trailing zero rows)."""
    data = mmsa_dict(dims=(8, 5, 6), seq=(6, 6, 6))
    for part in data.values():
        del part["audio_lengths"], part["vision_lengths"]
        part["audio"][:, -1] = 0.0  # a padded last step
        part["audio"][0, 0, 0] = -np.inf
    return data


def mult_object_ids():
    """MulT as released: float32 features, (N,1,1) labels, ids as an object array of str."""
    data = mult_dict()
    for part in data.values():
        part["id"] = np.array([[v.decode() for v in row] for row in part["id"]], dtype=object)
    return data


def odd_arrays():
    """Arrays and scalars whose pickles take the other numpy code paths."""
    return {
        "empty": np.zeros((0, 3), np.float32),
        "fortran": np.asfortranarray(np.arange(6.).reshape(2, 3)),
        "strided": np.arange(16.).reshape(4, 4)[::2],
        "big_endian": np.arange(3, dtype=">f8"),
        "float16": np.array([1.5, -np.inf, np.nan], np.float16),
        "bool": np.array([True, False]),
        "int64": np.array([2**40, -1]),
        "unicode": np.array(["héllo", "x"]),
        "bytes": np.array([b"v0", b"\xff\x00"]),
        "object_mixed": np.array([1, "a", None, 2.5, b"b"], object),
        "structured": np.array([(1, 2.5)], dtype=[("a", "<i4"), ("b", "<f8")]),
        "datetime": np.array(["2020-01-01"], "datetime64[D]"),
        "readonly": np.frombuffer(b"abcdefgh"),
        "scalars": [np.float32(1.5), np.int64(7), np.str_("s"), np.bool_(True), np.float64(-np.inf)],
        "plain": [None, True, 1, -2**70, 1.25, "é", b"", b"\x00\xff", (1, ("a",)), {"k": [b"v"]}],
    }


LAYOUTS = {"mmsa_unaligned": ("mmsa", mmsa_unaligned), "mmsa_aligned": ("mmsa", mmsa_aligned),
           "mult": ("mult", mult_dict), "mult_object_ids": ("mult", mult_object_ids)}


def assert_same(got, want, where="top"):
    """Same types, keys, dtypes, shapes and values, recursively (NaN equals NaN)."""
    assert type(got) is type(want), f"{where}: {type(got)} vs {type(want)}"
    if isinstance(want, dict):
        assert list(got) == list(want), where
        for key in want:
            assert_same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, (np.ndarray, np.generic)):
        assert got.dtype == want.dtype and got.shape == want.shape, where
        if want.dtype == object:
            for i, (g, w) in enumerate(zip(np.ravel(got), np.ravel(want))):
                assert_same(g, w, f"{where}.flat[{i}]")
        else:
            np.testing.assert_array_equal(got, want, err_msg=where, strict=True)
        if isinstance(want, np.ndarray):
            assert got.flags.f_contiguous == want.flags.f_contiguous, where
    else:
        assert got == want, where


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_restricted_load_equals_plain_load(protocol):
    objects = {name: make() for name, (_, make) in LAYOUTS.items()}
    objects["odd"] = odd_arrays()
    blob = pickle.dumps(objects, protocol=protocol)
    assert_same(safe_pickle.loads(blob), pickle.loads(blob))


def assert_same_splits(got, want):
    assert list(got) == list(want)
    for split in want:
        g, w = got[split], want[split]
        assert g.ids == w.ids and g.raw_text == w.raw_text
        np.testing.assert_array_equal(g.labels, w.labels, strict=True)
        for name in w.features:
            assert len(g.features[name]) == len(w.features[name])
            for rows_g, rows_w in zip(g.features[name], w.features[name]):
                np.testing.assert_array_equal(rows_g, rows_w, strict=True)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_read_pickle_is_the_same_restricted_or_trusted(tmp_path, protocol):
    for layout, (fmt, make) in LAYOUTS.items():
        path = dump(tmp_path / f"{layout}.pkl", make(), protocol)
        assert_same_splits(sources.read_pickle(path, fmt),
                           sources.read_pickle(path, fmt, trust_pickle=True))
    assert sources.read_pickle(str(tmp_path / "mult_object_ids.pkl"), "mult")["train"].ids[0] \
        == "v0_0_1"


# --- Python 2 and numpy 1.x pickles -------------------------------------------------------------

class OldPickler(pickle._Pickler):
    """Pickles as numpy 1.x named its functions (numpy.core.*); with `py2`, also writes str and bytes
    as Python 2 wrote its 8-bit str (STRING opcodes), which Python 3 reads with encoding='latin1'."""
    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file, protocol, py2=False):
        super().__init__(file, protocol)
        self.py2 = py2

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", "")
        if not module.startswith("numpy._core."):
            return super().save_global(obj, name)
        module, name = module.replace("numpy._core.", "numpy.core."), name or obj.__name__
        if self.proto >= 4:
            self.save(module)
            self.save(name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self.memoize(obj)

    def save_8bit_str(self, obj):
        if not self.py2:
            return (self.save_bytes if isinstance(obj, bytes) else self.save_str)(obj)
        if isinstance(obj, str):
            try:
                obj = obj.encode("ascii")
            except UnicodeEncodeError:  # a Python 2 `unicode`
                return self.save_str(obj)
        if self.proto == 0:
            self.write(pickle.STRING + b"'" + codecs.escape_encode(obj)[0] + b"'\n")
        elif len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)

    dispatch[bytes] = save_8bit_str
    dispatch[str] = save_8bit_str
    dispatch[types.FunctionType] = save_global  # numpy's _frombuffer (the base maps it to its own)


def old_dump(path, obj, protocol, py2=False):
    with open(path, "wb") as f:
        OldPickler(f, protocol, py2=py2).dump(obj)
    return str(path)


def plain_load(path, **kwargs):
    with open(path, "rb") as f, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2 on numpy.core names
        return pickle.load(f, **kwargs)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_numpy1_names_load_at_every_protocol(tmp_path, protocol):
    data = {"mult": mult_object_ids(), "odd": odd_arrays()}
    path = old_dump(tmp_path / "numpy1.pkl", data, protocol)
    raw = pathlib.Path(path).read_bytes()
    assert b"numpy.core" in raw and b"numpy._core" not in raw
    with open(path, "rb") as f:
        assert_same(safe_pickle.load(f), plain_load(path))


def py2_mult():
    """A MulT file as Python 2 wrote it: keys and text are 8-bit strings, some not UTF-8, beside a
    Python 2 unicode; arrays carry numpy 1.x names."""
    data = mult_dict()
    for part in data.values():
        n = len(part["id"])
        part["raw_text"] = ([b"caf\xe9 ok", "naïve"] * n)[:n]
    return data


@pytest.mark.parametrize("protocol", [0, 1, 2])
def test_python2_pickles_load_as_plain_pickle_loads_them(tmp_path, protocol):
    path = old_dump(tmp_path / "py2.pkl", {"mult": py2_mult(), "odd": odd_arrays()}, protocol,
                    py2=True)
    with open(path, "rb") as f:
        assert_same(safe_pickle.load(f, encoding="latin1"), plain_load(path, encoding="latin1"))


def test_python2_latin1_pickle(tmp_path, capsys):
    path = old_dump(tmp_path / "mosi_data.pkl", py2_mult(), 2, py2=True)
    with pytest.raises(UnicodeDecodeError):  # what sends sources to the latin1 retry
        plain_load(path)
    with open(path, "rb") as f:
        loaded = safe_pickle.load(f, encoding="latin1")
    assert_same(loaded, plain_load(path, encoding="latin1"))
    assert loaded["train"]["raw_text"][0] == "caf\xe9 ok"  # Python 2 str -> latin1 str
    assert loaded["train"]["id"].dtype.kind == "S"  # array data stays bytes
    np.testing.assert_array_equal(loaded["train"]["audio"], mult_dict()["train"]["audio"], strict=True)
    splits = sources.read_pickle(path, "mult")
    assert_same_splits(splits, sources.read_pickle(path, "mult", trust_pickle=True))
    assert splits["train"].ids[0] == "v0_0_1"
    code, _, err = run_main(["--format", "mult", "--input", path, "--output", tmp_path / "out"],
                            capsys)
    assert code == 0, err
    check_round_trip(splits, str(tmp_path / "out"))


@pytest.mark.parametrize("layout, protocol", [("mmsa_unaligned", 0), ("mmsa_aligned", 5),
                                              ("mult_object_ids", 2), ("mult", 4)])
def test_converter_converts_real_layouts_value_for_value(tmp_path, capsys, layout, protocol):
    fmt, make = LAYOUTS[layout]
    path = dump(tmp_path / "in.pkl", make(), protocol)
    code, out, err = run_main(["--format", fmt, "--input", path, "--output", tmp_path / "out"],
                              capsys)
    assert code == 0, err
    assert "wrote" in out
    meta = check_round_trip(sources.read_pickle(path, fmt, trust_pickle=True), str(tmp_path / "out"))
    if layout == "mmsa_unaligned":
        assert meta["splits"]["train"]["nonfinite_repaired"]["audio"] == 1


# --- --trust_pickle -----------------------------------------------------------------------------

def test_trust_pickle_reads_what_is_otherwise_refused(tmp_path, capsys):
    data = mmsa_dict()
    data["train"] = collections.OrderedDict(data["train"])  # harmless, but not on the list
    path = dump(tmp_path / "ordered.pkl", data)
    before = set(os.listdir(tmp_path))
    code, _, err = run_main(["--format", "mmsa", "--input", path, "--output", tmp_path / "out"],
                            capsys)
    assert code == 2 and err.splitlines()[-1].startswith(f"error: {path}: "), err
    assert "collections.OrderedDict" in err.splitlines()[-1]
    assert set(os.listdir(tmp_path)) == before
    code, out, err = run_main(["--format", "mmsa", "--input", path, "--output", tmp_path / "out",
                               "--trust_pickle"], capsys)
    assert code == 0, err
    check_round_trip(sources.read_source("mmsa", path, trust_pickle=True), str(tmp_path / "out"))


def test_trust_pickle_is_documented():
    help_text = " ".join(writer.build_parser().format_help().split())
    assert "--trust_pickle" in help_text and "arbitrary code" in help_text
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "--trust_pickle" in readme and "## Security" in readme


def test_the_package_reads_pickles_only_through_safe_pickle():
    readers = re.compile(r"\bpickle\.loads?\(|\bUnpickler\(|from pickle import|allow_pickle\s*=\s*True"
                         r"|pd\.read_pickle|joblib\.load|dill\.load|torch\.load|shelve\.open")
    found = []
    for folder in ("msa_xla", "tools"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path == REPO / "msa_xla" / "data" / "safe_pickle.py":
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if readers.search(line):
                    found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert found == []
