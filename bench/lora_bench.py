"""What serving LoRA adapters per request costs on this machine (issue 15).

One workload of greedy chat items (``temperature: 0``, ``max_tokens`` = ``--max-tokens``; the
prompts of examples/make_examples.py from ``--seed``), run in these phases, strictly one after the
other, each an ``inference run`` of its own (embedded Ray, a fresh process tree) through
``bench/vllm_bench.py``'s ``measure_system``:

- ``base``: every item on the base model (``body.model: tiny-llama``) with
  ``configs/vllm-cpu.yaml`` (``--base-config``): no LoRA at all;
- ``adapters``: the same items with ``configs/vllm-cpu-lora.yaml`` (``--lora-config``), item i
  naming adapter ``a``, ``b``, ``c``, ``d`` in turn (i mod 4): the four adapters mix in every
  engine step;
- ``base_on_lora``: the base items again through the LoRA config (on CPU they carry the zero
  adapter, see inference/engines/lora.py), unless ``--skip-base-on-lora``.

``base`` and ``adapters`` run ``--rounds`` times (default 2), in turns whose order alternates
(base then adapters, adapters then base, ...) so that a drift of the host's speed does not favour
either; ``base_on_lora`` runs once, last.

Figures: steady-state items/s (``vllm_bench.steady``: completions after the first completion
instant over the span to the last; the median over rounds) and wall time (start-up included);
``ratio`` = the median over rounds of adapters / base steady items/s (target >= 0.9; each
round's in ``round_ratios``), ``wall_ratio`` = base wall / adapters wall (medians).
``host_loop_us`` is ``sum(range(1000))`` in microseconds before, between and after the phases
(bench/hostspeed.py), to tell a slow host from a slow run.

Prints progress to stderr and one final JSON line on stdout. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from hostspeed import python_loop_us
from vllm_bench import REPO, _make_examples, _ratio, _round, log, measure_system, wait_idle

ADAPTERS = ["a", "b", "c", "d"]
TARGET = 0.9


def make_workload(
    name: str, count: int, seed: int, max_tokens: int, models: list[str], folder: Path
) -> Path:
    """make_examples' chat prompts, greedy, item i naming ``models[i % len(models)]``."""
    lines = _make_examples().generate("chat", count, seed)
    path = folder / f"{name}.jsonl"
    with path.open("w") as out:
        for index, line in enumerate(lines):
            item = json.loads(line)
            item["body"].update(
                model=models[index % len(models)], max_tokens=max_tokens, temperature=0
            )
            out.write(json.dumps(item) + "\n")
    return path


def _relative(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _median(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over rounds (None where a round had none)."""
    out = {}
    for figure in ("items_per_s", "tokens_per_s", "wall_s"):
        values = [r[figure] for r in results if r[figure] is not None]
        out[figure] = statistics.median(values) if values else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--base-config", type=Path, default=REPO / "configs/vllm-cpu.yaml")
    parser.add_argument("--lora-config", type=Path, default=REPO / "configs/vllm-cpu-lora.yaml")
    parser.add_argument("--rounds", type=int, default=2, help="base/adapters rounds")
    parser.add_argument("--skip-base-on-lora", action="store_true")
    parser.add_argument("--phase-timeout-s", type=float, default=1800)
    parser.add_argument(
        "--wait-idle", type=float, default=0, help="seconds to wait for other vLLM/Ray jobs to end"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = parser.parse_args()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    wait_idle(args.wait_idle)
    folder = Path(tempfile.mkdtemp(prefix="lb-", dir="/tmp"))
    log(f"working in {folder}")
    host: dict[str, float] = {"start": python_loop_us()}
    workload = (args.items, args.seed, args.max_tokens)
    base_items = make_workload("base", *workload, ["tiny-llama"], folder)
    adapter_items = make_workload("adapters", *workload, ADAPTERS, folder)
    pair = [("base", base_items, args.base_config), ("adapters", adapter_items, args.lora_config)]
    phases = []
    for turn in range(args.rounds):
        phases += [(name, path, config, turn) for name, path, config in pair[:: 1 - 2 * (turn % 2)]]
    if not args.skip_base_on_lora:
        phases.append(("base_on_lora", base_items, args.lora_config, 0))
    runs: dict[str, list[dict[str, Any]]] = {}
    for name, path, config, turn in phases:
        result = measure_system(path, folder, config, f"{name}-{turn}", args.phase_timeout_s)
        log(f"{name} round {turn} {json.dumps(result)}")
        runs.setdefault(name, []).append(result)
        host[f"after_{name}_{turn}"] = python_loop_us()
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    rounds = [
        _ratio(a["items_per_s"], b["items_per_s"])
        for a, b in zip(runs["adapters"], runs["base"], strict=True)
    ]
    known = [r for r in rounds if r is not None]
    ratio = round(statistics.median(known), 3) if known else None
    results = {name: _median(found) for name, found in runs.items()}
    report: dict[str, Any] = {
        f"{name}_{figure}": value
        for name, result in results.items()
        for figure, value in (
            ("items_per_s", _round(result["items_per_s"])),
            ("tokens_per_s", _round(result["tokens_per_s"], 0)),
            ("wall_s", round(result["wall_s"], 1)),
        )
    }
    print(
        json.dumps(
            {
                **report,
                "ratio": ratio,
                "round_ratios": rounds,
                "wall_ratio": _ratio(results["base"]["wall_s"], results["adapters"]["wall_s"]),
                "base_on_lora_ratio": _ratio(
                    results.get("base_on_lora", {}).get("items_per_s"),
                    results["base"]["items_per_s"],
                ),
                "target": TARGET,
                "target_met": ratio is not None and ratio >= TARGET,
                "items": args.items,
                "rounds": args.rounds,
                "max_tokens": args.max_tokens,
                "adapters": ADAPTERS,
                "host_loop_us": host,
                "cpus": os.cpu_count(),
                "base_config": _relative(args.base_config),
                "lora_config": _relative(args.lora_config),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
