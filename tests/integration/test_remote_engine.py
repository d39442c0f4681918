"""``engine.kind: openai`` against a real vLLM OpenAI-compatible server of the bundled model
(vLLM's CPU build, started once for this module), on the shared local Ray cluster. First the
server as the official client sees it (types, usage, ``length`` at ``max_tokens``, 404 for an
unknown model); then whole jobs with chat and completion items, answers equal to the server's
own, usage from the server, a request the server refuses dead-lettered with its message, and
the overflow of a job at risk of its deadline to the remote engine. Then through a loopback
stand-in that speaks OpenAI's rate-limit protocol (429 with ``Retry-After`` and
``x-ratelimit-*`` headers, injected 5xx and dropped connections, a bad key), and several
workers under one cluster-wide limit."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam

from inference.config import Config, parse_config
from inference.shards import read_results
from tests.checker import check

# ---- the server itself, as the official client sees it ---------------------------------------

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


# ---- jobs through it ------------------------------------------------------------------------


def _line(cid: str, url: str, body: dict[str, Any]) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})


def _chat(i: int, max_tokens: int = 8) -> dict[str, Any]:
    return {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": f"tell me about item {i}"}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }


def write_input(path: Path, chats: int, completions: int = 0, extra: list[str] = ()) -> Path:
    lines = [_line(f"c-{i}", "/v1/chat/completions", _chat(i)) for i in range(chats)]
    lines += [
        _line(
            f"p-{i}",
            "/v1/completions",
            {"prompt": f"once upon a time {i}", "max_tokens": 4, "logprobs": 2, "temperature": 0},
        )
        for i in range(completions)
    ]
    path.write_text("\n".join([*lines, *extra]) + "\n")
    return path


def remote_config(
    tmp_path: Path, queue_db: Path, base_url: str, workers: int = 1, **sections: dict[str, Any]
) -> Config:
    data: dict[str, Any] = {
        "engine": {
            "kind": "openai",
            "model": "tiny-llama",
            "base_url": base_url,
            "concurrency": 16,
            "retry_base_s": 0.05,
            "retry_max_s": 2.0,
            "input_price_per_mtok": 3.0,
            "output_price_per_mtok": 6.0,
        },
        "queue": {"db_path": str(queue_db), "backoff_base_s": 0.1, "lease_s": 30},
        "output": {"path": str(tmp_path / "out"), "rows_per_shard": 50, "max_shard_age_s": 1},
        "scaling": {"max_workers": workers, "cpus_per_worker": 0.5},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return parse_config(data)


def assert_exactly_once(summary: Any, queue_db: Path, job_id: str, expected: int) -> None:
    verdict = check(Path(summary.output), queue_db, job_id)
    assert verdict.accepted == expected
    assert (verdict.lost, verdict.duplicated, verdict.unexpected, verdict.partial) == (0, 0, 0, 0)


@pytest.mark.timeout(600)
def test_a_job_through_an_openai_compatible_server_gets_the_servers_answers(
    ray_cluster: Path, queue_db: Path, tmp_path: Path, vllm_openai_server: str
) -> None:
    import ray

    from inference.queue.actor import get_queue
    from inference.runner import run_job

    too_long = _line("too-long", "/v1/chat/completions", _chat(0, max_tokens=100_000))
    path = write_input(tmp_path / "in.jsonl", 120, 20, [too_long])
    config = remote_config(tmp_path, queue_db, vllm_openai_server, workers=2)
    summary = run_job(path, config, job_id="remote-online")
    assert (summary.done, summary.dead) == (140, 1)
    assert_exactly_once(summary, queue_db, "remote-online", 141)
    rows = {r["custom_id"]: r for r in read_results(summary.output).to_pylist()}
    # The server's own answer to the same request, asked directly.
    direct = httpx.post(f"{vllm_openai_server}/chat/completions", json=_chat(7), timeout=60).json()
    assert rows["c-7"]["output_text"] == direct["choices"][0]["message"]["content"]
    assert rows["c-7"]["prompt_tokens"] == direct["usage"]["prompt_tokens"]
    assert rows["c-7"]["completion_tokens"] == direct["usage"]["completion_tokens"] == 8
    assert rows["c-7"]["finish_reason"] == "length"
    logprobs = json.loads(rows["p-3"]["choices"][0]["logprobs"])
    assert len(logprobs) == 4 and all(len(t["top_logprobs"]) >= 2 for t in logprobs)
    assert {r["worker"].rsplit("-", 1)[0] for r in rows.values()} == {"tiny-llama"}
    assert len({r["worker"] for r in rows.values()}) == 2  # both workers took items
    dead = ray.get(get_queue().dead_letters.remote("remote-online"))
    assert [(d["custom_id"], d["error_code"]) for d in dead] == [("too-long", "http_400")]
    assert "max_completion_tokens" in dead[0]["message"]  # the server's own words
    assert dead[0]["error_kind"] == "permanent"
    job = json.loads((Path(summary.output) / "job.json").read_text())
    tokens = (job["prompt_tokens"] * 3.0 + job["completion_tokens"] * 6.0) / 1e6
    assert job["cost"] == pytest.approx(tokens) and tokens > 0


@pytest.mark.timeout(600)
def test_what_the_local_pool_cannot_finish_by_the_deadline_overflows_to_a_remote_engine(
    ray_cluster: Path, queue_db: Path, tmp_path: Path, vllm_openai_server: str
) -> None:
    """One local CPU worker (transformers) cannot do 4,000 items in 8 s: once its throughput
    is measured, the scaler moves the excess of pending items to the overflow pool (the remote
    engine against vLLM's server) and the job ends in time, every item exactly once."""
    from datetime import UTC, datetime, timedelta

    import ray

    from inference.queue.actor import get_queue
    from inference.runner import run_job

    path = write_input(tmp_path / "in.jsonl", 4000)
    deadline = datetime.now(UTC) + timedelta(seconds=8)
    config = parse_config(
        {
            "engine": {"kind": "transformers", "model": "tiny-llama", "device": "cpu"},
            "batching": {"max_batch_size": 32},
            "queue": {"db_path": str(queue_db), "backoff_base_s": 0.1, "lease_s": 30},
            "output": {"path": str(tmp_path / "out"), "rows_per_shard": 40, "max_shard_age_s": 1},
            "scaling": {
                "mode": "autoscale",
                "min_workers": 1,
                "max_workers": 1,
                "interval_s": 1,
                "deadline": deadline.isoformat(),
                "overflow": {
                    "kind": "openai",
                    "model": "tiny-llama",
                    "base_url": vllm_openai_server,
                    "concurrency": 32,
                },
                "overflow_workers": 1,
            },
        }
    )
    summary = run_job(path, config, job_id="overflow")
    assert (summary.done, summary.dead) == (4000, 0)
    assert_exactly_once(summary, queue_db, "overflow", 4000)
    rows = read_results(summary.output).to_pylist()
    pools = {r["worker"].rsplit("-", 1)[0] for r in rows}
    assert pools == {"tiny-llama", "tiny-llama+overflow"}
    local = sum(r["worker"].startswith("tiny-llama-") for r in rows)
    assert 0 < local < 4000  # the local pool did its share, the rest overflowed
    stats = ray.get(get_queue().stats.remote("overflow"))
    assert stats["pools"]["tiny-llama+overflow"]["done"] == 4000 - local
    assert stats["pools"]["tiny-llama"]["done"] == local


def _max_in_window(times: list[float], window_s: float) -> int:
    times = sorted(times)
    most, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] > window_s:
            start += 1
        most = max(most, end - start + 1)
    return most


@pytest.mark.timeout(600)
def test_429s_5xx_and_dropped_connections_are_retried_in_place_and_nothing_is_lost(
    ray_cluster: Path, queue_db: Path, tmp_path: Path, vllm_openai_server: str
) -> None:
    """The provider (a stand-in in front of vLLM's server) allows 120 requests a minute and
    answers 429 with Retry-After and x-ratelimit-* over that; it also fails three requests
    with 503 and drops two connections. No limit is configured here: the provider's signals
    alone pace the fleet (its announced limit, Retry-After), and every item completes on its
    first queue attempt."""
    from tests.support.ratelimit_proxy import start_proxy

    path = write_input(tmp_path / "in.jsonl", 40)
    with start_proxy(vllm_openai_server, rpm=120, log_dir=tmp_path) as proxy:
        proxy.fault(status=503, count=3, path="chat/completions")
        proxy.fault(drop=2)
        config = remote_config(
            tmp_path, queue_db, proxy.base_url, workers=2, engine={"max_retries": 50}
        )
        from inference.runner import run_job

        summary = run_job(path, config, job_id="remote-429")
        stats = proxy.stats()
    assert (summary.done, summary.dead) == (40, 0)
    assert_exactly_once(summary, queue_db, "remote-429", 40)
    rows = read_results(summary.output).to_pylist()
    assert {r["attempts"] for r in rows} == {1}  # retried in place, no attempt charged
    # The provider did say 429: to the first wave (32 requests at once, 2 allowed), and now and
    # then after; from its first answer on, its x-ratelimit-limit-requests paces the fleet
    # (without that, 161 refusals in a run here).
    assert 0 < len(stats["refused"]) <= 60
    assert len(stats["faulted"]) == 5
    ok = [r for r in stats["forwarded"] if r["status"] == 200]
    assert len(ok) == 40


@pytest.mark.timeout(600)
def test_several_workers_keep_one_cluster_wide_request_rate(
    ray_cluster: Path, queue_db: Path, tmp_path: Path, vllm_openai_server: str
) -> None:
    """Three workers of 4 requests in flight each, ``limits.requests_per_minute: 120`` with a
    1 s burst: at the server, no window of T seconds sees more than 2 + 2 T requests (one more
    for the time a response takes), and the limit is used, not undershot."""
    from tests.support.ratelimit_proxy import start_proxy

    n = 50
    path = write_input(tmp_path / "in.jsonl", n)
    with start_proxy(vllm_openai_server, log_dir=tmp_path) as proxy:  # counts, never refuses
        config = remote_config(
            tmp_path,
            queue_db,
            proxy.base_url,
            workers=3,
            engine={"concurrency": 4},
            limits={"requests_per_minute": 120, "burst_s": 1},
            scaling={"cpus_per_worker": 0.25},
        )
        from inference.runner import run_job

        summary = run_job(path, config, job_id="remote-limited")
        times = [r["epoch"] for r in proxy.stats()["forwarded"]]
    assert (summary.done, summary.dead) == (n, 0)
    assert len({r["worker"] for r in read_results(summary.output).to_pylist()}) == 3
    assert len(times) == n
    for window_s in (1.0, 5.0, 10.0):
        assert _max_in_window(times, window_s) <= 2 + 2 * window_s + 1, window_s
    span = max(times) - min(times)
    assert (n - 2) / span >= 2 * 0.8  # at least 80 % of the limit, after the first burst


@pytest.mark.timeout(600)
def test_a_bad_key_fails_the_workers_and_never_the_items(
    ray_cluster: Path, queue_db: Path, tmp_path: Path, vllm_openai_server: str
) -> None:
    """401 is the worker's problem, not the item's: workers fail and are replaced, the job
    fails with the provider's words once too many are lost, and no item is dead-lettered (a
    run with the right key takes them all)."""
    import ray

    from inference.errors import InferenceError
    from inference.queue.actor import get_queue
    from inference.runner import run_job
    from tests.support.ratelimit_proxy import start_proxy

    path = write_input(tmp_path / "in.jsonl", 10)
    with start_proxy(vllm_openai_server, log_dir=tmp_path) as proxy:
        proxy.fault(status=401, count=1000, path="chat/completions")
        config = remote_config(tmp_path, queue_db, proxy.base_url)
        with pytest.raises(InferenceError, match="401"):
            run_job(path, config, job_id="remote-401")
        queue = get_queue()
        stats = ray.get(queue.stats.remote("remote-401"))
        assert (stats["done"], stats["dead"]) == (0, 0)
        assert stats["pending"] + stats["leased"] == 10
        proxy.reset()  # the key is right again: the faults are gone
        summary = run_job(path, config, job_id="remote-401")  # resumed with a good key
    assert (summary.done, summary.dead) == (10, 0)
    assert_exactly_once(summary, queue_db, "remote-401", 10)
