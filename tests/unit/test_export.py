"""Choices (n > 1, logprobs) from an engine's Result to the Parquet row to OpenAI's response
shapes, and shards written before the ``choices`` column still read (no Ray)."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from inference.export import find_result, iter_rows, output_jsonl, response_body
from inference.schema import RESULT_SCHEMA, Choice, Request, Result, choices_column
from inference.shards import JobOutput, read_results, results_table


def _content(*tokens: tuple[str, float]) -> list[dict[str, Any]]:
    """A chat ``logprobs.content`` list: each token with itself and one alternative on top."""
    return [
        {
            "token": token,
            "logprob": logprob,
            "bytes": list(token.encode()),
            "top_logprobs": [
                {"token": token, "logprob": logprob, "bytes": list(token.encode())},
                {"token": "?", "logprob": -math.inf, "bytes": [63]},
            ],
        }
        for token, logprob in tokens
    ]


def _result() -> Result:
    return Result.from_choices(
        Request(task="chat", n=2, logprobs=True, top_logprobs=2),
        [
            Choice(0, "Hello", "stop", 2, _content(("Hel", -0.25), ("lo", -0.5))),
            Choice(1, "Hi", "length", 1, _content(("Hi", -1.0))),
        ],
        prompt_tokens=7,
    )


def _row(custom_id: str, result: Result | None = None) -> dict[str, Any]:
    result = result or Result(output_text=f"text {custom_id}", completion_tokens=2)
    return {
        "job_id": "j",
        "custom_id": custom_id,
        "output_text": result.output_text,
        "embedding": None,
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "model": "m",
        "attempts": 1,
        "worker": "w",
        "latency_ms": 1.5,
        "completed_at": datetime(2025, 1, 2, tzinfo=UTC),
        "choices": choices_column(result),
    }


def _stored_row() -> dict[str, Any]:
    """The row of :func:`_result` as a reader gets it back from a shard."""
    return results_table([_row("c", _result())]).to_pylist()[0]


def test_a_result_of_choices_takes_choice_zero_and_sums_the_tokens() -> None:
    result = _result()
    assert (result.output_text, result.finish_reason) == ("Hello", "stop")
    assert (result.prompt_tokens, result.completion_tokens) == (7, 3)
    assert result.choices is not None and len(result.choices) == 2


def test_choices_are_kept_only_when_n_or_logprobs_asked_for_them() -> None:
    plain = Result.from_choices(Request(task="chat"), [Choice(0, "a", "stop", 1)], 1)
    assert plain.choices is None and choices_column(plain) is None
    asked = Result.from_choices(Request(task="chat", logprobs=True), [Choice(0, "a", "stop", 1)], 1)
    assert asked.choices is not None


def test_choices_column_round_trips_through_a_shard_with_logprobs_as_json(tmp_path: Path) -> None:
    out = JobOutput(str(tmp_path), "j")
    out.makedirs()
    out.write_table(results_table([_row("c", _result())]), out.data_path(0))
    stored = read_results(out.base).to_pylist()[0]["choices"]
    fields = ("index", "text", "finish_reason", "completion_tokens")
    assert [tuple(c[f] for f in fields) for c in stored] == [
        (0, "Hello", "stop", 2),
        (1, "Hi", "length", 1),
    ]
    content = json.loads(stored[0]["logprobs"])
    assert [t["token"] for t in content] == ["Hel", "lo"]
    assert content[0]["top_logprobs"][1]["logprob"] == -9999.0  # -inf, as OpenAI writes it
    assert "Infinity" not in stored[0]["logprobs"]


def test_a_choice_without_logprobs_stores_null() -> None:
    result = Result.from_choices(
        Request(task="chat", n=2), [Choice(0, "a", "stop", 1), Choice(1, "b", "stop", 1)], 1
    )
    assert [c["logprobs"] for c in choices_column(result) or []] == [None, None]


def test_results_table_takes_rows_with_and_without_choices() -> None:
    without = _row("a")
    del without["choices"]
    table = results_table([without, _row("b"), _row("c", _result())])
    assert table.schema == RESULT_SCHEMA
    assert RESULT_SCHEMA.names[-2:] == ["choices", "url"]  # added columns come last
    choices = table.column("choices").to_pylist()
    assert choices[:2] == [None, None]
    assert [c["text"] for c in choices[2]] == ["Hello", "Hi"]


def test_a_chat_row_with_two_choices_exports_both_with_their_logprobs() -> None:
    body = response_body(_stored_row(), "/v1/chat/completions")
    completion = ChatCompletion.model_validate(body)
    assert [c.message.content for c in completion.choices] == ["Hello", "Hi"]
    assert [c.finish_reason for c in completion.choices] == ["stop", "length"]
    assert [c.index for c in completion.choices] == [0, 1]
    first = completion.choices[0].logprobs
    assert first is not None and first.content is not None
    assert [(t.token, t.logprob) for t in first.content] == [("Hel", -0.25), ("lo", -0.5)]
    assert first.content[0].top_logprobs[0].bytes == list(b"Hel")
    assert completion.usage is not None and completion.usage.completion_tokens == 3


def test_a_completions_row_exports_the_legacy_logprobs_shape() -> None:
    body = response_body(_stored_row(), "/v1/completions")
    completion = Completion.model_validate(body)
    assert [c.text for c in completion.choices] == ["Hello", "Hi"]
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.tokens == ["Hel", "lo"]
    assert logprobs.token_logprobs == [-0.25, -0.5]
    assert logprobs.top_logprobs == [{"Hel": -0.25, "?": -9999.0}, {"lo": -0.5, "?": -9999.0}]
    assert logprobs.text_offset == [0, 3]
    assert completion.choices[1].finish_reason == "length"


def test_a_row_without_choices_exports_one_choice_as_before() -> None:
    row = _row("a")
    chat = ChatCompletion.model_validate(response_body(row, "/v1/chat/completions"))
    assert [(c.index, c.message.content, c.logprobs) for c in chat.choices] == [(0, "text a", None)]
    legacy = Completion.model_validate(response_body(row, "/v1/completions"))
    assert [(c.text, c.logprobs) for c in legacy.choices] == [("text a", None)]


def test_n_choices_without_logprobs_export_null_logprobs() -> None:
    result = Result.from_choices(
        Request(task="chat", n=2), [Choice(0, "a", "stop", 1), Choice(1, "b", "stop", 1)], 1
    )
    body = response_body(results_table([_row("n", result)]).to_pylist()[0])
    assert [(c["message"]["content"], c["logprobs"]) for c in body["choices"]] == [
        ("a", None),
        ("b", None),
    ]
    ChatCompletion.model_validate(body)


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_a_shard_written_before_the_choices_column_still_reads(tmp_path: Path, fmt: str) -> None:
    old_schema = pa.schema([f for f in RESULT_SCHEMA if f.name not in ("choices", "url")])
    old_row = _row("old")
    del old_row["choices"]
    out = JobOutput(str(tmp_path), "j", fmt)
    out.makedirs()
    old_path = out.data_path(0)
    out.write_table(pa.Table.from_pylist([old_row], schema=old_schema), old_path)
    out.write_table(results_table([_row("new", _result())]), out.data_path(1))

    table = read_results(out.base)
    assert table.schema == RESULT_SCHEMA
    assert table.column("choices").to_pylist()[0] is None
    rows = {row["custom_id"]: row for row in iter_rows(out.base)}
    assert rows["old"]["choices"] is None and rows["old"]["output_text"] == "text old"
    assert len(rows["new"]["choices"]) == 2
    found = find_result(out, old_path, "old")
    assert found is not None and found["choices"] is None
    lines = [json.loads(line) for line in b"".join(output_jsonl(out.base)).splitlines()]
    assert [len(line["response"]["body"]["choices"]) for line in lines] == [1, 2]
