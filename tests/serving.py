"""Starting and stopping a real ``guardit serve`` for the server tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(d: Path, cfg: dict, env: dict[str, str], *vllm_flags: str) -> tuple[str, subprocess.Popen]:
    """``guardit serve`` on ``cfg`` (written to ``d/policies.yaml``), in the README's form: no MODEL
    (the bundled one), vLLM's flags after '--' (``vllm_flags`` added to them); waits until /health
    answers. Returns (base URL, process); its log is ``d/server.log``."""
    import urllib.request

    (d / "policies.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    port = free_port()
    log = open(d / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "guardit.cli",
            "serve",
            "--config",
            str(d / "policies.yaml"),
            "--",
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--max-num-seqs",
            "32",
            *vllm_flags,
        ],  # fmt: skip
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, GUARDIT_RUN_DIR=str(d / "run"), **env),
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 420
    while True:
        if proc.poll() is not None:
            raise RuntimeError("server exited:\n" + (d / "server.log").read_text()[-3000:])
        try:
            urllib.request.urlopen(base + "/health", timeout=2)
            return base, proc
        except Exception as e:
            if time.time() > deadline:
                proc.kill()
                raise RuntimeError("server did not start:\n" + (d / "server.log").read_text()[-3000:]) from e
            time.sleep(2)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def http(base, method, path, body=None, key=None, headers=None, raw_body=None) -> tuple[int, str]:
    """(status, text) of one request; any status is returned, never raised."""
    import urllib.error
    import urllib.request

    data = raw_body if raw_body is not None else (json.dumps(body).encode() if body is not None else None)
    h = {"content-type": "application/json", **(headers or {})}
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(base + path, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
