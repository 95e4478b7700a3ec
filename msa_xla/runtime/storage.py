"""Files and folders that may be local or remote: gs://, TF's in-memory ram://, any tf.io.gfile
scheme.

    from msa_xla.runtime import storage
    storage.is_remote("gs://bucket/run")                 # True: has a scheme://
    storage.absolute("runs/x")                           # "/abs/runs/x"; a URL comes back unchanged
    path = storage.join("gs://bucket/run", "results.json")
    storage.write_json_atomic(path, results, indent=2)   # readers see the old file or the new one
    storage.read_json(path)

Why two code paths: a local path keeps plain os/shutil/glob (fast, and callers may mmap it); only
a path with a `scheme://` goes through `tf.io.gfile` (TensorFlow is imported lazily, there: this
module itself imports only the standard library).
`os.path.abspath("gs://b/x")` would give "/cwd/gs:/b/x", so every path meant for users' data goes
through `absolute` instead.

Errors: a failing gfile call raises OSError naming the path (FileNotFoundError when it is missing),
as the local calls do, so callers catch one exception type; `as_oserror(path)` does the same for
TensorFlow's own file ops (TFRecordWriter, keras saving) used on such a path.

Object stores (GCS) have no folders, only names with '/' in them: `makedirs` is cheap there, a
folder "exists" once a file is under it, `rename` of a file is copy-then-delete and `rmtree`
deletes file by file. TF's ram:// (the tests' stand-in for gs://) lists and deletes only folders
made with `makedirs`, so code that writes a folder calls `makedirs` first; and it appends to an
existing file, so `open_file` removes an old ram:// file before writing it anew.
"""
import builtins
import contextlib
import errno
import glob as _glob
import json
import os
import posixpath
import re
import shutil
import sys
from typing import NamedTuple

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(path):
    """True when `path` names a `scheme://` location (gs://, ram://, s3://, ...)."""
    return bool(_SCHEME.match(os.fspath(path)))


def absolute(path):
    """os.path.abspath for a local path; a remote one unchanged (but for a trailing '/')."""
    path = os.fspath(path)
    if not is_remote(path):
        return os.path.abspath(path)
    stripped = path.rstrip("/")
    return stripped if "://" in stripped else path  # a bare "gs://" stays as it is


def join(path, *parts):
    """`path/part/...`; '/' for remote paths whatever the OS."""
    path = os.fspath(path)
    return posixpath.join(path, *parts) if is_remote(path) else os.path.join(path, *parts)


def dirname(path):
    """Parent of `path` ('gs://b/run/x' -> 'gs://b/run')."""
    path = os.fspath(path)
    return posixpath.dirname(path.rstrip("/")) if is_remote(path) else os.path.dirname(path)


def basename(path):
    """Last component of `path` ('gs://b/run/x' -> 'x')."""
    path = os.fspath(path)
    return posixpath.basename(path.rstrip("/")) if is_remote(path) else os.path.basename(path)


# --- Errors ----------------------------------------------------------------------------------

def _oserror(error, path):
    """The OSError a TensorFlow file error on `path` stands for."""
    import tensorflow as tf

    message = (getattr(error, "message", "") or "").strip()
    if isinstance(error, tf.errors.NotFoundError):
        return FileNotFoundError(errno.ENOENT, "No such file or directory", path)
    if isinstance(error, tf.errors.AlreadyExistsError):
        return FileExistsError(errno.EEXIST, "File exists", path)
    if isinstance(error, tf.errors.PermissionDeniedError):
        return PermissionError(errno.EACCES, message or "Permission denied", path)
    first = message.splitlines()[0] if message else type(error).__name__
    return OSError(f"{path}: {first}")


@contextlib.contextmanager
def as_oserror(path):
    """Re-raise TensorFlow file errors (tf.errors.OpError) of the block as OSError naming `path`.

    Costs nothing for local work: TensorFlow is consulted only once an exception is raised, and only
    when it is already imported (no OpError can exist otherwise)."""
    try:
        yield
    except Exception as error:
        tf = sys.modules.get("tensorflow")
        if tf is None or not isinstance(error, tf.errors.OpError):
            raise
        raise _oserror(error, os.fspath(path)) from None


def _gfile():
    import tensorflow as tf  # Lazily: local paths never need it.

    return tf.io.gfile


# --- Queries ---------------------------------------------------------------------------------

class Stat(NamedTuple):
    size: int
    mtime_ns: int  # 0 when the filesystem keeps no modification time (ram://)


def exists(path):
    if not is_remote(path):
        return os.path.exists(path)
    with as_oserror(path):
        return _gfile().exists(path)


def isdir(path):
    if not is_remote(path):
        return os.path.isdir(path)
    with as_oserror(path):
        return _gfile().isdir(path)


def isfile(path):
    if not is_remote(path):
        return os.path.isfile(path)
    with as_oserror(path):
        return _gfile().exists(path) and not _gfile().isdir(path)


def stat(path):
    """Stat(size, mtime_ns) of a file."""
    if not is_remote(path):
        st = os.stat(path)
        return Stat(st.st_size, st.st_mtime_ns)
    with as_oserror(path):
        st = _gfile().stat(path)
    return Stat(int(st.length), int(st.mtime_nsec or 0))


def listdir(path):
    """Sorted names in folder `path` (no trailing '/' on sub-folders, which GCS listings have)."""
    if not is_remote(path):
        return sorted(os.listdir(path))
    with as_oserror(path):
        return sorted(name.rstrip("/") for name in _gfile().listdir(path))


def glob(pattern):
    """Sorted paths matching `pattern` (`*`, `?`, `[...]`; no `**`)."""
    if not is_remote(pattern):
        return sorted(_glob.glob(pattern))
    with as_oserror(pattern):
        return sorted(_gfile().glob(pattern))


# --- Changes ---------------------------------------------------------------------------------

def makedirs(path):
    """Create folder `path` and its parents; fine when it exists."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)
        return
    with as_oserror(path):
        _gfile().makedirs(path)


def remove(path):
    """Delete one file."""
    if not is_remote(path):
        os.remove(path)
        return
    with as_oserror(path):
        _gfile().remove(path)


def rename(src, dst, overwrite=False):
    """Move file `src` to `dst`; atomic on a local filesystem, copy-then-delete on GCS."""
    if not is_remote(src) and not is_remote(dst):
        if not overwrite and os.path.exists(dst):
            raise FileExistsError(errno.EEXIST, "File exists", dst)
        os.replace(src, dst)
        return
    with as_oserror(dst):
        _gfile().rename(src, dst, overwrite=overwrite)


def rmtree(path, ignore_errors=False):
    """Delete folder `path` and everything under it."""
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=ignore_errors)
        return
    try:
        with as_oserror(path):
            _gfile().rmtree(path)
    except OSError:
        if not ignore_errors:
            raise


def copy(src, dst, overwrite=False):
    """Copy one file (either side may be remote)."""
    if not is_remote(src) and not is_remote(dst):
        if not overwrite and os.path.exists(dst):
            raise FileExistsError(errno.EEXIST, "File exists", dst)
        shutil.copyfile(src, dst)
        return
    with as_oserror(dst):
        _gfile().copy(src, dst, overwrite=overwrite)


def copytree(src, dst):
    """Copy folder `src` into `dst` (created as needed; files of the same name are replaced).
    Either side may be remote, e.g. a local run folder up to gs://."""
    if not is_remote(src) and not is_remote(dst):
        shutil.copytree(src, dst, dirs_exist_ok=True)
        return
    if not isdir(src):
        raise FileNotFoundError(errno.ENOENT, "No such directory", os.fspath(src))
    top = os.fspath(src).rstrip("/\\")
    with as_oserror(src):
        for folder, _, files in _gfile().walk(top):  # folder: `top` + "/sub/..."
            parts = [p for p in re.split(r"[\\/]", folder[len(top):]) if p]
            target = join(dst, *parts)
            makedirs(target)
            for name in files:
                copy(join(folder, name), join(target, name), overwrite=True)


# --- Contents --------------------------------------------------------------------------------

class _RemoteFile:
    """A tf.io.gfile.GFile whose errors are OSError naming the path (see `as_oserror`)."""

    def __init__(self, path, mode):
        self._path = path
        with as_oserror(path):
            if mode.startswith("w") and path.startswith("ram://") and _gfile().exists(path):
                # TF's ram:// appends to an existing file where every other filesystem replaces it.
                _gfile().remove(path)
            self._file = _gfile().GFile(path, mode)

    def __getattr__(self, name):
        attr = getattr(self._file, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            with as_oserror(self._path):
                return attr(*args, **kwargs)

        return call

    def __iter__(self):
        with as_oserror(self._path):
            yield from self._file

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        with as_oserror(self._path):
            self._file.close()


def open_file(path, mode="r", **local_kwargs):
    """A file object for `path`. Text modes are UTF-8. `local_kwargs` (e.g. newline='') go to the
    built-in open for a local path; a remote file never translates newlines."""
    if not is_remote(path):
        if "b" not in mode:
            local_kwargs.setdefault("encoding", "utf-8")
        return builtins.open(path, mode, **local_kwargs)
    return _RemoteFile(os.fspath(path), mode)


def read_bytes(path):
    with open_file(path, "rb") as f:
        return f.read()


def read_text(path):
    with open_file(path, "r") as f:
        return f.read()


def write_bytes(path, data):
    """Write (replace) file `path`; not atomic: see `write_json_atomic`."""
    with open_file(path, "wb") as f:
        f.write(data)


def write_text(path, text):
    """Write (replace) UTF-8 file `path`; not atomic: see `write_json_atomic`."""
    with open_file(path, "w") as f:
        f.write(text)


def read_json(path):
    """The JSON value in file `path` (OSError when unreadable, ValueError when not JSON)."""
    return json.loads(read_text(path))


def write_json_atomic(path, value, **dump_kwargs):
    """Write `value` as JSON (`dump_kwargs` go to json.dumps, e.g. indent=2) so that a reader, or a
    crash, sees the old file or the new one, never half of one.

    Local: a `path.tmp` file renamed over `path` (os.replace, atomic). Remote: the same through
    gfile; GCS's rename is copy-then-delete, and each object write is atomic there anyway. Where
    the filesystem has no rename, `path` is written directly."""
    text = json.dumps(value, **dump_kwargs) + "\n"
    tmp = f"{path}.tmp"
    if not is_remote(path):
        with builtins.open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)  # atomic: a crash leaves the old file or the new one
        return
    import tensorflow as tf

    write_text(tmp, text)
    try:
        with as_oserror(path):
            try:
                _gfile().rename(tmp, path, overwrite=True)
            except tf.errors.UnimplementedError:
                write_text(path, text)
                _gfile().remove(tmp)
    except OSError:
        with contextlib.suppress(OSError):
            remove(tmp)
        raise
