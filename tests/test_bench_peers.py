"""tools/bench_peers.py and tools/mmsa_parity.py against MMSA itself: skipped unless the optional
extra is installed (pip install -e '.[peers]'); nothing else in the suite needs torch."""
import os
import sys

import numpy as np
import pytest

from tests.test_data_sources import mmsa_dict, with_text_bert, write_pickle

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))


def _mmsa_pickle(path, aligned):
    data = with_text_bert(mmsa_dict(seed=4))
    for part in data.values():
        part["audio"][0, 0, 1] = -np.inf  # COVAREP's -inf: MMSA sets it to 0, so does msa_xla
        if aligned:  # MMSA's aligned pickles: one length, no *_lengths
            del part["audio_lengths"], part["vision_lengths"]
            length = part["text"].shape[1]
            part["audio"], part["vision"] = part["audio"][:, :length], part["vision"][:, :length]
    return write_pickle(path, data)


@pytest.mark.parametrize("aligned", [True, False])
def test_format_mmsa_yields_what_mmsas_loader_yields(tmp_path, aligned, capsys):
    pytest.importorskip("MMSA")
    from mmsa_parity import check_data

    path = _mmsa_pickle(tmp_path / "data.pkl", aligned)
    assert check_data(path, log=lambda line: None) == 0
    assert "check-data: identical" in capsys.readouterr().out
    # A NaN MMSA passes on (msa_xla repairs it to 0) is reported as a difference.
    import pickle
    with open(path, "rb") as f:
        data = pickle.load(f)
    data["valid"]["vision"][1, 0, 0] = np.nan
    assert check_data(write_pickle(tmp_path / "nan.pkl", data), log=lambda line: None) == 1
    assert "DIFFERENT valid.vision: 1 clips differ, first at clip 1" in capsys.readouterr().out


def test_mult_gives_mmsas_outputs_on_copied_weights():
    pytest.importorskip("MMSA")
    from bench_peers import check_model

    assert check_model(log=lambda line: None) == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_benchmark_keeps_glibcs_heap_for_torch():
    # Valid mallopt options and values return 1: a wrong option number makes this None.
    from bench_peers import keep_malloc_heap

    assert keep_malloc_heap() == {"M_MMAP_THRESHOLD": 32 << 20, "M_TRIM_THRESHOLD": 256 << 20}
