"""Shared benchmark plumbing: the Llama-style model, interleaved timing, result files.

Speed is reported as ratios measured in one process: every round runs each case once,
in a shuffled order, and a case's figure is the median over rounds of its time divided
by the reference case's time in the same round. With one torch thread this agrees
within about 3% from run to run on a shared machine; absolute times do not.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def llama(hidden: int = 512, intermediate: int = 1376, layers: int = 2, vocab: int = 1024, seed: int = 0):
    """A small random-weight LlamaForCausalLM built from a config (nothing downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=vocab,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def interleaved(
    cases: dict[str, Callable[[], object]],
    reference: str,
    rounds: int,
    inner: int = 1,
    warmup: int = 2,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Time ``cases`` interleaved; return per-case median time and ratio to ``reference``.

    Args:
        cases: name -> zero-argument callable (one forward pass, say).
        reference: The case every ratio is taken against, round by round.
        rounds: Number of rounds; each runs every case ``inner`` times, shuffled.
        inner: Calls per case per round (the round's time is their total).
        warmup: Untimed rounds first.

    Returns:
        name -> {"median_ms", "ratio", "ratio_p25", "ratio_p75"}.
    """
    rng = random.Random(seed)
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        rng.shuffle(names)
        for name in names:
            fn = cases[name]
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - t0) / inner)
    out: dict[str, dict[str, float]] = {}
    for name, ts in times.items():
        ratios = sorted(t / r for t, r in zip(ts, times[reference]))
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        out[name] = {
            "median_ms": statistics.median(ts) * 1e3,
            "ratio": statistics.median(ratios),
            "ratio_p25": q[0],
            "ratio_p75": q[2],
        }
    return out


def environment() -> dict[str, str]:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except OSError:
        sha = ""
    info = {
        "git_sha": sha,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine(),
        "threads": str(torch.get_num_threads()),
        "cpu_count": str(os.cpu_count()),
    }
    for pkg in ("transformers", "peft", "triton"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception:  # noqa: BLE001 - optional packages
            pass
    return info


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"env": environment(), **payload}, indent=2))
    return path


def markdown_table(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
