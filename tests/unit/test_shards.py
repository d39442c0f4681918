"""Output layout, path safety, formats and the manifest-aware reader (no Ray)."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from inference.errors import OutputError
from inference.shards import JobOutput, fill_shard_number, read_results, results_table


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
        tmp, final = out.tmp_path(n), out.data_path(n)
        out.write_table(results_table(rows(*ids)), tmp)
        assert read_results(out.base).num_rows == (0 if n == 0 else 2)  # invisible until published
        out.publish(tmp, final)
        assert Path(final).suffix == (".parquet" if fmt == "parquet" else ".arrow")
    table = read_results(out.base)
    assert sorted(table.column("custom_id").to_pylist()) == ["a", "b", "c"]
    assert list(Path(out.base, "_tmp").iterdir()) == []


def test_reader_honours_the_manifest(tmp_path: Path) -> None:
    out = JobOutput(str(tmp_path), "j")
    out.makedirs()
    committed = out.data_path(0)
    out.write_table(results_table(rows("a")), committed)
    out.write_table(results_table(rows("stray")), out.data_path(1))  # never committed
    name = f"data/{Path(committed).name}"
    out.write_json(out.manifest, {"shards": [{"file": name}]})
    assert read_results(out.base).column("custom_id").to_pylist() == ["a"]
    assert json.loads(Path(out.manifest).read_text())["shards"][0]["file"].startswith("data/")


def test_remove_temporaries_clears_leftovers(tmp_path: Path) -> None:
    out = JobOutput(str(tmp_path), "j")
    out.makedirs()
    Path(out.tmp_path(3)).write_bytes(b"half a parquet file")
    assert out.remove_temporaries() == 1
    assert list(Path(out.base, "_tmp").iterdir()) == []


def test_shard_names_are_unique_and_a_publish_never_replaces(tmp_path: Path) -> None:
    """A rerun of a job id against a fresh queue database numbers its shards from 0 again: the
    names still differ, and even a name that exists is never overwritten."""
    out = JobOutput(str(tmp_path), "j")
    out.makedirs()
    assert out.data_path(0) != out.data_path(0)
    first = out.data_path(0)
    tmp = out.tmp_path(0)
    out.write_table(results_table(rows("a")), tmp)
    out.publish(tmp, first)
    again = out.tmp_path(0)
    out.write_table(results_table(rows("b")), again)
    with pytest.raises(OutputError, match="never replaced"):
        out.publish(again, first)
    assert read_results(out.base).column("custom_id").to_pylist() == ["a"]
    assert Path(again).exists() and not Path(tmp).exists()  # the loser stays for the janitor
    assert out.remove_temporaries() == 1


def test_a_path_with_braces_gets_its_shard_number_only_in_the_file_name(tmp_path: Path) -> None:
    """The shard number is put in the name's ``{n}``; braces of the user's path stay as they
    are (``str.format`` on the whole path raised KeyError, killing the writer)."""
    root = tmp_path / "out{x}" / "{}"
    out = JobOutput(str(root), "j")
    template = out.data_path("{n}")
    path = fill_shard_number(template, 7)
    assert path.startswith(str(root) + "/j/data/part-000007-")
    assert "{x}" in path and "/{}/" in path


def test_shard_facts_read_rows_bytes_and_tokens_from_the_file(tmp_path: Path) -> None:
    out = JobOutput(str(tmp_path), "j")
    out.makedirs()
    path = out.data_path(0)
    nbytes = out.write_table(results_table(rows("a", "b", "c")), path)
    assert out.shard_facts(path) == (3, nbytes, {"prompt_tokens": 9.0, "completion_tokens": 6.0})


def test_on_an_object_store_only_committed_shards_are_ever_visible(tmp_path: Path) -> None:
    """S3 (a local moto server speaks its protocol): a shard is written under ``_tmp/`` and
    copied to its fresh name at the commit, so a reader listing ``data/`` before any manifest
    exists never sees a shard being written or one whose commit was refused."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        root = f"s3://k:s@bucket/out?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
        fs, _ = pafs.FileSystem.from_uri(root + "&allow_bucket_creation=true")
        fs.create_dir("bucket")
        out = JobOutput(root, "j")
        assert not out.is_local
        out.makedirs()
        tmp, final = out.tmp_path(0), out.data_path(0)
        out.write_table(results_table(rows("a", "b")), tmp)
        refused = out.tmp_path(1)
        out.write_table(results_table(rows("zombie")), refused)
        assert read_results(out.uri).num_rows == 0  # written, not committed: invisible
        out.publish(tmp, final)
        assert sorted(read_results(out.uri).column("custom_id").to_pylist()) == ["a", "b"]
        again = out.tmp_path(0)
        out.write_table(results_table(rows("c")), again)
        with pytest.raises(OutputError, match="never replaced"):
            out.publish(again, final)
        assert out.remove_temporaries() == 2  # the refused one and the loser
        assert sorted(read_results(out.uri).column("custom_id").to_pylist()) == ["a", "b"]
    finally:
        server.stop()


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_dead_letters_stream_into_one_file_a_page_at_a_time(tmp_path: Path, fmt: str) -> None:
    """What finalize does with a cancelled job of millions of items: each page of dead letters
    is a row group (or record batch) of the file, and only one page is in memory at a time."""
    import pyarrow.parquet as pq

    from inference.schema import ERROR_SCHEMA
    from inference.shards import errors_table

    def page(start: int) -> object:
        return errors_table(
            [
                {
                    "job_id": "j",
                    "custom_id": f"d{start + i}",
                    "error_kind": "permanent",
                    "error_code": "cancelled",
                    "message": "m",
                    "attempts": 0,
                    "last_attempt_at": datetime.now(UTC),
                }
                for i in range(10)
            ]
        )

    pulled: list[int] = []

    def pages():  # type: ignore[no-untyped-def]
        for start in range(0, 30, 10):
            pulled.append(start)
            yield page(start)

    out = JobOutput(str(tmp_path), "j", fmt)
    out.makedirs()
    tmp = out.scratch_path("errors")
    assert out.write_tables(pages(), ERROR_SCHEMA, tmp) == 30
    out.publish(tmp, out.errors_path(0), replace=True)
    table = read_results(out.base, errors=True)
    assert table.column("custom_id").to_pylist() == [f"d{i}" for i in range(30)]
    if fmt == "parquet":
        assert pq.ParquetFile(out.errors_path(0)).num_row_groups == 3
    assert out.write_tables(iter([]), ERROR_SCHEMA, out.scratch_path("e")) == 0
    assert list(Path(out.base, "_tmp").iterdir()) == []
