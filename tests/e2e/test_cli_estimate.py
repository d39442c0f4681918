"""`inference estimate` in a subprocess: a table or JSON, no Ray started, bad input and a bad
deadline refused as `inference run` refuses them (exit 2, naming the line)."""

from __future__ import annotations

import json
from pathlib import Path

from inference.config import load_config
from inference.measurements import JobMeasure, MeasurementStore, measurements_dir
from tests.conftest import REPO
from tests.e2e.test_cli import _line, _run

CONFIG = str(REPO / "configs/tiny-cpu.yaml")


def _estimate(tmp_path: Path, path: Path, *more: str):
    return _run(
        "estimate", str(path), "--config", CONFIG, "--output", str(tmp_path / "out"), *more,
        cwd=tmp_path,
    )  # fmt: skip


def test_estimate_prints_json_and_a_table_from_the_models_measurements(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(_line(f"q{i}") + "\n" for i in range(3)))
    result = _estimate(tmp_path, path, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "ray_was_started").read_text() == "False"
    est = json.loads(result.stdout)
    assert (est["items"], est["max_output_tokens"]) == (3, 18)
    assert est["throughput_source"] == "unknown" and est["now"]["duration_s"] is None

    config = load_config(CONFIG).with_updates(output={"path": str(tmp_path / "out")})
    MeasurementStore(measurements_dir(config)).record(
        "tiny-llama",
        JobMeasure("earlier", tokens=10_000, busy_s=10.0, completion_tokens=50,
                   max_output_tokens=100, wall_s=12.0, workers=2),
    )  # fmt: skip
    result = _estimate(tmp_path, path, "--workers", "3", "--deadline", "1h", "--json")
    est = json.loads(result.stdout)
    assert est["throughput_source"] == "measured" and est["now"]["workers"] == 3
    assert est["output_tokens"] == 9  # half of the 18 allowed, as measured
    engine_s = (est["prompt_tokens"] + 9) / 1000
    assert abs(est["now"]["duration_s"] - (7.0 + engine_s / 3)) < 1e-6
    assert est["deadline"]["workers_needed"] == 1

    table = _estimate(tmp_path, path, "--deadline", "1h")
    assert table.returncode == 0, table.stderr[-3000:]
    for label in ("prompt tokens", "pool now", "at max_workers", "deadline", "1,000.0 tokens/s"):
        assert label in table.stdout, table.stdout


def test_a_bad_line_or_deadline_exits_2_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(_line("a") + "\n" + '{"custom_id": "b", "body": \n')
    result = _estimate(tmp_path, path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(path) in result.stderr and "line 2" in result.stderr
    path.write_text(_line("a") + "\n")
    result = _estimate(tmp_path, path, "--deadline", "tomorrow")
    assert result.returncode == 2 and "neither a duration" in result.stderr
