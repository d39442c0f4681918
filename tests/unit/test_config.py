import re
from pathlib import Path

import pytest

from inference.config import Config, load_config, parse_config
from inference.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_bundled_configs_load() -> None:
    for path in sorted((REPO / "configs").glob("*.yaml")):
        assert isinstance(load_config(path), Config), path


def test_unknown_key_is_refused_with_its_path() -> None:
    with pytest.raises(ConfigError, match=r"batching\.max_batch_sise: Extra inputs"):
        parse_config({"batching": {"max_batch_sise": 3}})


def test_impossible_value_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"queue\.lease_s"):
        parse_config({"queue": {"lease_s": -1}})


def test_bad_window_is_refused() -> None:
    with pytest.raises(ConfigError, match="window"):
        parse_config({"schedule": {"windows": ["25:00-06:00"]}})


def test_bad_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("engine: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)


def test_with_updates_revalidates() -> None:
    config = parse_config({}).with_updates(output={"path": "/x"})
    assert config.output.path == "/x"
    with pytest.raises(ConfigError):
        parse_config({}).with_updates(output={"rows_per_shard": 0})


def _engines(**extra: object) -> dict:
    return {
        "engines": {
            "small": {"model": "tiny-llama", "scaling": {"max_workers": 1}},
            "embed": {"model": "all-minilm-l6-v2", "batching": {"max_batch_size": 8}},
        },
        "scaling": {"cost_per_gpu_hour": 2.0},
        **extra,
    }


def test_engines_give_each_model_its_own_config_merged_with_the_jobs() -> None:
    config = parse_config(_engines())
    models = config.models()
    assert list(models) == ["small", "embed"]
    small, embed = models["small"], models["embed"]
    assert (small.engine.model, small.scaling.max_workers, small.batching.max_batch_size) == (
        "tiny-llama",
        1,
        64,
    )
    assert (embed.engine.model, embed.scaling.max_workers, embed.batching.max_batch_size) == (
        "all-minilm-l6-v2",
        0,
        8,
    )
    assert small.scaling.cost_per_gpu_hour == embed.scaling.cost_per_gpu_hour == 2.0
    assert "small" in small.engine.base_names  # items may name the entry
    assert config.engine.model == "tiny-llama"  # engine is the first entry
    # A dump (a job record) validates back to the same config.
    assert parse_config(config.model_dump(mode="json")) == config
    assert config.with_updates(queue={"max_attempts": 5}).engines == config.engines


def test_items_are_routed_by_the_model_they_name() -> None:
    config = parse_config(_engines())
    assert config.pool_of("small") == "tiny-llama"
    assert config.pool_of("embed") == "all-minilm-l6-v2"
    assert config.pool_of("") == "tiny-llama"  # no model: the first
    assert config.pool_of("gpt-4o") is None
    assert config.served_names() == ["small", "embed"]
    one = parse_config({})  # one engine: any name runs on it, as before engines:
    assert one.pool_of("gpt-4o") == one.pool_of("") == "tiny-llama"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_engines(engine={"model": "all-minilm-l6-v2"}), "not both"),
        ({"engines": {"a b": {}}}, "model name 'a b'"),
        ({"engines": {"a": {}, "b": {}}}, "'a' and 'b' both serve tiny-llama"),
        ({"engines": {"a": {"scaling": {"max_workers": -1}}}}, "engines.a.scaling: max_workers"),
        ({"engines": {"a": {"batching": {"nope": 1}}}}, "engines.a.batching: nope"),
    ],
)
def test_bad_engines_are_refused_naming_the_entry(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(data)


def test_an_adapter_name_routes_to_its_base_models_pool() -> None:
    lora = {"adapters": {"sql": "tiny-lora/a", "poem": "tiny-lora/b"}}
    small = {"kind": "vllm", "model": "tiny-llama", "lora": lora, "scaling": {"cpus_per_worker": 2}}
    config = parse_config({"engines": {"small": small, "embed": {"model": "all-minilm-l6-v2"}}})
    assert config.pool_of("sql") == config.pool_of("poem") == "tiny-llama"
    assert config.served_names() == ["small", "embed", "sql", "poem"]
    assert config.models()["small"].engine.model_names == ("tiny-llama", "small", "sql", "poem")
    clash = {"kind": "vllm", "model": "tiny-llama", "lora": {"adapters": {"embed": "tiny-lora/a"}}}
    with pytest.raises(ConfigError, match="'embed' is also the name of another model"):
        parse_config({"engines": {"small": clash, "embed": {"model": "all-minilm-l6-v2"}}})
