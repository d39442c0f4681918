"""The shared vLLM server fixture answers the OpenAI API as the official client expects: chat
and completions parse into the client's types with usage, stop at ``max_tokens`` with
finish_reason ``length``, are deterministic at temperature 0, and an unknown model is a 404."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam

MODEL = "tiny-llama"


@pytest.fixture
def client(vllm_openai_server: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=vllm_openai_server, api_key="unused", max_retries=0) as c:
        yield c


def test_server_lists_the_tiny_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]


def test_chat_stops_at_max_tokens_with_usage(client: openai.OpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "Tell me about the river."}
    ]
    first = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0
    )
    again = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0
    )
    assert isinstance(first, ChatCompletion)
    assert first.model == MODEL
    [choice] = first.choices
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content.strip()
    assert first.usage is not None
    assert first.usage.completion_tokens == 8
    assert first.usage.prompt_tokens > 5  # the chat template wraps the message
    assert first.usage.total_tokens == first.usage.prompt_tokens + 8
    assert again.choices[0].message.content == choice.message.content


def test_completion_stops_at_max_tokens_with_usage(client: openai.OpenAI) -> None:
    result = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0
    )
    assert isinstance(result, Completion)
    [choice] = result.choices
    assert choice.finish_reason == "length"
    assert isinstance(choice.text, str) and choice.text
    assert result.usage is not None
    assert result.usage.completion_tokens == 5
    assert result.usage.prompt_tokens >= 4


def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
    assert raised.value.status_code == 404
    assert "no-such-model" in str(raised.value)
