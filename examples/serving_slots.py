"""Serve more adapters than fit on the device: reserved slots, hot-swap from files, LRU eviction.

    python examples/serving_slots.py --adapters 12 --slots 4 --requests 20

Adapters arrive as saved directories (PEFT's format). ``reserve_adapter_slots`` gives the
device-side stacks a fixed shape; any number of adapters may be loaded, those outside a
slot wait in host memory, and each request brings the ones it names into slots, least
recently used out first. Midway, one adapter is hot-swapped from a file under its name.
The model is compiled once: ``error_on_recompile`` proves that loads, evictions and the
hot-swap never recompile it. Every request's rows are checked against plain calls.
"""

from __future__ import annotations

import argparse
import random
import tempfile

import torch
from torch import nn

from tinytune import AdapterWrapper, LoraConfig


def make_base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8)).eval()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, default=10, help="adapters loaded (default 10)")
    p.add_argument("--slots", type=int, default=4, help="device slots reserved (default 4)")
    p.add_argument("--requests", type=int, default=12, help="mixed-batch requests served (default 12)")
    p.add_argument("--rows", type=int, default=6, help="rows per request (default 6)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="serve eagerly")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        return serve(args, tmp)


def serve(args: argparse.Namespace, tmp: str) -> dict:
    # Adapters trained elsewhere, saved as directories (ranks 4, 8 and 16).
    maker = AdapterWrapper(make_base())
    for i in range(args.adapters + 1):
        config = LoraConfig(target_modules=["0", "2"], r=[4, 8, 16][i % 3], init_lora_weights=False)
        maker.add_adapter_from_config(config, f"user{i}", activate=False)
        maker.save_adapter(f"{tmp}/user{i}", f"user{i}")

    server = AdapterWrapper(make_base())
    server.reserve_adapter_slots(max_adapters=args.slots, max_rank=16)  # fixed shapes from here on
    names = [f"user{i}" for i in range(args.adapters)]
    for name in names:
        server.load_adapter(f"{tmp}/{name}", name, activate=False)
    reference = AdapterWrapper(make_base())  # plain calls, one adapter at a time, to check against
    for name in names:
        reference.load_adapter(f"{tmp}/{name}", name, activate=False)

    rng = random.Random(0)
    x = torch.randn(args.rows, 16, generator=torch.Generator().manual_seed(1))
    run = torch.compile(server) if args.compile else server
    with torch.inference_mode():
        server(x, adapter_names=["__base__"] * args.rows)  # registers the hooks once
        run(x, adapter_names=["__base__"] * args.rows)  # compiles once
    with torch._dynamo.config.patch(error_on_recompile=args.compile), torch.inference_mode():
        for r in range(args.requests):
            if r == args.requests // 2:  # new weights for user0, from a file, in place
                server.hotswap_adapter(f"{tmp}/user{args.adapters}", "user0")
                reference.hotswap_adapter(f"{tmp}/user{args.adapters}", "user0")
                print(f"request {r}: hot-swapped user0")
            pool = rng.sample(names, min(args.slots, len(names)))  # at most `slots` distinct per request
            rows = [rng.choice([*pool, "__base__"]) for _ in range(args.rows)]
            out = run(x, adapter_names=rows)
            for i, name in enumerate(rows):
                reference.set_active_adapters([] if name == "__base__" else name)
                torch.testing.assert_close(out[i : i + 1], reference(x[i : i + 1]), rtol=1e-5, atol=1e-5)
    stats = server.slot_stats()
    print(f"{args.adapters} adapters through {args.slots} slots, {args.requests} requests: "
          f"{stats['loads']} loads, {stats['evictions']} evictions, no recompile; "
          f"device {stats['device_bytes']:,} bytes, host {stats['host_bytes']:,} bytes")
    return stats


if __name__ == "__main__":
    main()
