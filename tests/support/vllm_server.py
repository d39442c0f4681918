"""A real vLLM OpenAI-compatible server of the bundled tiny model, for tests and benchmarks.

``vllm_server(log_dir)`` starts ``python -m vllm.entrypoints.openai.api_server`` (vLLM's CPU
build in this venv) in a session of its own, waits until ``GET /v1/models`` answers, yields the
base URL (``http://127.0.0.1:PORT/v1``) and, on exit, terminates the whole session: the API
server and its ``VLLM::EngineCore`` child, SIGTERM first, SIGKILL after a grace period, and
waits until none of them is left. Start-up takes 30-70 s on the 2-core development VM.

The server's stdout and stderr (vLLM's log and uvicorn's access lines) go to
``log_dir/vllm-server-PORT.log``; a server that dies or does not answer within
``ready_timeout_s`` fails with the end of that log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models/tiny-llama"
SERVED_NAME = "tiny-llama"
READY_TIMEOUT_S = 300.0
STOP_GRACE_S = 20.0

# 1 GiB of KV cache: vLLM's CPU default would take a share of the machine's RAM.
DEFAULT_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


class ServerError(RuntimeError):
    """The server died before it was ready, or did not answer in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_command(port: int, extra_args: Sequence[str] = ()) -> list[str]:
    """The command line of the server on ``port``, serving the tiny model as ``tiny-llama``."""
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(MODEL),
        "--served-model-name",
        SERVED_NAME,
        "--dtype",
        "float32",
        "--enforce-eager",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra_args,
    ]


def session_pids(sid: int) -> list[int]:
    """Every live process of session ``sid`` (the server and the engine core it spawned)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def log_tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def wait_ready(base_url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    """Poll ``GET {base_url}/models`` until it answers 200; raise ServerError with the log's
    tail if the server exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise ServerError(
                f"vLLM server exited {proc.returncode} before it was ready; "
                f"the end of {log}:\n{log_tail(log)}"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/models", timeout=5).status_code == 200:
                return
        if time.monotonic() >= deadline:
            raise ServerError(
                f"vLLM server did not answer {base_url}/models within {timeout_s:.0f} s; "
                f"the end of {log}:\n{log_tail(log)}"
            )
        time.sleep(1)


def _signal_session(sid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(sid, sig)
    for pid in session_pids(sid):  # a child that left the group is still in the session
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_gone(sid: int, proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        proc.poll()  # reap the leader so it does not linger as a zombie
        if not session_pids(sid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def stop_session(proc: subprocess.Popen[bytes], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the session led by ``proc``, SIGKILL whatever is left after ``grace_s``, and
    wait until every process of it is gone."""
    sid = proc.pid
    _signal_session(sid, signal.SIGTERM)
    if _wait_gone(sid, proc, grace_s):
        return
    _signal_session(sid, signal.SIGKILL)
    if not _wait_gone(sid, proc, 30):
        raise ServerError(f"vLLM server session {sid} still has {session_pids(sid)} after SIGKILL")


@contextlib.contextmanager
def vllm_server(
    log_dir: Path,
    *,
    port: int | None = None,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> Iterator[str]:
    """Run the tiny model's vLLM server; yields its base URL, ``http://127.0.0.1:PORT/v1``.

    ``env`` is added to this process's environment (over ``VLLM_CPU_KVCACHE_SPACE=1``);
    ``extra_args`` go to the server's command line."""
    port = port or free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"vllm-server-{port}.log"
    full_env = {**os.environ, **DEFAULT_ENV, **(env or {})}
    base_url = f"http://127.0.0.1:{port}/v1"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            server_command(port, extra_args),
            cwd=REPO,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_ready(base_url, proc, log, ready_timeout_s)
        yield base_url
    finally:
        stop_session(proc)
