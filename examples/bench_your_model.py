"""Benchmark tinytune on your own model: ``tinytune-bench --model``.

    python examples/bench_your_model.py --rounds 3
    # the same, with every tinytune-bench flag available:
    tinytune-bench --model examples/bench_your_model.py:build_model --rounds 3 --no-compile

``tinytune-bench --model SPEC`` times your model instead of the built-in decoder: bare,
LoRA merged and unmerged, mixed-adapter batches, and PEFT with the same weights when peft
is installed, after checking that the variants that must agree do. SPEC is
``package.module:function`` or ``path/to/file.py:function`` (a function without arguments
returning an ``nn.Module`` that takes token ids and returns logits, or an output with
``.logits``), or a ``transformers`` config name or directory. LoRA goes on every linear
layer (``all-linear``) unless ``--targets`` names modules. Replace :func:`build_model` with
your model (a ``transformers`` model with random weights is fine: only the shapes matter).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from tinytune import benchmark


class TinyLM(nn.Module):
    """A small language model: embedding, two MLP blocks, an output head."""

    def __init__(self, vocab: int = 256, hidden: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden)) for _ in range(2)
        )
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def build_model() -> nn.Module:
    """What ``--model examples/bench_your_model.py:build_model`` calls."""
    torch.manual_seed(0)
    return TinyLM()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--adapters", type=int, default=16, help="adapters loaded (default 16)")
    p.add_argument("--tokens", default="1,16", help="tokens per row, comma-separated (default 1,16)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="also time torch.compile'd variants (default: off, for a short run)")
    p.add_argument("--out", default=None, help="write results.json and PNG plots here")
    args = p.parse_args(argv)
    cmd = ["--model", f"{__file__}:build_model", "--rounds", str(args.rounds), "--adapters", str(args.adapters),
           "--tokens", args.tokens, "--compile" if args.compile else "--no-compile"]
    if args.out:
        cmd += ["--out", args.out]
    print("tinytune-bench", " ".join(cmd))
    return benchmark.main(cmd)


if __name__ == "__main__":
    raise SystemExit(main())
