"""``/v1/responses`` bodies read as chat requests, refused fields named, and results shaped as
Responses objects that the official client's types accept (no Ray)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from inference.api.batch_input import check_batch_file
from inference.api.items import ItemRejected, check_item
from inference.config import ApiConfig, InputConfig, load_config
from inference.errors import PermanentError
from inference.export import output_jsonl, output_line, response_body
from inference.inputs import InputProblem, InputRecord, read_input
from inference.schema import (
    RESULT_SCHEMA,
    decode_item,
    encode_payload,
    parse_request,
)
from inference.shards import JobOutput, read_results, results_table

URL = "/v1/responses"
CONFIG = Path(__file__).parents[2] / "configs" / "tiny-cpu.yaml"


def _parse(**body: Any) -> Any:
    return parse_request(URL, {"model": "m", "input": "hi", **body})


def _refusal(code: str, **body: Any) -> PermanentError:
    with pytest.raises(PermanentError) as info:
        parse_request(URL, {"model": "m", "input": "hi", **body})
    assert info.value.code == code, info.value.message
    return info.value


# ------------------------------------------------------------------ parsing


def test_a_string_input_is_one_user_message_of_a_chat_request() -> None:
    r = _parse()
    assert (r.task, r.model, r.messages) == ("chat", "m", ({"role": "user", "content": "hi"},))
    assert r.max_tokens == 256  # chat's default


def test_instructions_are_a_leading_system_message() -> None:
    r = _parse(instructions="Be brief.")
    assert r.messages == (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    )
    assert _parse(instructions="").messages == ({"role": "user", "content": "hi"},)


def test_message_items_with_text_parts_become_chat_messages() -> None:
    r = _parse(
        input=[
            {"type": "message", "role": "developer", "content": "Answer in French."},
            {"role": "user", "content": [{"type": "input_text", "text": "Hello, "}]},
            {
                "type": "message",
                "id": "msg_1",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Bonjour", "annotations": []}],
            },
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "and "},
                    {"type": "input_text", "text": "goodbye?"},
                ],
            },
            {"role": "system", "content": "Be polite."},
        ]
    )
    assert r.messages == (
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hello, "},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": "and goodbye?"},
        {"role": "system", "content": "Be polite."},
    )


def test_sampling_fields_map_onto_the_chat_request() -> None:
    r = _parse(max_output_tokens=7, temperature=0, top_p=0.5, seed=3)
    assert (r.max_tokens, r.temperature, r.top_p, r.seed) == (7, 0.0, 0.5, 3)


def test_annotations_that_change_nothing_are_accepted() -> None:
    r = _parse(
        metadata={"team": "search"},
        store=False,
        user="u-1",
        safety_identifier="s",
        prompt_cache_key="k",
        tools=[],
        tool_choice="none",
        parallel_tool_calls=False,
        truncation="disabled",
        stream=False,
        background=False,
        include=[],
        service_tier="auto",
        text={"verbosity": "medium"},
    )
    assert r == _parse()


def test_a_json_schema_format_maps_onto_chats_response_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    r = _parse(
        text={
            "format": {
                "type": "json_schema",
                "name": "answer",
                "description": "An answer.",
                "schema": schema,
                "strict": True,
            }
        }
    )
    chat = parse_request(
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "answer",
                    "description": "An answer.",
                    "schema": schema,
                    "strict": True,
                },
            },
        },
    )
    assert r.response_format == chat.response_format
    assert r.response_format == {
        "type": "json_schema",
        "json_schema": {
            "name": "answer",
            "description": "An answer.",
            "strict": True,
            "schema": schema,
        },
    }


@pytest.mark.parametrize(
    ("given", "stored"),
    [({"type": "text"}, None), ({"type": "json_object"}, {"type": "json_object"})],
)
def test_text_and_json_object_formats(given: dict[str, Any], stored: Any) -> None:
    assert _parse(text={"format": given}).response_format == stored


def test_a_request_survives_the_queue_payload_with_its_url() -> None:
    body = {
        "model": "m",
        "instructions": "i",
        "input": [{"role": "user", "content": "x"}],
        "text": {"format": {"type": "json_object"}},
    }
    url, request = decode_item(encode_payload(URL, body))
    assert (url, request) == (URL, parse_request(URL, body))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tools": [{"type": "web_search"}]}, "body.tools is not supported on /v1/responses"),
        ({"tool_choice": "auto"}, "body.tool_choice is not supported on /v1/responses"),
        (
            {"parallel_tool_calls": True},
            "body.parallel_tool_calls is not supported on /v1/responses",
        ),
        ({"reasoning": {"effort": "low"}}, "body.reasoning is not supported on /v1/responses"),
        ({"background": True}, "body.background is not supported on /v1/responses"),
        (
            {"previous_response_id": "resp_1"},
            "body.previous_response_id is not supported on /v1/responses",
        ),
        ({"conversation": "conv_1"}, "body.conversation is not supported on /v1/responses"),
        (
            {"include": ["message.output_text.logprobs"]},
            "body.include is not supported on /v1/responses",
        ),
        ({"prompt": {"id": "pmpt_1"}}, "body.prompt is not supported on /v1/responses"),
        ({"stream": True}, "body.stream is not supported on /v1/responses"),
        ({"truncation": "auto"}, "body.truncation is not supported on /v1/responses"),
        ({"top_logprobs": 2}, "body.top_logprobs is not supported on /v1/responses"),
        ({"max_tool_calls": 3}, "body.max_tool_calls is not supported on /v1/responses"),
        ({"service_tier": "flex"}, "body.service_tier is not supported on /v1/responses"),
        ({"text": {"verbosity": "low"}}, "body.text.verbosity low is not supported"),
        (
            {
                "input": [
                    {
                        "role": "user",
                        "content": [{"type": "input_image", "image_url": "https://x/y.png"}],
                    }
                ]
            },
            "body.input[0].content[0]: input_image parts are not supported on /v1/responses",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "body.input[0].content[0]: input_file parts are not supported",
        ),
        (
            {
                "input": [
                    {"role": "user", "content": "x"},
                    {"type": "function_call_output", "call_id": "c", "output": "{}"},
                ]
            },
            "body.input[1].type 'function_call_output' is not supported on /v1/responses",
        ),
        (
            {"input": [{"type": "item_reference", "id": "msg_1"}]},
            "body.input[0].type 'item_reference' is not supported",
        ),
    ],
)
def test_what_no_engine_here_runs_is_refused_as_unsupported_naming_the_field(
    fields: dict[str, Any], message: str
) -> None:
    assert _refusal("unsupported", **fields).message.startswith(message)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"frequency_penalty": 0.5},
            "body.frequency_penalty is not a known field of /v1/responses",
        ),
        ({"messages": []}, "body.messages is not a known field"),
        ({"max_tokens": 5}, "body.max_tokens is not a known field"),
        ({"input": None}, "body.input must be a string or a non-empty list"),
        ({"input": []}, "body.input must be a string or a non-empty list"),
        ({"input": 3}, "body.input must be a string or a non-empty list"),
        ({"input": ["hi"]}, r"body.input[0] must be an object"),
        ({"input": [{"role": "bot", "content": "x"}]}, "body.input[0].role must be user"),
        ({"input": [{"role": "user", "content": 3}]}, "body.input[0].content must be a string"),
        ({"input": [{"role": "user", "content": "x", "name": "n"}]}, "body.input[0].name is not"),
        ({"input": [{"type": "mesage", "role": "user"}]}, "body.input[0].type must be message"),
        (
            {"input": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]},
            "body.input[0].content[0].type must be input_text or output_text",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_text"}]}]},
            "body.input[0].content[0].text must be a string",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "output_text", "text": "x"}]}]},
            "body.input[0].content[0]: output_text parts belong to assistant messages",
        ),
        ({"instructions": ["x"]}, "body.instructions must be a string"),
        ({"max_output_tokens": 0}, "body.max_output_tokens must be between 1"),
        ({"max_output_tokens": "5"}, "body.max_output_tokens must be an integer"),
        ({"temperature": 3}, "body.temperature must be between"),
        ({"top_p": "x"}, "body.top_p must be a number"),
        ({"seed": 1.5}, "body.seed must be an integer"),
        ({"model": 3}, "body.model must be a string"),
        ({"store": "yes"}, "body.store must be a boolean"),
        ({"user": 3}, "body.user must be a string"),
        ({"metadata": ["x"]}, "body.metadata must be an object"),
        ({"metadata": {"k": 3}}, "body.metadata['k'] must be a string"),
        ({"text": "json"}, "body.text must be an object"),
        ({"text": {"format": {"type": "xml"}}}, "body.text.format.type must be text"),
        ({"text": {"format": {"type": "text", "name": "n"}}}, "body.text.format.name is not"),
        (
            {"text": {"format": {"type": "json_schema", "schema": {}}}},
            "body.text.format.name must be 1 to 64",
        ),
        (
            {"text": {"format": {"type": "json_schema", "name": "n", "schema": {"type": 3}}}},
            "body.text.format.schema is not a valid JSON Schema",
        ),
        (
            {"text": {"format": {"type": "json_schema", "name": "n", "json_schema": {}}}},
            "body.text.format.json_schema is not a known field here",
        ),
    ],
)
def test_a_malformed_body_is_an_invalid_request_naming_the_field(
    fields: dict[str, Any], message: str
) -> None:
    assert _refusal("invalid_request", **fields).message.startswith(message)


def test_a_body_that_is_not_an_object_is_invalid() -> None:
    with pytest.raises(PermanentError, match="body must be a JSON object") as info:
        parse_request(URL, ["hi"])
    assert info.value.code == "invalid_request"


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)
_KEYS = st.sampled_from(["input", "instructions", "text", "metadata", "tools", "model", "type"])
_PARTS = st.fixed_dictionaries(
    {"type": st.sampled_from(["input_text", "output_text", "input_image", "message"]) | _JSON},
    optional={"text": _JSON, "role": _JSON},
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(_KEYS, _JSON | st.lists(_PARTS, max_size=2), max_size=4)
    | st.fixed_dictionaries(
        {
            "input": st.lists(
                st.fixed_dictionaries(
                    {"role": st.sampled_from(["user", "assistant"]) | _JSON},
                    optional={"content": st.lists(_PARTS, max_size=2) | _JSON, "type": _JSON},
                ),
                max_size=2,
            ),
            "text": st.fixed_dictionaries({}, optional={"format": _PARTS | _JSON}),
        }
    )
    | _JSON
)
@example({"input": [{"role": "user", "content": [{"type": []}]}]})  # an unhashable type
@example({"input": [{"type": {}}]})
def test_any_json_body_is_parsed_or_refused_with_a_permanent_error(body: Any) -> None:
    try:
        parse_request(URL, body)
    except PermanentError as exc:
        assert exc.code in ("invalid_request", "unsupported") and exc.message.startswith("body")


# ------------------------------------------------------------------ entry points


def test_the_http_check_caps_max_output_tokens_naming_it() -> None:
    api = ApiConfig()
    with pytest.raises(ItemRejected) as info:
        check_item(URL, {"input": "x", "max_output_tokens": api.max_tokens + 1}, api)
    assert info.value.param == "body.max_output_tokens"
    assert f"at most {api.max_tokens}" in info.value.message


def test_the_http_check_refuses_malformed_and_accepts_unsupported_bodies() -> None:
    api = ApiConfig()
    with pytest.raises(ItemRejected) as info:
        check_item(URL, {"input": [{"role": "user", "content": 3}]}, api)
    assert info.value.param == "body.input[0].content"
    accepted = check_item(URL, {"model": "m", "input": "x", "tools": [{"type": "x"}]}, api)
    assert accepted.model == "m"  # enqueued, and dead-lettered with its reason by the worker
    assert json.loads(accepted.payload)["url"] == URL


def _line(custom_id: str, **body: Any) -> str:
    return json.dumps(
        {"custom_id": custom_id, "method": "POST", "url": URL, "body": {"model": "m", **body}}
    )


def test_a_batch_file_of_responses_lines_is_checked_like_any_other(tmp_path: Path) -> None:
    config = load_config(CONFIG)
    model = config.engine.model
    good = tmp_path / "good.jsonl"
    good.write_text(
        "\n".join(
            [
                _line("a", model=model, input="hi"),
                _line("b", model=model, input="hi", tools=[{"type": "web_search"}]),
            ]
        )
    )
    check = check_batch_file(good, URL, config)
    assert (check.requests, check.errors) == (2, [])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_line("a", model=model, input="hi", max_tokens=3))
    check = check_batch_file(bad, URL, config)
    assert [(e["line"], e["param"]) for e in check.errors] == [(1, "body.max_tokens")]
    assert check_batch_file(good, "/v1/chat/completions", config).errors[0]["code"] == (
        "mismatched_endpoint"
    )


def test_the_run_reader_takes_responses_lines(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(
        "\n".join(
            [
                _line("a", input="hi", max_output_tokens=4),
                _line("b", input="hi", reasoning={"effort": "high"}),
                _line("c", input=[]),
            ]
        )
    )
    records = list(read_input(path, InputConfig(), "m"))
    assert [type(r) for r in records] == [InputRecord, InputRecord, InputProblem]
    assert isinstance(records[2], InputProblem)
    assert records[2].line == 3 and "body.input must be" in records[2].reason


# ------------------------------------------------------------------ output


def _row(custom_id: str, url: str | None = URL, **fields: Any) -> dict[str, Any]:
    return {
        "job_id": "j",
        "custom_id": custom_id,
        "output_text": "Hello there",
        "embedding": None,
        "finish_reason": "stop",
        "prompt_tokens": 5,
        "completion_tokens": 2,
        "model": "tiny-llama",
        "attempts": 1,
        "worker": "w",
        "latency_ms": 1.0,
        "completed_at": datetime(2025, 1, 2, tzinfo=UTC),
        "choices": None,
        "url": url,
        **fields,
    }


def _stored(row: dict[str, Any]) -> dict[str, Any]:
    return results_table([row]).to_pylist()[0]


def test_a_completed_row_is_a_response_the_official_types_accept() -> None:
    body = response_body(_stored(_row("a")))
    response = Response.model_validate(body)
    assert (response.object, response.status, response.incomplete_details) == (
        "response",
        "completed",
        None,
    )
    assert response.output_text == "Hello there"
    message = response.output[0]
    assert message.type == "message" and message.role == "assistant"
    assert message.status == "completed"
    assert [(c.type, c.text, c.annotations) for c in message.content] == [  # type: ignore[union-attr]
        ("output_text", "Hello there", [])
    ]
    assert response.usage is not None
    assert (
        response.usage.input_tokens,
        response.usage.output_tokens,
        response.usage.total_tokens,
        response.usage.input_tokens_details.cached_tokens,
        response.usage.output_tokens_details.reasoning_tokens,
    ) == (5, 2, 7, 0, 0)
    assert response.model == "tiny-llama"
    assert response.created_at == datetime(2025, 1, 2, tzinfo=UTC).timestamp()
    assert response.tools == [] and response.error is None


def test_a_row_cut_by_the_token_limit_is_incomplete() -> None:
    response = Response.model_validate(response_body(_row("a", finish_reason="length")))
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete"  # type: ignore[union-attr]
    assert response.completed_at is None


def test_a_json_schema_answer_is_a_response_whose_text_parses() -> None:
    row = _row("a", output_text='{"a": 1}')
    response = Response.model_validate(response_body(row))
    assert json.loads(response.output_text) == {"a": 1}


def test_ids_are_derived_from_the_job_and_custom_id() -> None:
    first, again = output_line(_row("a")), output_line(_row("a"))
    other = output_line(_row("b"))
    assert first == again
    body = first["response"]["body"]
    assert body["id"].startswith("resp_") and body["output"][0]["id"].startswith("msg_")
    assert body["id"] != other["response"]["body"]["id"]
    assert first["custom_id"] == "a" and first["response"]["status_code"] == 200


def test_the_rows_url_shapes_it_and_an_endpoint_given_overrides_it() -> None:
    assert response_body(_row("a"))["object"] == "response"
    assert response_body(_row("a", url="/v1/chat/completions"))["object"] == "chat.completion"
    assert response_body(_row("a", url=None))["object"] == "chat.completion"  # older shards
    assert response_body(_row("a", url=None), URL)["object"] == "response"
    assert response_body(_row("a", url=None, embedding=[0.5]))["object"] == "list"


def test_a_job_of_mixed_urls_exports_each_row_in_its_own_shape(tmp_path: Path) -> None:
    out = JobOutput(str(tmp_path), "j")
    out.makedirs()
    rows = [_row("r"), _row("c", url="/v1/chat/completions")]
    out.write_table(results_table(rows), out.data_path(0))
    lines = {
        line["custom_id"]: line["response"]["body"]
        for line in map(json.loads, b"".join(output_jsonl(out.base)).splitlines())
    }
    Response.model_validate(lines["r"])
    ChatCompletion.model_validate(lines["c"])


def test_a_shard_written_before_the_url_column_reads_its_url_as_null(tmp_path: Path) -> None:
    old_schema = pa.schema([f for f in RESULT_SCHEMA if f.name != "url"])
    old_row = _row("old")
    del old_row["url"]
    out = JobOutput(str(tmp_path), "j")
    out.makedirs()
    out.write_table(pa.Table.from_pylist([old_row], schema=old_schema), out.data_path(0))
    out.write_table(results_table([_row("new")]), out.data_path(1))
    table = read_results(out.base)
    assert table.schema == RESULT_SCHEMA
    assert dict(zip(table["custom_id"].to_pylist(), table["url"].to_pylist(), strict=True)) == {
        "old": None,
        "new": URL,
    }
