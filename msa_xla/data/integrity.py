"""Integrity scan of TFRecord shards: framing, CRCs, parsing and finite values, one pass per file.

Why a python-side scan before tf.data sees the files:
  * tf.data reports a damaged file as "corrupted record at 421400", with no file name, mid-training;
    and it cannot skip a damaged record (its reader stops at the first bad CRC).
  * Non-finite values are checked here, with numpy on the parsed records, rather than with
    `tf.debugging.check_numerics` in the batch parse: the scan is exact (every value of every record
    is looked at once), costs nothing per training step (it is cached per file), and its error names
    the file, the record index and the clip id, which an in-graph assertion could only do with
    extra plumbing of the ids through every batch. The converter already repairs non-finite values,
    so this guards hand-made and damaged shards.

A TFRecord file is a sequence of [u64 length][u32 masked crc32c(length)][data][u32 masked
crc32c(data)]. The scan walks it, checks both CRCs, and when a length header is damaged looks for the
next valid header (length CRC and data CRC both matching; a false match has odds ~2^-64), so records
after a damaged one are still found. Records with intact framing are then parsed with the reader's
own `tf.io.parse_example` spec (built from metadata.json) in batches, and checked: true lengths within
[0, seq_len], token ids within the vocabulary, all floats finite.

`scan_paths` returns a `ShardReport` per file (cached per path, size, mtime and spec); `check_reports`
turns them into a DataError naming the file (strict) or a warning with the exact number of skipped
records (skip_corrupt), and `usable_files` gives the files tf.data should read: the originals when
they are clean, else a private copy holding only the good records, byte for byte.

Local and remote files: a local shard is memory-mapped (the OS pages it in, nothing is copied); a
remote one (gs://...) has no mmap, so its bytes are read once through tf.io.gfile and scanned in
memory with the same code: the scan of a remote shard holds the whole shard in host memory (write
big datasets with several shards). Private copies of damaged shards are always local temp files.
"""
import atexit
import contextlib
import dataclasses
import json
import mmap
import os
import shutil
import struct
import tempfile
import warnings

import numpy as np

from msa_xla.data import schema
from msa_xla.data.schema import DataError
from msa_xla.options import MODALITIES
from msa_xla.runtime import storage

_PARSE_BATCH = 128
_RESYNC_CHUNK = 1 << 22  # header positions examined per numpy step while resynchronising


class CorruptRecordsWarning(UserWarning):
    """Damaged records were skipped (make_dataset(..., skip_corrupt=True))."""


# --- CRC32C ----------------------------------------------------------------------------------

def _make_table():
    table = np.zeros(256, np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
        table[i] = c
    return table


_TABLE = _make_table()
_TABLE_LIST = [int(v) for v in _TABLE]

try:  # C implementation (a dependency of google-cloud-storage); the fallback is pure python.
    import google_crc32c as _gcrc

    def crc32c(data):
        return _gcrc.value(bytes(data))
except ImportError:  # pragma: no cover - exercised only where google-crc32c is missing
    def crc32c(data):
        crc, table = 0xFFFFFFFF, _TABLE_LIST
        for byte in bytes(data):
            crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
        return crc ^ 0xFFFFFFFF


def masked_crc32c(data):
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _header_candidates(arr, start, stop):
    """Offsets p in [start, stop) whose 12 bytes form a header with a valid length CRC that fits."""
    size = arr.size
    stop = min(stop, size - 16 + 1)  # the smallest record (empty data) is 16 bytes
    n = stop - start
    if n <= 0:
        return np.zeros(0, np.int64)
    window = arr[start:stop + 11]
    crc = np.full(n, 0xFFFFFFFF, np.uint32)
    length = np.zeros(n, np.uint64)
    for j in range(8):
        b = window[j:j + n]
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> np.uint32(8))
        length |= b.astype(np.uint64) << np.uint64(8 * j)
    crc ^= np.uint32(0xFFFFFFFF)
    masked = ((crc >> np.uint32(15)) | (crc << np.uint32(17))) + np.uint32(0xA282EAD8)
    stored = np.zeros(n, np.uint32)
    for j in range(4):
        stored |= window[8 + j:8 + j + n].astype(np.uint32) << np.uint32(8 * j)
    room = (size - 16 - (start + np.arange(n, dtype=np.int64))).astype(np.uint64)
    ok = (masked == stored) & (length <= room)
    return start + np.nonzero(ok)[0].astype(np.int64)


# --- Reports ---------------------------------------------------------------------------------

@dataclasses.dataclass
class ShardReport:
    """What the scan found in one shard.

    expected: record count metadata.json gives for the file (None when unknown).
    good: records with intact framing and CRCs that parse and pass the checks.
    problems: (record index, byte offset, reason) for each damaged record or unreadable byte range;
      indices after an unreadable range count the records found, not those lost in it.
    nonfinite: (record index, clip id, {feature: number of NaN/inf values}); never skipped.
    """
    path: str
    expected: int = None
    good: int = 0
    problems: list = dataclasses.field(default_factory=list)
    nonfinite: list = dataclasses.field(default_factory=list)
    spans: list = dataclasses.field(default_factory=list, repr=False)  # (offset, nbytes) of good
    clean_path: str = dataclasses.field(default=None, repr=False)

    @property
    def skipped(self):
        """Records that make_dataset(skip_corrupt=True) leaves out of this file."""
        if self.expected is None:
            return len(self.problems)
        return max(self.expected - self.good, 0)

    @property
    def ok(self):
        return not self.problems and not self.nonfinite and (
            self.expected is None or self.good == self.expected)


@dataclasses.dataclass
class ScanReport:
    """Per-file reports of one split (`scan_shards`)."""
    shards: list

    @property
    def good(self):
        return sum(r.good for r in self.shards)

    @property
    def skipped(self):
        return sum(r.skipped for r in self.shards)

    def by_file(self):
        """{path: (good, skipped)}"""
        return {r.path: (r.good, r.skipped) for r in self.shards}


# --- Scan ------------------------------------------------------------------------------------

@contextlib.contextmanager
def _file_bytes(path):
    """The bytes of file `path` as a buffer: a read-only mmap of a local file, the contents of a
    remote one (read once through tf.io.gfile)."""
    if storage.is_remote(path):
        yield storage.read_bytes(path)
        return
    if os.path.getsize(path) == 0:  # mmap refuses an empty file
        yield b""
        return
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        yield buf


def _walk(buf, report):
    """Framing and CRC walk of a file's bytes `buf`; returns [(record index, offset, nbytes)] of
    records with intact CRCs."""
    size = len(buf)
    if size == 0:
        return []
    records = []
    arr = np.frombuffer(buf, np.uint8)
    try:
        offset, index = 0, 0
        while offset < size:
            if size - offset < 16:
                report.problems.append((index, offset, f"truncated: {size - offset} stray "
                                                       "bytes at the end of the file"))
                break
            head = buf[offset:offset + 12]
            (length,) = struct.unpack("<Q", head[:8])
            (length_crc,) = struct.unpack("<I", head[8:])
            if masked_crc32c(head[:8]) != length_crc:
                found = _resync(buf, arr, offset + 1)
                end = size if found is None else found
                report.problems.append((index, offset, f"damaged record header; bytes "
                                                       f"{offset}-{end} unreadable"))
                if found is None:
                    break
                offset, index = found, index + 1
                continue
            end = offset + 12 + length + 4
            if end > size:
                report.problems.append((index, offset, f"truncated: record claims {length} "
                                                       f"bytes, the file ends at {size}"))
                break
            (data_crc,) = struct.unpack("<I", buf[end - 4:end])
            if masked_crc32c(buf[offset + 12:end - 4]) != data_crc:
                report.problems.append((index, offset, "data CRC mismatch"))
            else:
                records.append((index, offset, end - offset))
            offset, index = end, index + 1
    finally:
        del arr  # release the buffer export before the mmap closes
    return records


def _resync(buf, arr, start):
    """Offset of the next record whose header and data CRCs both match, or None."""
    size = len(buf)
    for chunk in range(start, size, _RESYNC_CHUNK):
        for p in _header_candidates(arr, chunk, min(chunk + _RESYNC_CHUNK, size)):
            p = int(p)
            (length,) = struct.unpack("<Q", buf[p:p + 8])
            end = p + 12 + length + 4
            (data_crc,) = struct.unpack("<I", buf[end - 4:end])
            if masked_crc32c(buf[p + 12:end - 4]) == data_crc:
                return p
    return None


def _spec_info(meta):
    tokens = bool(meta.get("tokens"))
    spec = schema.feature_spec(meta, modalities=MODALITIES, tokens=tokens)
    limits = {name: meta["modalities"][name]["seq_len"] for name in MODALITIES}
    if tokens:
        limits[schema.TOKENS_KEY] = meta["tokens"]["seq_len"]
    vocab = meta["tokens"].get("vocab_size") if tokens else None
    return spec, limits, vocab


def _check_parsed(parsed, row, limits, vocab):
    """Reason the parsed record `row` is unusable, or None; and its {float feature: #non-finite}."""
    for name, seq_len in limits.items():
        value = int(parsed[schema.length_key(name)][row])
        if not 0 <= value <= seq_len:
            return f"{schema.length_key(name)}={value} outside [0, {seq_len}]", {}
    if vocab is not None:
        ids = parsed[schema.TOKENS_KEY][row]
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            return f"token id outside [0, {vocab})", {}
    bad = {}
    for name in MODALITIES + (schema.LABEL_KEY,):
        count = int(np.count_nonzero(~np.isfinite(parsed[name][row])))
        if count:
            bad[name] = count
    return None, bad


def _parse_all(buf, records, meta, report):
    """Parse the records of `buf` (file bytes) at `records` and check their values into `report`."""
    import tensorflow as tf

    spec, limits, vocab = _spec_info(meta)
    meta_name = schema.METADATA_FILE

    def payload(offset, nbytes):
        return bytes(buf[offset + 12:offset + nbytes - 4])

    for start in range(0, len(records), _PARSE_BATCH):
        batch = records[start:start + _PARSE_BATCH]
        data = [payload(off, nbytes) for _, off, nbytes in batch]
        try:
            parsed = {k: v.numpy() for k, v in tf.io.parse_example(data, spec).items()}
            rows = [(rec, parsed, i) for i, rec in enumerate(batch)]
        # UnicodeDecodeError: TF's own message quotes the bad bytes and then fails to decode.
        except (tf.errors.OpError, UnicodeDecodeError):  # find the failing records, one by one
            rows = []
            for rec, one in zip(batch, data):
                try:
                    single = {k: v.numpy() for k, v in tf.io.parse_example([one], spec).items()}
                    rows.append((rec, single, 0))
                except (tf.errors.OpError, UnicodeDecodeError) as err:
                    why = (getattr(err, "message", "") or "not a tf.train.Example").strip()
                    why = why.splitlines()[0][:200]
                    report.problems.append((rec[0], rec[1], f"does not parse with the shapes "
                                                            f"in {meta_name} ({why})"))
        for (index, offset, nbytes), parsed, row in rows:
            reason, nonfinite = _check_parsed(parsed, row, limits, vocab)
            if reason:
                report.problems.append((index, offset, reason))
                continue
            if nonfinite:
                clip = parsed[schema.ID_KEY][row].decode("utf-8", "replace")
                report.nonfinite.append((index, clip, nonfinite))
            report.good += 1
            report.spans.append((offset, nbytes))
    report.problems.sort()


_cache = {}  # (path, size, mtime_ns, expected, spec key) -> ShardReport


def scan_file(path, expected=None, meta=None):
    """ShardReport of one TFRecord file (parsed and value-checked when `meta` is given); cached,
    unless the filesystem keeps no modification times (ram://): a rewritten file of the same size
    could not be told from the scanned one."""
    try:
        return _scan_file(path, expected, meta)
    except OSError as err:  # unreadable (permissions, a bucket gone): one line naming the file
        raise DataError(f"{path}: cannot read shard ({err})") from None


def _scan_file(path, expected, meta):
    stat = storage.stat(path)
    spec_key = None if meta is None else json.dumps(
        [meta["modalities"], (meta.get("tokens") or {}).get("seq_len"),
         (meta.get("tokens") or {}).get("vocab_size")], sort_keys=True)
    key = (storage.absolute(path), stat.size, stat.mtime_ns, expected, spec_key)
    if key in _cache:
        return _cache[key]
    report = ShardReport(path=path, expected=expected)
    with _file_bytes(path) as buf:
        records = _walk(buf, report)
        if meta is None:
            report.good = len(records)
            report.spans = [(off, n) for _, off, n in records]
        else:
            _parse_all(buf, records, meta, report)
    if stat.mtime_ns:
        _cache[key] = report
    return report


def scan_paths(paths, meta=None):
    """[ShardReport] for [(path, expected count)]."""
    return [scan_file(path, count, meta) for path, count in paths]


def scan_shards(data_dir, split):
    """ScanReport of every shard of `split` (per-file good and skipped record counts); never raises
    for damaged records, only for a bad metadata.json or a missing shard."""
    data_dir = os.fspath(data_dir)
    meta = schema.load_metadata(data_dir)
    return ScanReport(scan_paths(schema.shard_paths(data_dir, meta, split), meta))


# --- Verdicts --------------------------------------------------------------------------------

def _first_problems(report, limit=3):
    parts = [f"record {i} at byte {off}: {why}" for i, off, why in report.problems[:limit]]
    more = len(report.problems) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def check_report(report, skip_corrupt=False):
    """Raise DataError naming the file, or (skip_corrupt) warn; returns the number skipped."""
    path = report.path
    if report.nonfinite:
        shown = ", ".join(f"record {i} clip '{clip}' ({', '.join(f'{k}: {n}' for k, n in bad.items())})"
                          for i, clip, bad in report.nonfinite[:5])
        more = len(report.nonfinite) - 5
        raise DataError(f"{path}: {len(report.nonfinite)} record(s) with non-finite (NaN/inf) "
                        f"features or labels: {shown}" + (f", and {more} more" if more > 0 else ""))
    if report.expected is not None and report.good > report.expected:
        raise DataError(f"{path}: holds {report.good} records, metadata.json says {report.expected}")
    skipped = report.skipped
    if not skipped and not report.problems:
        return 0
    if report.problems:
        what = f"{skipped} damaged or unreadable record(s) ({_first_problems(report)})"
    else:
        what = (f"holds {report.good} records, metadata.json says {report.expected} (cut at a "
                "record boundary?)")
    if not skip_corrupt:
        raise DataError(f"{path}: {what}; pass skip_corrupt=True (--skip_corrupt) to skip them")
    of = f" of {report.expected}" if report.expected is not None else ""
    warnings.warn(f"{path}: skipped {skipped}{of} records: {what}", CorruptRecordsWarning,
                  stacklevel=3)
    return skipped


_clean_dir = None


def _clean_copy(report):
    """Path of a private copy of the report's file holding only its good records (verbatim); a
    local temp file, also for a remote shard (tf.data reads either)."""
    global _clean_dir
    if report.clean_path and os.path.isfile(report.clean_path):
        return report.clean_path
    if _clean_dir is None:
        _clean_dir = tempfile.mkdtemp(prefix="msa_xla-skip_corrupt-")
        atexit.register(shutil.rmtree, _clean_dir, True)
    fd, out = tempfile.mkstemp(suffix="-" + storage.basename(report.path), dir=_clean_dir)
    with storage.open_file(report.path, "rb") as src, os.fdopen(fd, "wb") as dst:
        for offset, nbytes in report.spans:
            src.seek(offset)
            dst.write(src.read(nbytes))
    report.clean_path = out
    return out


def usable_files(reports, skip_corrupt=False):
    """[(path tf.data should read, record count)] after `check_report` on each; files with no
    usable records are dropped. Raises DataError when nothing usable is left."""
    out = []
    for report in reports:
        check_report(report, skip_corrupt)
        if report.good == 0:
            continue
        # Without problems every record of the file is good (maybe fewer than metadata says).
        out.append((report.path if not report.problems else _clean_copy(report), report.good))
    if not out:
        names = ", ".join(r.path for r in reports)
        raise DataError(f"{names}: no usable records left after skipping damaged ones")
    return out
