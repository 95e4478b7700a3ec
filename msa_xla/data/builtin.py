"""The built-in dataset: synthetic MOSI-shaped TFRecords, generated on first use.

    from msa_xla.data import ensure_builtin_dataset, make_dataset
    data_dir = ensure_builtin_dataset()        # ~2 s the first time, then instant
    train = make_dataset(data_dir, "train", 32)

Shapes follow MulT's aligned MOSI: text 50x300, audio 50x74, video 47-d video, 1284/229/686 clips;
the label is the known function of synthetic.py, so a working model visibly learns it.

Location: `$MSA_XLA_DATA_HOME/builtin_synthetic` when that variable is set; else
`<repo>/tfrecords/builtin_synthetic` when the package runs from a writable checkout (editable
install); else `~/.cache/msa_xla/builtin_synthetic`. A remote location (gs://...) works too.
"""
import os
import shutil
import tempfile

from msa_xla.data import schema, synthetic, writer
from msa_xla.runtime import storage

NAME = "builtin_synthetic"
# Bump when the generator or its parameters change: an older folder is then regenerated.
BUILTIN_VERSION = 1
SEQ_LEN = 50
SEED = 0


def default_home():
    """Folder that holds the built-in dataset (see module docstring)."""
    if os.environ.get("MSA_XLA_DATA_HOME"):
        return os.path.expanduser(os.environ["MSA_XLA_DATA_HOME"])
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    tfrecords = os.path.join(repo, "tfrecords")
    if os.path.isfile(os.path.join(repo, "pyproject.toml")) and os.path.isdir(tfrecords) \
            and os.access(tfrecords, os.W_OK):
        return tfrecords
    return os.path.join(os.path.expanduser("~"), ".cache", "msa_xla")


def _is_current(path):
    try:
        meta = schema.load_metadata(path)
    except schema.DataError:
        return False
    return meta.get("builtin_version") == BUILTIN_VERSION and all(
        storage.isfile(storage.join(path, s["file"]))
        for info in meta["splits"].values() for s in info["shards"])


def _generate(output, overwrite=False, log=None):
    splits = synthetic.generate(synthetic.MOSI_SPLIT_SIZES, seq_len=SEQ_LEN,
                                dims=synthetic.MOSI_DIMS, seed=SEED)
    writer.convert(splits, output, source_format="synthetic", source_path="builtin",
                   seq_len=SEQ_LEN, tokenize=True, overwrite=overwrite,
                   log=log or (lambda line: None),
                   extra_metadata={"builtin_version": BUILTIN_VERSION,
                                   "label_function": synthetic.__doc__.split("\n\n")[1].strip()})


def ensure_builtin_dataset(path=None, *, log=None):
    """Create the built-in dataset unless a current one exists; return its folder.

    Safe when several local processes race: each writes to its own temporary folder and renames it
    into place; a process that loses the rename uses the winner's folder and removes its own. A
    remote folder is written by writer.convert (replacing a stale one); processes racing to create
    it there are not coordinated, so create it once before starting several.
    """
    path = storage.absolute(path or storage.join(default_home(), NAME))
    if _is_current(path):
        return path
    if storage.is_remote(path):
        _generate(path, overwrite=True, log=log)
        return path
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{NAME}.build-", dir=parent)
    try:
        built = os.path.join(staging, NAME)
        _generate(built, log=log)
        if os.path.exists(path) and not _is_current(path):
            # A stale or broken folder (old version, interrupted copy): move it aside, then replace.
            os.rename(path, os.path.join(staging, "stale"))
        try:
            os.rename(built, path)
        except OSError:
            if not _is_current(path):  # Lost a race to a broken writer: surface it.
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
