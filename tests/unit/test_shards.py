"""Output layout, path safety, formats and the manifest-aware reader (no Ray)."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from inference.errors import OutputError
from inference.shards import JobOutput, read_results, results_table


def rows(*ids: str) -> list[dict]:
    now = datetime.now(UTC)
    return [
        {
            "job_id": "j",
            "custom_id": i,
            "output_text": f"text {i}",
            "embedding": None,
            "finish_reason": "stop",
            "prompt_tokens": 3,
            "completion_tokens": 2,
            "model": "m",
            "attempts": 1,
            "worker": "w",
            "latency_ms": 1.5,
            "completed_at": now,
        }
        for i in ids
    ]


@pytest.mark.parametrize("job_id", ["..", "../escape", "/abs", "a/b", "", "x" * 200])
def test_job_ids_cannot_escape_the_output_root(tmp_path: Path, job_id: str) -> None:
    with pytest.raises(OutputError):
        JobOutput(str(tmp_path), job_id)


def test_paths_outside_the_job_folder_are_refused(tmp_path: Path) -> None:
    out = JobOutput(str(tmp_path), "j")
    out.makedirs()
    with pytest.raises(OutputError, match="outside"):
        out.write_table(results_table(rows("a")), f"{out.base}/../other/x.parquet")
    with pytest.raises(OutputError, match="outside"):
        out.write_table(results_table(rows("a")), "/etc/x.parquet")


def test_a_symlink_leading_out_of_the_root_is_refused(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    (root / "j").mkdir()
    os.symlink(elsewhere, root / "j" / "data")
    out = JobOutput(str(root), "j")
    with pytest.raises(OutputError, match="symlink"):
        out.write_table(results_table(rows("a")), out.data_path(0))
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_both_formats_share_schema_commit_and_reader(tmp_path: Path, fmt: str) -> None:
    out = JobOutput(str(tmp_path), "j", fmt)
    out.makedirs()
    for n, ids in enumerate([("a", "b"), ("c",)]):
        tmp = out.tmp_path(n)
        out.write_table(results_table(rows(*ids)), tmp)
        assert not Path(out.data_path(n)).exists()  # invisible until published
        out.publish(tmp, out.data_path(n))
    table = read_results(out.base)
    assert sorted(table.column("custom_id").to_pylist()) == ["a", "b", "c"]
    assert Path(out.data_path(0)).suffix == (".parquet" if fmt == "parquet" else ".arrow")
    assert list(Path(out.base, "_tmp").iterdir()) == []


def test_reader_honours_the_manifest(tmp_path: Path) -> None:
    out = JobOutput(str(tmp_path), "j")
    out.makedirs()
    out.write_table(results_table(rows("a")), out.data_path(0))
    out.write_table(results_table(rows("stray")), out.data_path(1))  # never committed
    out.write_json(out.manifest, {"shards": [{"file": "data/part-000000.parquet"}]})
    assert read_results(out.base).column("custom_id").to_pylist() == ["a"]
    assert json.loads(Path(out.manifest).read_text())["shards"][0]["file"].startswith("data/")


def test_remove_temporaries_clears_leftovers(tmp_path: Path) -> None:
    out = JobOutput(str(tmp_path), "j")
    out.makedirs()
    Path(out.tmp_path(3)).write_bytes(b"half a parquet file")
    assert out.remove_temporaries() == 1
    assert list(Path(out.base, "_tmp").iterdir()) == []
