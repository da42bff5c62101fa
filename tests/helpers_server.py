"""Local Jupyter/Voilà servers for tests: a free port on 127.0.0.1, a wait for it to open, a
context manager that runs a server with private Jupyter dirs and kills it by PID after, and the
flags and template path `make voila` uses."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARE = ROOT / "share" / "jupyter"  # JUPYTER_PATH entry holding the voila template "workbench"


def makefile_voila_flags() -> list[str]:
    """The flags `make voila` passes (the Makefile's VOILA_OFFLINE)."""
    m = re.search(r"^VOILA_OFFLINE\s*=\s*(.+)$", (ROOT / "Makefile").read_text(), re.M)
    if m is None:
        raise AssertionError("the Makefile defines no VOILA_OFFLINE")
    return shlex.split(m.group(1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    """Wait until the server accepts connections (without sending a request)."""
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.25)
    raise TimeoutError(f"port {port} never opened:\n{log.read_text()[-3000:]}")


@contextmanager
def server(cmd: list[str], tmp: Path, port: int, env: dict[str, str] | None = None
           ) -> Iterator[subprocess.Popen]:
    """Start a Jupyter server in ``tmp/nb`` with private data/runtime/config dirs under
    ``tmp`` (plus ``env``); kill it (and its kernels) by PID after."""
    env = dict(os.environ, JUPYTER_DATA_DIR=str(tmp / "data"),
               JUPYTER_RUNTIME_DIR=str(tmp / "runtime"), JUPYTER_CONFIG_DIR=str(tmp / "config"),
               PYDEVD_DISABLE_FILE_VALIDATION="1", **(env or {}))
    log = tmp / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp / "nb", env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_for_port(port, proc, log)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and the kernels it started
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
