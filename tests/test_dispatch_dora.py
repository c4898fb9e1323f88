"""DoRA layers on the fused kernels (issue 22, part 5): dispatch hands ``dora_scale()`` to
``lora_linear`` as its column scale, and mixed batches write DoRA layers into the per-row
kernel's inputs with their scales.

Each test runs kernel mode ``"triton"`` (the kernels, through Triton's interpreter on the
CPU, ``TRITON_INTERPRET=1``, or natively on a GPU) against ``"torch"`` (the PyTorch path)
on a tiny model, and counts the kernel calls, so a silent fallback fails. Tolerances are
test_dispatch.py's: fp32, summation order only; bf16, a few ulps of the logits carried
through the layers.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import tinytune
import tinytune.dispatch as dispatch
from tinytune import AdapterWrapper, IA3Config, KernelUnavailableError, LoraConfig

from conftest import Tower, tiny_gpt2, tiny_llama

transformers = pytest.importorskip("transformers")

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if CUDA and not INTERPRET else "cpu"
needs_kernels = pytest.mark.skipif(
    not (dispatch.fusion_possible() and (CUDA or INTERPRET)),
    reason="needs Triton and a CUDA device or TRITON_INTERPRET=1",
)
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _default_mode(monkeypatch):
    monkeypatch.delenv("TINYTUNE_KERNELS", raising=False)
    tinytune.set_kernel_mode(None)
    yield
    tinytune.set_kernel_mode(None)


class Count:
    """Counts the kernel ops' calls (and still runs them); ``col`` holds the column scale
    each call passed (``None``: none)."""

    def __init__(self, monkeypatch):
        self.single, self.mixed, self.col = 0, 0, []
        ops = dispatch.kernel_ops()
        single, mixed = ops.lora_linear, ops.lora_mixed_linear

        def count_single(*a):
            self.single += 1
            self.col.append(a[9] if len(a) > 9 else None)
            return single(*a)

        def count_mixed(*a):
            self.mixed += 1
            self.col.append(a[13] if len(a) > 13 else None)
            return mixed(*a)

        monkeypatch.setattr(ops, "lora_linear", count_single)
        monkeypatch.setattr(ops, "lora_mixed_linear", count_mixed)


def llama(dtype=torch.float32):
    model = tiny_llama(
        vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    return model.to(DEVICE, dtype)


def randomise(wrapper, seed=0):
    """Random factors, magnitudes 0.5-1.5x their initial norms (so DoRA's scale is far
    from 1), IA³ scales around 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapper.named_adapter_parameters():
            if "magnitude" in name:
                p.mul_((torch.rand(p.shape, generator=g) + 0.5).to(p.device, p.dtype))
            else:
                noise = torch.randn(p.shape, generator=g) * 0.3
                p.copy_((noise + (1.0 if name.endswith("ia3_l") else 0.0)).to(p.dtype))


def ids(rows=2, tokens=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 64, (rows, tokens), generator=g).to(DEVICE)


def both_paths(fn):
    with torch.no_grad():
        with tinytune.kernel_mode("torch"):
            ref = fn()
        with tinytune.kernel_mode("triton"):
            out = fn()
    return ref, out


def assert_close(out, ref, dtype):
    scale = ref.float().abs().max().item()
    torch.testing.assert_close(out.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype] * scale)


def dora_llama(dtype=torch.float32):
    cfg = LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False, target_modules=LLAMA_ALL)
    w = AdapterWrapper.from_config(llama(dtype), cfg, "d")
    randomise(w, seed=1)
    return w


# ----------------------------------------------------------------------------------------
# one DoRA adapter: lora_linear with col_scale
# ----------------------------------------------------------------------------------------
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_single_dora_adapter_runs_fused(dtype, monkeypatch):
    w = dora_llama(dtype)
    x = ids()
    count = Count(monkeypatch)
    ref, out = both_paths(lambda: w(x).logits)
    assert count.single == 14 and count.mixed == 0  # every adapted Linear, once
    assert all(c is not None and c.dtype == torch.float32 for c in count.col)
    assert_close(out, ref, dtype)


@needs_kernels
def test_dora_scale_follows_in_place_updates_on_the_fused_path(monkeypatch):
    w = dora_llama()
    x = ids(seed=2)
    both_paths(lambda: w(x).logits)
    with torch.no_grad():
        for name, p in w.named_adapter_parameters():
            if "magnitude" in name:
                p.mul_(1.5)  # in place: the cached scales must be recomputed
    count = Count(monkeypatch)
    ref, out = both_paths(lambda: w(x).logits)
    assert count.single == 14
    assert_close(out, ref, torch.float32)


@needs_kernels
def test_gpt2_conv1d_dora_runs_fused(monkeypatch):
    model = tiny_gpt2(n_embd=32, vocab_size=64, bos_token_id=0, eos_token_id=0, pad_token_id=0).to(DEVICE)
    cfg = LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False,
                     target_modules=["c_attn", "c_proj", "c_fc"])  # fmt: skip
    w = AdapterWrapper.from_config(model, cfg, "d")
    randomise(w, seed=3)
    x = ids(seed=4)
    count = Count(monkeypatch)
    ref, out = both_paths(lambda: w(x).logits)
    assert count.single == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    assert_close(out, ref, torch.float32)


@needs_kernels
def test_dora_with_other_adapters_on_a_module_runs_on_pytorch():
    w = dora_llama()
    w.add_adapter_from_config(LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "l")
    w.set_active_adapters(["d", "l"])
    x = ids()
    with torch.no_grad(), tinytune.kernel_mode("triton"):
        with pytest.raises(KernelUnavailableError, match="DoRA layer is active on it together"):
            w(x)
    with torch.no_grad():
        with tinytune.kernel_mode("torch"):
            ref = w(x).logits
        assert torch.equal(w(x).logits, ref)  # 'auto': the PyTorch path, no error


# ----------------------------------------------------------------------------------------
# mixed batches: DoRA rows next to LoRA, IA³ and __base__ rows
# ----------------------------------------------------------------------------------------
def mixed_llama(dtype=torch.float32):
    w = dora_llama(dtype)
    w.add_adapter_from_config(LoraConfig(r=6, lora_alpha=8, target_modules=LLAMA_ALL), "a")
    w.add_adapter_from_config(
        IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]), "c"
    )
    # A second DoRA adapter on some modules only, at another rank.
    w.add_adapter_from_config(
        LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=r"model\.layers\.1\.self_attn\.(q|v)_proj"), "e"
    )
    randomise(w, seed=5)
    return w


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens", [1, 6], ids=["decode", "prefill"])
def test_mixed_batch_with_dora_rows_runs_fused(dtype, tokens, monkeypatch):
    w = mixed_llama(dtype)
    names = ["d", "__base__", "a", "c", "e", "d"]
    x = ids(len(names), tokens, seed=6)
    count = Count(monkeypatch)
    ref, out = both_paths(lambda: w(x, adapter_names=names).logits)
    assert count.mixed == 14 and count.single == 0
    assert all(c is not None for c in count.col)  # every module has a DoRA slot
    assert_close(out, ref, dtype)
    if dtype != torch.float32:
        return  # bf16: two kernels' roundings through the layers; fp32 checks the rows
    # Each row equals running its adapter alone (fused too).
    for i, name in enumerate(names):
        with torch.no_grad(), tinytune.kernel_mode("triton"):
            if name == "__base__":
                with w.disable_adapter():
                    alone = w(x[i : i + 1]).logits
            else:
                w.set_active_adapters(name)
                alone = w(x[i : i + 1]).logits
        assert_close(out[i : i + 1], alone, dtype)


@needs_kernels
def test_mixed_batch_without_dora_rows(monkeypatch):
    """DoRA adapters held in slots but used by no row: their scales (if passed) touch no
    row; LoRA, IA³ and base rows come out as on the PyTorch path."""
    w = mixed_llama()
    names = ["a", "c", "__base__"]
    x = ids(len(names), 3, seed=7)
    count = Count(monkeypatch)
    ref, out = both_paths(lambda: w(x, adapter_names=names).logits)
    assert count.mixed == 14
    assert_close(out, ref, torch.float32)


@needs_kernels
def test_mixed_batch_stacks_unchanged_by_dora_rows():
    """The DoRA rows go into copies: the slots' own stacks (which the adapters'
    parameters view) are not written."""
    w = mixed_llama()
    names = ["d", "a", "e"]
    x = ids(len(names), 2, seed=8)
    before = {n: p.detach().clone() for n, p in w.named_adapter_parameters()}
    both_paths(lambda: w(x, adapter_names=names).logits)
    for n, p in w.named_adapter_parameters():
        assert torch.equal(p, before[n]), n
    with torch.no_grad(), tinytune.kernel_mode("torch"):
        again = w(copy.deepcopy(x), adapter_names=names).logits
        w.set_active_adapters("d")
        alone = w(x[:1]).logits
    assert_close(again[:1], alone, torch.float32)


# ----------------------------------------------------------------------------------------
# torch.compile: the op stays in the graph with the column scale, no graph break
# ----------------------------------------------------------------------------------------
@needs_kernels
def test_compile_fullgraph_dora_triton_mode():
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, use_dora=True, init_lora_weights=False, target_modules=["q_proj", "up_proj"])
    w = AdapterWrapper.from_config(Tower().eval().to(DEVICE), cfg, "d")
    randomise(w, seed=9)
    x = torch.randint(0, 32, (2, 3)).to(DEVICE)
    ops = []

    def backend(gm, example_inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(w, backend=backend, fullgraph=True)
    ref, out = both_paths(lambda: w(x))
    with torch.no_grad(), tinytune.kernel_mode("triton"):
        got = compiled(x)
    assert sum("tinytune.lora_linear" in op for op in ops) == 4
    assert_close(got, ref, torch.float32)
    assert_close(got, out, torch.float32)
    torch._dynamo.reset()
