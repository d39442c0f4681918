"""``inference submit``: run ``inference run`` on a remote Ray cluster as a Ray job.

The job's ``runtime_env`` ships this project (``working_dir``: the source checkout, without
``.venv``, outputs and caches), so the cluster runs the code you submit, over the package its
image has installed. Paths inside the project travel with it; the input and config may also be
absolute paths the head node can read (a shared file system). The output must be a place every
node reaches: an absolute path on a shared file system or an object store URI.

Ray 2.60 turns token authentication on for ``ray start`` clusters. The token is read the way
Ray reads it (``RAY_AUTH_TOKEN``, the file named by ``RAY_AUTH_TOKEN_PATH``, then
``~/.ray/auth_token``) and sent as ``Authorization: Bearer <token>`` on every Jobs API call; it
is never put in the job's environment.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inference.config import load_config
from inference.errors import ConfigError, InferenceError, InputError
from inference.runner import check_input, default_job_id

EXCLUDES = [
    ".venv",
    "venv",
    "output",
    ".git",
    "**/__pycache__",
    "*.pyc",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    "*.egg-info",
    "build",
    "dist",
]
JOB_ENV = {
    "PYTHONUNBUFFERED": "1",  # logs reach `ray job logs` as they are written
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",  # models are never downloaded
}
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(InferenceError):
    """The job could not be submitted or followed (address, authentication, paths)."""


@dataclass
class Submission:
    submission_id: str  # Ray's job id (raysubmit_...)
    job_id: str  # the inference job id: results under <output>/<job_id>/
    address: str
    entrypoint: str
    output: str
    runtime_env: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def follow_hint(self) -> str:
        return f"ray job logs --address {self.address} --follow {self.submission_id}"


def auth_token() -> str | None:
    """The Ray cluster token, found where Ray looks for it; None when there is none."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    candidates = [Path(named).expanduser()] if named else []
    candidates.append(Path.home() / ".ray" / "auth_token")
    for path in candidates:
        try:
            token = path.read_text().strip()
        except OSError:
            if path == candidates[0] and named:
                raise SubmitError(f"RAY_AUTH_TOKEN_PATH={named} cannot be read") from None
            continue
        if token:
            return token
    return None


def project_dir() -> Path | None:
    """The source checkout this package runs from (it has ``pyproject.toml``), if any."""
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file() and (root / "inference").is_dir():
        return root
    return None


def _is_uri(text: str) -> bool:
    return "://" in text


def _job_path(path: Path, project: Path | None, notes: list[str], what: str) -> str:
    """How the job reaches a local file: relative inside the shipped project, else absolute."""
    resolved = path.expanduser().resolve()
    if not resolved.is_file():
        raise SubmitError(f"{what} {path} does not exist")
    if project is not None and resolved.is_relative_to(project):
        return str(resolved.relative_to(project))
    notes.append(
        f"{what} {resolved} is outside the project folder: the job reads it at that path on "
        "the head node (a shared file system)"
    )
    return str(resolved)


def _output_root(output: str | None, configured: str) -> str:
    root = output or configured
    if _is_uri(root) or Path(root).expanduser().is_absolute():
        return root if _is_uri(root) else str(Path(root).expanduser())
    raise SubmitError(
        f"output {root!r} is relative: on the cluster it would land in the job's temporary "
        "folder. Pass --output with an absolute path every node reaches (a shared file system) "
        "or an object store URI (s3://, gs://)"
    )


def plan(
    input_path: Path,
    config_path: Path,
    address: str,
    *,
    output: str | None = None,
    job_id: str | None = None,
    env: dict[str, str] | None = None,
    project: Path | None = None,
) -> Submission:
    """Check everything that can be checked here and build the job; submits nothing."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        raise SubmitError(str(exc)) from None
    project = project if project is not None else project_dir()
    notes: list[str] = []
    job_input = _job_path(input_path, project, notes, "input")
    try:  # the job's own pre-pass, here: a bad line or row is named before anything is sent
        check_input(input_path.expanduser(), config)
    except InputError as exc:
        raise SubmitError(str(exc)) from None
    job_config = _job_path(config_path, project, notes, "config")
    root = _output_root(output, config.output.path)
    job_id = job_id or default_job_id(input_path)
    argv = ["inference", "run", job_input, "--config", job_config, "--output", root]
    entrypoint = shlex.join([*argv, "--job-id", job_id])
    runtime_env: dict[str, Any] = {"env_vars": {**JOB_ENV, **(env or {})}}
    if project is not None:
        excludes = list(EXCLUDES)
        if not _is_uri(root) and Path(root).resolve().is_relative_to(project):
            excludes.append(str(Path(root).resolve().relative_to(project)))
        runtime_env["working_dir"] = str(project)
        runtime_env["excludes"] = excludes
    else:
        notes.append("no source checkout found: the job runs the package the cluster has")
    return Submission(
        submission_id="",
        job_id=job_id,
        address=address,
        entrypoint=entrypoint,
        output=f"{root.rstrip('/')}/{job_id}",
        runtime_env=runtime_env,
        notes=notes,
    )


def client(address: str) -> Any:
    """A ``JobSubmissionClient`` for ``address``, authenticated when a token is found."""
    from ray.job_submission import JobSubmissionClient

    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except _api_errors() as exc:
        raise SubmitError(_explain(address, exc, token is not None)) from None


def _api_errors() -> tuple[type[Exception], ...]:
    """What the Jobs SDK raises for a refused or failed call (authentication included)."""
    from ray.exceptions import RayError

    return (OSError, RuntimeError, ValueError, RayError)


def _explain(address: str, exc: Exception, had_token: bool) -> str:
    text = str(exc)
    if "401" in text or "403" in text or "Authentication" in text:
        if had_token:
            return (
                f"the Ray cluster at {address} refused the token: use the head node's "
                "~/.ray/auth_token (RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)"
            )
        return (
            f"the Ray cluster at {address} needs a token: set RAY_AUTH_TOKEN, or "
            "RAY_AUTH_TOKEN_PATH to a file holding it (the head node's ~/.ray/auth_token)"
        )
    return f"cannot reach the Ray Jobs API at {address}: {text.splitlines()[0] if text else exc}"


def submit_job(submission: Submission, jobs: Any | None = None) -> Submission:
    """Submit the planned job; fills in ``submission_id``."""
    jobs = jobs or client(submission.address)
    try:
        submission.submission_id = jobs.submit_job(
            entrypoint=submission.entrypoint,
            runtime_env=submission.runtime_env,
            metadata={"inference_job_id": submission.job_id, "output": submission.output},
        )
    except _api_errors() as exc:
        raise SubmitError(_explain(submission.address, exc, auth_token() is not None)) from None
    return submission


def follow_job(
    submission: Submission, jobs: Any | None = None, write: Callable[[str], Any] | None = None
) -> str:
    """Stream the job's logs until it ends; returns its final status (``SUCCEEDED``...)."""
    jobs = jobs or client(submission.address)
    write = write or sys.stdout.write

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(submission.submission_id):
            write(chunk)

    try:
        asyncio.run(tail())
    except RuntimeError as exc:  # the stream closed early: the status still tells
        write(f"\n(log stream ended: {exc})\n")
    return wait(submission, jobs)


def wait(submission: Submission, jobs: Any | None = None, poll_s: float = 1.0) -> str:
    """Wait for the job to end; returns its final status."""
    jobs = jobs or client(submission.address)
    while True:
        status = str(jobs.get_job_status(submission.submission_id)).rsplit(".", 1)[-1]
        if status in TERMINAL:
            return status
        time.sleep(poll_s)
