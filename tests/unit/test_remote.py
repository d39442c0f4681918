"""Remote engines without a server: what is sent for a request, how an answer and a batch
line are read, the config's checks, token prices in the cost, and the provider batch ledger on
a real SQLite file."""

from __future__ import annotations

import pytest

from inference.config import parse_config
from inference.engines.remote import (
    estimate_prompt_tokens,
    parse_response,
    request_body,
    retry_after_s,
)
from inference.engines.remote_batch import _line_outcome
from inference.errors import ConfigError, PermanentError, TransientError
from inference.progress import Tracker, job_cost, model_shares
from inference.queue.remote import RemoteLedger
from inference.queue.store import QueueStore
from inference.schema import Result, parse_request

URL = "http://127.0.0.1:9/v1"


def chat(**body: object):
    return parse_request(
        "/v1/chat/completions",
        {"model": "m", "messages": [{"role": "user", "content": "hello"}], **body},
    )


def test_a_chat_request_is_sent_with_exactly_the_fields_it_was_checked_for() -> None:
    request = chat(
        max_tokens=7, temperature=0, stop="x", seed=3, logprobs=True, top_logprobs=2, n=2
    )
    body = request_body(request, "gpt-x")
    assert body == {
        "model": "gpt-x",
        "messages": [{"role": "user", "content": "hello"}],
        "max_completion_tokens": 7,
        "temperature": 0.0,
        "top_p": 1.0,
        "n": 2,
        "stop": ["x"],
        "seed": 3,
        "logprobs": True,
        "top_logprobs": 2,
    }
    completion = parse_request("/v1/completions", {"prompt": "p", "max_tokens": 3, "logprobs": 2})
    assert request_body(completion, "m")["logprobs"] == 2
    embedding = parse_request("/v1/embeddings", {"input": "t"})
    assert request_body(embedding, "e") == {"model": "e", "input": "t"}


def test_the_estimate_grows_with_the_text_and_its_messages() -> None:
    short, long = (
        chat(),
        parse_request(
            "/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 400}]}
        ),
    )
    assert 1 <= estimate_prompt_tokens(short) < 10
    assert 450 <= estimate_prompt_tokens(long) <= 600


def test_answers_are_read_with_their_usage_choices_and_logprobs() -> None:
    request = chat(n=2, logprobs=True)
    data = {
        "choices": [
            {"index": 1, "message": {"content": "b"}, "finish_reason": "stop", "logprobs": None},
            {
                "index": 0,
                "message": {"content": "a"},
                "finish_reason": "length",
                "logprobs": {"content": [{"token": "a", "logprob": -0.5, "top_logprobs": []}]},
            },
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3},
    }
    result = parse_response(request, data)
    assert (result.output_text, result.finish_reason) == ("a", "length")
    assert (result.prompt_tokens, result.completion_tokens) == (5, 3)
    assert result.choices is not None
    assert [c.text for c in result.choices] == ["a", "b"]
    assert [c.completion_tokens for c in result.choices] == [2, 1]
    assert result.choices[0].logprobs == [{"token": "a", "logprob": -0.5, "top_logprobs": []}]

    completion = parse_request("/v1/completions", {"prompt": "p", "logprobs": 1})
    legacy = {
        "choices": [
            {
                "text": " x",
                "finish_reason": "length",
                "logprobs": {
                    "tokens": [" x"],
                    "token_logprobs": [-1.0],
                    "top_logprobs": [{" x": -1.0, " y": -2.0}],
                },
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1},
    }
    choice = parse_response(completion, legacy).choices[0]  # type: ignore[index]
    assert choice.logprobs == [
        {
            "token": " x",
            "logprob": -1.0,
            "bytes": [32, 120],
            "top_logprobs": [
                {"token": " x", "logprob": -1.0, "bytes": [32, 120]},
                {"token": " y", "logprob": -2.0, "bytes": [32, 121]},
            ],
        }
    ]
    embedding = parse_request("/v1/embeddings", {"input": "t"})
    vector = parse_response(embedding, {"data": [{"embedding": [1, 2]}], "usage": {}})
    assert vector.embedding == [1.0, 2.0]
    with pytest.raises(KeyError):
        parse_response(request, {"usage": {}})


def test_retry_after_in_seconds_or_milliseconds() -> None:
    assert retry_after_s({"retry-after": "2"}) == 2.0
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "1"}) == 0.25
    assert retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) is None
    assert retry_after_s({}) is None


def test_batch_lines_are_classified_like_online_answers() -> None:
    request = chat()
    ok = {
        "custom_id": "a",
        "response": {
            "status_code": 200,
            "body": {
                "choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 2, "completion_tokens": 1},
            },
        },
        "error": None,
    }
    assert isinstance(_line_outcome(request, ok), Result)
    bad = {"response": {"status_code": 400, "body": {"error": {"message": "no such model"}}}}
    outcome = _line_outcome(request, bad)
    assert isinstance(outcome, PermanentError)
    assert "no such model" in outcome.message and outcome.code == "http_400"
    busy = {"response": {"status_code": 503, "body": {"error": {"message": "overloaded"}}}}
    assert isinstance(_line_outcome(request, busy), TransientError)
    expired = {"response": None, "error": {"code": "batch_expired", "message": "expired"}}
    assert isinstance(_line_outcome(request, expired), TransientError)
    invalid = {"response": None, "error": {"code": "invalid_request", "message": "bad line"}}
    assert isinstance(_line_outcome(request, invalid), PermanentError)


def test_remote_engines_need_a_base_url_and_a_variable_name_not_a_key() -> None:
    with pytest.raises(ConfigError, match="base_url"):
        parse_config({"engine": {"kind": "openai"}})
    with pytest.raises(ConfigError, match="not an environment variable name"):
        parse_config({"engine": {"kind": "openai", "base_url": URL, "api_key_env": "sk-abc-123"}})
    with pytest.raises(ConfigError, match="base_url/api_key_env"):
        parse_config({"engine": {"kind": "transformers", "base_url": URL}})
    config = parse_config(
        {"engine": {"kind": "openai", "base_url": URL, "api_key_env": "OPENAI_API_KEY"}}
    )
    assert config.engine.remote and config.engine.concurrency == 32


def test_token_prices_enter_the_cost_with_the_batch_discount() -> None:
    engine = {
        "base_url": URL,
        "model": "gpt-x",
        "input_price_per_mtok": 2.0,
        "output_price_per_mtok": 8.0,
    }
    online = parse_config({"engine": {"kind": "openai", **engine}})
    batch = parse_config({"engine": {"kind": "openai_batch", **engine}})
    assert online.token_prices() == {"gpt-x": (2.0, 8.0)}
    assert batch.token_prices() == {"gpt-x": (1.0, 4.0)}
    assert parse_config({}).token_prices() == {}
    pool = {
        "total": 100,
        "done": 50,
        "dead": 0,
        "pending": 50,
        "leased": 0,
        "prompt_tokens": 1_000_000,
        "completion_tokens": 500_000,
        "busy_s": 3600.0,
    }
    stats = {**pool, "pools": {"gpt-x": pool}}
    cost, to_finish = job_cost(stats, 0.5, online.token_prices())
    assert cost == pytest.approx(0.5 + 2.0 + 4.0)
    assert to_finish == pytest.approx(6.5)  # as much again for the other half
    assert job_cost(stats, 0.5) == (pytest.approx(0.5), pytest.approx(0.5))
    shares = model_shares(stats["pools"], {"gpt-x": ("gpt", 0.0)}, batch.token_prices())
    assert shares["gpt"]["cost"] == pytest.approx(1.0 + 2.0)
    progress = Tracker(token_prices=online.token_prices()).update(0.0, {**stats, "state": "active"})
    assert progress.cost == pytest.approx(6.0)


@pytest.fixture
def ledger(queue_target: str) -> RemoteLedger:
    """The ledger on the store's connection, on SQLite and on PostgreSQL."""
    return RemoteLedger(QueueStore(queue_target).db)


def test_the_ledger_maps_items_to_live_batches_until_they_are_forgotten(
    ledger: RemoteLedger,
) -> None:
    ledger.record("k1", "job", "pool", URL, "/v1/chat/completions", "file-1", ["a", "b"], 10)
    ledger.record("k1", "job", "pool", URL, "/v1/chat/completions", "file-1", ["a", "b"], 10)
    found = ledger.lookup("job", ["a", "b", "c"])
    assert set(found) == {"a", "b"}
    assert found["a"]["state"] == "created" and found["a"]["provider_id"] is None
    assert ledger.lookup("other", ["a"]) == {}
    ledger.update("k1", provider_id="batch_1", state="submitted", counts={"total": 2})
    batch = ledger.batch("k1")
    assert batch is not None
    assert (batch["provider_id"], batch["counts"]) == ("batch_1", {"total": 2})
    assert ledger.forget("job", ["b"], key="other-key") == 0
    assert ledger.forget("job", ["b"], key="k1") == 1
    assert set(ledger.lookup("job", ["a", "b"])) == {"a"}
    ledger.record("k2", "job", "pool", URL, "/v1/chat/completions", "file-2", ["b"], 5)
    assert ledger.lookup("job", ["b"])["b"]["key"] == "k2"  # submitted afresh
    ledger.update("k1", state="failed")
    assert ledger.lookup("job", ["a"]) == {}  # a failed batch holds nobody
    assert ledger.summary("job") == {
        "batches": {"failed": 1, "created": 1},
        "lines": {"failed": 2, "created": 1},
    }
    assert ledger.summary("none") is None
    assert [b["key"] for b in ledger.batches("job")] == ["k1", "k2"]
    with pytest.raises(ValueError, match="not a field"):
        ledger.update("k1", lines=3)


def test_an_overflow_pool_is_a_remote_engine_beside_an_autoscaled_pool() -> None:
    remote = {"kind": "openai", "base_url": URL, "model": "gpt-x", "output_price_per_mtok": 4}
    with pytest.raises(ConfigError, match="mode: autoscale"):
        parse_config({"scaling": {"max_workers": 2, "overflow": remote}})
    with pytest.raises(ConfigError, match=r"overflow\.kind"):
        parse_config(
            {"scaling": {"mode": "autoscale", "max_workers": 2, "overflow": {"kind": "vllm"}}}
        )
    config = parse_config(
        {
            "scaling": {
                "mode": "autoscale",
                "max_workers": 4,
                "gpus_per_worker": 1,
                "cost_per_gpu_hour": 2.0,
                "overflow": remote,
                "overflow_workers": 3,
            }
        }
    )
    pools = config.pools()
    assert list(pools) == ["tiny-llama", "tiny-llama+overflow"]
    over = pools["tiny-llama+overflow"]
    assert over.engine.kind == "openai" and over.scaling.overflow is None
    assert (over.scaling.max_workers, over.scaling.gpus_per_worker) == (3, 0.0)
    assert (over.scaling.cpus_per_worker, over.scaling.cost_per_gpu_hour) == (0.25, 0.0)
    assert config.token_prices() == {"tiny-llama+overflow": (0.0, 4.0)}
