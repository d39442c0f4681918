"""``inference submit`` against a real ``ray start --head`` cluster with token authentication
(Ray 2.60's default), started here in its own temp dir, ports and process group with its own
token (``RAY_AUTH_TOKEN_PATH``), and stopped by killing what was started."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from inference.shards import read_results
from inference.submit import SubmitError, plan
from tests.conftest import REPO
from tests.integration.test_autoscale import _free_port, ray_head

INFERENCE = str(Path(sys.executable).with_name("inference"))


@dataclass
class Head:
    url: str
    token_path: Path
    env: dict[str, str]


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    base = Path(tempfile.mkdtemp(prefix="isb", dir="/tmp"))  # short: unix socket paths
    token_path = base / "token"
    token_path.write_text(secrets.token_hex(32))
    dashboard = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_path),
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    args = [
        f"--port={_free_port()}",
        "--num-cpus=1",  # one worker: the job is small, the machine shared
        "--num-gpus=0",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--ray-client-server-port={_free_port()}",
        "--disable-usage-stats",
    ]
    try:
        with ray_head(base, args, env):
            yield Head(f"http://127.0.0.1:{dashboard}", token_path, env)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _submit(head: Head, *args: str, env: dict[str, str] | None = None, timeout: int = 240):
    client_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    client_env.update(env if env is not None else {"RAY_AUTH_TOKEN_PATH": str(head.token_path)})
    return subprocess.run(
        [INFERENCE, "submit", *args, "--address", head.url],
        cwd=REPO,
        env=client_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _input(path: Path, count: int) -> list[str]:
    ids = [f"sub-{i:04d}" for i in range(count)]
    with path.open("w") as f:
        for cid in ids:
            body = {"messages": [{"role": "user", "content": f"say {cid}"}], "max_tokens": 6}
            line = {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions"}
            f.write(json.dumps({**line, "body": body}) + "\n")
    return ids


def test_submitted_job_succeeds_and_its_output_is_complete(head: Head, tmp_path: Path) -> None:
    ids = _input(tmp_path / "in.jsonl", 300)
    out = tmp_path / "out"
    proc = _submit(
        head,
        str(tmp_path / "in.jsonl"),
        "--config",
        "configs/tiny-cpu.yaml",  # inside the project: travels with the working_dir
        "--output",
        str(out),
        "--job-id",
        "submitted",
        "--follow",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Ray job: raysubmit_" in proc.stdout
    assert "ray job logs --address" in proc.stdout
    assert "SUCCEEDED" in proc.stderr
    assert '"summary"' in proc.stdout  # the job's own output, followed
    table = read_results(str(out / "submitted"))
    got = table.column("custom_id").to_pylist()
    assert sorted(got) == ids  # every item, none twice


def test_submit_without_a_token_says_how_to_get_one(head: Head, tmp_path: Path) -> None:
    _input(tmp_path / "in.jsonl", 1)
    home = tmp_path / "home"  # no ~/.ray/auth_token here
    home.mkdir()
    proc = _submit(
        head,
        str(tmp_path / "in.jsonl"),
        "--output",
        str(tmp_path / "out"),
        env={"HOME": str(home)},
        timeout=60,
    )
    assert proc.returncode == 2
    assert "needs a token" in proc.stderr and "RAY_AUTH_TOKEN" in proc.stderr
    assert "Ray job:" not in proc.stdout


def test_submit_with_a_wrong_token_is_refused(head: Head, tmp_path: Path) -> None:
    _input(tmp_path / "in.jsonl", 1)
    proc = _submit(
        head,
        str(tmp_path / "in.jsonl"),
        "--output",
        str(tmp_path / "out"),
        env={"RAY_AUTH_TOKEN": "not-the-token"},
        timeout=60,
    )
    assert proc.returncode == 2
    assert "refused the token" in proc.stderr


# ---------------------------------------------------------------------- planning (no Ray)
def test_plan_ships_the_project_and_keeps_paths_inside_it_relative(tmp_path: Path) -> None:
    job = plan(
        REPO / "examples" / "chat.jsonl",
        REPO / "configs" / "tiny-cpu.yaml",
        "http://head:8265",
        output="s3://bucket/results",
        job_id="j1",
        env={"MY_VAR": "1"},
    )
    assert job.entrypoint == (
        "inference run examples/chat.jsonl --config configs/tiny-cpu.yaml "
        "--output s3://bucket/results --job-id j1"
    )
    assert job.runtime_env["working_dir"] == str(REPO)
    assert ".venv" in job.runtime_env["excludes"] and "output" in job.runtime_env["excludes"]
    assert job.runtime_env["env_vars"]["MY_VAR"] == "1"
    assert not any(k.startswith("RAY_AUTH") for k in job.runtime_env["env_vars"])
    assert job.output == "s3://bucket/results/j1"
    assert job.notes == []


def test_plan_refuses_a_relative_output(tmp_path: Path) -> None:
    with pytest.raises(SubmitError, match="relative"):
        plan(REPO / "examples" / "chat.jsonl", REPO / "configs" / "tiny-cpu.yaml", "http://h:1")


def test_plan_refuses_a_missing_input_and_a_bad_config(tmp_path: Path) -> None:
    config = REPO / "configs" / "tiny-cpu.yaml"
    with pytest.raises(SubmitError, match="does not exist"):
        plan(tmp_path / "nope.jsonl", config, "http://h:1", output="/shared/out")
    bad = tmp_path / "bad.yaml"
    bad.write_text("batching: {max_batch_sise: 3}\n")
    with pytest.raises(SubmitError, match="max_batch_sise"):
        plan(REPO / "examples" / "chat.jsonl", bad, "http://h:1", output="/shared/out")


def test_plan_notes_an_input_outside_the_project(tmp_path: Path) -> None:
    _input(tmp_path / "in.jsonl", 1)
    job = plan(tmp_path / "in.jsonl", REPO / "configs" / "tiny-cpu.yaml", "http://h:1", output="/o")
    assert str(tmp_path / "in.jsonl") in job.entrypoint
    assert any("outside the project" in n for n in job.notes)
