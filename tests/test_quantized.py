"""Adapters on quantized base models (issue 21): bitsandbytes 4-bit (nf4, fp4; fp32 and
bf16 compute) and 8-bit, torchao int8 and float8 weight-only, each loaded through
transformers (``BitsAndBytesConfig`` / ``TorchAoConfig``) from a tiny Llama saved to a
temporary directory (nothing is downloaded).

For every kind: the kind is detected, forward and files match PEFT both ways, QLoRA
training reaches only the adapter, mixed batches equal single runs, IA³ runs, a merge is
refused with nothing changed, ``merge_and_unload(dequantize=True)`` is exact, ``unload``
gives the quantized model back bit-identical, and the fused kernels refuse the weight.
Unknown weight layouts are refused with nothing changed.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")

from peft import PeftModel, get_peft_model  # noqa: E402
from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_  # noqa: E402

import tinytune as tt  # noqa: E402
from tinytune import weights  # noqa: E402
from tinytune.errors import (  # noqa: E402
    KernelUnavailableError,
    MergeNotSupportedError,
    UnsupportedModuleError,
)

from conftest import IDS, hook_count, randomize, small, tiny_llama  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _bnb(**kw):
    return lambda: transformers.BitsAndBytesConfig(**kw)


# kind id -> (the quantization_config, the kind weight_kind reports)
KINDS = {
    "nf4": (_bnb(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32), "bnb_nf4"),
    "nf4-bf16": (_bnb(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16), "bnb_nf4"),
    "fp4": (_bnb(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32), "bnb_fp4"),
    "fp4-bf16": (_bnb(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.bfloat16), "bnb_fp4"),
    "int8": (_bnb(load_in_8bit=True), "bnb_int8"),
    "ao-int8": (lambda: transformers.TorchAoConfig(Int8WeightOnlyConfig()), "torchao_int8"),
    "ao-fp8": (lambda: transformers.TorchAoConfig(Float8WeightOnlyConfig()), "torchao_fp8"),
}
# LLM.int8() (bitsandbytes' default llm_int8_threshold=6.0) runs the input columns holding
# a value above the threshold in float, choosing them over the whole batch: a row's base
# output then depends on the other rows. Mixed batches compare rows on this variant.
BATCH_INVARIANT = {"int8": "int8-t0"}
LOADABLE = {**KINDS, "int8-t0": (_bnb(load_in_8bit=True, llm_int8_threshold=0.0), "bnb_int8")}
# Outputs of two libraries running the same quantized forward plus their own LoRA term.
ATOL = 1e-5
# bf16 compute: the quantized base rounds its inputs and products to bf16, the merged float
# model does not. Logits here are below 1 and differ by at most 0.0044 (measured, nf4 and
# fp4, LoRA and IA³): about one bf16 step at 1, accumulated over two layers.
BF16_ATOL = 0.01


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def load(saved):
    """``load(kind)``: a fresh quantized tiny Llama of that kind (a copy of the one
    loaded through transformers: every call holds the same bits)."""

    loaded: dict[str, nn.Module] = {}
    transformers.utils.logging.disable_progress_bar()

    def load(kind: str) -> nn.Module:
        if kind not in loaded:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded[kind] = transformers.AutoModelForCausalLM.from_pretrained(
                    saved, quantization_config=LOADABLE[kind][0](), device_map="cpu", dtype=torch.float32
                ).eval()
        return copy.deepcopy(loaded[kind])

    return load


def raw(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every quantized weight tensor as stored (data, scales, quant_state)."""
    return {
        f"{path}:{k}": t.detach().clone()
        for path in weights.quantized_modules(model)
        for k, t in weights.weight_tensors(model.get_submodule(path)).items()
    }


def assert_raw_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{k} changed"


def grad_logits(model, ids=IDS):
    # With autograd on and in training mode: bitsandbytes' 4-bit CPU kernel is not
    # repacked (see test_avx512_bf16_repack_then_training), so raw tensors stay as loaded.
    return model(input_ids=ids).logits.detach()


def lora(**kw):
    return tt.LoraConfig(target_modules=TARGETS, r=4, lora_alpha=8, init_lora_weights=False, **kw)


def wrapped(load, kind, config=None, seed=1):
    w = tt.AdapterWrapper.from_config(load(kind), config or lora())
    randomize(w, seed)
    return w


def no_grad_logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------------------------------
# kinds
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_kind_is_detected_on_every_quantized_linear(load, kind):
    model = load(kind)
    found = weights.quantized_modules(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    assert sorted(found) == sorted(linears) and set(found.values()) == {KINDS[kind][1]}
    q = model.model.layers[0].self_attn.q_proj
    assert weights.is_quantized(q) and not weights.is_quantized(model.lm_head)
    assert weights.linear_sizes(q) == (64, 64)
    deq = weights.dequantized_weight(q)
    assert deq.shape == (64, 64) and deq.is_floating_point()
    pair = weights.int_weight_and_scale(q)
    if KINDS[kind][1] in ("bnb_int8", "torchao_int8", "torchao_fp8"):
        qdata, scale = pair
        assert qdata.shape == (64, 64) and scale.shape == (64,) and scale.dtype == torch.float32
        assert qdata.dtype in (torch.int8, torch.float8_e4m3fn)
        torch.testing.assert_close(qdata.float() * scale[:, None], deq.float(), rtol=1e-6, atol=1e-7)
    else:
        assert pair is None


# ---------------------------------------------------------------------------------------
# PEFT parity, both ways
# ---------------------------------------------------------------------------------------
PEFT_LORA = dict(target_modules=TARGETS, r=4, lora_alpha=8, init_lora_weights=False)


@pytest.mark.parametrize("kind", KINDS)
def test_peft_parity_both_ways(load, kind, tmp_path):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(load(kind), peft.LoraConfig(**PEFT_LORA))
    pm.save_pretrained(tmp_path / "peft")
    w = tt.AdapterWrapper.from_pretrained(load(kind), tmp_path / "peft")
    # Autograd on, training mode first (bitsandbytes' exact 4-bit path, see grad_logits),
    # then eval without autograd (on an AVX512-BF16 CPU both models repack then).
    pm.train(), w.train()
    torch.testing.assert_close(grad_logits(w), grad_logits(pm), rtol=0, atol=ATOL)
    pm.eval(), w.eval()
    torch.testing.assert_close(no_grad_logits(w), no_grad_logits(pm), rtol=0, atol=ATOL)

    # tinytune's own adapter, saved and loaded by PEFT.
    mine = wrapped(load, kind, seed=3)
    mine.save_pretrained(tmp_path / "tt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = PeftModel.from_pretrained(load(kind), tmp_path / "tt").eval()
    torch.testing.assert_close(no_grad_logits(back), no_grad_logits(mine), rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------------
# training, mixed batches, IA³
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_qlora_training_reaches_only_the_adapter(load, kind):
    w = tt.AdapterWrapper.from_config(load(kind), lora())
    model = w.get_base_model()
    before = raw(model)
    trainable = {n for n, p in w.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in w.parameters() if p.requires_grad], lr=1e-2)
    w.train()
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = w(input_ids=IDS, labels=IDS).loss
        loss.backward()
        losses.append(loss.item())
        with_grad = {n for n, p in w.named_parameters() if p.grad is not None}
        assert with_grad == trainable  # B starts at zero: A gets its gradient through B
        opt.step()
    assert losses[-1] < losses[0]
    assert_raw_equal(raw(model), before)


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batch_rows_equal_single_runs(load, kind):
    w = tt.AdapterWrapper.from_config(load(BATCH_INVARIANT.get(kind, kind)), lora(), adapter_name="a")
    w.add_adapter_from_config(tt.LoraConfig(target_modules=["q_proj", "o_proj"], r=2, init_lora_weights=False), "b")
    randomize(w, 5)
    names = ["a", "__base__", "b", "a"]
    ids = torch.cat([IDS, IDS.flip(1)])
    with torch.no_grad():
        got = w(input_ids=ids, adapter_names=names).logits
    for i, name in enumerate(names):
        w.set_active_adapters([] if name == "__base__" else [name])
        want = no_grad_logits(w, ids[i : i + 1])
        torch.testing.assert_close(got[i : i + 1], want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("kind", KINDS)
def test_ia3_on_a_quantized_base(load, kind):
    config = tt.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    w = tt.AdapterWrapper.from_config(load(kind), config)
    base = no_grad_logits(w)
    randomize(w, 2)
    w.train()
    out = w(input_ids=IDS, labels=IDS)
    out.loss.backward()
    assert all(p.grad is not None for n, p in w.named_parameters() if p.requires_grad)
    w.eval()
    unmerged = no_grad_logits(w)
    assert (unmerged - base).abs().max() > 1e-3
    with pytest.raises(MergeNotSupportedError, match=r"dequantize=True"):
        w.merge_adapters()
    bf16 = kind.endswith("bf16")
    w.train()  # the unmerged reference on bitsandbytes' exact path (see grad_logits)
    ref = grad_logits(w)
    merged = w.merge_and_unload(dequantize=True)
    torch.testing.assert_close(
        grad_logits(merged.train()), ref, rtol=0, atol=BF16_ATOL if bf16 else 1e-4
    )


# ---------------------------------------------------------------------------------------
# merging
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_merge_is_refused_with_nothing_changed(load, kind):
    w = wrapped(load, kind)
    model = w.get_base_model()
    before_raw = raw(model)
    before_params = {n: p.detach().clone() for n, p in w.named_adapter_parameters()}
    hooks = hook_count(model)
    for call in (w.merge_adapters, w.merge_and_unload, lambda: w.merge_adapters(["default"])):
        with pytest.raises(MergeNotSupportedError, match=r"merge_and_unload\(dequantize=True\)") as err:
            call()
        # Refused up front, naming the module and the adapter.
        assert "'model.layers.0.self_attn.q_proj' (adapter 'default'" in str(err.value)
        assert w.merged_adapters == [] and hook_count(model) == hooks
        assert_raw_equal(raw(model), before_raw)
        for n, p in w.named_adapter_parameters():
            assert torch.equal(p.detach(), before_params[n]), n
    # A layer's own merge refuses too (a custom merge path cannot corrupt the weight).
    site_layer = w.adapters["default"].layers["model/layers/0/self_attn/q_proj"]
    with pytest.raises(MergeNotSupportedError):
        site_layer.merge(model.model.layers[0].self_attn.q_proj)
    assert_raw_equal(raw(model), before_raw)


@pytest.mark.parametrize("kind", KINDS)
def test_dequantized_merge_is_exact(load, kind):
    w = wrapped(load, kind)
    w.add_adapter_from_config(tt.LoraConfig(target_modules=["q_proj"], r=2, init_lora_weights=False), "second")
    randomize(w, 7)
    w.set_active_adapters(["default", "second"])
    model = w.get_base_model()
    path = "model.layers.0.self_attn.q_proj"
    q = model.get_submodule(path)
    deq = weights.dequantized_weight(q).float()
    dtype = weights.float_dtype(q, weights.model_float_dtype(model))
    want = deq
    for name in ("default", "second"):
        want = (want + w.adapters[name].layers[path.replace(".", "/")].delta_weight()).to(dtype).float()
    w.train()
    ref = grad_logits(w)
    out = w.merge_and_unload(dequantize=True)
    assert out is model and weights.quantized_modules(out) == {}
    assert type(out.get_submodule(path)) is nn.Linear and hook_count(out) == 0
    assert torch.equal(out.get_submodule(path).weight.float(), want)
    assert getattr(out.config, "quantization_config", None) is None
    atol = BF16_ATOL if kind.endswith("bf16") else 1e-4
    torch.testing.assert_close(grad_logits(out.train()), ref, rtol=0, atol=atol)
    assert (ref - grad_logits(tiny_llama().train())).abs().max() > 1e-3  # the adapters count


@pytest.mark.parametrize("kind", KINDS)
def test_unload_gives_back_the_quantized_model_bit_identical(load, kind):
    model = load(kind)
    before = raw(model)
    types = {n: type(m) for n, m in model.named_modules()}
    w = tt.AdapterWrapper.from_config(model, lora())
    randomize(w)
    w.train()
    w(input_ids=IDS, labels=IDS).loss.backward()
    assert w.unload() is model
    assert_raw_equal(raw(model), before)
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert hook_count(model) == 0


@pytest.mark.parametrize("kind", ["nf4", "int8-t0", "ao-fp8"])
def test_serving_slots_on_a_quantized_base(load, kind):
    w = tt.AdapterWrapper.from_config(load(kind), lora(), adapter_name="a")
    for name in ("b", "c"):
        w.add_adapter_from_config(tt.LoraConfig(target_modules=["q_proj"], r=2, init_lora_weights=False), name)
    randomize(w, 4)
    singles = {}
    for name in ("a", "b", "c"):
        w.set_active_adapters([name])
        singles[name] = no_grad_logits(w, IDS[:1])
    w.reserve_adapter_slots(2, 4)
    for names in (["a", "b"], ["c", "a"], ["b", "c"]):  # three adapters through two slots
        with torch.no_grad():
            got = w(input_ids=torch.cat([IDS[:1], IDS[:1]]), adapter_names=names).logits
        for i, name in enumerate(names):
            torch.testing.assert_close(got[i : i + 1], singles[name], rtol=0, atol=ATOL)
    with pytest.raises(MergeNotSupportedError):
        w.merge_adapters(["a"])


@pytest.mark.parametrize("kind", ["nf4", "int8", "ao-int8"])
def test_dora_on_a_quantized_base(load, kind):
    """DoRA's norms are taken over the dequantized weight (as PEFT's
    ``dequantize_module_weight``): unmerged outputs equal the dequantized merge's, a
    plain merge is refused with nothing changed, and unload gives the raw data back."""
    model = load(kind)
    before = raw(model)
    w = tt.AdapterWrapper.from_config(model, lora(use_dora=True))
    randomize(w, 5)
    with torch.no_grad():
        for _, layer in w.adapters["default"].items():
            layer.lora_magnitude_vector.mul_(1.25)
    w.train()
    ref = grad_logits(w)
    with pytest.raises(MergeNotSupportedError):
        w.merge_adapters()
    assert_raw_equal(raw(model), before)
    torch.testing.assert_close(grad_logits(w), ref, rtol=0, atol=0)
    clone = copy.deepcopy(w)
    assert_raw_equal(raw(w.unload()), before)
    merged = clone.merge_and_unload(dequantize=True)
    assert weights.quantized_modules(merged) == {}
    torch.testing.assert_close(grad_logits(merged.train()), ref, rtol=0, atol=1e-4)
    # the magnitudes count: the same adapter without the 1.25 differs
    assert (ref - grad_logits(model.train())).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------
# weighted combination, swapping the base
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["nf4", "int8", "ao-int8"])
def test_weighted_adapter_and_swap_on_quantized_bases(load, kind):
    w = wrapped(load, kind)
    w.add_adapter_from_config(lora(), "other")
    randomize(w, 9)
    w.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix", combination_type="cat")
    w.set_active_adapters("mix")
    with pytest.raises(MergeNotSupportedError):
        w.merge_adapters()
    before = no_grad_logits(w)
    old = w.swap_base_model(load(kind))
    assert hook_count(old) == 0
    torch.testing.assert_close(no_grad_logits(w), before, rtol=0, atol=ATOL)


def test_swap_between_float_and_quantized_twins(load):
    """Adapters trained on the float model serve on its quantized twin and back."""
    float_model = tiny_llama()
    w = tt.AdapterWrapper.from_config(float_model, lora())
    randomize(w, 11)
    want_float = no_grad_logits(w)
    twin = load("ao-int8")
    w.swap_base_model(twin)
    direct = tt.AdapterWrapper.from_config(load("ao-int8"), lora())
    with torch.no_grad():
        for (n, p), (m, q) in zip(w.named_adapter_parameters(), direct.named_adapter_parameters()):
            assert n == m
            q.copy_(p)
    torch.testing.assert_close(no_grad_logits(w), no_grad_logits(direct), rtol=0, atol=ATOL)
    # Another shape is refused, naming the module, with nothing changed.
    other = load("ao-int8")
    other.model.layers[0].self_attn.q_proj = nn.Linear(64, 32, bias=False)
    with pytest.raises(UnsupportedModuleError, match=r"q_proj.*\(64, 32, False\)"):
        w.swap_base_model(other)
    assert w.get_base_model() is twin and hook_count(other) == 0
    w.swap_base_model(tiny_llama())
    torch.testing.assert_close(no_grad_logits(w), want_float, rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------------
# unknown layouts
# ---------------------------------------------------------------------------------------
class PackedInt4Linear(nn.Linear):
    """A quantized linear tinytune does not know: int4 pairs packed into uint8 bytes."""

    def __init__(self, inp: int, out: int) -> None:
        super().__init__(inp, out)
        self.weight = nn.Parameter(
            torch.randint(0, 255, (out, inp // 2), dtype=torch.uint8), requires_grad=False
        )

    def forward(self, x):
        lo = (self.weight & 15).float() - 8
        hi = (self.weight >> 4).float() - 8
        return x @ torch.stack([lo, hi], -1).flatten(1).t() * 0.01 + self.bias


class OpaqueQuantTensor(torch.Tensor):
    """A torchao-like tensor subclass of no known kind."""

    @staticmethod
    def __new__(cls, data):
        return torch.Tensor._make_subclass(cls, data)


def unknown_linear(make: str, inp: int, out: int) -> nn.Linear:
    if make == "packed":
        return PackedInt4Linear(inp, out)
    linear = nn.Linear(inp, out)
    linear.weight = nn.Parameter(OpaqueQuantTensor(linear.weight.detach()), requires_grad=False)
    return linear


@pytest.mark.parametrize("make", ["packed", "subclass"])
def test_unknown_weight_layout_is_refused_with_nothing_changed(make):
    model = small()
    model.lin0 = unknown_linear(make, 10, 32)
    what = r"PackedInt4Linear.*torch\.uint8" if make == "packed" else r"Linear.*OpaqueQuantTensor"
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModuleError, match=rf"'lin0'.*{what}"):
        tt.AdapterWrapper.from_config(model, tt.LoraConfig(target_modules=["lin0", "lin1"], r=2))
    with pytest.raises(UnsupportedModuleError, match="'lin0'"):
        tt.AdapterWrapper.from_config(model, tt.IA3Config(target_modules=["lin0"], feedforward_modules=[]))
    assert hook_count(model) == 0
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    # The layer alone refuses it too, before creating any parameter.
    layer = tt.LinearLoraLayer(r=2)
    with pytest.raises(UnsupportedModuleError):
        layer.reset_params("lin0", model.lin0)
    assert not hasattr(layer, "lora_A")
    # Modules left out of target_modules do not matter; adding an adapter there fails
    # alone, and so does swapping in a model with such a module where adapters are.
    w = tt.AdapterWrapper.from_config(model, tt.LoraConfig(target_modules=["lin1"], r=2))
    with pytest.raises(UnsupportedModuleError, match="'lin0'"):
        w.add_adapter_from_config(tt.LoraConfig(target_modules=["lin0"], r=2), "x")
    assert list(w.adapters) == ["default"]
    other = small()
    other.lin1 = unknown_linear(make, 32, 4)
    with pytest.raises(UnsupportedModuleError, match="'lin1'"):
        w.swap_base_model(other)
    assert hook_count(other) == 0 and w.get_base_model() is model


# ---------------------------------------------------------------------------------------
# the fused path: 4-bit weights refused; int8/fp8 codes on the int8/fp8 kernels
# ---------------------------------------------------------------------------------------
needs_interpreter = pytest.mark.skipif(
    not INTERPRET, reason="needs TRITON_INTERPRET=1 (the kernels then take CPU tensors)"
)


@needs_interpreter
@pytest.mark.parametrize("kind", ["int8", "ao-int8", "ao-fp8"])
def test_fused_path_runs_int8_and_fp8_weights(load, kind):
    """The kernels compute x · dequant(W)ᵀ + b + LoRA on the codes: the logits of the
    exact dequantized merge, up to fp32 rounding (tests/test_kernel_quant.py bounds each
    layer). Every quantized linear is adapted, so none runs bitsandbytes' own forward
    (which casts the activations to fp16 on the CPU)."""
    every = tt.LoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"], r=4, lora_alpha=8, init_lora_weights=False)
    w = wrapped(load, kind, every)
    with tt.kernel_mode("triton"):
        fused = no_grad_logits(w)
    merged = wrapped(load, kind, every).merge_and_unload(dequantize=True)
    torch.testing.assert_close(fused, no_grad_logits(merged), rtol=1e-4, atol=1e-4)


@needs_interpreter
@pytest.mark.parametrize("kind", ["nf4"])
def test_fused_path_refuses_quantized_weights(load, kind):
    w = wrapped(load, kind)
    with tt.kernel_mode("auto"):
        auto = no_grad_logits(w)
    with tt.kernel_mode("torch"):
        torch.testing.assert_close(no_grad_logits(w), auto, rtol=0, atol=0)
    with tt.kernel_mode("triton"), pytest.raises(KernelUnavailableError, match=KINDS[kind][1]) as err:
        no_grad_logits(w)
    assert "model.layers.0.self_attn.q_proj" in str(err.value)


@needs_interpreter
def test_weight_quantized_after_wrapping_is_not_sent_to_the_float_kernel():
    model = small()
    w = tt.AdapterWrapper.from_config(model, tt.LoraConfig(target_modules=["lin0"], r=2))
    x = torch.randn(3, model.lin0.in_features)
    with tt.kernel_mode("triton"), torch.no_grad():
        w(x)  # float: the kernel runs
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, name: name == "lin0")
    with tt.kernel_mode("triton"), torch.no_grad():
        fused = w(x)  # the int8 kernel, on the codes and their scale
    with tt.kernel_mode("auto"), torch.no_grad():
        torch.testing.assert_close(w(x), model(x), rtol=0, atol=0)  # B = 0: the base alone
        torch.testing.assert_close(fused, model(x), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------
# bitsandbytes' CPU repack (AVX512-BF16)
# ---------------------------------------------------------------------------------------
def test_avx512_bf16_repack_then_training(load):
    """On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights in place on the first
    eval forward without autograd (bf16 scales, not exactly invertible); a forward with
    autograd then fails inside bitsandbytes. The wrapper keeps the original layout and
    puts it back for autograd forwards and on unload."""
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    if not bnb_functional.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack")
    model = load("nf4")
    before = raw(model)
    w = tt.AdapterWrapper.from_config(model, lora())
    randomize(w)
    w.train()
    want = w(input_ids=IDS, labels=IDS).loss
    w.eval()
    no_grad_logits(w)
    q = model.model.layers[0].self_attn.q_proj
    assert weights.repacked_for_cpu(q)  # bitsandbytes' fast eval path ran
    w.train()
    loss = w(input_ids=IDS, labels=IDS).loss
    loss.backward()
    assert not weights.repacked_for_cpu(q)
    assert loss.item() == want.item()
    assert_raw_equal(raw(model), before)
    w.eval()
    no_grad_logits(w)
    assert weights.repacked_for_cpu(q)
    assert w.unload() is model
    assert_raw_equal(raw(model), before)
    assert hook_count(model) == 0

    # A model repacked before it was wrapped: autograd forwards are refused clearly.
    late = load("nf4")
    no_grad_logits(late)
    w = tt.AdapterWrapper.from_config(late, lora())
    with pytest.raises(tt.errors.AdapterStateError, match="repacked"):
        w(input_ids=IDS, labels=IDS)
    with pytest.raises(tt.errors.AdapterStateError, match="repacked"):
        w.merge_and_unload(dequantize=True)


def test_tinytune_imports_neither_bitsandbytes_nor_torchao():
    """Detection reads ``sys.modules`` and class names: importing tinytune (and asking
    a float module's kind) loads neither library."""
    import subprocess
    import sys

    code = (
        "import sys, torch, tinytune\n"
        "from tinytune import weights\n"
        "assert weights.weight_kind(torch.nn.Linear(2, 2)) == 'float'\n"
        "assert not {'bitsandbytes', 'torchao'} & set(sys.modules), sorted(sys.modules)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
