import json
from pathlib import Path
from typing import Any

import pytest

from inference.config import InputConfig
from inference.errors import PermanentError
from inference.inputs import InputProblem, InputRecord, read_input
from inference.schema import decode_payload, encode_payload, parse_request


def _line(custom_id: str = "a", **body: object) -> str:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}
    return json.dumps(
        {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
    )


def test_chat_request_is_parsed_with_sampling_parameters() -> None:
    r = parse_request(
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 5,
            "temperature": 0,
            "top_p": 0.5,
            "stop": "\n",
            "seed": 3,
        },
    )
    assert (r.task, r.max_tokens, r.temperature, r.top_p, r.stop, r.seed) == (
        "chat",
        5,
        0.0,
        0.5,
        ("\n",),
        3,
    )


@pytest.mark.parametrize(
    ("url", "body", "message"),
    [
        ("/v1/nope", {}, "url must be one of"),
        ("/v1/chat/completions", {"messages": []}, "messages must be a non-empty list"),
        ("/v1/chat/completions", {"messages": [{"role": "bot", "content": "x"}]}, "role"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            "max_tokens",
        ),
        ("/v1/completions", {"prompt": 3}, "prompt must be a string"),
        ("/v1/embeddings", {"input": ""}, "input must not be empty"),
    ],
)
def test_malformed_requests_name_the_field(url: str, body: dict, message: str) -> None:
    with pytest.raises(PermanentError, match=message) as info:
        parse_request(url, body)
    assert info.value.code == "invalid_request"


def test_unsupported_feature_is_refused_not_ignored() -> None:
    with pytest.raises(PermanentError) as info:
        parse_request(
            "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{}]}
        )
    assert info.value.code == "unsupported"


def test_reader_reports_bad_lines_with_numbers_and_keeps_good_ones(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(
        "\n".join(
            [
                _line("a"),
                "{not json",
                _line("b", max_tokens="many"),
                _line("a"),
                _line("c", tools=[{"type": "function"}]),
                _line("bad id!"),
            ]
        )
        + "\n"
    )
    records = list(read_input(path, InputConfig(), "m"))
    problems = {r.line: r.reason for r in records if isinstance(r, InputProblem)}
    good = [r.item_id for r in records if isinstance(r, InputRecord)]
    assert good == ["a", "c"]  # c is valid but unsupported: accepted, dead-lettered later
    assert set(problems) == {2, 3, 4, 6}
    assert "invalid JSON" in problems[2]
    assert "max_tokens" in problems[3]
    assert "duplicate" in problems[4]
    assert "custom_id" in problems[6]


def test_plain_csv_rows_become_requests(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("id,text\nx1,hello there\nx2,general kenobi\n")
    config = InputConfig(id_column="id", prompt_template="Say: {text}", max_tokens=7)
    records = list(read_input(path, config, "tiny-llama"))
    assert [r.item_id for r in records if isinstance(r, InputRecord)] == ["x1", "x2"]
    first = records[0]
    assert isinstance(first, InputRecord)
    request = decode_payload(first.payload)
    assert request.messages[0]["content"] == "Say: hello there"
    assert request.max_tokens == 7


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16},
        {"b": [1, 2.5, 1e16, -0.0, True, None, {"z": 1, "a": {}}], "a": 'é☃\u2028\x00"\\'},
        {"n": 10**30, "x": float("nan"), "y": float("-inf"), "": []},
    ],
)
def test_a_payload_is_the_canonical_json_text_of_its_request(body: dict[str, Any]) -> None:
    """Payload equality decides duplicates against items already stored: the text must stay
    exactly json.dumps' canonical form, whatever encoder makes it."""
    payload = encode_payload("/v1/chat/completions", body)
    expected = {"url": "/v1/chat/completions", "body": body}
    assert payload == json.dumps(expected, sort_keys=True, separators=(",", ":"))
    assert payload == encode_payload("/v1/chat/completions", dict(reversed(body.items())))
