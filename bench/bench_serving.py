"""Serving many adapters (issue 10): memory, slot loads, and a Zipf-popularity serving loop.

Run: ``python bench/bench_serving.py`` (``--quick`` for a short run; ``--smoke --out
PATH`` runs every section on a tiny model in seconds, for the test command). One torch thread,
the Llama-style model of ``bench_mixed.py`` (hidden 512, intermediate 1376, 2 layers,
vocab 1024), LoRA r=16 on all seven projections, random nonzero factors (fp32, 1.25 MB
per adapter). Results: ``bench/results/serving_cpu.json``.

Measured:

1. Memory with ``reserve_adapter_slots(16, 16)`` as adapters are loaded (1 .. 256):
   ``slot_stats()`` device bytes (the stacks) and host bytes (the host tier); without
   reservation, the stacks after a mixed call, for comparison.
2. Loading one adapter into a free slot, with 1, 16 and 256 adapters loaded (median of
   repeated loads; the slots are emptied between loads, untimed), against what one new
   adapter costs without reservation (every loaded adapter restacked).
3. A serving loop: 200 adapters through 16 slots, 8 rows x 4 tokens per request, each
   row's adapter drawn from a Zipf-like popularity (p(k) ~ 1/k^1.1). Its outputs are
   checked against plain single-adapter calls (each row alone, its adapter active);
   time per call and slot hit rate, interleaved with the same requests served by a
   wrapper without reservation (all 200 stacked) and by the plain calls.
4. What the freshness check costs per call (16 adapters used), against the call, and
   against refreshing the used adapters' slots by a copy on every call instead.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from tinytune import AdapterWrapper, LoraConfig  # noqa: E402
from tinytune.batch import cached_stacks, clear_cache  # noqa: E402
from tinytune.stacks import state_of, stack_params  # noqa: E402
from tinytune.timing import clock_timer, environment, quantiles, summarize, time_cases  # noqa: E402
from tinytune.layers import layer_kind  # noqa: E402

RANK = 16
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The benchmark's sizes; --smoke shrinks every one (it checks that the script runs).
FULL = {"hidden": 512, "intermediate": 1376, "layers": 2, "vocab": 1024, "served": 200, "slots": 16,
        "counts": [1, 16, 64, 256], "loads": (1, 16, 256), "restacks": (1, 16, 64), "checked": 40}
SMOKE = {"hidden": 64, "intermediate": 96, "layers": 1, "vocab": 128, "served": 16, "slots": 8,
         "counts": [1, 10], "loads": (1, 10), "restacks": (1, 10), "checked": 3}


def llama(size: dict, seed: int = 0):
    """A small random-weight LlamaForCausalLM built from a config (nothing downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=size["hidden"], intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"], num_attention_heads=8, num_key_value_heads=8,
        vocab_size=size["vocab"], max_position_embeddings=512,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def interleaved(cases: dict, reference: str, rounds: int, warmup: int, seed: int) -> dict:
    """tinytune.timing's interleaved rounds (one call per measurement): per case the median
    ms per call and the median, p25 and p75 of its per-round ratio to ``reference``."""
    times = time_cases(cases, rounds, warmup=warmup, min_time=0.0, seed=seed)
    out = {}
    for name, s in summarize(times, {"ref": reference}).items():
        r = s["ratio"]["ref"]
        out[name] = {"median_ms": s["median_ms"], "ratio": r["median"], "ratio_p25": r["p25"],
                     "ratio_p75": r["p75"]}  # fmt: skip
    return out


def markdown_table(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def add_adapters(w: AdapterWrapper, names: list[str], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name in names:
        w.add_adapter_from_config(
            LoraConfig(target_modules=LLAMA_PROJECTIONS, r=RANK, lora_alpha=32), name, activate=False
        )
        with torch.no_grad():
            for p in w.adapters[name].adapter_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def adapter_bytes(w: AdapterWrapper, name: str) -> int:
    return sum(p.numel() * p.element_size() for p in w.adapters[name].adapter_parameters())


def median_us(fn, reps: int, setup=None) -> tuple[float, float, float]:
    wall = clock_timer()
    times = []
    for _ in range(reps):
        if setup is not None:
            setup()
        times.append(wall(fn, 1) * 1e6)
    p25, med, p75 = quantiles(times)
    return med, p25, p75


def memory_section(base, size: dict, counts: list[int]) -> dict:
    w = AdapterWrapper(copy.deepcopy(base))
    w.reserve_adapter_slots(max_adapters=size["slots"], max_rank=RANK)
    rows, done = [], 0
    ids = torch.randint(0, size["vocab"], (2, 4))
    for n in counts:
        add_adapters(w, [f"a{i}" for i in range(done, n)], seed=n)
        done = n
        with torch.inference_mode():
            w(ids, adapter_names=[f"a{n - 1}", "a0"])
        s = w.slot_stats()
        rows.append({"loaded": n, "device_bytes": s["device_bytes"], "host_bytes": s["host_bytes"]})
    plain = []
    u = AdapterWrapper(copy.deepcopy(base))
    done = 0
    for n in [c for c in counts if c <= size["restacks"][-1]]:
        add_adapters(u, [f"a{i}" for i in range(done, n)], seed=n)
        done = n
        with torch.inference_mode():
            u(ids, adapter_names=[f"a{n - 1}", "a0"])
        plain.append({"loaded": n, "device_bytes": u.slot_stats()["device_bytes"]})
    return {"reserved": rows, "unreserved": plain, "adapter_bytes": adapter_bytes(w, "a0")}


def load_section(base, size: dict, reps: int) -> dict:
    w = AdapterWrapper(copy.deepcopy(base))
    w.reserve_adapter_slots(max_adapters=size["slots"], max_rank=RANK)
    pool = state_of(w).pool
    out, done = [], 0
    for n in size["loads"]:
        add_adapters(w, [f"a{i}" for i in range(done, n)], seed=n)
        done = n
        names = [f"a{i}" for i in range(n)]
        rng = random.Random(n)

        def one_load():
            with pool.cond:
                _, _, pins = pool.prepare([rng.choice(names)])
            pins.release()

        med, p25, p75 = median_us(one_load, reps, setup=lambda: clear_cache(w))
        out.append({"loaded": n, "load_us": med, "p25": p25, "p75": p75})
    nbytes = adapter_bytes(w, "a0")
    # Without reservation: one more adapter restacks every loaded one.
    restack = []
    ids = torch.randint(0, size["vocab"], (1, 4))
    for n in size["restacks"]:
        u = AdapterWrapper(copy.deepcopy(base))
        add_adapters(u, [f"a{i}" for i in range(n)], seed=n)
        with torch.inference_mode():
            u(ids, adapter_names=["a0"])
        state = state_of(u)

        def restack_all():
            state.names = ()  # what adding or deleting an adapter does
            with state.lock:
                cached_stacks(u, state, ["a0"])

        med, p25, p75 = median_us(restack_all, max(3, reps // 4))
        restack.append({"loaded": n, "restack_us": med, "p25": p25, "p75": p75})
    return {"reserved": out, "unreserved_restack": restack, "adapter_bytes": nbytes}


def zipf_requests(n_adapters: int, n_requests: int, rows: int, seed: int) -> list[list[str]]:
    weights = [1.0 / (k + 1) ** 1.1 for k in range(n_adapters)]
    rng = random.Random(seed)
    order = list(range(n_adapters))
    rng.shuffle(order)  # popularity unrelated to load order
    names = [f"a{order[k]}" for k in range(n_adapters)]
    return [rng.choices(names, weights=weights, k=rows) for _ in range(n_requests)]


def serving_section(base, size: dict, rounds: int, block: int) -> dict:
    n, rows, tokens = size["served"], 8, 4
    names = [f"a{i}" for i in range(n)]
    w = AdapterWrapper(copy.deepcopy(base))
    w.reserve_adapter_slots(max_adapters=size["slots"], max_rank=RANK)
    add_adapters(w, names, seed=1)
    u = AdapterWrapper(copy.deepcopy(base))  # the same adapters, no reservation
    add_adapters(u, names, seed=1)
    ids = torch.randint(0, size["vocab"], (rows, tokens), generator=torch.Generator().manual_seed(0))

    def plain_call(req):
        outs = []
        for i, name in enumerate(req):
            w.set_active_adapters([name])
            outs.append(w(ids[i : i + 1]).logits)
        w.set_active_adapters([])
        return torch.cat(outs)

    # Correctness: every row of every checked request equals its plain call.
    check = zipf_requests(n, size["checked"], rows, seed=99)
    worst = 0.0
    with torch.inference_mode():
        for req in check:
            got = w(ids, adapter_names=req).logits
            ref = plain_call(req)
            worst = max(worst, (got - ref).abs().max().item())
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(u(ids, adapter_names=req).logits, ref, atol=1e-4, rtol=1e-4)

    # Each measurement of time_cases also makes two untimed calls (torch's Timer warms up),
    # so a round takes three blocks; the stream wraps around rather than running dry.
    stream = zipf_requests(n, block * 3 * (rounds + 2), rows, seed=7)
    cursor = {"reserved": 0, "unreserved": 0, "plain": 0}
    uses = {"n": 0}

    def serve(kind):
        def run():
            start = cursor[kind]
            cursor[kind] += block
            with torch.inference_mode():
                for req in (stream[(start + i) % len(stream)] for i in range(block)):
                    if kind == "reserved":
                        uses["n"] += len(set(req))
                        w(ids, adapter_names=req)
                    elif kind == "unreserved":
                        u(ids, adapter_names=req)
                    else:
                        plain_call(req)

        return run

    before = w.slot_stats()
    uses["n"] = 0
    timing = interleaved(
        {k: serve(k) for k in cursor}, reference="plain", rounds=rounds, warmup=1, seed=3
    )
    after = w.slot_stats()
    loads = after["loads"] - before["loads"]
    per_call = {k: v["median_ms"] / block for k, v in timing.items()}
    return {
        "adapters": n,
        "slots": size["slots"],
        "rows": rows,
        "tokens": tokens,
        "checked_requests": len(check),
        "max_abs_diff_vs_plain": worst,
        "ms_per_call": per_call,
        "ratios_vs_plain": {k: [v["ratio"], v["ratio_p25"], v["ratio_p75"]] for k, v in timing.items()},
        "hit_rate": 1.0 - loads / max(1, uses["n"]),
        "adapter_uses": uses["n"],
        "loads": loads,
        "device_bytes": after["device_bytes"],
        "host_bytes": after["host_bytes"],
        "unreserved_device_bytes": u.slot_stats()["device_bytes"],
    }


def check_section(base, size: dict, reps: int) -> dict:
    names = [f"a{i}" for i in range(4 * size["slots"])]
    used = names[: size["slots"]]
    w = AdapterWrapper(copy.deepcopy(base))
    add_adapters(w, names, seed=5)
    r = AdapterWrapper(copy.deepcopy(base))
    r.reserve_adapter_slots(max_adapters=size["slots"], max_rank=RANK)
    add_adapters(r, names, seed=5)
    ids = torch.randint(0, size["vocab"], (len(used), 1))
    with torch.inference_mode():
        w(ids, adapter_names=used)
        r(ids, adapter_names=used)
    state, pool = state_of(w), state_of(r).pool

    def check_unreserved():
        with state.lock:
            cached_stacks(w, state, used)

    def check_reserved():
        with pool.cond:
            _, _, pins = pool.prepare(used)
        pins.release()

    views = []
    for name in used:
        slot = state.slot[name]
        for path, layer in w.adapters[name].items():
            st = state.stacks[path]
            for p, v in zip(stack_params(layer, layer_kind(layer)), st.views(slot, layer)):
                views.append((v, p.detach().clone()))

    def copy_used():
        for v, p in views:
            v.copy_(p)

    def call():
        with torch.inference_mode():
            w(ids, adapter_names=used)

    out = {}
    for name, fn in (
        ("check_unreserved", check_unreserved),
        ("check_reserved", check_reserved),
        ("copy_used_slots", copy_used),
        (f"decode_call_{len(used)}x1", call),
    ):
        med, p25, p75 = median_us(fn, reps)
        out[name] = {"us": med, "p25": p25, "p75": p75}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, up to 64 adapters loaded")
    parser.add_argument("--smoke", action="store_true", help="a tiny model and few adapters: checks that it runs")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default bench/results/serving_cpu[_quick].json)")  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    size = SMOKE if args.smoke else FULL
    base = llama(size)
    quick = args.quick or args.smoke
    counts = size["counts"][:-1] if args.quick else size["counts"]
    result = {
        "memory": memory_section(base, size, counts),
        "load": load_section(base, size, reps=3 if args.smoke else 10 if quick else 40),
        "serving": serving_section(base, size, rounds=1 if args.smoke else 3 if quick else 9,
                                   block=2 if args.smoke else 10),  # fmt: skip
        "check": check_section(base, size, reps=3 if args.smoke else 20 if quick else 100),
    }
    path = args.out or ROOT / "bench" / "results" / ("serving_cpu" + ("_quick" if quick else "") + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"env": environment(), "size": size, **result}, indent=2))
    mem = result["memory"]
    print(markdown_table(
        [[str(r["loaded"]), str(r["device_bytes"]), str(r["host_bytes"])] for r in mem["reserved"]],
        ["loaded", "device bytes", "host bytes"],
    ))
    print(markdown_table(
        [[str(r["loaded"]), str(r["device_bytes"])] for r in mem["unreserved"]],
        ["loaded (no reservation)", "device bytes"],
    ))
    print(markdown_table(
        [[str(r["loaded"]), f"{r['load_us']:.0f} [{r['p25']:.0f}-{r['p75']:.0f}]"] for r in result["load"]["reserved"]],
        ["loaded", "load into a free slot, us"],
    ))
    print(markdown_table(
        [[str(r["loaded"]), f"{r['restack_us']:.0f} [{r['p25']:.0f}-{r['p75']:.0f}]"]
         for r in result["load"]["unreserved_restack"]],
        ["loaded", "restack without reservation, us"],
    ))
    s = result["serving"]
    print({k: v for k, v in s.items()})
    print(result["check"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
