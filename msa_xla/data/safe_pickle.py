"""Reading pickles nobody here wrote without running code they carry.

Why: `pickle.load` imports and calls whatever the file names. A pickle's REDUCE opcode calls any
importable callable with arguments from the file, so a feature file whose 'train' entry reduces
to `os.system('...')` (spelled `posix.system` on Linux) runs the command while it loads, before
the caller can look at what came back. MMSA/MulT feature pickles reach researchers from mirrors,
so the package reads every pickle through `RestrictedUnpickler` (`load`/`loads` below); it is the
only pickle reader in the package and its tools.

What loads without any global, so needs no permission: dict, list, tuple, str, bytes (protocol
>= 3), int, float, bool, None (and sets and bytearrays at the protocols with opcodes for them).
Each global a pickle references goes through `find_class`, which returns an object from
ALLOWED_GLOBALS or raises RefusedGlobal naming it `module.name` as the file spells it; refusal
happens when the global is looked up, so before it could be called. Allowed, and nothing else:

  numpy.ndarray                       the array class `_reconstruct` is told to build
  numpy.dtype                         rebuilds the dtype of every array and numpy scalar
  numpy.core.multiarray._reconstruct  ndarray.__reduce__: every array at protocols 0-4, and object
  numpy._core.multiarray._reconstruct   or non-contiguous arrays at 5 (numpy 1.x / 2.x module)
  numpy.core.multiarray.scalar        numpy scalars, e.g. np.float32 labels or np.int64 lengths
  numpy._core.multiarray.scalar         in lists (numpy 1.x / 2.x module)
  numpy.core.numeric._frombuffer      contiguous arrays at protocol 5 (numpy >= 1.16 / 2.x module)
  numpy._core.numeric._frombuffer
  _codecs.encode                      how Python 3 writes bytes at protocols 0-2 (array data
                                        included): `encode(text, 'latin1')`; latin-1 str only
  builtins.bytes, __builtin__.bytes   how Python 3 writes an empty bytes at protocols 0-2 (the data
                                        of an empty array): `bytes()`; no arguments accepted

Python 2 era files use the numpy 1.x names and 8-bit strings; they are read with
`encoding="latin1"` (the caller's retry), which numpy's own unpickling expects.

Refused although they occur in pickles: `copyreg._reconstructor`/`copy_reg._reconstructor` with
`builtins.object` (instances of Python classes at protocols 0-1; no array or plain container needs
them), `builtins.set`/`frozenset` (protocols 0-3) and `builtins.bytearray` (protocols 0-4), which
build those types through their constructors (neither format holds them and numpy arrays never
need them), `collections.OrderedDict`, and any other class or function.

The numpy functions and the two builtins are handed out as stand-ins that call them and have no
attribute a pickle's BUILD opcode could set (under plain pickle a file can set, e.g.,
`_reconstruct.__module__`, which decides how this process pickles arrays afterwards); the two
classes are immutable types.

`trusted=True` is plain `pickle.load`, for a file the user vouches for (the converter's
`--trust_pickle`): it can run any code the file carries.
"""
import codecs
import io
import pickle

import numpy as np

try:
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # numpy < 1.26 has only numpy.core
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle references a global outside ALLOWED_GLOBALS; `global_name` is `module.name`."""

    def __init__(self, module, name):
        spelled = f"{module}.{name}"
        # A crafted STACK_GLOBAL can name anything, newlines included: keep the message one line.
        self.global_name = spelled if spelled.isprintable() else repr(spelled)
        super().__init__(f"refused global {self.global_name} (a pickle may hold only numpy arrays "
                         "and plain containers)")


def _stand_in(label, call):
    """A callable for `call` whose instance has no attributes (`__slots__ = ()`)."""
    class StandIn:
        __slots__ = ()

        def __call__(self, *args):
            return call(*args)

        def __repr__(self):
            return f"<restricted {label}>"

    return StandIn()


def _latin1_encode(text, encoding, *errors):
    if type(text) is not str or encoding not in ("latin1", "latin-1") or errors:
        raise pickle.UnpicklingError("_codecs.encode is allowed only as pickle writes bytes: "
                                     "(str, 'latin1')")
    return codecs.encode(text, "latin1")


def _empty_bytes(*args):
    if args:
        raise pickle.UnpicklingError("bytes() is allowed only without arguments, as pickle "
                                     "writes b''")
    return b""


def _allowed():
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module, attr in (("multiarray", "_reconstruct"), ("multiarray", "scalar"),
                         ("numeric", "_frombuffer")):
        call = getattr(_multiarray if module == "multiarray" else _numeric, attr)
        stand_in = _stand_in(f"numpy {module}.{attr}", call)
        allowed[(f"numpy.core.{module}", attr)] = stand_in
        allowed[(f"numpy._core.{module}", attr)] = stand_in
    allowed[("_codecs", "encode")] = _stand_in("_codecs.encode", _latin1_encode)
    empty_bytes = _stand_in("bytes", _empty_bytes)
    allowed[("builtins", "bytes")] = allowed[("__builtin__", "bytes")] = empty_bytes
    return allowed


ALLOWED_GLOBALS = _allowed()


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only ALLOWED_GLOBALS and raises RefusedGlobal otherwise."""

    def find_class(self, module, name):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedGlobal(module, name) from None


def load(file, *, encoding="ASCII", trusted=False):
    """Unpickle one object from binary `file`; `trusted=True` is plain pickle.load (runs code)."""
    if trusted:
        return pickle.load(file, encoding=encoding)
    return RestrictedUnpickler(file, encoding=encoding).load()


def loads(data, *, encoding="ASCII", trusted=False):
    """`load` from bytes."""
    return load(io.BytesIO(data), encoding=encoding, trusted=trusted)
