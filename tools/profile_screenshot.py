#!/usr/bin/env python
"""A screenshot of TensorBoard's Profile tab for a captured profile, taken in headless Chromium.

    # setup, once (Debian; not installed by the package):
    apt-get update && apt-get install -y chromium
    python -m msa_xla.train --epochs=1 --profile_steps=3,6 --profile_dir=profiles/demo
    python tools/profile_screenshot.py profiles --out docs/profile_tab.png

Starts `tensorboard --logdir LOGDIR --host 127.0.0.1 --port <free port>`, waits until its
profile plugin lists a run (`/data/plugin/profile/runs`), runs
`chromium --headless --no-sandbox --screenshot=OUT --window-size=W,H URL` on
`http://127.0.0.1:<port>/#profile`, stops TensorBoard and prints the run, its tools and OUT.
Exit 2 (one `error:` line) when Chromium is missing or TensorBoard lists no profile run.
"""
import argparse
import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
PLUGIN_DATA = "/data/plugin/profile"  # xprof/profile_plugin.py: RUNS_ROUTE, RUN_TOOLS_ROUTE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 10.0):
    """GET a TensorBoard data route (its responses may be gzip-encoded)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body = response.read()
        if response.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
    return json.loads(body)


class TensorBoard:
    """`tensorboard --logdir LOGDIR` on 127.0.0.1 as a subprocess (a context manager)."""

    def __init__(self, logdir: str, port: int | None = None, timeout: float = 120.0):
        self.logdir, self.port, self.timeout = logdir, port or free_port(), timeout
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None

    def __enter__(self):
        self._log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", self.logdir,
             "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def profile_runs(self) -> list[str]:
        """Polls the profile plugin until it lists a run (or the timeout); returns the runs."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tensorboard exited with {self.process.returncode}: "
                                   f"{self.output()[-2000:]}")
            try:
                runs = get_json(self.url + PLUGIN_DATA + "/runs")
                if runs:
                    return runs
            except OSError:
                pass  # not listening yet
            time.sleep(0.5)
        return []

    def run_tools(self, run: str) -> list[str]:
        return get_json(f"{self.url}{PLUGIN_DATA}/run_tools?"
                        + urllib.parse.urlencode({"run": run}))

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def __exit__(self, *exc):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(chromium: str, url: str, out: str, size=(1600, 1000), wait_ms: int = 20000):
    """Headless Chromium's screenshot of `url` into `out` (PNG), after `wait_ms` of page time
    (the Profile tab loads its tools over XHR)."""
    with tempfile.TemporaryDirectory() as profile_dir:
        command = [chromium, "--headless", "--no-sandbox", "--disable-gpu",
                   "--hide-scrollbars", f"--user-data-dir={profile_dir}",
                   f"--virtual-time-budget={wait_ms}", f"--window-size={size[0]},{size[1]}",
                   f"--screenshot={os.path.abspath(out)}", url]
        done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    if done.returncode != 0 or not os.path.exists(out):
        raise RuntimeError(f"chromium failed ({done.returncode}): {done.stderr[-2000:]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logdir", help="the folder given to tensorboard --logdir, e.g. profiles")
    parser.add_argument("--out", default="profile_tab.png", help="PNG to write")
    parser.add_argument("--size", default="1600,1000", help="window size W,H")
    parser.add_argument("--wait_ms", type=int, default=20000,
                        help="page time before the screenshot (Chromium's virtual time)")
    args = parser.parse_args(argv)
    chromium = find_chromium()
    if chromium is None:
        print("error: no chromium on PATH (setup: apt-get update && apt-get install -y "
              "chromium)", file=sys.stderr)
        return 2
    with TensorBoard(args.logdir) as board:
        runs = board.profile_runs()
        if not runs:
            print(f"error: tensorboard lists no profile run under {args.logdir}",
                  file=sys.stderr)
            return 2
        print(f"runs {runs}; tools of {runs[0]}: {board.run_tools(runs[0])}")
        width, height = (int(v) for v in args.size.split(","))
        screenshot(chromium, board.url + "/#profile", args.out, (width, height), args.wait_ms)
    print(f"screenshot {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
