#!/usr/bin/env python
"""Step time, input-wait share, compile time and top ops of a captured profile, in the terminal.

    python -m msa_xla.train --profile_steps=5,9             # writes profiles/<run name>/
    python tools/profile_report.py profiles/<run name>      # table
    python tools/profile_report.py profiles/<run name> --json report.json   # table + JSON file
    python tools/profile_report.py profiles/<run name> --json -             # JSON on stdout

Reads the newest *.xplane.pb under the folder with xprof's converter (overview_page,
input_pipeline_analyzer, framework_op_stats, hlo_stats): the numbers TensorBoard's Profile tab
shows for the same capture; then the step's time by model part (each encoder, fusion direction,
head, loss, optimizer update; attention core, projections, feed-forward, layer norm, dropout;
forward and backward), from XLA's thunk events and the optimized HLO in the capture
(msa_xla/profiling/parts.py). A folder without a profile prints one `error: ...` line and exits with code 2.
All the work lives in msa_xla/profiling/report.py.
"""
import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Run from a checkout.


def _load_report_module():
    """msa_xla/profiling/report.py without running msa_xla/__init__.py (which loads TensorFlow,
    ~5 s): the report needs only xprof."""
    package = importlib.util.find_spec("msa_xla")  # locates the package, does not import it
    path = os.path.join(package.submodule_search_locations[0], "profiling", "report.py")
    spec = importlib.util.spec_from_file_location("msa_xla_profiling_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    sys.exit(_load_report_module().main())
