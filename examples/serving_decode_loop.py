"""A decode loop with per-row adapters over a static row buffer: set_row_adapters between steps.

    python examples/serving_decode_loop.py --adapters 6 --slots 4 --rows 4 --steps 12

A serving engine captures its decode step once and replays it, changing only which adapter
each row (request) uses. Here ``reserve_adapter_slots(..., max_rows=N)`` gives the wrapper a
static ``(N,)`` buffer of slot indices; ``set_row_adapters(names)`` writes it in place
between steps (outside any captured region), so the step itself creates no tensor from
host data and ``torch.compile(mode="reduce-overhead")`` (CUDA graphs on a GPU) replays it for
every assignment without recompiling (``error_on_recompile`` proves it). Requests finish
and new ones take their rows, with other adapters; midway one adapter is hot-swapped from a
file. Every step's tokens are checked against a plain per-row call.
"""

from __future__ import annotations

import argparse
import random
import tempfile

import torch
from torch import nn

from tinytune import AdapterWrapper, LoraConfig

VOCAB, DIM = 64, 32


class TinyLM(nn.Module):
    """Embedding, two MLP blocks, a head: enough to decode greedily."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, DIM)
        self.up = nn.Linear(DIM, 4 * DIM)
        self.down = nn.Linear(4 * DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(h)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, default=6, help="adapters loaded (default 6)")
    p.add_argument("--slots", type=int, default=4, help="device slots reserved (default 4)")
    p.add_argument("--rows", type=int, default=4, help="rows of the decode batch, max_rows (default 4)")
    p.add_argument("--steps", type=int, default=12, help="decode steps (default 12)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="decode eagerly")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        return decode(args, tmp)


def decode(args: argparse.Namespace, tmp: str) -> dict:
    names = [f"user{i}" for i in range(args.adapters)]
    server = AdapterWrapper(TinyLM())
    for i, name in enumerate(names + ["swap"]):
        config = LoraConfig(target_modules=["up", "down"], r=[4, 8][i % 2], init_lora_weights=False)
        server.add_adapter_from_config(config, name, activate=False)
    server.save_adapter(f"{tmp}/swap", "swap")
    server.delete_adapter("swap")
    server.to(args.device).eval()
    server.reserve_adapter_slots(max_adapters=args.slots, max_rank=8, max_rows=args.rows)
    step = torch.compile(server, mode="reduce-overhead") if args.compile else server

    rng = random.Random(0)
    # One request per row: [adapter, tokens left]; a finished row takes a new request.
    requests = [[names[i % args.slots], rng.randint(2, 5)] for i in range(args.rows)]
    ids = torch.randint(0, VOCAB, (args.rows, 1), device=args.device)
    assignments = 0
    checked = 0
    current = None
    for t in range(args.steps):
        for row in requests:
            if row[1] == 0:
                # Any adapter, as long as one step uses at most `slots` distinct ones.
                live = {r[0] for r in requests if r is not row and r[1] > 0}
                choices = names if len(live) < args.slots else sorted(live)
                row[:] = [rng.choice(choices), rng.randint(2, 5)]
        row_names = [r[0] for r in requests]
        if row_names != current:
            server.set_row_adapters(row_names)  # outside the step: an in-place write
            current, assignments = row_names, assignments + 1
        if t == args.steps // 2:
            server.hotswap_adapter(f"{tmp}/swap", current[0])  # the next step sees it
        recompiles = torch._dynamo.config.patch(error_on_recompile=t >= 2 and args.compile)
        with torch.no_grad(), recompiles:
            logits = step(ids)
        with torch.no_grad():
            want = torch.cat([server(ids[i : i + 1], adapter_names=[n]) for i, n in enumerate(current)])
        torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)
        checked += 1
        ids = logits[:, -1:].argmax(-1)
        for row in requests:
            row[1] -= 1
    server.clear_row_adapters()
    result = {"steps": args.steps, "assignments": assignments, "checked": checked,
              "compiled": args.compile, "device": args.device}
    print(f"decoded {args.steps} steps with {assignments} row assignments; every step matched "
          f"the per-row reference ({'compiled, reduce-overhead' if args.compile else 'eager'}, {args.device})")
    return result


if __name__ == "__main__":
    main()
