"""The fused kernels on int8 / float8_e4m3fn weight codes (issue 21, part 4).

``lora_linear`` and ``lora_mixed_linear`` take a weight of int8 or fp8 codes with one
fp32 scale per output channel (``weight_scale``): ``W = codes ⊙ weight_scale[:, None]``.
The kernels read the codes, convert them inside the K-loop and scale the base
accumulator before the bias. Here they run through Triton's interpreter (or natively on
a GPU) against the dequantize-then-multiply reference, computed exactly (float64).

The bound is the forward error of the kernels' arithmetic, as in
tests/test_kernel_twins.py. Every int8 and e4m3 code is a bf16/fp16 value, so the
conversion is exact; products of two 16-bit values are exact in fp32. The only
roundings to the input dtype (unit roundoff ``u``) are ``h = (x Aᵀ) ⊙ s`` before
``h Bᵀ``, ``l_in ⊙ x`` before the base product (when there is an ``l_in``) and the
output; the rest are fp32 roundings (``u32``: the sums, the scale, bias and ``l_out``):

    |y - y_exact| <= 2u |y_exact| + 2u (|h| |B|ᵀ) [+ 2u |l_out| ((|l_in| |x|) |W|ᵀ)]
                     + 2 (K + R + 4) u32 y_abs

with ``y_abs`` the formula on absolute values. Each rounding to 16 bits counts ``2u``:
the interpreter truncates where the GPU rounds to nearest. With non-negative x, A and B
(``aligned``) the LoRA term's rounding bound is ``2u`` times the term itself, so a LoRA
term scaled by 0.95 fails it; so does a scale applied after the bias, or not at all.

Every input sits in a larger buffer whose padding is NaN (int8 codes: 127, the largest
code), so an unmasked load fails the test.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import tinytune
from tinytune import AdapterWrapper, IA3Config, KernelUnavailableError, LoraConfig, weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ci"))
import kernel_report  # noqa: E402

L = pytest.importorskip("tinytune.kernels.lora_linear")
M = pytest.importorskip("tinytune.kernels.lora_mixed")

if not L.HAS_TRITON:  # pragma: no cover - depends on the platform
    pytest.skip("triton is not installed", allow_module_level=True)

ON_CUDA = torch.cuda.is_available() and not L.interpreted()
DEVICE = "cuda" if ON_CUDA else "cpu"
needs_kernels = pytest.mark.skipif(
    not (ON_CUDA or L.interpreted()),
    reason="needs a CUDA GPU or TRITON_INTERPRET=1 (the Triton CPU interpreter)",
)
FP8_OK = not ON_CUDA or torch.cuda.get_device_capability() >= (8, 9)

U = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
U32 = 2.0**-24
K, N = 150, 90  # multiples of no block
QUANTS = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def quant_param(name):
    marks = [] if name == "int8" or FP8_OK else [pytest.mark.skip(reason="fp8 needs sm_89+")]
    return pytest.param(name, marks=marks, id=name)


QUANT_PARAMS = [quant_param(q) for q in QUANTS]


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def quantize(w: torch.Tensor, quant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel absmax quantization of a float ``(N, K)`` weight."""
    top = 127.0 if quant == "int8" else 448.0
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / top
    q = w / scale[:, None]
    codes = q.round().clamp(-127, 127).to(torch.int8) if quant == "int8" else q.to(torch.float8_e4m3fn)
    return codes, scale.float()


def embed(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` as a view inside a larger buffer of poison (NaN; 127 for int8 codes)."""
    if t is None:
        return None
    poison = 127 if t.dtype == torch.int8 else float("nan")
    lead = t.shape[:-1]
    buf = torch.full((*[s + 3 for s in lead], t.shape[-1] + 5), poison, dtype=torch.float32)
    buf = buf.to(t.dtype).to(t.device)
    view = buf[tuple(slice(1, 1 + s) for s in lead) + (slice(2, 2 + t.shape[-1]),)]
    view.copy_(t)
    return view


def linear_inputs(m, r, dtype, quant, *, seed=0, aligned=False, l_in=False, l_out=True, bias=True,
                  ranks=None):
    """Op inputs for ``lora_linear`` (NaN-embedded, on DEVICE); ``ranks``: several LoRAs
    concatenated along the rank, each with its own scale."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0, pos=False, dt=dtype, mean=0.0):
        t = torch.randn(*shape, generator=g) * std + mean
        return (t.abs() if pos else t).to(dt).to(DEVICE)

    codes, scale = quantize(torch.randn(N, K, generator=g) / math.sqrt(K), quant)
    lora_scale = None
    if r:
        parts = ranks or [r]
        lora_scale = torch.cat([torch.full((p,), 0.5 + i) for i, p in enumerate(parts)]).to(DEVICE)
    return dict(
        x=embed(rnd(m, K, pos=aligned)),
        weight=embed(codes.to(DEVICE)),
        bias=embed(rnd(1, N))[0] if bias else None,
        lora_a=embed(rnd(r, K, std=1 / math.sqrt(K), pos=aligned)) if r else None,
        lora_b=embed(rnd(N, r, std=1 / math.sqrt(r), pos=aligned)) if r else None,
        lora_scale=lora_scale,
        l_in=embed(rnd(1, K, std=0.3, mean=1.0))[0] if l_in else None,
        l_out=embed(rnd(1, N, std=0.3, mean=1.0))[0] if l_out else None,
        weight_scale=embed(scale.to(DEVICE)[None])[0],
    )


def run_linear(inp: dict) -> torch.Tensor:
    return torch.ops.tinytune.lora_linear(
        inp["x"], inp["weight"], inp["bias"], inp["lora_a"], inp["lora_b"], inp["lora_scale"],
        inp["l_in"], inp["l_out"], False, None, inp["weight_scale"],
    )  # fmt: skip


def excess(y, x, w, bias, a, b, s, l_in, l_out) -> float:
    """How far ``y`` lies outside the module docstring's bound (<= 0: inside).

    Per token (float64): ``x`` (T, K); dequantized ``w`` (N, K); ``a`` (T, R, K), ``b``
    (T, N, R), ``s`` (T, R) with dead rank rows zeroed; ``l_in`` (T, K), ``l_out`` (T, N)
    or None.
    """
    assert torch.isfinite(y).all(), "non-finite output: an unmasked load read the padding"

    def formula(x, w, bias, a, b, s, l_in, l_out):
        xin = x * l_in if l_in is not None else x
        base = xin @ w.t() + (bias if bias is not None else 0)
        if l_out is not None:
            base = base * l_out
        h = torch.einsum("tk,trk->tr", x, a) * s
        return base, h, torch.einsum("tr,tnr->tn", h, b)

    args = (x, w, bias, a, b, s, l_in, l_out)
    base, _, lora = formula(*args)
    base_abs, _, lora_abs = formula(*(t.abs() if t is not None else None for t in args))
    exact = base + lora
    u = U[y.dtype]
    r = a.shape[1]
    bound = 2 * u * (exact.abs() + lora_abs) + 2 * (K + r + 4) * U32 * (base_abs + lora_abs)
    if l_in is not None and y.dtype != torch.float32:
        bound = bound + 2 * u * base_abs
    return ((y.double() - exact).abs() - bound).max().item()


def linear_excess(y: torch.Tensor, inp: dict) -> float:
    f = {k: (v.double().cpu() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    t = f["x"].shape[0]
    w = f["weight"] * f["weight_scale"][:, None]
    if f["lora_a"] is not None:
        a, b, s = f["lora_a"], f["lora_b"], f["lora_scale"]
    else:
        a, b, s = torch.zeros(0, K, dtype=torch.double), torch.zeros(N, 0, dtype=torch.double), torch.zeros(0)
    rep = lambda v: None if v is None else v.expand(t, *v.shape)  # noqa: E731
    return excess(y.cpu(), f["x"], w, f["bias"], rep(a), rep(b), rep(s.double()), rep(f["l_in"]),
                  rep(f["l_out"]))


# ---------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant", list(QUANTS))
def test_references_dequantize_then_multiply(quant):
    inp = linear_inputs(3, 8, torch.float32, quant, l_in=True)
    inp = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    deq = inp["weight"].float() * inp["weight_scale"][:, None]
    args = [inp[k] for k in ("x", "weight", "bias", "lora_a", "lora_b", "lora_scale", "l_in", "l_out")]
    got = L.torch_lora_linear(*args, False, None, inp["weight_scale"])
    want = L.torch_lora_linear(args[0], deq, *args[2:], False)
    assert torch.equal(got, want)
    # the Conv1D layout takes the scale along its columns
    got_kn = L.torch_lora_linear(args[0], inp["weight"].t(), *args[2:], True, None, inp["weight_scale"])
    torch.testing.assert_close(got_kn, want, rtol=1e-6, atol=1e-6)
    row_index = torch.zeros(3, dtype=torch.long)
    x3 = args[0][:, None]
    got = M.torch_lora_mixed_linear(x3, inp["weight"], inp["bias"], row_index, None, None, None, None,
                                    None, None, False, None, inp["weight_scale"])
    want = M.torch_lora_mixed_linear(x3, deq, inp["bias"], row_index, None, None, None, None, None, None)
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------
# lora_linear: decode, batched decode, the two-launch path, prefill
# ---------------------------------------------------------------------------------------

# (rows, rank, the case pick_config takes in 16 bits): decode with the shrink fused in the
# K-loop, decode with a precomputed h (padded rank 128: two launches), batched decode
# (17 rows: a partial 32-row tile), prefill (130 rows: shrink kernel + 64-row tiles).
LINEAR_CASES = [(1, 8, "decode"), (3, 100, "decode"), (17, 24, "batched-decode"), (130, 16, "prefill")]


@needs_kernels
@pytest.mark.parametrize("quant", QUANT_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,r,case", LINEAR_CASES, ids=[f"m{c[0]}-r{c[1]}" for c in LINEAR_CASES])
def test_lora_linear_within_bound(quant, dtype, m, r, case):
    cfg = L.pick_config(m, N, K, r, dtype)
    if dtype != torch.float32:
        assert cfg["case"] == case
    inp = linear_inputs(m, r, dtype, quant, seed=m + r)
    assert linear_excess(run_linear(inp), inp) <= 0


@needs_kernels
@pytest.mark.parametrize("quant", QUANT_PARAMS)
@pytest.mark.parametrize("m,r,case", LINEAR_CASES, ids=[f"m{c[0]}-r{c[1]}" for c in LINEAR_CASES])
def test_lora_linear_scaled_lora_fails_the_bound(quant, m, r, case):
    inp = linear_inputs(m, r, torch.bfloat16, quant, seed=m, aligned=True)
    assert linear_excess(run_linear(inp), inp) <= 0
    wrong = dict(inp, lora_scale=inp["lora_scale"] * 0.95)
    assert linear_excess(run_linear(wrong), inp) > 0


@needs_kernels
@pytest.mark.parametrize("quant", QUANT_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [3, 130])
@pytest.mark.parametrize(
    "features",
    [dict(r=8, l_in=True, l_out=True), dict(r=0, l_in=True, l_out=True), dict(r=0, l_out=False, bias=False),
     dict(r=12, ranks=[8, 4])],
    ids=["lora+ia3", "ia3-only", "base-only", "two-loras"],
)
def test_lora_linear_ia3_and_several_adapters(quant, dtype, m, features):
    features = dict(features)  # the parameter is shared between the cases
    r = features.pop("r")
    inp = linear_inputs(m, r, dtype, quant, seed=7, **features)
    assert linear_excess(run_linear(inp), inp) <= 0


@needs_kernels
def test_lora_linear_scale_goes_before_the_bias():
    """The bias is added after the scale: with the bias the only nonzero term, the output
    is the bias (a scale applied after it would shrink it ~100x)."""
    inp = linear_inputs(3, 8, torch.float32, "int8", l_out=False)
    x = torch.zeros_like(inp["x"])
    y = run_linear(dict(inp, x=x))
    torch.testing.assert_close(y, inp["bias"].expand(3, N).contiguous(), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# lora_mixed_linear: per-row adapters, `__base__` rows
# ---------------------------------------------------------------------------------------


def mixed_inputs(rows, tokens, dtype, quant, *, seed=0, aligned=False, ia3=True):
    """Three adapter slots of ranks 16, 5 and 0 (IA³ only) plus the identity slot, in the
    library's stacked layout; rows 0 and the last are `__base__` rows (identity slot)."""
    g = torch.Generator().manual_seed(seed)
    slots, r_max = 4, 16

    def rnd(*shape, std=1.0, pos=False, mean=0.0):
        t = torch.randn(*shape, generator=g) * std + mean
        return (t.abs() if pos else t).to(dtype).to(DEVICE)

    codes, scale = quantize(torch.randn(N, K, generator=g) / math.sqrt(K), quant)
    ranks = torch.tensor([16, 5, 0, 0], dtype=torch.int32)
    a = rnd(slots, r_max, K, std=1 / math.sqrt(K), pos=aligned)
    bt = rnd(slots, r_max, N, std=1 / 4, pos=aligned)
    live = (torch.arange(r_max)[None] < ranks[:, None]).to(DEVICE)
    # rank rows past a slot's rank hold NaN: the kernels must never read them
    a = torch.where(live[..., None], a, torch.full_like(a, float("nan")))
    bt = torch.where(live[..., None], bt, torch.full_like(bt, float("nan")))
    l_in = rnd(slots, K, std=0.3, mean=1.0)
    l_out = rnd(slots, N, std=0.3, mean=1.0)
    l_in[-1] = 1
    l_out[-1] = 1
    row_index = torch.tensor([(3 if i in (0, rows - 1) else (i - 1) % 3) for i in range(rows)])
    return dict(
        x=embed(rnd(rows, tokens, K, pos=aligned)), weight=embed(codes.to(DEVICE)),
        bias=embed(rnd(1, N))[0], row_index=row_index.to(DEVICE), a_stack=embed(a),
        bt_stack=embed(bt), scale=torch.tensor([0.5, 2.0, 1.0, 1.0]).to(DEVICE),
        ranks=ranks.to(DEVICE), l_in_stack=embed(l_in) if ia3 else None,
        l_out_stack=embed(l_out) if ia3 else None, weight_scale=embed(scale.to(DEVICE)[None])[0],
    )  # fmt: skip


def run_mixed(inp: dict, strategy=None) -> torch.Tensor:
    args = [inp[k] for k in ("x", "weight", "bias", "row_index", "a_stack", "bt_stack", "scale", "ranks",
                             "l_in_stack", "l_out_stack")]
    if strategy is None:
        return torch.ops.tinytune.lora_mixed_linear(*args, False, None, None, None, inp["weight_scale"])
    return M.launch(*args, False, strategy=strategy, weight_scale=inp["weight_scale"])


def mixed_excess(y: torch.Tensor, inp: dict) -> float:
    f = {k: (v.cpu() if v is not None else None) for k, v in inp.items()}
    rows, tokens = f["x"].shape[:2]
    slot = f["row_index"].repeat_interleave(tokens)  # per token
    live = (torch.arange(f["a_stack"].shape[1])[None] < f["ranks"][:, None].long())
    a = torch.where(live[..., None], f["a_stack"].double(), 0.0)[slot]
    b = torch.where(live[..., None], f["bt_stack"].double(), 0.0)[slot].transpose(1, 2)
    s = f["scale"].double()[slot][:, None].expand(-1, a.shape[1])
    pick = lambda v: None if v is None else v.double()[slot]  # noqa: E731
    w = f["weight"].double() * f["weight_scale"].double()[:, None]
    return excess(y.cpu().reshape(rows * tokens, N), f["x"].double().reshape(-1, K), w,
                  f["bias"].double(), a, b, s, pick(f["l_in_stack"]), pick(f["l_out_stack"]))


MIXED_SHAPES = [(5, 1), (3, 17)]  # decode (5 rows, one token each) and 51 prefill tokens


@needs_kernels
@pytest.mark.parametrize("quant", QUANT_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("strategy", ["rows", "segments"])
@pytest.mark.parametrize("rows,tokens", MIXED_SHAPES, ids=["decode", "prefill"])
def test_lora_mixed_within_bound(quant, dtype, strategy, rows, tokens):
    inp = mixed_inputs(rows, tokens, dtype, quant, seed=rows)
    # the bound covers the `__base__` rows too: for them it is x · dequant(W)ᵀ + b
    assert mixed_excess(run_mixed(inp, strategy), inp) <= 0


@needs_kernels
@pytest.mark.parametrize("quant", QUANT_PARAMS)
@pytest.mark.parametrize("strategy", ["rows", "segments"])
def test_lora_mixed_scaled_lora_fails_the_bound(quant, strategy):
    inp = mixed_inputs(5, 3, torch.bfloat16, quant, seed=3, aligned=True, ia3=False)
    assert mixed_excess(run_mixed(inp, strategy), inp) <= 0
    wrong = dict(inp, scale=inp["scale"] * 0.95)
    assert mixed_excess(run_mixed(wrong, strategy), inp) > 0


@needs_kernels
def test_lora_mixed_op_picks_a_strategy_and_matches():
    inp = mixed_inputs(5, 1, torch.bfloat16, "int8", seed=11)
    assert mixed_excess(run_mixed(inp), inp) <= 0


# ---------------------------------------------------------------------------------------
# registration and errors
# ---------------------------------------------------------------------------------------


@needs_kernels
@pytest.mark.parametrize("quant", QUANT_PARAMS)
def test_opcheck(quant):
    inp = linear_inputs(3, 8, torch.float32, quant)
    inp = {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    # test_schema compares the inputs before and after the call with arithmetic that
    # torch does not implement for float8 on the CPU; int8 runs every check.
    utils = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    kw = dict(test_utils=utils) if quant == "fp8" else {}
    torch.library.opcheck(L.lora_linear, (inp["x"], inp["weight"], inp["bias"], inp["lora_a"], inp["lora_b"],
                                          inp["lora_scale"], None, inp["l_out"], False, None, inp["weight_scale"]),
                          **kw)
    mix = {k: v.contiguous() for k, v in mixed_inputs(3, 1, torch.float32, quant).items()}
    torch.library.opcheck(M.lora_mixed_linear, (
        mix["x"], mix["weight"], mix["bias"], mix["row_index"], torch.nan_to_num(mix["a_stack"]),
        torch.nan_to_num(mix["bt_stack"]), mix["scale"], mix["ranks"], mix["l_in_stack"], mix["l_out_stack"],
        False, None, None, None, mix["weight_scale"]), **kw)  # fmt: skip


@pytest.mark.parametrize(
    "change,error,message",
    [
        (dict(weight_scale=None), TypeError, "pass their per-output-channel weight_scale"),
        (dict(weight_scale=torch.ones(N + 1)), ValueError, r"weight_scale must have shape \(90,\)"),
        (dict(weight_scale=torch.ones(N, dtype=torch.int32)), TypeError, "must be a float tensor"),
        (dict(weight=torch.zeros(N, K, dtype=torch.float8_e5m2)), TypeError, "float8_e4m3fn"),
    ],
    ids=["no-scale", "scale-shape", "scale-dtype", "e5m2"],
)
def test_bad_quantized_inputs_raise(change, error, message):
    codes, scale = quantize(torch.randn(N, K), "int8")
    args = dict(x=torch.randn(2, K), weight=codes, weight_scale=scale)
    args.update(change)
    with pytest.raises(error, match=message):
        L.lora_linear(args["x"], args["weight"], None, None, None, None, None, None, False, None, args["weight_scale"])
    with pytest.raises(error, match=message):
        M.lora_mixed_linear(args["x"], args["weight"], None, torch.zeros(2, dtype=torch.long), None, None,
                            None, None, None, None, False, None, None, None, args["weight_scale"])


# ---------------------------------------------------------------------------------------
# tiles and the roofline model
# ---------------------------------------------------------------------------------------


@needs_kernels
def test_launcher_takes_the_quantized_tiles(monkeypatch):
    """Codes take pick_config(quantized=True)'s tiles (those the compile report checked
    for spills) and the W_SCALED branch; float weights keep theirs."""
    seen = []
    kernel = L.triton_kernels()["_lora_linear_fwd_kernel"]
    real = kernel.run

    def run(*args, grid, **meta):
        seen.append(meta)
        return real(*args, grid=grid, **meta)

    monkeypatch.setattr(kernel, "run", run)
    inp = linear_inputs(17, 8, torch.bfloat16, "int8")
    run_linear(inp)
    run_linear(dict(inp, weight=inp["weight"].to(torch.bfloat16), weight_scale=None))
    q, f = seen
    cfg_q = L.pick_config(17, N, K, 8, torch.bfloat16, quantized=True)
    cfg_f = L.pick_config(17, N, K, 8, torch.bfloat16)
    assert (q["W_SCALED"], f["W_SCALED"]) == (True, False)
    assert q["num_warps"] == cfg_q["num_warps"] != f["num_warps"] == cfg_f["num_warps"]


def test_roofline_reads_codes_at_one_byte():
    """The model's decode prediction: about half the bf16 merged layer, plus A and B."""
    for n in (4096, 14336):
        bf16 = kernel_report.roofline(1, 4096, n, 16)
        q = kernel_report.roofline(1, 4096, n, 16, w_e=1)
        assert 0.5 < q["fused"] / bf16["merged"] < 0.52
        assert q["merged"] < q["fused"] < 1.02 * q["merged"]


# ---------------------------------------------------------------------------------------
# dispatch: real bitsandbytes / torchao modules on the fused path
# ---------------------------------------------------------------------------------------

QK, QN = 70, 50  # the quantized Linear's in/out features: multiples of no block


def quantized_linear(kind: str) -> nn.Module:
    """One bitsandbytes ``Linear8bitLt`` (fp32 model) or torchao int8/fp8 weight-only
    ``nn.Linear`` (bf16 model), quantized from a seeded float ``Linear(QK, QN)``."""
    torch.manual_seed(0)
    lin = nn.Linear(QK, QN)
    if kind == "bnb_int8":
        bnb = pytest.importorskip("bitsandbytes")
        mod = bnb.nn.Linear8bitLt(QK, QN, has_fp16_weights=False, threshold=0.0)
        mod.load_state_dict(lin.state_dict())
        return mod.to(DEVICE)  # bitsandbytes quantizes on the move to the device
    ao = pytest.importorskip("torchao.quantization")
    model = nn.Sequential(lin).to(torch.bfloat16).to(DEVICE)
    ao.quantize_(model, ao.Int8WeightOnlyConfig() if kind == "torchao_int8" else ao.Float8WeightOnlyConfig())
    return model[0]


KIND_PARAMS = [
    pytest.param("bnb_int8", id="bnb_int8"),
    pytest.param("torchao_int8", id="torchao_int8"),
    pytest.param("torchao_fp8", id="torchao_fp8", marks=[] if FP8_OK else [pytest.mark.skip(reason="sm_89+")]),
]


@pytest.fixture
def launches(monkeypatch):
    """``(kernel name, W_SCALED)`` of every launch of the GEMM kernels."""
    log = []
    kernels = {**L.triton_kernels(), **M.triton_kernels()}
    for name in ("_lora_linear_fwd_kernel", "_mixed_rows_kernel", "_mixed_segments_kernel"):
        kernel = kernels[name]
        real = kernel.run

        def run(*args, _real=real, _name=name, grid, **meta):
            log.append((_name, meta["W_SCALED"]))
            return _real(*args, grid=grid, **meta)

        monkeypatch.setattr(kernel, "run", run)
    return log


def adapted(kind: str):
    """The quantized linear wrapped with two LoRAs ("a", "b") and an IA³ ("c"), random."""
    base = nn.Sequential(quantized_linear(kind))
    assert weights.weight_kind(base[0]) == kind
    w = AdapterWrapper.from_config(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0"]), "a")
    w.add_adapter_from_config(LoraConfig(r=6, lora_alpha=3, target_modules=["0"]), "b")
    w.add_adapter_from_config(IA3Config(target_modules=["0"], feedforward_modules=[]), "c")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in w.named_adapter_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.3
            p.copy_((noise + (1.0 if name.endswith("ia3_l") else 0.0)).to(p.dtype))
    return w


def adapted_reference(w, x: torch.Tensor, name: str) -> tuple:
    """float64 (x, dequantized W, b, A, B, s, l_out) of ``name``'s adapter on the one
    module (``__base__``: no adapter), per token, for :func:`excess`."""
    module = w.get_base_model()[0]
    codes, scale = weights.int_weight_and_scale(module)
    deq = codes.double().cpu() * scale.double().cpu()[:, None]
    p = {n: t.detach().double().cpu() for n, t in w.named_adapter_parameters()}
    t = x.shape[0]
    a, b, s, l_out = torch.zeros(0, QK), torch.zeros(QN, 0), torch.zeros(0), None
    if name in ("a", "b"):
        a, b = p[f"{name}.0.lora_A.weight"], p[f"{name}.0.lora_B.weight"]
        s = torch.full((a.shape[0],), 2.0 if name == "a" else 0.5)
    if name == "c":
        l_out = p["c.0.ia3_l"].reshape(1, QN).expand(t, QN)
    a, b, s = (v.double().expand(t, *v.shape) for v in (a, b, s))
    return x.double().cpu(), deq, module.bias.detach().double().cpu(), a, b, s, None, l_out


@needs_kernels
@pytest.mark.parametrize("kind", KIND_PARAMS)
def test_dispatch_runs_quantized_modules_on_the_kernels(kind, launches):
    w = adapted(kind)
    dtype = torch.float32 if kind == "bnb_int8" else torch.bfloat16
    x = torch.randn(3, QK, generator=torch.Generator().manual_seed(2)).to(dtype).to(DEVICE)
    for name in ("a", "b", "c"):
        w.set_adapter(name)
        launches.clear()
        with torch.no_grad(), tinytune.kernel_mode("triton"):
            y = w(x)
        assert launches == [("_lora_linear_fwd_kernel", True)]
        assert excess(y.cpu(), *adapted_reference(w, x, name)) <= 0, name
    # per-row adapters, `__base__` rows among them: lora_mixed_linear on the codes
    names = ["a", "__base__", "b", "c"]
    launches.clear()
    with torch.no_grad(), tinytune.kernel_mode("triton"):
        y = w(x[:1].expand(4, QK).contiguous(), adapter_names=names)
    assert launches and all(flag for _, flag in launches) and "_lora_linear_fwd_kernel" not in dict(launches)
    for i, name in enumerate(names):
        assert excess(y[i : i + 1].cpu(), *adapted_reference(w, x[:1], name)) <= 0, name


@needs_kernels
def test_dispatch_refuses_4bit_in_triton_mode_and_auto_falls_back():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    mod = bnb.nn.Linear4bit(QK, QN, compute_dtype=torch.float32, quant_type="nf4")
    mod.load_state_dict(nn.Linear(QK, QN).state_dict())
    w = AdapterWrapper.from_config(nn.Sequential(mod.to(DEVICE)), LoraConfig(r=4, target_modules=["0"]), "a")
    x = torch.randn(2, QK).to(DEVICE)
    with torch.no_grad(), tinytune.kernel_mode("triton"), pytest.raises(KernelUnavailableError, match="bnb_nf4"):
        w(x)
