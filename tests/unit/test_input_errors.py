"""Bad input files: every problem is named by file, line (JSONL) or row (CSV/Parquet) and reason,
as an :class:`InputProblem` of the reader or one :class:`InputError` of the pre-pass, never an
exception of the parser underneath; ids are read as text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from inference.config import InputConfig, parse_config
from inference.errors import InputError
from inference.inputs import InputProblem, InputRecord, read_input
from inference.runner import check_input, validate_input

ID_TEXT = InputConfig(id_column="id")


def _read(path: Path, config: InputConfig = ID_TEXT, **kw: Any) -> list[InputRecord | InputProblem]:
    return list(read_input(path, config, "m", **kw))


def _problems(records: list[InputRecord | InputProblem]) -> list[InputProblem]:
    return [r for r in records if isinstance(r, InputProblem)]


def _ids(records: list[InputRecord | InputProblem]) -> list[str]:
    return [r.item_id for r in records if isinstance(r, InputRecord)]


def _openai(custom_id: str = "a", **body: Any) -> str:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}
    return json.dumps(
        {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
    )


# ---------------------------------------------------------------------------------- columns
def test_csv_without_the_id_column_is_one_problem_naming_the_header(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("key,text\na,hello\nb,hi\n")
    [problem] = _problems(_read(path))
    assert problem.where == "line 1"  # the header
    assert "'id'" in problem.reason and "key, text" in problem.reason


def test_csv_without_the_text_column_is_one_problem(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("id,body\na,hello\nb,hi\n")
    [problem] = _problems(_read(path))
    assert "'text'" in problem.reason and "not found" in problem.reason


def test_parquet_without_the_text_column_is_one_problem(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "body": ["x", "y"]}), path)
    [problem] = _problems(_read(path))
    assert "'text'" in problem.reason and "id, body" in problem.reason


def test_jsonl_row_without_a_column_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "a", "text": "x"}\n{"id": "b"}\n{"text": "y"}\n')
    problems = _problems(_read(path))
    assert [(p.where, "missing" in p.reason) for p in problems] == [
        ("line 2", True),
        ("line 3", True),
    ]
    assert "'text'" in problems[0].reason and "'id'" in problems[1].reason


# ---------------------------------------------------------------------------- CSV structure
def test_ragged_csv_rows_are_problems_named_by_row_and_line(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("id,text\na,hello\nb,hi,extra\nc\nd,fine\n")
    records = _read(path)
    assert _ids(records) == ["a", "d"]
    problems = _problems(records)
    assert [p.where for p in problems] == ["row 2 (line 3)", "row 3 (line 4)"]
    assert "3 fields" in problems[0].reason and "2" in problems[0].reason
    assert "1 field" in problems[1].reason


def test_csv_line_numbers_count_quoted_newlines(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text('id,text\na,"two\nlines"\nb,ok\n,empty id\n')
    records = _read(path)
    assert _ids(records) == ["a", "b"]
    [problem] = _problems(records)
    assert problem.where == "row 3 (line 5)"
    assert "empty" in problem.reason


def test_invalid_utf8_in_csv_names_the_row(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(b"id,text\na,fine\nb,hel\xff\xfelo\nc,ok\n")
    records = _read(path)
    assert _ids(records) == ["a", "c"]
    [problem] = _problems(records)
    assert problem.where == "row 2 (line 3)" and "UTF-8" in problem.reason


@pytest.mark.parametrize("openai", [False, True])
def test_invalid_utf8_in_jsonl_names_the_line(tmp_path: Path, openai: bool) -> None:
    path = tmp_path / "in.jsonl"
    good = _openai("a") if openai else '{"id": "a", "text": "x"}'
    bad = _openai("b").replace("hi", "h\udcffi") if openai else '{"id": "b", "text": "h\udcffi"}'
    path.write_bytes(good.encode() + b"\n" + bad.encode("utf-8", "surrogateescape") + b"\n" + b"\n")
    records = _read(path)
    assert _ids(records) == ["a"]
    [problem] = _problems(records)
    assert problem.where == "line 2" and "UTF-8" in problem.reason


def test_invalid_utf8_on_the_first_line_does_not_hide_plain_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"id": "a", "text": "h\xffi"}\n{"id": "b", "text": "ok"}\n')
    records = _read(path)
    assert _ids(records) == ["b"]
    assert [p.where for p in _problems(records)] == ["line 1"]


# ------------------------------------------------------------------------------- ids as text
def test_csv_ids_stay_text(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("id,text\n007,hello\n1e3,hi\n12,42\n")
    records = _read(path)
    assert _ids(records) == ["007", "1e3", "12"]
    third = records[2]
    assert isinstance(third, InputRecord) and '"42"' in third.payload  # text stays text too


def test_parquet_integer_ids_become_their_decimal_text(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": pa.array([7, 10**12], pa.int64()), "text": ["a", "b"]}), path)
    assert _ids(_read(path)) == ["7", "1000000000000"]


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        (pa.array([1.0, 2.5]), "float"),
        (pa.array([{"a": 1}, {"a": 2}]), "dict"),
        (pa.array([True, False]), "bool"),
    ],
)
def test_parquet_ids_of_another_type_are_problems(
    tmp_path: Path, ids: pa.Array, expected: str
) -> None:
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ids, "text": ["a", "b"]}), path)
    problems = _problems(_read(path))
    assert [p.where for p in problems] == ["row 1", "row 2"]
    assert "must be text or an integer" in problems[0].reason and expected in problems[0].reason


def test_null_and_empty_ids_are_problems_naming_the_row(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["a", None, ""], "text": ["x", "y", "z"]}), path)
    records = _read(path)
    assert _ids(records) == ["a"]
    problems = _problems(records)
    assert [p.where for p in problems] == ["row 2", "row 3"]
    assert "null" in problems[0].reason and "empty" in problems[1].reason


def test_jsonl_ids_must_be_text_or_integers(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    rows = [{"id": 7, "text": "x"}, {"id": 2.5, "text": "x"}, {"id": None, "text": "x"}]
    rows += [{"id": ["a"], "text": "x"}, {"id": "b", "text": 5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = _read(path)
    assert _ids(records) == ["7"]
    problems = _problems(records)
    assert [p.where for p in problems] == ["line 2", "line 3", "line 4", "line 5"]
    assert "float" in problems[0].reason and "null" in problems[1].reason
    assert "list" in problems[2].reason
    assert "'text'" in problems[3].reason and "int" in problems[3].reason


def test_a_repeated_id_is_a_problem_of_the_repeat(tmp_path: Path) -> None:
    """Not a silent dedup: with on_invalid reject the job stops, with skip the first stays."""
    path = tmp_path / "in.csv"
    path.write_text("id,text\na,x\nb,y\na,z\n")
    records = _read(path)
    assert _ids(records) == ["a", "b"]
    [problem] = _problems(records)
    assert problem.where == "row 3 (line 4)"
    assert "duplicate id 'a'" in problem.reason
    path = tmp_path / "in.jsonl"
    path.write_text(_openai("a") + "\n" + _openai("a") + "\n")
    [problem] = _problems(_read(path))
    assert problem.where == "line 2" and "duplicate custom_id 'a'" in problem.reason


# ------------------------------------------------------------------------- types and sizes
@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"max_tokens": "many"}, "max_tokens"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "content"),
        ({"temperature": "hot"}, "temperature"),
    ],
)
def test_wrongly_typed_openai_fields_name_the_line_and_field(
    tmp_path: Path, body: dict[str, Any], reason: str
) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(_openai("a") + "\n" + _openai("b", **body) + "\n")
    [problem] = _problems(_read(path))
    assert problem.where == "line 2" and reason in problem.reason


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet", "openai.jsonl"])
def test_an_item_over_max_item_bytes_is_a_problem(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"in.{suffix}"
    big = "x" * 5000
    if suffix == "openai.jsonl":
        path.write_text(_openai("a") + "\n" + _openai("b").replace('"hi"', f'"{big}"') + "\n")
    elif suffix == "jsonl":
        path.write_text('{"id": "a", "text": "x"}\n' + json.dumps({"id": "b", "text": big}) + "\n")
    elif suffix == "csv":
        path.write_text(f"id,text\na,x\nb,{big}\n")
    else:
        pq.write_table(pa.table({"id": ["a", "b"], "text": ["x", big]}), path)
    records = _read(path, max_item_bytes=4096)
    assert _ids(records) == ["a"]
    [problem] = _problems(records)
    assert problem.where in ("line 2", "row 2", "row 2 (line 3)")
    assert "max_item_bytes" in problem.reason and "4096" in problem.reason
    assert _ids(_read(path)) == ["a", "b"]  # no limit given: not checked here


def test_a_file_that_is_not_parquet_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    path.write_text("id,text\na,b\n")
    with pytest.raises(InputError, match=r"in\.parquet"):
        _read(path)


# ---------------------------------------------------------------------------- the pre-pass
def test_the_pre_pass_names_the_file_row_and_reason_in_one_error(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("id,text\na,x\nb,y,z\n")
    config = parse_config({"input": {"id_column": "id"}})
    with pytest.raises(InputError) as info:
        check_input(path, config)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and "row 2 (line 3)" in message and "3 fields" in message
    assert "nothing was enqueued" in message


def test_the_pre_pass_counts_every_problem_and_keeps_only_the_first(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(f'{{"id": {i}.5, "text": "x"}}\n' for i in range(1000)))
    config = parse_config({"input": {"id_column": "id"}})
    good, problems, count = validate_input(path, config)
    assert (good, count) == ({}, 1000)
    assert len(problems) <= 20
    with pytest.raises(InputError, match=r"(?s)1000 invalid lines.*and 980 more"):
        check_input(path, config)


def test_the_pre_pass_checks_the_queue_s_item_size(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(
        _openai("a") + "\n" + _openai("b").replace('"hi"', '"' + "y" * 600 + '"') + "\n"
    )
    config = parse_config({"queue": {"max_item_bytes": 512}})
    with pytest.raises(InputError, match=r"line 2: .*max_item_bytes"):
        check_input(path, config)


def test_skip_mode_passes_the_good_records(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("id,text\na,x\nb,y,z\nc,w\n")
    config = parse_config({"input": {"id_column": "id", "on_invalid": "skip"}})
    good, problems, count = check_input(path, config)
    assert (sum(good.values()), count) == (2, 1)
    assert problems[0].where == "row 2 (line 3)"


def test_submit_checks_the_input_before_submitting(tmp_path: Path) -> None:
    from inference.config import load_config
    from inference.submit import SubmitError, plan
    from tests.conftest import REPO

    config = tmp_path / "c.yaml"
    config.write_text((REPO / "configs/tiny-cpu.yaml").read_text() + "input:\n  id_column: id\n")
    load_config(config)
    path = tmp_path / "in.csv"
    path.write_text("id,text\na,x\n,y\n")
    with pytest.raises(SubmitError, match=r"in\.csv: row 2 \(line 3\): id .*empty"):
        plan(path, config, "http://h:1", output="/shared/out")


def test_bad_csv_quoting_is_a_problem_of_its_row_and_the_rest_is_read(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text('id,text\na,"x"y\nb,ok\nc,"never closed\nd,z\n')
    records = _read(path)
    assert _ids(records) == ["b"]
    problems = _problems(records)
    assert [p.where for p in problems] == ["row 1 (line 2)", "row 3 (line 4)"]
    assert all("unreadable CSV" in p.reason for p in problems)
