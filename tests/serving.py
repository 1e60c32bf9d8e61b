"""Starting and stopping a real ``guardit serve`` for the server tests, other processes the tests
launch and wait for later, and the core halves on which two engines run side by side."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from guardit.vllm_generation import ENV_CPU_KV

SERVER_KEYS = {  # test_vllm_server's tenants' API keys
    "kids": "kids-key",
    "open": "open-key",
    "privacy": "privacy-key",
    "research": "research-key",
    "answer": "answer-key",
    "strict": "strict-key",
    "admin": "admin-key",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def core_halves() -> tuple[dict[str, str], dict[str, str]]:
    """Two disjoint halves of this machine's cores, as vLLM CPU thread bindings (environment).

    vLLM's CPU engine computes on all cores but one by default (one core of 2), so two engines
    bound to the two halves run side by side in about the time of one (two compiled engines
    started together: 172 s, one alone: 162 s, on 2 cores, 2026-12-02). Engines whose tokens a
    test compares all run on a half, so each computes with the same number of threads. With
    fewer than two cores both are left to vLLM's default."""
    cores = sorted(os.sched_getaffinity(0))
    half = len(cores) // 2
    if not half:
        return {}, {}

    def bind(cs: list[int]) -> dict[str, str]:
        return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cs))}

    return bind(cores[:half]), bind(cores[half : 2 * half])


def launch_server(d: Path, cfg: dict, env: dict[str, str], *vllm_flags: str) -> tuple[str, subprocess.Popen]:
    """``guardit serve`` on ``cfg`` (written to ``d/policies.yaml``), in the README's form: no MODEL
    (the bundled one), vLLM's flags after '--' (``vllm_flags`` added to them); returns at once
    (base URL, process), before it is up (:func:`wait_until_up`). Its log is ``d/server.log``."""
    (d / "policies.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    port = free_port()
    argv = ["-m", "guardit.cli", "serve", "--config", str(d / "policies.yaml"), "--",
            "--port", str(port), "--host", "127.0.0.1", "--max-num-seqs", "32", *vllm_flags]  # fmt: skip
    proc = launch(d, argv, {"GUARDIT_RUN_DIR": str(d / "run"), **env}, log="server.log")
    return f"http://127.0.0.1:{port}", proc


def wait_until_up(d: Path, base: str, proc: subprocess.Popen, timeout: float = 420) -> None:
    """Wait until a launched server's /health answers; its log's tail in the error if it exits or
    does not answer within ``timeout`` seconds."""
    import urllib.request

    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError("server exited:\n" + (d / "server.log").read_text()[-3000:])
        try:
            urllib.request.urlopen(base + "/health", timeout=2)
            return
        except Exception as e:
            if time.time() > deadline:
                proc.kill()
                raise RuntimeError("server did not start:\n" + (d / "server.log").read_text()[-3000:]) from e
            time.sleep(2)


def start_server(d: Path, cfg: dict, env: dict[str, str], *vllm_flags: str) -> tuple[str, subprocess.Popen]:
    """:func:`launch_server`, then :func:`wait_until_up`."""
    base, proc = launch_server(d, cfg, env, *vllm_flags)
    wait_until_up(d, base, proc)
    return base, proc


def launch_test_server(d: Path, packs_dir: Path, text_variants: Path) -> tuple[str, subprocess.Popen]:
    """test_vllm_server's server, compiled as `guardit serve` runs by default, launched in ``d`` on the
    second half of the cores with a 2 GiB KV cache (the live server may be up beside it)."""
    cfg = {
        "packs": {
            "harry-potter": str(packs_dir / "harry-potter"),
            "einstein": str(packs_dir / "einstein"),
            "hp-answer-open": str(text_variants / "hp-answer-open"),
        },
        "tenants": {
            "kids": {"api_key_env": "GUARDIT_TEST_KEY_KIDS", "mandatory": ["harry-potter"]},
            "open": {"api_key_env": "GUARDIT_TEST_KEY_OPEN"},
            "privacy": {
                "api_key_sha256": hashlib.sha256(SERVER_KEYS["privacy"].encode()).hexdigest(),
                "packs": ["einstein"],
            },
            "research": {"api_key_env": "GUARDIT_TEST_KEY_RESEARCH", "allow_client_alpha": True},
            "answer": {"api_key_env": "GUARDIT_TEST_KEY_ANSWER", "mandatory": ["hp-answer-open"]},
            "strict": {
                "api_key_env": "GUARDIT_TEST_KEY_STRICT",
                "mandatory": ["harry-potter"],
                "alpha": 0.5,
                "allow_client_alpha": True,
            },
        },
        "max_packs_per_request": 1,
        "admin": {"api_key_env": "GUARDIT_TEST_KEY_ADMIN"},
    }
    env = {
        "GUARDIT_TEST_KEY_KIDS": SERVER_KEYS["kids"],
        "GUARDIT_TEST_KEY_OPEN": SERVER_KEYS["open"],
        "GUARDIT_TEST_KEY_RESEARCH": SERVER_KEYS["research"],
        "GUARDIT_TEST_KEY_ANSWER": SERVER_KEYS["answer"],
        "GUARDIT_TEST_KEY_STRICT": SERVER_KEYS["strict"],
        "GUARDIT_TEST_KEY_ADMIN": SERVER_KEYS["admin"],
        ENV_CPU_KV: "2",
        **core_halves()[1],
    }
    return launch_server(d, cfg, env)


def stop_process(proc: subprocess.Popen) -> None:
    """Stop a launched process (a server, or one nobody waited for): terminate, then kill after 30 s.
    Nothing happens to one that has exited."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def launch(
    d: Path, argv: list[str], env: dict[str, str] | None = None, nice: int = 0, log: str | None = None
) -> subprocess.Popen:
    """This Python on ``argv`` in its own process (at niceness ``nice``), its output in
    ``d/stdout.log`` and ``d/stderr.log``, or both in ``d/<log>`` when ``log`` names one (files: a
    pipe read only at the end could stall a process that logs a lot); wait for it with
    :func:`finished`."""
    with contextlib.ExitStack() as files:
        out = files.enter_context(open(d / (log or "stdout.log"), "w"))
        err = subprocess.STDOUT if log else files.enter_context(open(d / "stderr.log", "w"))
        return subprocess.Popen(
            [sys.executable, *argv],
            stdout=out,
            stderr=err,
            env=dict(os.environ, **(env or {})),
            preexec_fn=(lambda: os.nice(nice)) if nice else None,
        )


def finished(proc: subprocess.Popen, d: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """The exit status and output of a process launched in ``d`` (waits for it; killed after
    ``timeout`` seconds)."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    out, err = ((d / f"{name}.log").read_text() for name in ("stdout", "stderr"))
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


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
