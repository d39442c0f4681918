"""How close the whole system comes to vLLM's own limit on this machine (issue 14).

Two workloads of greedy chat items (``temperature: 0``; prompts of varied length from
examples/make_examples.py, the same prompts in both), generated deterministically from
``--seed``:

- ``A``: every item ``max_tokens`` = ``--fixed-max-tokens`` (64);
- ``B``: long-tailed ``max_tokens``: about 5% of items 200-400, the rest 8-32.

For each workload, strictly one after the other (never two engines at once), each phase in a
fresh process tree of its own:

- offline: ``python bench/vllm_bench.py _offline INPUT RESULT`` imports vLLM, builds
  ``vllm.LLM(<repo>/models/tiny-llama, dtype=float32, enforce_eager, prefix caching, 1 GiB of KV
  cache)``, tokenizes every chat exactly as ``inference/engines/vllm.py``'s ``prepare`` does
  (``apply_chat_template(..., tokenize=False, add_generation_prompt=True)`` then
  ``tokenizer(text, add_special_tokens=False)``) and makes one pass over all of them, one
  ``SamplingParams(max_tokens=..., temperature=0)`` per item: ``llm.enqueue`` then
  ``llm.llm_engine.step()`` while ``has_unfinished_requests()``, which is exactly what
  ``LLM.generate`` does internally (``_add_completion_requests`` then ``_run_engine``), only here
  each finished output's ``time.monotonic()`` is recorded (read once per step, as every
  request a step finishes is finished at the same moment);
- system: ``inference run INPUT --config configs/vllm-cpu.yaml`` (``--config``), on an embedded
  Ray cluster (``RAY_ADDRESS`` unset, ``INFERENCE_RAY_TEMP_DIR`` a fresh folder under /tmp),
  exit code 0 and every item in the output required; completion times are the output's
  ``completed_at`` column;
- transformers: the same with ``configs/tiny-cpu.yaml`` (``--transformers-config``; its default
  pool of one worker per CPU), unless ``--skip-transformers``.

Figures per workload:

- ``*_wall_s``: the phase's process from its start to its exit, imports, model load, Ray start
  and shutdown included; ``whole_job_ratio`` = offline wall / system wall (above 1: we are
  faster);
- ``*_items_per_s``: the steady-state rate, completions after the first completion instant over
  the span from the first to the last one: (N - 1) / (last - first) when every item has its own
  instant; where completions share instants (one vLLM step finishes several requests; the
  system stamps a whole batch at once) this excludes all of the first instant's items, not just
  one, so a coarse clock does not inflate the rate; ``steady_ratio`` = system / offline;
- ``*_tokens_per_s``: completion tokens over the same window.

Each workload runs ``--rounds`` offline/system pairs (3), the order alternating (offline first,
then system first, ...), so the host's speed drifting over the run (this VM halves for minutes
at a time) weighs on both sides alike. ``round_steady_ratios`` and ``round_whole_job_ratios``
give every pair; ``steady_ratio`` and ``whole_job_ratio`` are their medians, and the rates shown
are those of the pair with the median steady ratio.

Prints progress to stderr and one final JSON line on stdout. Every phase runs in a session of
its own, which is killed (process group, then any process left in the session, e.g.
``VLLM::EngineCore`` or Ray's workers) when the phase ends or fails. Run it alone on the
machine: CPU contention distorts every figure (``--wait-idle`` waits for other vLLM or Ray
processes to end first).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hostspeed import python_loop_us

REPO = Path(__file__).resolve().parents[1]

MODEL = REPO / "models/tiny-llama"
TARGETS = {"steady_ratio": 0.97, "whole_job_ratio": 0.90}
FOREIGN = re.compile(r"VLLM|ray::|raylet")


def log(message: str) -> None:
    print(f"[vllm_bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- workloads
def _make_examples() -> Any:
    spec = importlib.util.spec_from_file_location(
        "make_examples", REPO / "examples/make_examples.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def max_tokens_for(workload: str, index: int, seed: int, fixed: int) -> int:
    if workload == "A":
        return fixed
    rng = random.Random(f"{seed}:B:{index}")
    if rng.random() < 0.05:
        return rng.randint(200, 400)
    return rng.randint(8, 32)


def make_workload(workload: str, count: int, seed: int, fixed: int, folder: Path) -> Path:
    """A greedy chat batch file: make_examples' prompts, this workload's ``max_tokens``."""
    lines = _make_examples().generate("chat", count, seed)
    path = folder / f"{workload}.jsonl"
    with path.open("w") as out:
        for index, line in enumerate(lines):
            item = json.loads(line)
            item["body"]["max_tokens"] = max_tokens_for(workload, index, seed, fixed)
            item["body"]["temperature"] = 0
            out.write(json.dumps(item) + "\n")
    return path


def steady(times: Sequence[float], tokens: Sequence[int]) -> dict[str, Any]:
    """Items and tokens per second completed after the first completion instant, up to the last.

    Equals (N - 1) / (last - first) when all instants differ; items sharing the first instant
    are all left out. None when everything completed at one instant."""
    first, last = min(times), max(times)
    after = [(t, n) for t, n in zip(times, tokens, strict=True) if t > first]
    span = last - first
    return {
        "items_per_s": len(after) / span if span > 0 else None,
        "tokens_per_s": sum(n for _, n in after) / span if span > 0 else None,
        "span_s": span,
        "instants": len(set(times)),
    }


# ----------------------------------------------------------------------------- offline child
def offline_child(input_path: str, result_path: str) -> None:
    """The offline phase, run as its own process (``_offline INPUT RESULT``)."""
    started = time.monotonic()
    import vllm

    imported = time.monotonic()
    llm = vllm.LLM(
        model=str(MODEL),
        dtype="float32",
        enforce_eager=True,
        enable_prefix_caching=True,
        kv_cache_memory_bytes=1 << 30,
    )
    loaded = time.monotonic()
    tokenizer: Any = llm.get_tokenizer()
    bodies = [json.loads(line)["body"] for line in Path(input_path).read_text().splitlines()]
    prompts: list[Any] = []
    params = []
    for body in bodies:
        # As inference/engines/vllm.py's prepare does.
        text = tokenizer.apply_chat_template(
            body["messages"], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        prompts.append({"prompt_token_ids": list(ids)})
        params.append(vllm.SamplingParams(max_tokens=body["max_tokens"], temperature=0))
    # LLM.generate = _add_completion_requests (what enqueue does) + _run_engine (this loop).
    llm.enqueue(prompts, params, use_tqdm=False)
    engine: Any = llm.llm_engine
    times: list[float] = []
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.monotonic()  # one instant per step: its requests finished together
        for output in outputs:
            if output.finished:
                times.append(now)
                tokens.append(sum(len(c.token_ids) for c in output.outputs))
    done = time.monotonic()
    if len(times) != len(bodies):
        raise SystemExit(f"offline: {len(times)} outputs for {len(bodies)} inputs")
    result = {
        "outputs": len(times),
        "completion_tokens": sum(tokens),
        "import_s": imported - started,
        "load_s": loaded - imported,
        "generate_s": done - loaded,
        "vllm": vllm.__version__,
        **steady(times, tokens),
    }
    Path(result_path).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- processes
def _session_members(sid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[3]) == sid:  # state ppid pgrp session ...
            members.append(int(entry))
    return members


def _kill_session(sid: int, grace_s: float) -> int:
    """Wait up to ``grace_s`` for the session to empty, then TERM and KILL what is left of it
    (its process group first, then every process still in the session). Returns how many
    processes were left to kill."""
    deadline = time.monotonic() + grace_s
    while _session_members(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _session_members(sid)
    if not left:
        return 0
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sid, sig)
        for pid in _session_members(sid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while _session_members(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
    return len(left)


def run_phase(
    name: str, command: list[str], log_path: Path, timeout_s: float, env: dict[str, str] | None
) -> float:
    """Run ``command`` in a session of its own; its wall time from start to exit. Nothing it
    started survives: whatever is left in its session afterwards is killed."""
    log(f"{name}: {' '.join(command)} (log {log_path})")
    with log_path.open("wb") as out:
        start = time.monotonic()
        proc = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=timeout_s)
            wall = time.monotonic() - start
        except BaseException as exc:
            log(f"{name}: {type(exc).__name__}: killing its session")
            log(f"{name}: killed {_kill_session(proc.pid, 0)} process(es)")
            proc.wait()
            raise
        finally:
            left = _kill_session(proc.pid, 15)
            if left:
                log(f"{name}: killed {left} process(es) left in its session")
    if rc != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{name} exited {rc}; the end of {log_path}:\n{tail}")
    log(f"{name}: done in {wall:.1f} s")
    return wall


def foreign_processes() -> list[str]:
    """Other vLLM or Ray processes on the machine (not this bench's)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if FOREIGN.search(cmdline) and "vllm_bench" not in cmdline:
            found.append(f"{entry} {cmdline.strip()[:120]}")
    return found


def wait_idle(wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while others := foreign_processes():
        if time.monotonic() >= deadline:
            log("WARNING: other vLLM/Ray processes are running; the figures will be distorted:")
            for line in others[:10]:
                log(f"  {line}")
            return
        log(f"waiting for {len(others)} other vLLM/Ray process(es) to end")
        time.sleep(30)


# ----------------------------------------------------------------------------- phases
def measure_offline(path: Path, folder: Path, timeout_s: float) -> dict[str, Any]:
    result = folder / f"{path.stem}-offline.json"
    command = [sys.executable, str(Path(__file__).resolve()), "_offline", str(path), str(result)]
    wall = run_phase(
        f"{path.stem} offline", command, folder / f"{path.stem}-offline.log", timeout_s, None
    )
    return {"wall_s": wall, **json.loads(result.read_text())}


def _inference_command() -> list[str]:
    script = Path(sys.executable).with_name("inference")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from inference.cli import app; app()"]


def measure_system(
    path: Path, folder: Path, config: Path, label: str, timeout_s: float
) -> dict[str, Any]:
    from inference import read_results

    job_id = f"{path.stem}-{label}"
    output = folder / f"out-{job_id}"
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["INFERENCE_RAY_TEMP_DIR"] = str(folder / f"r{job_id}")
    command = [
        *_inference_command(),
        "run",
        str(path),
        "--config",
        str(config),
        "--output",
        str(output),
        "--job-id",
        job_id,
        "--quiet",
    ]
    wall = run_phase(f"{job_id}", command, folder / f"{job_id}.log", timeout_s, env)
    table = read_results(output / job_id)
    summary = json.loads((output / job_id / "job.json").read_text())
    items = sum(1 for _ in path.open())
    if table.num_rows != items:
        raise RuntimeError(
            f"{job_id}: {table.num_rows} rows for {items} items ({summary.get('dead')} dead "
            f"letters; see {output / job_id}/errors)"
        )
    times = [t.timestamp() for t in table["completed_at"].to_pylist()]
    tokens = table["completion_tokens"].to_pylist()
    return {
        "wall_s": wall,
        "rows": table.num_rows,
        "dead": summary.get("dead"),
        "workers": summary.get("workers"),
        "completion_tokens": sum(tokens),
        **steady(times, tokens),
    }


def _ratio(num: float | None, den: float | None) -> float | None:
    return round(num / den, 3) if num is not None and den else None


def _median(values: Sequence[float | None]) -> float | None:
    known = sorted(v for v in values if v is not None)
    if len(known) < len(values) or not known:
        return None
    mid = len(known) // 2
    return known[mid] if len(known) % 2 else round((known[mid - 1] + known[mid]) / 2, 3)


def _median_round(rounds: list[dict[str, dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The round whose steady ratio is the median one (its own offline and system figures, so
    the rates shown are of one pair that ran side by side)."""

    def key(p: dict[str, dict[str, Any]]) -> float:
        return _ratio(p["system"]["items_per_s"], p["offline"]["items_per_s"]) or 0.0

    ranked = sorted(rounds, key=key)
    middle = ranked[(len(ranked) - 1) // 2]
    return middle["offline"], middle["system"]


def _round(value: float | None, digits: int = 2) -> float | None:
    return round(value, digits) if value is not None else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--fixed-max-tokens", type=int, default=64, help="workload A")
    parser.add_argument("--workloads", default="A,B", help="comma-separated: A, B or both")
    parser.add_argument("--config", type=Path, default=REPO / "configs/vllm-cpu.yaml")
    parser.add_argument("--transformers-config", type=Path, default=REPO / "configs/tiny-cpu.yaml")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="offline/system pairs per workload (order alternating); ratios are their median",
    )
    parser.add_argument("--phase-timeout-s", type=float, default=3600)
    parser.add_argument(
        "--wait-idle", type=float, default=0, help="seconds to wait for other vLLM/Ray jobs to end"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = parser.parse_args()
    workloads = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    if not workloads or set(workloads) - {"A", "B"}:
        parser.error("--workloads takes A, B or A,B")

    # Interrupted or terminated: unwind through run_phase's cleanup.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    wait_idle(args.wait_idle)
    folder = Path(tempfile.mkdtemp(prefix="vb-", dir="/tmp"))
    log(f"working in {folder}")
    host: dict[str, float] = {"start": python_loop_us()}
    report: dict[str, Any] = {}
    version = None
    for workload in workloads:
        path = make_workload(workload, args.items, args.seed, args.fixed_max_tokens, folder)
        long_items = sum(
            max_tokens_for(workload, i, args.seed, args.fixed_max_tokens) >= 200
            for i in range(args.items)
        )
        rounds: list[dict[str, dict[str, Any]]] = []
        for r in range(args.rounds):
            # Alternate which phase goes first, so a drift of the host's speed over the run
            # (it halves for minutes at a time) weighs on both sides alike.
            order = ("offline", "system") if r % 2 == 0 else ("system", "offline")
            phases: dict[str, dict[str, Any]] = {}
            for phase in order:
                if phase == "offline":
                    phases[phase] = measure_offline(path, folder, args.phase_timeout_s)
                    version = phases[phase]["vllm"]
                else:
                    # A job of its own each round (the same id would resume a finished job).
                    phases[phase] = measure_system(
                        path, folder, args.config, f"system{r}", args.phase_timeout_s
                    )
                log(f"{workload} round {r} {phase} {json.dumps(phases[phase])}")
                host[f"{workload}_{r}_after_{phase}"] = python_loop_us()
            rounds.append(phases)
        offline, system = _median_round(rounds)
        hf: dict[str, Any] = {}
        if not args.skip_transformers:
            hf = measure_system(
                path, folder, args.transformers_config, "transformers", args.phase_timeout_s
            )
            log(f"{workload} transformers {json.dumps(hf)}")
            host[f"{workload}_after_transformers"] = python_loop_us()
        steady_ratios = [
            _ratio(p["system"]["items_per_s"], p["offline"]["items_per_s"]) for p in rounds
        ]
        whole_ratios = [_ratio(p["offline"]["wall_s"], p["system"]["wall_s"]) for p in rounds]
        steady_ratio = _median(steady_ratios)
        whole_ratio = _median(whole_ratios)
        report[workload] = {
            "round_steady_ratios": steady_ratios,
            "round_whole_job_ratios": whole_ratios,
            "offline_items_per_s": _round(offline["items_per_s"]),
            "system_items_per_s": _round(system["items_per_s"]),
            "steady_ratio": steady_ratio,
            "offline_wall_s": round(offline["wall_s"], 1),
            "system_wall_s": round(system["wall_s"], 1),
            "whole_job_ratio": whole_ratio,
            "offline_tokens_per_s": _round(offline["tokens_per_s"], 0),
            "system_tokens_per_s": _round(system["tokens_per_s"], 0),
            "transformers_items_per_s": _round(hf.get("items_per_s")),
            "transformers_wall_s": _round(hf.get("wall_s"), 1),
            "offline_completion_tokens": offline["completion_tokens"],
            "system_completion_tokens": system["completion_tokens"],
            "offline_load_s": round(offline["import_s"] + offline["load_s"], 1),
            "offline_generate_s": round(offline["generate_s"], 1),
            "completion_instants": {"offline": offline["instants"], "system": system["instants"]},
            "long_items": long_items,
            "targets_met": steady_ratio is not None
            and whole_ratio is not None
            and steady_ratio >= TARGETS["steady_ratio"]
            and whole_ratio >= TARGETS["whole_job_ratio"],
        }
    host["end"] = python_loop_us()
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    print(
        json.dumps(
            {
                **report,
                "items": args.items,
                "host_loop_us": host,
                "cpus": os.cpu_count(),
                "vllm": version,
                "config": str(args.config.resolve().relative_to(REPO))
                if args.config.resolve().is_relative_to(REPO)
                else str(args.config),
                "targets": TARGETS,
                "targets_met": all(r["targets_met"] for r in report.values()),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "_offline":
        offline_child(sys.argv[2], sys.argv[3])
    else:
        main()
