"""Multi-GPU engines in the config, the worker's placement group and the scaler's demand:
``engine.tensor_parallel_size`` x ``pipeline_parallel_size`` ranks, one GPU each."""

from __future__ import annotations

from typing import Any

import pytest

from inference.autoscale import ResourceDemand, worker_bundle, worker_demand
from inference.config import parse_config
from inference.engines.cpu_cores import cpu_rank_binding, rank_cores
from inference.errors import ConfigError
from inference.pool import placement_bundles


def config(engine: dict[str, Any], **scaling: Any) -> Any:
    return parse_config({"engine": {"kind": "vllm", **engine}, "scaling": scaling})


def test_parallel_sizes_default_to_one_rank() -> None:
    c = parse_config({})
    assert c.engine.tensor_parallel_size == c.engine.pipeline_parallel_size == 1
    assert c.engine.world_size == 1
    assert c.scaling.placement_strategy == "STRICT_PACK"
    assert placement_bundles(c) is None


def test_a_gpu_worker_holds_one_gpu_per_rank() -> None:
    c = config({"tensor_parallel_size": 2, "pipeline_parallel_size": 2}, gpus_per_worker=4)
    assert c.engine.world_size == 4
    assert c.scaling.worker_cost_per_hour == 0.0  # priced per GPU: 4 of them
    priced = c.with_updates(scaling={"cost_per_gpu_hour": 2.5})
    assert priced.scaling.worker_cost_per_hour == 10.0


@pytest.mark.parametrize("gpus", [1, 3, 0.5])
def test_gpus_per_worker_other_than_the_ranks_is_refused(gpus: float) -> None:
    with pytest.raises(ConfigError) as info:
        config({"tensor_parallel_size": 2}, gpus_per_worker=gpus)
    message = str(info.value)
    assert f"scaling.gpus_per_worker is {gpus:g}" in message
    assert "engine.tensor_parallel_size x pipeline_parallel_size is 2" in message
    assert "set gpus_per_worker: 2" in message


def test_ranks_on_cpus_need_a_core_each() -> None:
    assert config({"tensor_parallel_size": 2}, cpus_per_worker=2).engine.world_size == 2
    with pytest.raises(ConfigError, match=r"scaling.cpus_per_worker is 1 .* at least 2"):
        config({"tensor_parallel_size": 2}, cpus_per_worker=1)


def test_parallel_ranks_need_vllm() -> None:
    with pytest.raises(ConfigError, match=r"engine: .*runs on engine.kind vllm, not transformers"):
        parse_config({"engine": {"tensor_parallel_size": 2}, "scaling": {"cpus_per_worker": 2}})


@pytest.mark.parametrize("key", ["tensor_parallel_size", "pipeline_parallel_size"])
def test_parallel_sizes_in_engine_options_are_refused(key: str) -> None:
    with pytest.raises(ConfigError, match=f"options.{key}: set engine.{key} instead"):
        config({"options": {key: 2}})


@pytest.mark.parametrize("field", ["tensor_parallel_size", "pipeline_parallel_size"])
def test_parallel_sizes_are_at_least_one(field: str) -> None:
    with pytest.raises(ConfigError, match=f"engine.{field}"):
        config({field: 0})


def test_each_model_of_several_is_checked_with_its_own_scaling() -> None:
    data: dict[str, Any] = {
        "engines": {
            "big": {
                "kind": "vllm",
                "model": "tiny-llama",
                "tensor_parallel_size": 2,
                "scaling": {"gpus_per_worker": 2},
            },
            "small": {"kind": "vllm", "model": "all-minilm-l6-v2"},
        },
        "scaling": {"gpus_per_worker": 1},
    }
    models = parse_config(data).models()
    assert models["big"].scaling.gpus_per_worker == 2
    assert models["small"].scaling.gpus_per_worker == 1
    del data["engines"]["big"]["scaling"]
    with pytest.raises(ConfigError, match=r"engines.big.scaling.gpus_per_worker is 1 but engines"):
        parse_config(data)


def test_the_placement_group_has_one_gpu_bundle_per_rank() -> None:
    c = config({"tensor_parallel_size": 2}, gpus_per_worker=2, cpus_per_worker=3)
    assert placement_bundles(c) == [{"GPU": 1.0, "CPU": 3.0}, {"GPU": 1.0}]
    no_cpu = config({"pipeline_parallel_size": 3}, gpus_per_worker=3, cpus_per_worker=0)
    assert placement_bundles(no_cpu) == [{"GPU": 1.0}] * 3
    on_cpus = config({"tensor_parallel_size": 2}, cpus_per_worker=2)
    assert placement_bundles(on_cpus) is None  # ranks are processes on the worker's cores
    one_gpu = config({}, gpus_per_worker=1)
    assert placement_bundles(one_gpu) is None  # a plain num_gpus=1 actor, as before


def test_the_autoscaler_counts_a_multi_gpu_worker_as_its_gpus() -> None:
    c = config({"tensor_parallel_size": 4}, gpus_per_worker=4, cpus_per_worker=2)
    # STRICT_PACK: one node must hold all four, so one bundle of four.
    assert worker_demand(c) == [worker_bundle(c.scaling)] == [{"GPU": 4.0, "CPU": 2.0}]
    spread = c.with_updates(scaling={"placement_strategy": "PACK"})
    assert worker_demand(spread) == [{"GPU": 1.0, "CPU": 2.0}] + [{"GPU": 1.0}] * 3
    sent: list[list[dict[str, float]]] = []
    demand = ResourceDemand(sent.append)
    demand.set("big", worker_demand(spread), 2)
    assert sent[-1] == ([{"GPU": 1.0, "CPU": 2.0}] + [{"GPU": 1.0}] * 3) * 2
    demand.set("big", worker_demand(c), 2)
    assert sent[-1] == [{"GPU": 4.0, "CPU": 2.0}] * 2


def test_rank_cores_gives_each_rank_cores_of_its_own() -> None:
    assert rank_cores(2, [0, 1]) == "0|1"
    assert rank_cores(2, [3, 2, 1, 0, 4]) == "0,1|2,3"  # one core left to the frontend
    assert rank_cores(2, [0, 1, 2]) == "0|1"
    assert rank_cores(3, [0, 1]) is None


def test_cpu_rank_binding_is_set_while_the_engine_starts_and_restored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import os

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3, 4})
    with cpu_rank_binding(2):
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0,1|2,3"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
    with cpu_rank_binding(1):
        assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|4")  # the operator's own choice stays
    with cpu_rank_binding(2):
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0|4"
