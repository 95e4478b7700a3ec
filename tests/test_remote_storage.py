"""Remote storage (gs:// and the like) through tf.io.gfile, with TF's in-memory `ram://` filesystem as
the stand-in for a bucket: it is per-process, so everything here runs in this process."""
import json
import os
import uuid

import pytest

from msa_xla import storage


def _ram(name):
    """A fresh ram:// folder of this test run (the filesystem is shared by the whole process)."""
    return f"ram://msa-xla-test-{uuid.uuid4().hex[:12]}/{name}"


# --- The storage helpers ---------------------------------------------------------------------

def test_paths_of_urls_stay_urls():
    assert storage.absolute("gs://b/x") == "gs://b/x"
    assert storage.absolute("gs://b/x/") == "gs://b/x"
    assert storage.absolute("runs/x") == os.path.abspath("runs/x")
    assert storage.is_remote("gs://b/x") and storage.is_remote("ram://x")
    assert not storage.is_remote("/tmp/x") and not storage.is_remote("runs/gs:/x")
    assert storage.join("gs://b/run", "seed_0", "model.keras") == "gs://b/run/seed_0/model.keras"
    assert storage.join("gs://b/run/", "x") == "gs://b/run/x"
    assert storage.dirname("gs://b/run/x") == "gs://b/run"
    assert storage.basename("gs://b/run/x") == "x"


@pytest.mark.parametrize("where", ["local", "ram"])
def test_write_json_atomic(tmp_path, where):
    folder = str(tmp_path) if where == "local" else _ram("json")
    storage.makedirs(folder)
    path = storage.join(folder, "results.json")
    storage.write_json_atomic(path, {"a": 1, "b": [1.5, None]})
    assert storage.read_json(path) == {"a": 1, "b": [1.5, None]}
    storage.write_json_atomic(path, {"z": 2, "a": 0}, indent=1, sort_keys=True)  # replaces it
    assert storage.read_json(path) == {"a": 0, "z": 2}
    assert storage.read_text(path) == json.dumps({"a": 0, "z": 2}, indent=1, sort_keys=True) + "\n"
    assert storage.listdir(folder) == ["results.json"]  # no .tmp left behind


def test_remote_file_operations():
    root = _ram("ops")
    storage.makedirs(storage.join(root, "a", "b"))
    storage.write_text(storage.join(root, "a", "x.txt"), "x")
    storage.write_bytes(storage.join(root, "a", "b", "y.bin"), b"\x00\x01")
    assert storage.exists(root) and storage.isdir(storage.join(root, "a"))
    assert storage.isfile(storage.join(root, "a", "x.txt"))
    assert not storage.isfile(storage.join(root, "a", "b"))
    assert not storage.exists(storage.join(root, "nope"))
    assert storage.listdir(storage.join(root, "a")) == ["b", "x.txt"]
    assert storage.glob(storage.join(root, "a", "*.txt")) == [storage.join(root, "a", "x.txt")]
    assert storage.stat(storage.join(root, "a", "b", "y.bin")).size == 2
    storage.copytree(storage.join(root, "a"), storage.join(root, "copy"))
    assert storage.read_bytes(storage.join(root, "copy", "b", "y.bin")) == b"\x00\x01"
    storage.rename(storage.join(root, "copy", "x.txt"), storage.join(root, "copy", "z.txt"))
    assert storage.listdir(storage.join(root, "copy")) == ["b", "z.txt"]
    with storage.open_file(storage.join(root, "copy", "z.txt")) as f:
        assert f.read() == "x"
    storage.rmtree(storage.join(root, "copy"))
    assert not storage.exists(storage.join(root, "copy", "z.txt"))
    storage.rmtree(storage.join(root, "copy"), ignore_errors=True)  # already gone: no error
    missing = storage.join(root, "missing.json")
    with pytest.raises(FileNotFoundError, match=missing):  # an OSError naming the path
        storage.read_json(missing)


def test_local_file_operations(tmp_path):
    root = str(tmp_path)
    storage.makedirs(storage.join(root, "a", "b"))
    storage.write_text(storage.join(root, "a", "x.txt"), "x")
    storage.copytree(storage.join(root, "a"), storage.join(root, "copy"))
    assert storage.listdir(storage.join(root, "copy")) == ["b", "x.txt"]
    assert storage.glob(storage.join(root, "*", "x.txt")) == [
        storage.join(root, "a", "x.txt"), storage.join(root, "copy", "x.txt")]
    storage.rmtree(storage.join(root, "copy"))
    assert storage.listdir(root) == ["a"]
