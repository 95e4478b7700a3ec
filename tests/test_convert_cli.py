"""The conversion CLI: happy path as a subprocess; bad inputs in-process via writer.main(argv)."""
import os
import subprocess
import sys

import numpy as np
import pytest

from msa_xla.data import load_metadata, writer
from tests.test_data_sources import csd_folder, mmsa_dict, mult_dict, write_pickle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "convert_to_tfrecord.py")


def run_main(argv, capsys):
    """writer.main(argv) -> (exit code, stdout, stderr)."""
    try:
        code = writer.main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(tmp_path, argv, capsys, message):
    """Exit 2, one `error:` line naming the problem, nothing left beside the output."""
    before = set(os.listdir(tmp_path))
    code, _, err = run_main(argv + ["--output", tmp_path / "out"], capsys)
    lines = err.splitlines()  # progress lines may precede the error
    assert code == 2, err
    assert lines[-1].startswith("error: ") and "Traceback" not in err, err
    assert sum(line.startswith("error") for line in lines) == 1, err
    assert message in lines[-1], lines[-1]
    assert set(os.listdir(tmp_path)) == before  # no output folder, no temp folder


@pytest.mark.slow
def test_cli_subprocess_synthetic_with_tokens(tmp_path):
    out = tmp_path / "synth"
    proc = subprocess.run(
        [sys.executable, TOOL, "--format", "synthetic", "--output", str(out), "--seq_len",
         "12,20,24", "--synthetic_sizes", "20,8,10", "--shards", "2", "--tokenize"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "train" in proc.stdout and "repaired t/a/v" in proc.stdout  # summary table
    assert "train: 20/20 clips" in proc.stderr  # progress
    meta = load_metadata(out)
    assert meta["seq_len"] == [12, 20, 24] and meta["tokens"]["seq_len"] == 12
    assert sorted(os.listdir(out)) == sorted(
        ["metadata.json", "vocab.txt"] + [f"{s}-0000{i}-of-00002.tfrecord"
                                          for s in ("train", "valid", "test") for i in (0, 1)])


@pytest.mark.slow
def test_cli_subprocess_error_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, TOOL, "--format", "mmsa", "--input",
                           str(tmp_path / "nope.pkl"), "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: input not found: {tmp_path / 'nope.pkl'}"
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_missing_file(tmp_path, capsys):
    assert_refused(tmp_path, ["--format", "mult", "--input", tmp_path / "missing.pkl"], capsys,
                   "input not found")


def test_unknown_format(tmp_path, capsys):
    assert_refused(tmp_path, ["--format", "hdf5", "--input", "x"], capsys, "invalid choice: 'hdf5'")


def test_pickle_lacking_a_key(tmp_path, capsys):
    data = mmsa_dict()
    del data["train"]["regression_labels"]
    path = write_pickle(tmp_path / "a.pkl", data)
    assert_refused(tmp_path, ["--format", "mmsa", "--input", path], capsys,
                   "split 'train' lacks key 'regression_labels' (expected MMSA layout")


def test_dims_differ_across_splits(tmp_path, capsys):
    data = mult_dict()
    data["test"]["audio"] = np.ones((4, 5, 9), np.float32)
    path = write_pickle(tmp_path / "a.pkl", data)
    assert_refused(tmp_path, ["--format", "mult", "--input", path], capsys,
                   "audio feature dim differs across clips/splits: 4 vs 9 (split 'test'")


def test_empty_split(tmp_path, capsys):
    data = mult_dict(sizes={"train": 5, "valid": 0, "test": 2})
    path = write_pickle(tmp_path / "a.pkl", data)
    assert_refused(tmp_path, ["--format", "mult", "--input", path], capsys,
                   "split 'valid' is empty")


def test_nan_labels(tmp_path, capsys):
    data = mmsa_dict()
    data["test"]["regression_labels"][2] = np.nan
    path = write_pickle(tmp_path / "a.pkl", data)
    assert_refused(tmp_path, ["--format", "mmsa", "--input", path], capsys,
                   "split 'test' has 1 non-finite (NaN/inf) labels, first at clip 'vid2$_$2'")


def test_nonfinite_error_names_split_modality_clip(tmp_path, capsys):
    data = mmsa_dict()
    data["valid"]["audio"][1, 0, 0] = -np.inf
    path = write_pickle(tmp_path / "a.pkl", data)
    assert_refused(tmp_path, ["--format", "mmsa", "--input", path, "--nonfinite", "error"], capsys,
                   "split 'valid' modality 'audio' clip 'vid1$_$1': 1 non-finite values")


def test_not_a_pickle_and_bad_seq_len(tmp_path, capsys):
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    assert_refused(tmp_path, ["--format", "mmsa", "--input", tmp_path / "junk.pkl"], capsys,
                   "cannot read pickle")
    assert_refused(tmp_path, ["--format", "synthetic", "--seq_len", "50,375"], capsys,
                   "--seq_len '50,375'")


def test_csd_folder_missing_labels(tmp_path, capsys):
    folder = tmp_path / "csd"
    folder.mkdir()
    csd_folder(folder)
    os.remove(folder / "labels.csd")
    assert_refused(tmp_path, ["--format", "csd", "--input", folder], capsys, "labels.csd: not found")


def test_tokenize_needs_raw_text(tmp_path, capsys):
    path = write_pickle(tmp_path / "a.pkl", mult_dict())
    assert_refused(tmp_path, ["--format", "mult", "--input", path, "--tokenize"], capsys,
                   "--tokenize needs raw_text")


def test_existing_output_needs_overwrite(tmp_path, capsys):
    path = write_pickle(tmp_path / "a.pkl", mmsa_dict())
    argv = ["--format", "mmsa", "--input", path, "--output", tmp_path / "out"]
    assert run_main(argv, capsys)[0] == 0
    assert_refused(tmp_path, argv[:-2], capsys, "already exists (pass --overwrite")
    code, out, _ = run_main(argv + ["--overwrite", "--seq_len", "3", "--tokenize"], capsys)
    assert code == 0 and "wrote" in out
    assert load_metadata(tmp_path / "out")["seq_len"] == 3
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    from msa_xla.data import synthetic

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer.schema, "write_metadata", boom)
    splits = synthetic.generate((4, 2, 2), seq_len=4, dims=(3, 2, 2))
    with pytest.raises(KeyboardInterrupt):
        writer.convert(splits, tmp_path / "out", source_format="synthetic", source_path="-",
                       log=lambda line: None)
    assert os.listdir(tmp_path) == []
