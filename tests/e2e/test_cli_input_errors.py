"""`inference run` on a bad input file: exit 2, one clear message naming the file, the line or
row and the reason, no traceback, nothing enqueued (the check runs before Ray starts)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO
from tests.e2e.test_cli import _line, _run


def _config(tmp_path: Path, extra: str = "") -> Path:
    config = tmp_path / "c.yaml"
    config.write_text((REPO / "configs/tiny-cpu.yaml").read_text() + extra)
    return config


def _bad_run(path: Path, config: Path, tmp_path: Path) -> str:
    out = tmp_path / "out"
    result = _run(
        "run",
        str(path),
        "--config",
        str(config),
        "--output",
        str(out),
        "--job-id",
        "bad",
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert str(path) in result.stderr
    assert "nothing was enqueued" in result.stderr
    assert not (out / "_queue").exists()  # no queue was created, so no item of the job
    assert (tmp_path / "ray_was_started").read_text() == "False"
    return result.stderr


@pytest.mark.parametrize("kind", ["ragged csv", "null parquet id", "bad utf-8 jsonl"])
def test_a_bad_plain_input_exits_2_naming_the_file_and_row(tmp_path: Path, kind: str) -> None:
    config = _config(tmp_path, "input:\n  id_column: id\n")
    if kind == "ragged csv":
        path = tmp_path / "in.csv"
        path.write_text("id,text\n007,hello\nb,hi,extra\n")
        where, reason = "row 2 (line 3)", "3 fields"
    elif kind == "null parquet id":
        path = tmp_path / "in.parquet"
        pq.write_table(pa.table({"id": ["a", None], "text": ["x", "y"]}), path)
        where, reason = "row 2", "null"
    else:
        path = tmp_path / "in.jsonl"
        path.write_bytes(b'{"id": "a", "text": "x"}\n{"id": "b", "text": "\xff"}\n')
        where, reason = "line 2", "UTF-8"
    stderr = _bad_run(path, config, tmp_path)
    assert where in stderr and reason in stderr


def test_an_item_over_the_queue_s_size_limit_exits_2_before_anything_is_enqueued(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path)
    config.write_text(config.read_text().replace("queue:\n", "queue:\n  max_item_bytes: 1024\n"))
    path = tmp_path / "in.jsonl"
    big = json.loads(_line("big"))
    big["body"]["messages"][0]["content"] = "z" * 2000
    path.write_text(_line("a") + "\n" + json.dumps(big) + "\n")
    stderr = _bad_run(path, config, tmp_path)
    assert "line 2" in stderr and "max_item_bytes" in stderr
