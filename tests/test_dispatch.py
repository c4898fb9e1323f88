"""Dispatch: which path runs an adapted layer (fused kernel or PyTorch), and the hooks
that put the fused kernels behind a module without replacing it.

The kernels run here on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``,
as the README's test command sets), or natively on a CUDA device if there is one. Each
end-to-end test compares kernel mode ``"triton"`` against ``"torch"`` (the PyTorch path)
on tiny transformers models, and counts kernel calls so that a silent fallback fails.
"""

from __future__ import annotations

import copy
import gc
import os
import subprocess
import sys
import threading
import weakref

import pytest
import torch
from torch import nn

import tinytune
import tinytune.dispatch as dispatch
from tinytune.kernels.triton_support import HAS_TRITON
from tinytune import (
    AdapterLayer,
    AdapterWrapper,
    IA3Config,
    InvalidConfigError,
    KernelUnavailableError,
    LinearIA3Layer,
    LinearLoraLayer,
    LoraConfig,
)

from conftest import ConvNet, Tower, hook_count, tiny_gpt2, tiny_llama

transformers = pytest.importorskip("transformers")

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Natively on a GPU (ci/gpu_check.sh runs this file there) every model and input is a
# CUDA tensor; under the interpreter (the README's test command) CPU tensors, also on a
# machine that has a GPU (as the kernel tests do).
DEVICE = "cuda" if CUDA and not INTERPRET else "cpu"
needs_kernels = pytest.mark.skipif(
    not (dispatch.fusion_possible() and (CUDA or INTERPRET)),
    reason="needs Triton and a CUDA device or TRITON_INTERPRET=1",
)
needs_cuda = pytest.mark.skipif(
    DEVICE != "cuda" or not dispatch.fusion_possible(),
    reason="needs Triton and a CUDA device, without TRITON_INTERPRET (ci/gpu_check.sh runs it)",
)
# Relative to the logits' scale. fp32: both paths compute in fp32, no TF32 (the kernels'
# dots use input_precision="ieee"; torch's default for fp32 matmuls on CUDA is also full
# fp32), so they differ only by summation order. bf16: the kernels multiply bf16 operands
# exactly and accumulate in fp32, on GPU tensor cores as on the interpreter (which upcasts
# them), and round once; the PyTorch path rounds each intermediate (x Aᵀ, its scaled
# product with Bᵀ, the sum) to bf16's 8-bit mantissa, so the layers' outputs differ by a
# few bf16 ulps, which the following layers carry to the logits. The same holds on a GPU:
# the K of these tiny models is too small for cuBLAS's reduced-precision split-K.
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def _default_mode(monkeypatch):
    monkeypatch.delenv("TINYTUNE_KERNELS", raising=False)
    tinytune.set_kernel_mode(None)
    yield
    tinytune.set_kernel_mode(None)


class Count:
    """Counts calls of the kernel ops that dispatch makes (and still runs them)."""

    def __init__(self, monkeypatch):
        self.single = self.mixed = 0
        ops = dispatch.kernel_ops()
        single, mixed = ops.lora_linear, ops.lora_mixed_linear

        def count_single(*a):
            self.single += 1
            return single(*a)

        def count_mixed(*a):
            self.mixed += 1
            return mixed(*a)

        monkeypatch.setattr(ops, "lora_linear", count_single)
        monkeypatch.setattr(ops, "lora_mixed_linear", count_mixed)


def llama(dtype=torch.float32, layers=2):
    model = tiny_llama(
        vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=layers,
        max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    return model.to(DEVICE, dtype)


def gpt2(dtype=torch.float32):
    model = tiny_gpt2(n_embd=32, vocab_size=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return model.to(DEVICE, dtype)


def randomise(wrapper, seed=0):
    """Random adapter weights (IA³ scales around 1), so every adapter changes outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapper.named_adapter_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.3
            p.copy_((noise + (1.0 if name.endswith("ia3_l") else 0.0)).to(p.dtype))


def ids(rows=2, tokens=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 64, (rows, tokens), generator=g).to(DEVICE)


def both_paths(fn):
    """``fn()`` under kernel modes 'torch' and 'triton', without autograd."""
    with torch.no_grad():
        with tinytune.kernel_mode("torch"):
            ref = fn()
        with tinytune.kernel_mode("triton"):
            out = fn()
    return ref, out


def assert_close(out, ref, dtype):
    scale = ref.float().abs().max().item()
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= TOL[dtype] * max(scale, 1.0), (err, scale)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, snap):
    now = model.state_dict()
    return now.keys() == snap.keys() and all(torch.equal(now[k], v) for k, v in snap.items())


def stacks_empty(wrapper):
    """No call state left on this thread: no handed-over values, no mixed-batch plan."""
    return all(
        not s.call_state.stack and not hasattr(s.call_state, "mixed")
        for s in wrapper.registry.sites.values()
    )


# ----------------------------------------------------------------------------------------
# the mode API
# ----------------------------------------------------------------------------------------
def test_mode_api_and_context_manager():
    assert tinytune.get_kernel_mode() == "auto"
    tinytune.set_kernel_mode("TORCH")  # case-insensitive
    assert tinytune.get_kernel_mode() == "torch"
    with tinytune.kernel_mode("triton") as mode:
        assert mode == "triton" and tinytune.get_kernel_mode() == "triton"
        with tinytune.kernel_mode("auto"):
            assert tinytune.get_kernel_mode() == "auto"
        assert tinytune.get_kernel_mode() == "triton"
    assert tinytune.get_kernel_mode() == "torch"
    with pytest.raises(ZeroDivisionError):
        with tinytune.kernel_mode("triton"):
            1 / 0
    assert tinytune.get_kernel_mode() == "torch"
    for bad in ("fast", "", None, 3):
        with pytest.raises(InvalidConfigError, match="'auto', 'triton', 'torch'"):
            with tinytune.kernel_mode(bad):
                pass
    with pytest.raises(ValueError, match="must be one of"):
        tinytune.set_kernel_mode("cuda")
    assert tinytune.get_kernel_mode() == "torch"  # a refused mode changes nothing
    assert issubclass(KernelUnavailableError, tinytune.TinytuneError)
    assert issubclass(KernelUnavailableError, RuntimeError)


def test_kernel_mode_is_per_thread():
    seen = {}
    inside, release = threading.Event(), threading.Event()

    def other():
        inside.wait()
        seen["other"] = tinytune.get_kernel_mode()
        with tinytune.kernel_mode("triton"):
            seen["other_block"] = tinytune.get_kernel_mode()
            release.set()

    t = threading.Thread(target=other)
    t.start()
    with tinytune.kernel_mode("torch"):
        inside.set()
        release.wait()
        seen["main"] = tinytune.get_kernel_mode()
    t.join()
    assert seen == {"other": "auto", "other_block": "triton", "main": "torch"}
    tinytune.set_kernel_mode("torch")  # process-wide: seen by a new thread
    t = threading.Thread(target=lambda: seen.update(new=tinytune.get_kernel_mode()))
    t.start()
    t.join()
    assert seen["new"] == "torch"


def test_env_var(monkeypatch, tower):
    monkeypatch.setenv("TINYTUNE_KERNELS", "torch")
    assert tinytune.get_kernel_mode() == "torch"
    tinytune.set_kernel_mode("triton")  # Python wins over the environment
    assert tinytune.get_kernel_mode() == "triton"
    monkeypatch.setenv("TINYTUNE_KERNELS", "Triton ")
    tinytune.set_kernel_mode(None)  # back to the environment, re-read
    assert tinytune.get_kernel_mode() == "triton"
    monkeypatch.setenv("TINYTUNE_KERNELS", "gpu")
    with pytest.raises(InvalidConfigError, match="TINYTUNE_KERNELS"):
        tinytune.get_kernel_mode()
    # ... and so does an adapted layer that needs the mode.
    w = AdapterWrapper.from_config(tower, LoraConfig(target_modules=["head"]))
    with pytest.raises(InvalidConfigError, match="TINYTUNE_KERNELS"):
        w(torch.zeros(1, 3, dtype=torch.long))
    with tinytune.kernel_mode("torch"):  # an explicit mode does not need the variable
        w(torch.zeros(1, 3, dtype=torch.long))


def test_env_var_in_a_new_process_and_without_triton():
    """``import tinytune`` works without Triton; 'auto' then uses PyTorch and 'triton'
    says why it cannot run. The environment variable sets the default."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # import triton -> ImportError
        "import torch, tinytune\n"
        "from tinytune.kernels.triton_support import HAS_TRITON\n"
        "assert not HAS_TRITON\n"
        "assert tinytune.get_kernel_mode() == 'torch', tinytune.get_kernel_mode()\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 4))\n"
        "w = tinytune.AdapterWrapper.from_config(m, tinytune.LoraConfig(target_modules=['0']))\n"
        "x = torch.randn(2, 4)\n"
        "ref = m[0](x)\n"
        "tinytune.set_kernel_mode('auto')\n"
        "assert torch.equal(w(x), ref)\n"
        "try:\n"
        "    with tinytune.kernel_mode('triton'):\n"
        "        w(x)\n"
        "except tinytune.KernelUnavailableError as e:\n"
        "    print('ERR', e)\n"
    )
    env = dict(os.environ, TINYTUNE_KERNELS="torch", TRITON_INTERPRET="1")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "ERR" in out.stdout and "Triton is not installed" in out.stdout


# ----------------------------------------------------------------------------------------
# mode 'triton': a clear error for what the kernels cannot run, and nothing changes
# ----------------------------------------------------------------------------------------
class Shift(AdapterLayer):
    def reset_params(self, prefix, target):
        self.shift = nn.Parameter(torch.zeros(()))

    def post_forward(self, module, args, kwargs, output):
        return output + self.shift


def _custom(model):
    w = AdapterWrapper(model)
    w.add_adapter("c")
    w.add_adapter_layer("c", "layers.0.q_proj", Shift())
    return w


@pytest.mark.parametrize(
    "case, match",
    [
        ("custom", "Shift is not a built-in"),
        ("embedding", "Embedding"),
        ("dtype", "float64"),
        ("grad", "gradient is needed"),
        ("dropout", "dropout is active"),
        ("cpu", "CPU tensor"),
    ],
)
def test_triton_mode_refuses_with_a_reason(case, match, tower, monkeypatch):
    if case in ("dtype", "grad", "dropout", "cpu") and not HAS_TRITON:
        pytest.skip("without Triton every call is refused for that reason first")
    if case in ("dtype", "grad", "dropout") and not (CUDA or INTERPRET):
        pytest.skip("no CUDA and no TRITON_INTERPRET=1: every call is refused as a CPU call first")
    x = torch.randint(0, 32, (2, 3))
    if case == "custom":
        w = _custom(tower)
    elif case == "embedding":
        w = AdapterWrapper.from_config(tower, LoraConfig(target_modules=["embed"]))
    else:
        if case == "dtype":
            tower.double()
        cfg = LoraConfig(target_modules=["q_proj"], lora_dropout=0.1 if case == "dropout" else 0.0)
        w = AdapterWrapper.from_config(tower, cfg)
        if case == "dropout":
            w.train()
        if case == "cpu":
            monkeypatch.setattr(dispatch.kernel_ops(), "interpret", False)
    randomise(w)
    if case != "cpu":  # on a GPU machine, everything else runs on the GPU
        w.to(DEVICE)
        x = x.to(DEVICE)
    snap, hooks = state(w), hook_count(tower)
    with torch.no_grad():
        ref = None if case in ("dropout",) else w(x)
    with tinytune.kernel_mode("triton"), pytest.raises(KernelUnavailableError, match=match) as e:
        if case == "grad":
            w(x)  # autograd on, adapter parameters trainable
        else:
            with torch.no_grad():
                w(x)
    assert "kernel mode 'auto'" in str(e.value) and "layers.0.q_proj" in str(e.value) or (
        case == "embedding" and "'embed'" in str(e.value)
    )
    assert same_state(w, snap) and hook_count(tower) == hooks and stacks_empty(w)
    if ref is not None:
        with torch.no_grad():
            assert torch.equal(w(x), ref)  # still the model it was


def test_triton_mode_refuses_conv2d():
    model = ConvNet().eval().to(DEVICE)
    w = AdapterWrapper.from_config(model, LoraConfig(target_modules=["conv"]))
    with torch.no_grad(), tinytune.kernel_mode("triton"):
        with pytest.raises(KernelUnavailableError, match="Conv2d"):
            w(torch.randn(1, 3, 6, 6, device=DEVICE))


# ----------------------------------------------------------------------------------------
# end to end: triton == torch
# ----------------------------------------------------------------------------------------
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_one_and_several_adapters(dtype, monkeypatch):
    model = llama(dtype, layers=1)
    w = AdapterWrapper.from_config(model, LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_ALL))
    w.add_adapter_from_config(LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "o_proj"]), "b")
    # IA³ on modules with LoRA: output scales (k, v) and a feed-forward input scale (down).
    w.add_adapter_from_config(
        IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]), "c"
    )
    randomise(w)
    x = ids()
    count = Count(monkeypatch)
    cases = [
        (["default"], 7),
        (["default", "b", "c"], 7),  # IA³ outermost: folded into the LoRAs' A/B
        (["c", "b", "default"], 7),  # IA³ innermost: it sees the raw input/output
        (["c"], 2),  # IA³ only: l_in / l_out, no LoRA
    ]
    for active, fused_sites in cases if dtype == torch.float32 else cases[1:3]:
        w.set_active_adapters(active)
        count.single = 0
        ref, out = both_paths(lambda: w(x).logits)
        assert count.single == fused_sites, active
        assert out.dtype == ref.dtype == dtype
        assert_close(out, ref, dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt2_conv1d(dtype, monkeypatch):
    model = gpt2(dtype)
    w = AdapterWrapper.from_config(model, LoraConfig(r=4, target_modules=["c_attn", "c_fc"]))
    w.add_adapter_from_config(
        IA3Config(target_modules=["c_fc", "c_proj"], feedforward_modules=["c_proj"]), "ia3"
    )
    w.set_active_adapters(["default", "ia3"])
    randomise(w, seed=1)
    count = Count(monkeypatch)
    ref, out = both_paths(lambda: w(ids()).logits)
    # c_attn, c_fc (LoRA + IA³), mlp.c_proj and attn.c_proj (IA³) per block.
    assert count.single == 2 * 4
    assert_close(out, ref, dtype)


@needs_kernels
def test_fused_path_inputs_and_grad_modes(mlp, monkeypatch):
    """1-D and keyword inputs, inference_mode, and autograd on with frozen adapters
    (nothing requires grad: the fused path is allowed)."""
    w = AdapterWrapper.from_config(mlp, LoraConfig(r=2, target_modules=["lin0", "lin1"]))
    randomise(w)
    w.to(DEVICE)
    count = Count(monkeypatch)
    for x in (torch.randn(10), torch.randn(2, 3, 10)):
        x = x.to(DEVICE)
        ref, out = both_paths(lambda: w(x))
        assert out.shape == ref.shape
        assert_close(out, ref, torch.float32)
        with torch.inference_mode(), tinytune.kernel_mode("triton"):
            assert_close(w(x), ref, torch.float32)
        with torch.no_grad(), tinytune.kernel_mode("triton"):
            assert_close(mlp.lin0(input=x), mlp.lin0(x), torch.float32)
    assert count.single == 2 * 2 * 2 + 2 * 2
    for p in w.adapter_parameters():
        p.requires_grad_(False)
    with tinytune.kernel_mode("triton"):  # autograd on, but nothing requires grad
        assert_close(w(x), ref, torch.float32)


@needs_kernels
def test_threads_with_different_modes(tower, monkeypatch):
    w = AdapterWrapper.from_config(tower, LoraConfig(target_modules=["q_proj", "up_proj"]))
    randomise(w)
    w.to(DEVICE)
    xs = [torch.randint(0, 32, (2, 3), generator=torch.Generator().manual_seed(i)).to(DEVICE) for i in range(4)]
    with torch.no_grad(), tinytune.kernel_mode("torch"):
        refs = [w(x) for x in xs]
    count = Count(monkeypatch)
    results: dict = {}
    start = threading.Barrier(2)

    def run(mode):
        with torch.no_grad(), tinytune.kernel_mode(mode):
            start.wait()
            results[mode] = [w(x) for x in xs]
            results[mode + "_mode"] = tinytune.get_kernel_mode()

    threads = [threading.Thread(target=run, args=(m,)) for m in ("triton", "torch")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["triton_mode"] == "triton" and results["torch_mode"] == "torch"
    assert count.single == 4 * len(xs)  # only the 'triton' thread's calls
    for mode in ("triton", "torch"):
        for got, ref in zip(results[mode], refs):
            assert_close(got, ref, torch.float32)


@needs_kernels
def test_module_sees_an_empty_batch(monkeypatch):
    """The module's own matmul gets no rows on the fused path: a forward hook registered
    before the wrapper's (so it sees the module's raw output) records the shapes."""
    model = llama()
    seen = []
    q = model.model.layers[0].self_attn.q_proj
    q.register_forward_hook(lambda m, a, out: seen.append((a[0].shape[0], out.shape[0])))
    w = AdapterWrapper.from_config(model, LoraConfig(target_modules=["q_proj"]))
    randomise(w)
    ref, out = both_paths(lambda: w(ids(3, 4)).logits)
    assert seen == [(3, 3), (0, 0)]  # torch path: the real batch; fused: empty
    assert_close(out, ref, torch.float32)


@needs_kernels
def test_auto_falls_back_per_layer(monkeypatch):
    """'auto' on a device it considers (CUDA; on a CPU-only machine the CPU, for the
    test) runs the layers the kernels can run fused and the others on PyTorch, in one
    forward."""
    if DEVICE == "cpu":  # on a GPU: the real rule, CUDA tensors
        monkeypatch.setattr(dispatch, "auto_device", lambda x: True)
    model = Tower().eval()
    w = AdapterWrapper.from_config(model, LoraConfig(target_modules=["q_proj", "v_proj", "embed"]))
    w.add_adapter("c")
    w.add_adapter_layer("c", "layers.1.up_proj", Shift())
    randomise(w)
    x = torch.randint(0, 32, (2, 3)).to(DEVICE)
    w.to(DEVICE)
    count = Count(monkeypatch)
    with torch.no_grad():
        with tinytune.kernel_mode("torch"):
            ref = w(x)
        assert count.single == 0
        out = w(x)  # auto
    assert count.single == 4  # q_proj, v_proj of both blocks; not embed, not up_proj
    assert_close(out, ref, torch.float32)
    with torch.no_grad(), tinytune.kernel_mode("triton"):
        with pytest.raises(KernelUnavailableError):
            w(x)
    # Autograd on with trainable adapters: 'auto' runs everything on PyTorch.
    count.single = 0
    w(x).sum().backward()
    assert count.single == 0 and w.adapters["default"]["layers.0.q_proj"].lora_B.weight.grad is not None


@needs_kernels
def test_rank_above_the_kernel_limit_falls_back_per_module(monkeypatch):
    """lora_linear takes a total rank up to 256: 'auto' runs a module whose active LoRAs
    add up to more (one of r=300, or 200 + 100 concatenated) on PyTorch and the others
    fused; 'triton' refuses naming the module and the rank. Mixed calls (lora_mixed,
    which walks the rank in blocks) still run fused at rank 300."""
    if DEVICE == "cpu":  # on a GPU: the real rule, CUDA tensors
        monkeypatch.setattr(dispatch, "auto_device", lambda x: True)
    w = AdapterWrapper(Tower().eval().to(DEVICE))
    q0, v0 = "layers.0.q_proj", "layers.0.v_proj"
    w.add_adapter_from_config(LoraConfig(r=300, target_modules=[q0]), "big")
    w.add_adapter_from_config(LoraConfig(r=4, target_modules=[v0]), "small")
    w.add_adapter_from_config(LoraConfig(r=200, target_modules=[v0]), "r200", activate=False)
    w.add_adapter_from_config(LoraConfig(r=100, target_modules=[v0]), "r100", activate=False)
    randomise(w)
    x = torch.randint(0, 32, (2, 3)).to(DEVICE)
    count = Count(monkeypatch)
    with torch.no_grad():
        with tinytune.kernel_mode("torch"):
            ref = w(x)
        out = w(x)  # auto
        assert count.single == 1  # v_proj; q_proj (rank 300) on PyTorch
        assert_close(out, ref, torch.float32)
        with tinytune.kernel_mode("triton"), pytest.raises(KernelUnavailableError) as err:
            w(x)
        assert q0 in str(err.value) and "300" in str(err.value)
        w.set_active_adapters(["r200", "r100"])  # 300 at v_proj, concatenated
        with tinytune.kernel_mode("torch"):
            ref = w(x)
        count.single = 0
        assert_close(w(x), ref, torch.float32)
        assert count.single == 0
        with tinytune.kernel_mode("triton"), pytest.raises(KernelUnavailableError) as err:
            w(x)
        assert v0 in str(err.value) and "300 (200 + 100)" in str(err.value)
        w.set_active_adapters("r200")  # alone it fits
        with tinytune.kernel_mode("torch"):
            ref = w(x)
        assert_close(w(x), ref, torch.float32)
        assert count.single == 1
        names = ["big", "__base__"]
        with tinytune.kernel_mode("torch"):
            ref = w(x, adapter_names=names)
        with tinytune.kernel_mode("triton"):
            assert_close(w(x, adapter_names=names), ref, torch.float32)
        assert count.mixed == 2  # q_proj (rank 300) and v_proj (identity rows), fused


@needs_kernels
def test_nothing_left_behind_after_an_exception(monkeypatch):
    """A forward that raises between the pre-hook (which took the real input) and the
    post-hook leaves no call state: nothing on the thread-local stacks, and the inputs
    of the failed call are freed."""
    model = llama()
    q = model.model.layers[0].self_attn.q_proj
    down = model.model.layers[0].mlp.down_proj
    fail = {"on": False}
    inputs = []

    def boom(module, args, out):
        if fail["on"]:
            raise RuntimeError("boom")

    # Registered before the wrapper's hooks: they run before its pre-hook (recording the
    # real input) and before its post-hook (raising after the module ran).
    for m in (q, down):
        m.register_forward_pre_hook(lambda m, a: inputs.append(weakref.ref(a[0])))
        m.register_forward_hook(boom)
    w = AdapterWrapper.from_config(model, LoraConfig(target_modules=["q_proj", "down_proj"]))
    w.add_adapter_from_config(
        IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"]), "c"
    )
    w.set_active_adapters(["default", "c"])  # down_proj: IA³ pre-forward wraps a LoRA
    randomise(w)
    x = ids()
    ref_torch, ref_triton = both_paths(lambda: w(x).logits)
    fail["on"] = True
    for mode in ("torch", "triton"):
        inputs.clear()
        with torch.no_grad(), tinytune.kernel_mode(mode):
            try:
                w(x)
            except RuntimeError as e:
                assert "boom" in str(e)
            else:
                raise AssertionError("no exception")
        gc.collect()
        assert stacks_empty(w), mode
        assert inputs and all(r() is None for r in inputs), mode
    fail["on"] = False
    again_torch, again_triton = both_paths(lambda: w(x).logits)
    assert torch.equal(again_torch, ref_torch) and torch.equal(again_triton, ref_triton)


@needs_kernels
def test_compile_fullgraph_triton_mode():
    model = Tower().eval().to(DEVICE)
    w = AdapterWrapper.from_config(model, LoraConfig(target_modules=["q_proj", "up_proj"]))
    w.add_adapter_from_config(IA3Config(target_modules=["up_proj"]), "ia3")
    w.set_active_adapters(["default", "ia3"])
    randomise(w)
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


@needs_cuda
def test_cuda_graph_capture_triton_mode(monkeypatch):
    """The fused path inside a CUDA graph: capture fails on a host sync or a host-to-device
    copy in the hooks or the kernels, and replays must recompute from the current input
    and adapter weights (the op inputs, IA³ folded into B here, are built in the graph)."""
    model = Tower().eval().to(DEVICE)
    w = AdapterWrapper.from_config(model, LoraConfig(target_modules=["q_proj", "up_proj"]))
    w.add_adapter_from_config(IA3Config(target_modules=["up_proj"]), "ia3")
    w.set_active_adapters(["default", "ia3"])
    randomise(w)
    static_x = torch.randint(0, 32, (2, 3)).to(DEVICE)
    count = Count(monkeypatch)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), tinytune.kernel_mode("triton"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture: Triton compiles
            w(static_x)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            static_out = w(static_x)
    assert count.single == 2 * 4  # q_proj, up_proj of both blocks; warm-up and capture
    for seed in (1, 2):
        x = torch.randint(0, 32, (2, 3), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
        randomise(w, seed=seed)  # in place: the graph reads the parameters' memory
        static_x.copy_(x)
        graph.replay()
        with torch.no_grad(), tinytune.kernel_mode("torch"):
            ref = w(x)
        assert_close(static_out, ref, torch.float32)
    assert count.single == 2 * 4 and stacks_empty(w)  # replays run no Python


# ----------------------------------------------------------------------------------------
# mixed batches (adapter_names=) in mode 'triton'
# ----------------------------------------------------------------------------------------
def _mixed_llama(dtype=torch.float32):
    model = llama(dtype)
    w = AdapterWrapper.from_config(model, LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_ALL), "a")
    # Adapts only some layers (block 1's attention), at another rank.
    w.add_adapter_from_config(
        LoraConfig(r=2, lora_alpha=4, target_modules=r"model\.layers\.1\.self_attn\.(q|v)_proj"), "b"
    )
    w.add_adapter_from_config(
        IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]), "c"
    )
    randomise(w, seed=2)
    return w


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_batch_triton_mode(dtype, monkeypatch):
    w = _mixed_llama(dtype)
    names = ["a", "__base__", "b", "c", "a", "__base__"]
    x = ids(len(names), 4)
    count = Count(monkeypatch)
    ref, out = both_paths(lambda: w(x, adapter_names=names).logits)
    assert count.mixed == 14 and count.single == 0  # every adapted Linear, once
    assert_close(out, ref, dtype)
    # Base rows are the bare model's rows.
    with torch.no_grad(), tinytune.kernel_mode("triton"), w.disable_adapter():
        base = w(x).logits
    assert_close(out[1], base[1], dtype)
    assert stacks_empty(w)


@needs_kernels
def test_mixed_generate_triton_mode_matches_torch(monkeypatch):
    w = _mixed_llama()
    names = ["a", "b", "__base__", "c"]
    x = ids(len(names), 3, seed=3)
    count = Count(monkeypatch)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=1)
    ref, out = both_paths(lambda: w.generate(x, adapter_names=names, **kw))
    assert count.mixed > 0
    assert torch.equal(out, ref)


@needs_kernels
def test_mixed_triton_mode_refuses_custom_and_embedding_layers(tower):
    w = AdapterWrapper.from_config(tower.to(DEVICE), LoraConfig(target_modules=["q_proj", "embed"]), "a")
    x = torch.randint(0, 32, (2, 3)).to(DEVICE)
    snap = state(w)
    with torch.no_grad(), tinytune.kernel_mode("triton"):
        with pytest.raises(KernelUnavailableError, match="Embedding"):
            w(x, adapter_names=["a", "__base__"])
    w2 = _custom(copy.deepcopy(Tower().eval().to(DEVICE)))
    with torch.no_grad(), tinytune.kernel_mode("triton"):
        with pytest.raises(KernelUnavailableError, match="Shift"):
            w2(x, adapter_names=["c", "__base__"])
    assert same_state(w, snap) and stacks_empty(w) and stacks_empty(w2)
    # 'auto' falls back, and the mixed call still works.
    with torch.no_grad():
        w(x, adapter_names=["a", "__base__"])


def test_cpu_auto_is_unchanged(mlp):
    """On the CPU, mode 'auto' is the PyTorch path, bit for bit."""
    w = AdapterWrapper.from_config(mlp, LoraConfig(target_modules=["lin0", "lin1"]))
    randomise(w)
    x = torch.randn(4, 10)
    with torch.no_grad():
        with tinytune.kernel_mode("torch"):
            ref = w(x)
        assert torch.equal(w(x), ref)
