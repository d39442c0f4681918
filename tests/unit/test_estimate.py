"""The estimate's arithmetic and counting, with the bundled model's real tokenizer (no Ray)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from inference.config import load_config, parse_config
from inference.errors import InputError
from inference.estimate import (
    Throughput,
    estimate,
    file_requests,
    parse_deadline,
    pool_estimate,
    throughput,
    workers_for,
)
from inference.measurements import JobMeasure, Measured, MeasurementStore
from inference.schema import parse_request
from inference.tokens import TokenCounter, count
from tests.conftest import REPO

TINY = REPO / "models" / "tiny-llama"


def _config(**sections: dict):
    return load_config(REPO / "configs" / "tiny-cpu.yaml").with_updates(**sections)


def _chat(text: str, max_tokens: int = 10, n: int = 1):
    return parse_request(
        "/v1/chat/completions",
        {
            "model": "tiny-llama",
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens,
            "n": n,
        },
    )


def _tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(TINY))


# ------------------------------------------------------------------------------ deadlines
def test_deadline_is_a_duration_or_an_iso_time_in_the_future() -> None:
    assert parse_deadline("2h", 1000.0) == 7200
    assert parse_deadline("90s", 0.0) == 90
    assert parse_deadline("1.5d", 0.0) == 1.5 * 86400
    assert parse_deadline("2030-01-01T00:00:00", 1_893_455_400.0) == pytest.approx(600)
    with pytest.raises(ValueError, match="neither a duration"):
        parse_deadline("soon", 0.0)
    with pytest.raises(ValueError, match="not in the future"):
        parse_deadline("2020-01-01T00:00:00+00:00", 1_893_455_000.0)


def test_workers_for_a_deadline_round_up_and_none_when_startup_passes_it() -> None:
    assert workers_for(engine_s=1000, startup_s=0, deadline_s=100) == 10
    assert workers_for(engine_s=1001, startup_s=0, deadline_s=100) == 11
    assert workers_for(engine_s=1000, startup_s=50, deadline_s=100) == 20
    assert workers_for(engine_s=10, startup_s=0, deadline_s=100) == 1
    assert workers_for(engine_s=10, startup_s=100, deadline_s=100) is None


# ------------------------------------------------------------------------------ counting
def test_chat_prompts_are_counted_through_the_chat_template_as_the_engine_formats_them() -> None:
    tok = _tokenizer()
    requests = [_chat("hello there"), _chat("a much longer question about poetry and music")]
    expected = [
        len(
            tok(
                tok.apply_chat_template(
                    list(r.messages), tokenize=False, add_generation_prompt=True
                ),
                add_special_tokens=False,
            )["input_ids"]
        )
        for r in requests
    ]
    counter = TokenCounter(_config().engine)
    assert counter.method == "tokenizer"
    assert counter.count(requests) == expected
    # The template adds tokens of its own: more than the bare text has.
    assert expected[0] > len(tok("hello there", add_special_tokens=False)["input_ids"])


def test_completion_and_embedding_inputs_count_their_text_with_special_tokens() -> None:
    tok = _tokenizer()
    completion = parse_request("/v1/completions", {"model": "m", "prompt": "once upon a time"})
    embedding = parse_request("/v1/embeddings", {"model": "m", "input": "embed these words"})
    counter = TokenCounter(_config().engine)
    assert counter.count([completion, embedding]) == [
        len(tok("once upon a time")["input_ids"]),
        len(tok("embed these words")["input_ids"]),
    ]
    counted = count([("tiny-llama", embedding)], {"tiny-llama": counter})["tiny-llama"]
    assert counted.max_output_tokens == 0  # an embedding generates nothing


def test_output_budget_is_max_tokens_times_n() -> None:
    counter = TokenCounter(_config().engine)
    pairs = [("tiny-llama", _chat("a", 10)), ("tiny-llama", _chat("b", 7, n=3))]
    counted = count(pairs, {"tiny-llama": counter})["tiny-llama"]
    assert (counted.items, counted.max_output_tokens) == (2, 10 + 21)


def test_items_past_the_exact_count_are_extrapolated_from_their_characters() -> None:
    counter = TokenCounter(_config().engine)
    texts = ["alpha beta gamma delta", "the quick brown fox jumps", "x" * 300, "y" * 30]
    pairs = [("tiny-llama", _chat(t)) for t in texts]
    exact = count(pairs, {"tiny-llama": counter})["tiny-llama"]
    sampled = count(pairs, {"tiny-llama": counter}, exact_items=2)["tiny-llama"]
    assert not exact.sampled and exact.exact_items == 4
    assert sampled.sampled and sampled.exact_items == 2
    first_two = sum(counter.count([r for _, r in pairs[:2]]))
    ratio = first_two / (len(texts[0]) + len(texts[1]))
    assert sampled.tokens_per_char == pytest.approx(ratio)
    assert sampled.total_prompt_tokens() == first_two + round(330 * ratio)
    assert "first 2 items; the other 2 extrapolated" in sampled.note()
    assert sampled.max_output_tokens == exact.max_output_tokens == 40  # always exact


def test_a_remote_engine_counts_characters_and_says_so() -> None:
    config = load_config(REPO / "configs" / "remote-openai.yaml")
    counter = TokenCounter(config.engine)
    assert counter.method == "characters"
    assert counter.count([_chat("x" * 30)]) == [30 // 3 + 8]
    counted = count([("tiny-llama", _chat("x" * 30))], {"tiny-llama": counter})["tiny-llama"]
    assert "characters" in counted.note()


# ------------------------------------------------------------------------------ arithmetic
def _counted(prompt_chars: int = 0, items: int = 100, max_tokens: int = 50):
    counter = TokenCounter(_config().engine)
    pairs = [("tiny-llama", _chat(f"item {i}", max_tokens)) for i in range(items)]
    return count(pairs, {"tiny-llama": counter})["tiny-llama"]


def test_durations_and_costs_at_the_pool_now_and_at_max_workers() -> None:
    counted = _counted()
    prompt = counted.total_prompt_tokens()
    config = _config(scaling={"cost_per_gpu_hour": 3.6})
    measured = Measured(jobs=3, tokens_per_s=50.0, completion_ratio=0.5, startup_s=10.0)
    est = pool_estimate(counted, measured, Throughput(50.0, "measured"), config, 2, 8, 100.0)
    output = 100 * 50 // 2
    assert (est["prompt_tokens"], est["output_tokens"], est["max_output_tokens"]) == (
        prompt,
        output,
        5000,
    )
    engine_s = (prompt + output) / 50.0
    assert est["engine_s"] == pytest.approx(engine_s)
    assert est["now"]["duration_s"] == pytest.approx(10 + engine_s / 2)
    assert est["max"]["duration_s"] == pytest.approx(10 + engine_s / 8)
    # job.json's cost: engine-seconds at the hourly price, whatever the pool's size.
    assert est["now"]["cost"] == est["max"]["cost"] == pytest.approx(engine_s / 3600 * 3.6)
    # Holding the pool for the whole duration costs more with more workers (startup).
    assert est["max"]["pool_cost"] == pytest.approx(8 * (10 + engine_s / 8) / 3600 * 3.6)
    assert est["deadline"]["workers_needed"] == math.ceil(engine_s / 90)
    assert est["deadline"]["feasible"] is (math.ceil(engine_s / 90) <= 8)


def test_without_a_measured_output_share_every_answer_uses_its_max_tokens() -> None:
    counted = _counted()
    est = pool_estimate(counted, Measured(), Throughput(100.0, "assumed"), _config(), 1, 1)
    assert est["output_tokens"] == est["max_output_tokens"] == 5000
    assert est["output_source"].startswith("max_tokens")
    assert "deadline" not in est


def test_unknown_throughput_leaves_durations_unknown_but_never_made_up() -> None:
    est = pool_estimate(_counted(), Measured(), Throughput(None, "unknown"), _config(), 1, 4, 60.0)
    assert est["now"]["duration_s"] is None and est["max"]["cost"] is None
    assert est["deadline"] == {"deadline_s": 60.0, "workers_needed": None, "feasible": None}


def test_throughput_prefers_measured_then_live_then_assumed() -> None:
    assert throughput(Measured(tokens_per_s=5.0), 7.0, 9.0) == Throughput(5.0, "measured")
    assert throughput(Measured(), 7.0, 9.0) == Throughput(7.0, "live")
    assert throughput(Measured(), None, 9.0) == Throughput(9.0, "assumed")
    assert throughput(Measured(), None, 0.0) == Throughput(None, "unknown")


def test_a_remote_batch_engine_prices_tokens_at_its_batch_discount() -> None:
    config = parse_config(
        {
            "engine": {
                "kind": "openai_batch",
                "base_url": "http://127.0.0.1:9/v1",
                "model": "gpt-x",
                "input_price_per_mtok": 2.0,
                "output_price_per_mtok": 8.0,
                "batch_discount": 0.5,
            },
            "scaling": {"cost_per_gpu_hour": 0.0, "cpus_per_worker": 0.25},
        }
    )
    counter = TokenCounter(config.engine)
    pairs = [("gpt-x", _chat("x" * 300, 100)) for _ in range(10)]
    counted = count(pairs, {"gpt-x": counter})["gpt-x"]
    prompt = 10 * (300 // 3 + 8)
    est = pool_estimate(
        counted,
        Measured(),
        Throughput(1000.0, "assumed"),
        config,
        1,
        1,
        token_prices=config.token_prices()["gpt-x"],
    )
    listed = (prompt * 2.0 + 1000 * 8.0) / 1e6
    assert est["now"]["cost"] == pytest.approx(listed * 0.5)  # what job.json will count
    (provider,) = est["provider"]
    assert provider["kind"] == "openai_batch"
    assert provider["cost"] == pytest.approx(listed)
    assert provider["batch_cost"] == pytest.approx(listed * 0.5)


def test_an_overflow_engine_shows_its_batch_price_beside_the_local_cost() -> None:
    config = _config(
        scaling={
            "overflow": {
                "kind": "openai",
                "base_url": "http://127.0.0.1:9/v1",
                "model": "gpt-x",
                "input_price_per_mtok": 1.0,
                "output_price_per_mtok": 4.0,
            },
            "max_workers": 2,
            "mode": "autoscale",
            "deadline": "2030-01-01T00:00:00",
        }
    )
    est = pool_estimate(_counted(), Measured(), Throughput(100.0, "assumed"), config, 1, 2)
    (provider,) = est["provider"]
    assert provider["role"] == "overflow"
    expected = (est["prompt_tokens"] * 1.0 + est["output_tokens"] * 4.0) / 1e6
    assert provider["batch_cost"] == pytest.approx(expected * 0.5)


# ------------------------------------------------------------------------------ measurements
def test_measurements_sum_the_recent_jobs_and_a_job_reported_again_replaces_itself(
    tmp_path: Path,
) -> None:
    store = MeasurementStore(tmp_path)
    assert store.read("tiny-llama") == Measured()
    store.record(
        "tiny-llama",
        JobMeasure(
            "a",
            tokens=1000,
            busy_s=10,
            completion_tokens=100,
            max_output_tokens=400,
            wall_s=20,
            workers=2,
        ),
    )
    m = store.record(
        "tiny-llama",
        JobMeasure(
            "b",
            tokens=3000,
            busy_s=10,
            completion_tokens=300,
            max_output_tokens=400,
            wall_s=9,
            workers=2,
        ),
    )
    assert m.jobs == 2
    assert m.tokens_per_s == pytest.approx(4000 / 20)
    assert m.completion_ratio == pytest.approx(400 / 800)
    assert m.startup_s == pytest.approx((15 + 4) / 2)  # median of wall - busy / workers
    m = store.record("tiny-llama", JobMeasure("b", tokens=1000, busy_s=10))
    assert m.jobs == 2 and m.tokens_per_s == pytest.approx(100)
    assert m.completion_ratio == pytest.approx(0.25)  # only "a" had a budget now
    assert store.read("tiny-llama") == m
    assert store.read("other-model") == Measured()


def test_a_damaged_measurements_file_is_ignored(tmp_path: Path) -> None:
    store = MeasurementStore(tmp_path)
    store.path("tiny-llama").write_text("{not json")
    assert store.read("tiny-llama") == Measured()
    m = store.record("tiny-llama", JobMeasure("a", tokens=100, busy_s=1))
    assert m.tokens_per_s == 100


# ------------------------------------------------------------------------------ whole
def test_estimate_of_an_input_file_uses_the_models_measurements(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    lines = [
        {
            "custom_id": f"r{i}",
            "url": "/v1/chat/completions",
            "body": {
                "model": "tiny-llama",
                "messages": [{"role": "user", "content": f"question {i}"}],
                "max_tokens": 20,
            },
        }
        for i in range(30)
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    config = _config(scaling={"max_workers": 4})
    store = MeasurementStore(tmp_path / "m")
    store.record(
        "tiny-llama",
        JobMeasure(
            "a", 2000, 20.0, completion_tokens=300, max_output_tokens=600, wall_s=15, workers=2
        ),
    )
    est = estimate(
        config,
        file_requests(path, config),
        store,
        {"tiny-llama": 1},
        {"tiny-llama": 4},
        deadline_s=30.0,
    )
    assert est["items"] == 30 and est["max_output_tokens"] == 600
    assert est["output_tokens"] == 300 and est["output_ratio"] == pytest.approx(0.5)
    assert est["throughput_source"] == "measured" and est["tokens_per_s_per_worker"] == 100
    engine_s = (est["prompt_tokens"] + 300) / 100
    assert est["now"]["duration_s"] == pytest.approx(5 + engine_s)
    assert est["max"]["duration_s"] == pytest.approx(5 + engine_s / 4)
    assert est["deadline"]["workers_needed"] == math.ceil(engine_s / 25)


def test_an_input_without_items_cannot_be_estimated(tmp_path: Path) -> None:
    config = _config()
    with pytest.raises(InputError, match="no items"):
        estimate(config, iter(()), MeasurementStore(tmp_path), {}, {})


def test_a_chat_the_template_refuses_is_counted_by_characters_and_noted() -> None:
    from inference.schema import Request

    counter = TokenCounter(_config().engine)
    odd = Request(task="chat", messages=({"role": "tool", "content": "x" * 30},), max_tokens=5)
    pairs = [("tiny-llama", odd), ("tiny-llama", _chat("fine"))]
    counted = count(pairs, {"tiny-llama": counter})["tiny-llama"]
    assert counted.unformatted == 1
    assert counted.prompt_tokens == 30 // 3 + 8 + counter.count([_chat("fine")])[0]
    assert "chat template refuses" in counted.note()
