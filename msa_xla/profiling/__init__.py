"""Profiling: capture a window of steps (capture.py, used by the trainer) and read it back into a
report (report.py, also `python tools/profile_report.py`). Nothing is imported here: report.py
runs without TensorFlow.
"""
