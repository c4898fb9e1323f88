"""pytest-benchmark suite: one adapted linear layer, per path, at decode and prefill sizes.

Not part of the test command (which collects ``tests/`` only). Run it, save a run, and
compare a later run against it with:

    python -m pytest bench/test_bench_layers.py --benchmark-only --benchmark-autosave
    python -m pytest bench/test_bench_layers.py --benchmark-only --benchmark-compare

(runs are saved under ``.benchmarks/``, which git ignores; ``--benchmark-compare=0001``
picks a particular one). Each benchmark records its variant and shape in ``extra_info``.

Variants, through tinytune's public API on a module holding one ``nn.Linear``:

* ``merged``: the LoRA folded into the weight (the bare layer's cost);
* ``unmerged-torch``: the hook on the PyTorch path;
* ``unmerged-fused``: the fused Triton kernel (CUDA with Triton only; skipped elsewhere);
* ``mixed``: 16 adapters loaded, one per row (``adapter_names=``), the mixed-batch path.

CPU runs use one torch thread (stable numbers); CUDA calls are synchronised.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tinytune
from tinytune import AdapterWrapper, LoraConfig
from tinytune.benchmark import fused_unavailable

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
RANK = 16
ADAPTERS = 16
SHAPES = [(512, 512), (512, 1376), (1376, 512)]  # (in, out): attention and MLP projections
SIZES = {"decode": (16, 1), "prefill": (4, 128)}  # (rows, tokens per row)


class One(nn.Module):
    def __init__(self, k: int, n: int) -> None:
        super().__init__()
        self.proj = nn.Linear(k, n, bias=False)

    def forward(self, x):
        return self.proj(x)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    if DEVICE.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _wrapper(k: int, n: int, adapters: int) -> AdapterWrapper:
    torch.manual_seed(0)
    w = AdapterWrapper(One(k, n).to(DEVICE, DTYPE).eval())
    config = LoraConfig(target_modules=["proj"], r=RANK, lora_alpha=2 * RANK, init_lora_weights=False)
    for i in range(adapters):
        w.add_adapter_from_config(config, f"a{i}", activate=i == 0)
    return w.eval()


def _sync(fn):
    if DEVICE.type != "cuda":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize()
        return out

    return call


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("variant", ["merged", "unmerged-torch", "unmerged-fused", "mixed"])
def test_adapted_linear(benchmark, variant, shape, size):
    k, n = shape
    rows, tokens = SIZES[size]
    if variant == "unmerged-fused" and (why := fused_unavailable(DEVICE)):
        pytest.skip(why)
    benchmark.extra_info.update(
        variant=variant, in_features=k, out_features=n, rows=rows, tokens_per_row=tokens,
        rank=RANK, dtype=str(DTYPE), device=str(DEVICE),
        adapters_loaded=ADAPTERS if variant == "mixed" else 1, tinytune=tinytune.__version__,
    )
    x = torch.randn(rows, tokens, k, device=DEVICE, dtype=DTYPE)
    if variant == "mixed":
        w = _wrapper(k, n, ADAPTERS)
        names = [f"a{i % ADAPTERS}" for i in range(rows)]

        def fn():
            return w(x, adapter_names=names)
    else:
        w = _wrapper(k, n, 1)
        reference = copy.deepcopy(w)
        if variant == "merged":
            w.merge_adapters()
        mode = {"unmerged-torch": "torch", "unmerged-fused": "triton"}.get(variant)

        def fn():
            if mode is None or DEVICE.type != "cuda":
                return w(x)
            with tinytune.kernel_mode(mode):
                return w(x)

        with torch.inference_mode():  # the variant computes what the PyTorch path computes
            tol = 2e-4 if DTYPE is torch.float32 else 3e-2
            torch.testing.assert_close(fn(), reference(x), atol=tol, rtol=tol)
    with torch.inference_mode():
        benchmark(_sync(fn))
