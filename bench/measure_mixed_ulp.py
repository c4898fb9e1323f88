"""How far mixed-batch rows are from running each row alone, across seeds.

Builds the mixed-batch test's model (the one ``tests/test_mixed_batch.py`` builds, kept
here so that this script needs nothing from ``tests/``; a test checks that the two are
the same: a Tower with LoRA of several ranks and alphas, rsLoRA, IA³ on inputs and
outputs, modules_to_save, a mixed LoRA+IA³ adapter and a custom layer) for each seed,
runs the test's nine rows once as a mixed batch and once row by row, and reports the
largest difference in units in the last place of the largest output magnitude (outputs
are below 8, so one unit is 2**-21 in fp32, 2**-8 in fp16, 2**-5 in bf16), which is the
unit the README states.

    python bench/measure_mixed_ulp.py --seeds 200
"""

from __future__ import annotations

import argparse
import math
import sys
from functools import partial
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import tinytune  # noqa: E402
from tinytune import AdapterWrapper, IA3Config, LinearLoraLayer, LoraConfig  # noqa: E402
from tinytune.layers import AdapterLayer, first_input  # noqa: E402


class Block(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.up_proj = nn.Linear(d, 2 * d)
        self.down_proj = nn.Linear(2 * d, d)

    def forward(self, x):
        h = self.q_proj(x) + self.v_proj(x)
        return x + self.down_proj(torch.relu(self.up_proj(h)))


class Tower(nn.Module):
    """Embedding -> nested blocks -> head."""

    def __init__(self, vocab: int = 32, d: int = 16, n: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, 3)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class Shift(AdapterLayer):
    """A custom layer: adds a learned vector to the input (pre) and scales the output."""

    def reset_params(self, prefix, target):
        self.shift = nn.Parameter(torch.randn(target.in_features) * 0.5)
        self.gain = nn.Parameter(torch.rand(target.out_features) + 0.5)

    def pre_forward(self, module, args, kwargs):
        x = first_input(args, kwargs)
        return (x + self.shift,) + tuple(args[1:]), kwargs

    def post_forward(self, module, args, kwargs, output):
        return output * self.gain


def randomize(wrapper: AdapterWrapper, seed: int = 1) -> None:
    """Random adapter weights, so every adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapper.named_adapter_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.3
            center = 1.0 if name.endswith("ia3_l") else 0.0
            p.copy_((noise + center).to(p.dtype))


def per_row_reference(wrapper: AdapterWrapper, x: torch.Tensor, names: list[str], **kw) -> torch.Tensor:
    """Each row run alone with only its adapter active (then the active set restored)."""
    active = wrapper.active_adapters
    outs = []
    try:
        for i, name in enumerate(names):
            wrapper.set_active_adapters([] if name == "__base__" else [name])
            outs.append(wrapper(x[i : i + 1], **kw))
    finally:
        wrapper.set_active_adapters(active)
    return torch.cat(outs)


def many_kinds(tower: nn.Module) -> AdapterWrapper:
    """Adapters of every stacked kind plus modules_to_save, on overlapping modules."""
    w = AdapterWrapper.from_config(
        tower, LoraConfig(target_modules=["q_proj", "v_proj", "embed"], r=4, init_lora_weights=False), "a"
    )
    # Another rank and alpha, rsLoRA, and no layer on v_proj/embed: those rows pass through.
    w.add_adapter_from_config(
        LoraConfig(target_modules=["q_proj", "up_proj"], r=8, lora_alpha=3, use_rslora=True,
                   init_lora_weights=False),
        "b",
    )  # fmt: skip
    w.add_adapter_from_config(
        IA3Config(target_modules=["up_proj", "down_proj", "q_proj"], feedforward_modules=["down_proj"]), "c"
    )
    w.add_adapter_from_config(LoraConfig(target_modules=["up_proj"], r=2, modules_to_save=["head"]), "m")
    # One adapter mixing LoRA and IA3 across layers.
    w.add_adapter("mix")
    w.add_adapter_layer("mix", "layers.0.q_proj", partial(LinearLoraLayer, r=3, lora_alpha=5))
    w.add_adapter_layer("mix", "layers.1.down_proj", partial(tinytune.LinearIA3Layer, is_feedforward=True))
    w.add_adapter_layer("mix", "layers.1.v_proj", tinytune.LinearIA3Layer)
    # A custom layer (pre- and post-forward) where stacked kinds of others also sit.
    w.add_adapter("s")
    w.add_adapter_layer("s", "layers.0.q_proj", Shift)
    randomize(w)
    return w


NAMES = ["a", "__base__", "b", "c", "m", "mix", "s", "b", "a"]

MANTISSA = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}


def measure(dtype: torch.dtype, seed: int) -> float:
    torch.manual_seed(seed)
    w = many_kinds(Tower().eval())
    w.to(dtype)
    ids = torch.randint(0, 32, (len(NAMES), 5))
    with torch.no_grad():
        ref = per_row_reference(w, ids, NAMES).float()
        out = w(ids, adapter_names=NAMES).float()
    top = ref.abs().max().item()
    ulp = 2.0 ** (math.floor(math.log2(top)) - MANTISSA[dtype])
    return (out - ref).abs().max().item() / ulp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        ulps = sorted(measure(dtype, s) for s in range(args.seeds))
        worst = ulps[-1]
        print(
            f"{str(dtype):16s} seeds={args.seeds}: max {worst:.1f} ulp, "
            f"p99 {ulps[int(0.99 * (len(ulps) - 1))]:.1f}, median {ulps[len(ulps) // 2]:.1f}"
        )


if __name__ == "__main__":
    main()
