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
