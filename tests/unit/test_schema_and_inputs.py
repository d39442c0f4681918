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


# ---------------------------------------------------------------- sampling fields vLLM serves
def _chat(**body: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "x"}], **body}


def test_penalties_logprobs_and_response_format_are_parsed_from_a_chat_request() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    spec: dict[str, Any] = {"name": "answer-1", "schema": schema}
    r = parse_request(
        "/v1/chat/completions",
        _chat(
            presence_penalty=1.5,
            frequency_penalty=-0.5,
            logprobs=True,
            top_logprobs=3,
            response_format={"type": "json_schema", "json_schema": {**spec, "strict": True}},
        ),
    )
    assert (r.presence_penalty, r.frequency_penalty) == (1.5, -0.5)
    assert (r.logprobs, r.top_logprobs) == (True, 3)
    assert r.response_format == {
        "type": "json_schema",
        "json_schema": {"name": "answer-1", "schema": schema, "strict": True},
    }


def test_a_request_without_the_new_fields_gets_their_defaults() -> None:
    r = parse_request("/v1/chat/completions", _chat(logprobs=False))
    assert (r.presence_penalty, r.frequency_penalty, r.logprobs, r.top_logprobs) == (0, 0, 0, 0)
    assert r.response_format is None


def test_logprobs_without_top_logprobs_asks_for_the_sampled_token_only() -> None:
    r = parse_request("/v1/chat/completions", _chat(logprobs=True))
    assert (r.logprobs, r.top_logprobs) == (True, 0)


@pytest.mark.parametrize(
    ("legacy", "expected"),
    [(0, (True, 0)), (5, (True, 5)), (None, (False, 0)), (False, (False, 0))],
)
def test_legacy_completions_logprobs_integer_means_top_n(
    legacy: int | bool | None, expected: tuple[bool, int]
) -> None:
    r = parse_request("/v1/completions", {"prompt": "x", "logprobs": legacy})
    assert (r.logprobs, r.top_logprobs) == expected


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (_chat(presence_penalty=2.5), r"body\.presence_penalty must be between -2\.0 and 2\.0"),
        (_chat(frequency_penalty="high"), r"body\.frequency_penalty must be a number"),
        (_chat(frequency_penalty=True), r"body\.frequency_penalty must be a number"),
        (_chat(logprobs=1), r"body\.logprobs must be a boolean"),
        (_chat(logprobs=True, top_logprobs=21), r"body\.top_logprobs must be between 0 and 20"),
        (_chat(logprobs=True, top_logprobs=2.0), r"body\.top_logprobs must be an integer"),
        (_chat(top_logprobs=2), r"body\.top_logprobs requires body\.logprobs: true"),
        (_chat(logprobs=False, top_logprobs=0), r"body\.top_logprobs requires body\.logprobs"),
        (_chat(response_format="json"), r"body\.response_format must be an object"),
        (_chat(response_format={"type": "yaml"}), r"body\.response_format\.type must be text"),
        (
            _chat(response_format={"type": "json_object", "schema": {}}),
            r"body\.response_format\.schema is not a known field",
        ),
        (
            _chat(response_format={"type": "json_schema"}),
            r"body\.response_format\.json_schema must be an object",
        ),
        (
            _chat(response_format={"type": "json_schema", "json_schema": {"schema": {}}}),
            r"body\.response_format\.json_schema\.name must be 1 to 64",
        ),
        (
            _chat(
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "has space", "schema": {}},
                }
            ),
            r"body\.response_format\.json_schema\.name",
        ),
        (
            _chat(
                response_format={"type": "json_schema", "json_schema": {"name": "a" * 65}},
            ),
            r"body\.response_format\.json_schema\.name",
        ),
        (
            _chat(response_format={"type": "json_schema", "json_schema": {"name": "ok\n"}}),
            r"body\.response_format\.json_schema\.name",
        ),
        (
            _chat(response_format={"type": "json_schema", "json_schema": {"name": "a"}}),
            r"body\.response_format\.json_schema\.schema must be an object",
        ),
        (
            _chat(
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "a", "schema": [{"type": "string"}]},
                }
            ),
            r"body\.response_format\.json_schema\.schema must be an object",
        ),
        (
            _chat(
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "a", "schema": {}, "strict": "yes"},
                }
            ),
            r"body\.response_format\.json_schema\.strict must be a boolean",
        ),
        (
            _chat(
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "a", "schema": {}, "examples": []},
                }
            ),
            r"body\.response_format\.json_schema\.examples is not a known field",
        ),
        (
            _chat(
                response_format={
                    "type": "json_schema",
                    "json_schema": {
                        "name": "a",
                        "schema": {"type": "object", "properties": {"a": {"type": "strin"}}},
                    },
                }
            ),
            r"body\.response_format\.json_schema\.schema is not a valid JSON Schema: .*"
            r"\$\.properties\.a\.type",
        ),
        (
            _chat(
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "a", "schema": {"type": "string", "pattern": "("}},
                }
            ),
            r"body\.response_format\.json_schema\.schema is not a valid JSON Schema",
        ),
        ({"prompt": "x", "logprobs": 6}, r"body\.logprobs must be an integer between 0 and 5"),
        ({"prompt": "x", "logprobs": True}, r"body\.logprobs must be an integer between 0 and 5"),
        ({"prompt": "x", "presence_penalty": -3}, r"body\.presence_penalty must be between"),
    ],
)
def test_bad_sampling_fields_are_refused_naming_the_field(
    body: dict[str, Any], message: str
) -> None:
    url = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    with pytest.raises(PermanentError, match=message) as info:
        parse_request(url, body)
    assert info.value.code == "invalid_request"


@pytest.mark.parametrize(
    ("url", "body", "field"),
    [
        ("/v1/completions", {"prompt": "x", "top_logprobs": 2}, "body.top_logprobs"),
        (
            "/v1/completions",
            {"prompt": "x", "response_format": {"type": "json_object"}},
            "body.response_format",
        ),
        ("/v1/chat/completions", _chat(logit_bias={"1": 5}), "body.logit_bias"),
        ("/v1/chat/completions", _chat(stream=True), "body.stream"),
    ],
)
def test_fields_no_engine_here_serves_at_that_endpoint_are_unsupported(
    url: str, body: dict[str, Any], field: str
) -> None:
    with pytest.raises(PermanentError, match=field.replace(".", r"\.")) as info:
        parse_request(url, body)
    assert info.value.code == "unsupported"


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ({"type": "text"}, None),
        ({"type": "json_object"}, {"type": "json_object"}),
        (
            {
                "type": "json_schema",
                "json_schema": {"name": "x", "description": "d", "schema": {}, "strict": None},
            },
            {"type": "json_schema", "json_schema": {"name": "x", "description": "d", "schema": {}}},
        ),
    ],
)
def test_response_format_is_normalised(given: dict[str, Any], stored: Any) -> None:
    r = parse_request("/v1/chat/completions", _chat(response_format=given))
    assert r.response_format == stored


def test_a_request_with_a_response_format_survives_the_queue_payload() -> None:
    body = _chat(
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "n", "schema": {"type": "object"}},
        },
        logprobs=True,
        top_logprobs=1,
    )
    direct = parse_request("/v1/chat/completions", body)
    assert decode_payload(encode_payload("/v1/chat/completions", body)) == direct


def test_the_http_layer_refuses_a_bad_schema_with_its_param() -> None:
    from inference.api.items import ItemRejected, check_item
    from inference.config import ApiConfig

    body = _chat(response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": 3}})
    with pytest.raises(ItemRejected) as info:
        check_item("/v1/chat/completions", body, ApiConfig())
    assert info.value.param == "body.response_format.json_schema.schema"


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"n": 2}, "body.n"),
        ({"logprobs": True}, "body.logprobs"),
        (
            {"response_format": {"type": "json_object"}},
            "body.response_format (body.text.format on /v1/responses) needs engine.kind",
        ),
        ({"presence_penalty": 0.1}, "body.presence_penalty"),
        ({"frequency_penalty": -0.1}, "body.frequency_penalty"),
    ],
)
def test_the_transformers_engine_names_what_it_cannot_honour(
    fields: dict[str, Any], named: str
) -> None:
    from inference.engines.hf import _unsupported_reason

    assert _unsupported_reason(parse_request("/v1/chat/completions", _chat())) is None
    reason = _unsupported_reason(parse_request("/v1/chat/completions", _chat(**fields)))
    assert reason is not None and reason.startswith(named) and "engine.kind vllm" in reason
