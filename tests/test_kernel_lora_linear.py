"""The fused single-adapter kernels (kernels/lora_linear.py) against their PyTorch reference.

On a CPU machine the kernels run through Triton's interpreter (``TRITON_INTERPRET=1``,
as in the README's test command); on a CUDA machine without it they run natively
(``ci/gpu_check.sh``). Every input sits inside a larger NaN-filled buffer, so a load
that is not masked on M, N, K or R turns the output into NaN and fails the test.

Tolerances are a forward error bound, not a fudge factor. The kernel rounds at most
three operands of each product to the input dtype (``l_in ⊙ x``; ``A`` or ``B`` given
in another dtype; ``h = x Aᵀ`` before ``h Bᵀ``) and the output once, accumulating in
fp32; so ``|y - y_exact| <= 4 u · y_abs + 2 (K + R) u32 · y_abs``, where ``u`` is the
dtype's unit roundoff (2^-8 bf16, 2^-11 fp16, 2^-24 fp32), ``y_abs`` is the same formula
evaluated on the absolute values of every input (it bounds the sum of the magnitudes of
the terms), and the second term covers fp32 summation-order differences on both sides.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

L = pytest.importorskip("tinytune.kernels.lora_linear")

if not L.HAS_TRITON:  # pragma: no cover - depends on the platform
    pytest.skip("triton is not installed", allow_module_level=True)

ON_CUDA = torch.cuda.is_available() and not L.interpreted()
DEVICE = "cuda" if ON_CUDA else "cpu"
RUNS_KERNELS = ON_CUDA or L.interpreted()
needs_kernels = pytest.mark.skipif(
    not RUNS_KERNELS, reason="needs a CUDA GPU or TRITON_INTERPRET=1 (the Triton CPU interpreter)"
)

U = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
K, N = 150, 90  # not multiples of any block; K spans 2-3 iterations of the K-loops


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def nan_embed(t: torch.Tensor | None, unit_stride: bool = True) -> torch.Tensor | None:
    """The same values as a view inside a bigger NaN-filled buffer (offset, padded rows).

    ``unit_stride=False`` also spaces the last dimension (stride 2).
    """
    if t is None:
        return None
    step = 1 if unit_stride else 2
    last = t.shape[-1]
    lead = t.shape[:-1]
    buf = torch.full((*[s + 3 for s in lead], last * step + 5), float("nan"), dtype=t.dtype, device=t.device)
    idx = tuple(slice(1, 1 + s) for s in lead) + (slice(2, 2 + last * step, step),)
    view = buf[idx]
    view.copy_(t)
    return view


def make_inputs(m, k, n, r, dtype, *, bias=True, l_in=False, l_out=False, lora_dtype=None,
                scale=True, weight_kn=False, unit_stride=True, lead=None, seed=0):  # fmt: skip
    """Random op inputs (NaN-embedded views), on DEVICE."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, dt=dtype, std=1.0, mean=0.0):
        return (torch.randn(*shape, generator=g) * std + mean).to(dt).to(DEVICE)

    x = rnd(*(lead or (m,)), k)
    w = rnd(n, k, std=1 / math.sqrt(k))
    if weight_kn:
        w = w.t().contiguous()
    ld = lora_dtype or dtype
    inp = dict(
        x=x,
        weight=w,
        bias=rnd(n) if bias else None,
        lora_a=rnd(r, k, dt=ld, std=1 / math.sqrt(k)) if r else None,
        lora_b=rnd(n, r, dt=ld, std=1 / math.sqrt(r)) if r else None,
        lora_scale=(torch.rand(r, generator=g) * 2 + 0.5).to(DEVICE) if r and scale else None,
        l_in=rnd(k, mean=1.0, std=0.3) if l_in else None,
        l_out=rnd(n, mean=1.0, std=0.3) if l_out else None,
        weight_kn=weight_kn,
    )
    return {key: (nan_embed(v, unit_stride) if isinstance(v, torch.Tensor) else v) for key, v in inp.items()}


def _f32(inp: dict, fn=lambda t: t) -> dict:
    return {key: (fn(v.float()) if isinstance(v, torch.Tensor) else v) for key, v in inp.items()}


def assert_matches(y: torch.Tensor, inp: dict, exact: torch.Tensor | None = None) -> None:
    """``y`` (kernel output) within the forward error bound of the exact result.

    ``exact`` defaults to the fp32 reference on fp32 copies of the inputs.
    """
    x = inp["x"]
    assert y.dtype == x.dtype
    n = inp["weight"].shape[1] if inp["weight_kn"] else inp["weight"].shape[0]
    assert y.shape == (*x.shape[:-1], n)
    if exact is None:
        exact = L.torch_lora_linear(**_f32(inp))
    mag = L.torch_lora_linear(**_f32(inp, torch.abs))
    r = inp["lora_a"].shape[0] if inp["lora_a"] is not None else 0
    bound = 4 * U[x.dtype] * mag + 2 * (x.shape[-1] + r + 2) * U[torch.float32] * mag
    err = (y.float() - exact).abs()
    assert torch.isfinite(y).all(), "non-finite output: an unmasked load read the NaN padding"
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (
        f"max error {err.max().item():.3g}; at the worst element error {err.flatten()[worst].item():.3g} "
        f"> bound {bound.flatten()[worst].item():.3g}"
    )


def run_op(inp: dict) -> torch.Tensor:
    return torch.ops.tinytune.lora_linear(
        inp["x"], inp["weight"], inp["bias"], inp["lora_a"], inp["lora_b"], inp["lora_scale"],
        inp["l_in"], inp["l_out"], inp["weight_kn"],
    )  # fmt: skip


# ---------------------------------------------------------------------------------------
# The reference itself
# ---------------------------------------------------------------------------------------


def test_reference_matches_linear_plus_lora_and_ia3():
    """torch_lora_linear == nn.Linear + LoRA (PEFT's formula) and IA³, in float64."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(20, 12).double()
    a = torch.nn.Linear(20, 4, bias=False).double()
    b = torch.nn.Linear(4, 12, bias=False).double()
    torch.nn.init.normal_(b.weight)
    x = torch.randn(2, 5, 20, dtype=torch.float64)
    s = 0.75
    want = lin(x) + s * b(a(x))
    got = L.torch_lora_linear(
        x, lin.weight, lin.bias, a.weight, b.weight, torch.full((4,), s), None, None
    )
    # The reference computes in fp32: compare at fp32 accuracy.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # transformers' Conv1D stores W as (in, out) and computes addmm(bias, x, W).
    got_kn = L.torch_lora_linear(
        x, lin.weight.t().contiguous(), lin.bias, a.weight, b.weight, torch.full((4,), s), None, None, True
    )
    torch.testing.assert_close(got_kn, want, rtol=1e-5, atol=1e-5)
    # IA³: feed-forward (input) and output placements, as PEFT's IA3 layers compute them.
    li, lo = torch.rand(20, dtype=torch.float64), torch.rand(12, dtype=torch.float64)
    got = L.torch_lora_linear(x, lin.weight, lin.bias, None, None, None, li, lo)
    torch.testing.assert_close(got, lin(x * li) * lo, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Kernels vs reference
# ---------------------------------------------------------------------------------------


# Every M against every rank, the dtype rotating so each dtype meets each M and each rank
# (test_every_config runs every configuration in every dtype).
MR = [(m, r, DTYPES[(i + j) % 3]) for i, m in enumerate([1, 3, 17, 130]) for j, r in enumerate([1, 8, 16, 64, 200])]


@needs_kernels
@pytest.mark.parametrize("m,r,dtype", MR, ids=[f"m{m}-r{r}-{str(d)[6:]}" for m, r, d in MR])
def test_lora_matches_reference(m, r, dtype):
    # Adapters in fp32 under 16-bit inputs for some ranks: the op casts internally.
    lora_dtype = torch.float32 if r in (1, 64) else dtype
    inp = make_inputs(m, K, N, r, dtype, bias=(m + r) % 2 == 0, lora_dtype=lora_dtype, seed=m * 1000 + r)
    assert_matches(run_op(inp), inp)


IA3 = [(d, p, m, b) for i, (d, p) in enumerate((d, p) for d in DTYPES for p in ("in", "out", "both"))
       for m, b in [((1, 130)[i % 2], i % 3 != 0)]]  # fmt: skip


@needs_kernels
@pytest.mark.parametrize("dtype,placement,m,bias", IA3, ids=[f"{str(d)[6:]}-{p}-m{m}-bias{b}" for d, p, m, b in IA3])
def test_pure_ia3(dtype, placement, m, bias):
    """No LoRA: R = 0 / None; IA³ on the input (feed-forward), the output, or both."""
    inp = make_inputs(m, K, N, 0, dtype, bias=bias, l_in=placement in ("in", "both"),
                      l_out=placement in ("out", "both"), seed=m)  # fmt: skip
    y = run_op(inp)
    assert_matches(y, inp)
    # ... and against PEFT's IA³ formulas written out.
    f = _f32(inp)
    x = f["x"] * f["l_in"] if f["l_in"] is not None else f["x"]
    want = F.linear(x, f["weight"], f["bias"])
    if f["l_out"] is not None:
        want = want * f["l_out"]
    assert_matches(y, inp, exact=want)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [3, 130])
def test_base_only_and_empty_rank(dtype, m):
    inp = make_inputs(m, K, N, 0, dtype, bias=False)
    assert_matches(run_op(inp), inp)
    # A rank-0 LoRA (empty factors) is no LoRA.
    inp["lora_a"] = torch.zeros(0, K, dtype=dtype, device=DEVICE)
    inp["lora_b"] = torch.zeros(N, 0, dtype=dtype, device=DEVICE)
    assert_matches(run_op(inp), inp)


def _configs() -> list[tuple[int, int, torch.dtype, dict]]:
    """Every distinct configuration pick_config can choose, with a rank that selects it.

    One case per (dtype, tile, strategy, LoRA or not) over sm_80 and sm_90 choices and
    both decode widths; for bf16 also per padded rank class (16 / 64 / 256), which
    changes the fused shrink and the epilogue's rank chunks.
    """
    seen, out = set(), []
    for arch in (90, 80):
        for dtype in DTYPES:
            for m in (1, 64, 4096):
                for n in (4096, 14336):
                    for r in (0, 16, 64, 256):
                        cfg = L.pick_config(m, n, 4096, r, dtype, arch)
                        tile = tuple(cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "R_BLOCK"))
                        key = (dtype, tile, cfg["shrink_in_loop"], r > 0)
                        if dtype == torch.bfloat16 and arch == 90 and r in (64, 256):
                            key += (r,)
                        if key not in seen:
                            seen.add(key)
                            out.append((m, r, dtype, cfg))
    return out


CONFIGS = _configs()


@needs_kernels
@pytest.mark.parametrize(
    "m_pick,r,dtype,cfg", CONFIGS,
    ids=[f"{c['case']}{'-fused' if c['shrink_in_loop'] else ''}-{str(d)[6:]}-r{r}-{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']}"
         for _, r, d, c in CONFIGS],
)  # fmt: skip
def test_every_config(m_pick, r, dtype, cfg):
    """Each configuration the launcher can choose, forced on small odd shapes."""
    m = 3 if cfg["case"] == "decode" else 130
    r_run = {16: 9, 32: 17, 64: 40, 128: 100, 256: 200}.get(r, 0)  # same R_PAD, unaligned R
    cfg = dict(cfg, R_PAD=L.pad_rank(r_run) if r_run else cfg["R_PAD"])
    inp = make_inputs(m, K, N, r_run, dtype, l_in=True, l_out=True, seed=r)
    y = L.launch(**inp, config=cfg)
    assert_matches(y, inp)


def test_pick_config_is_the_documented_rule():
    assert L.pick_config(16, 4096, 4096, 16, torch.bfloat16)["case"] == "decode"
    assert L.pick_config(16, 4096, 4096, 16, torch.bfloat16)["shrink_in_loop"]
    assert L.pick_config(17, 4096, 4096, 16, torch.bfloat16)["case"] == "batched-decode"
    assert L.pick_config(17, 4096, 4096, 16, torch.bfloat16)["shrink_in_loop"]
    assert not L.pick_config(129, 4096, 4096, 16, torch.bfloat16)["shrink_in_loop"]
    # Above rank 64 decode precomputes h (re-reading A per N-tile would cost more than W).
    assert not L.pick_config(1, 4096, 4096, 65, torch.bfloat16)["shrink_in_loop"]
    assert L.pick_config(1, 4096, 4096, 65, torch.bfloat16)["R_PAD"] == 128
    assert L.pick_config(1, 4096, 4096, 1, torch.bfloat16)["R_PAD"] == 16
    # sm_80 gets a tile that does not spill; smaller parts get fewer pipeline stages.
    assert L.pick_config(4096, 4096, 4096, 16, torch.bfloat16, 80)["BLOCK_N"] == 128
    assert L.pick_config(4096, 4096, 4096, 16, torch.bfloat16, 90)["BLOCK_N"] == 256
    assert L.pick_config(1, 4096, 4096, 64, torch.bfloat16, 86)["num_stages"] < 4


@needs_kernels
@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("bias", [True, False])
def test_conv1d_layout(m, bias):
    """transformers' Conv1D keeps W as (in, out): weight_kn=True."""
    inp = make_inputs(m, K, N, 8, torch.float32, bias=bias, weight_kn=True, l_in=True, l_out=True)
    y = run_op(inp)
    assert_matches(y, inp)
    f = _f32(inp)
    want = L.torch_lora_linear(**dict(f, weight=f["weight"].t(), weight_kn=False))
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize(
    "dtype,m,weight_kn",
    [(torch.float32, 1, False), (torch.float32, 130, True), (torch.bfloat16, 130, False), (torch.bfloat16, 1, True)],
)
def test_strided_inputs(dtype, m, weight_kn):
    """Every input a view with a non-unit last stride (and padded rows) in a NaN buffer."""
    inp = make_inputs(m, K, N, 24, dtype, l_in=True, l_out=True, weight_kn=weight_kn, unit_stride=False)
    assert inp["x"].stride(-1) == 2 and inp["lora_b"].stride(-1) == 2
    assert_matches(run_op(inp), inp)


@needs_kernels
def test_leading_dims_and_no_scale():
    inp = make_inputs(0, K, N, 8, torch.float32, lead=(2, 3), scale=False)
    y = run_op(inp)
    assert y.shape == (2, 3, N)
    assert_matches(y, inp)


@needs_kernels
@pytest.mark.parametrize("m", [1, 130])
def test_broadcast_scale(m):
    """One LoRA's scale as a stride-0 view of a 0-d tensor (no copy per call)."""
    inp = make_inputs(m, K, N, 12, torch.bfloat16, lora_dtype=torch.float32)
    inp["lora_scale"] = torch.tensor(1.5, device=DEVICE).expand(12)
    assert inp["lora_scale"].stride(0) == 0
    assert_matches(run_op(inp), inp)


@needs_kernels
def test_zero_rows():
    inp = make_inputs(0, K, N, 8, torch.float32, lead=(0,))
    assert run_op(inp).shape == (0, N)


# ---------------------------------------------------------------------------------------
# Several adapters, and IA³ folded into a LoRA
# ---------------------------------------------------------------------------------------


CONCAT = [(d, m, ranks) for i, d in enumerate(DTYPES) for j, ranks in enumerate([(8, 4), (16, 1, 40)])
          for m in [(1, 130)[(i + j) % 2]]]  # fmt: skip


@needs_kernels
@pytest.mark.parametrize("dtype,m,ranks", CONCAT, ids=[f"{str(d)[6:]}-m{m}-{len(r)}adapters" for d, m, r in CONCAT])
def test_concatenated_adapters(dtype, m, ranks):
    """Several active LoRAs = one LoRA concatenated along R with per-rank-row scales."""
    g = torch.Generator().manual_seed(len(ranks))
    base = make_inputs(m, K, N, 0, dtype, seed=m)
    x, w, b = base["x"], base["weight"], base["bias"]
    As = [(torch.randn(r, K, generator=g) / math.sqrt(K)).to(dtype).to(DEVICE) for r in ranks]
    Bs = [(torch.randn(N, r, generator=g) / math.sqrt(r)).to(dtype).to(DEVICE) for r in ranks]
    scales = [0.5 + i for i in range(len(ranks))]
    inp = dict(base, lora_a=nan_embed(torch.cat(As)), lora_b=nan_embed(torch.cat(Bs, dim=1)),
               lora_scale=nan_embed(torch.cat([torch.full((r,), s) for r, s in zip(ranks, scales)]).to(DEVICE)))  # fmt: skip
    y = run_op(inp)
    assert_matches(y, inp)
    # The unfused sum of the adapters, each as its own LoRA (fp32).
    xf = x.float()
    want = F.linear(xf, w.float(), b.float())
    for a_, b_, s in zip(As, Bs, scales):
        want = want + s * F.linear(F.linear(xf, a_.float()), b_.float())
    mag = L.torch_lora_linear(**_f32(inp, torch.abs))
    bound = (4 * U[dtype] + 2 * (K + sum(ranks)) * U[torch.float32]) * mag
    assert ((y.float() - want).abs() <= bound).all()


def _unfused(x, w, b, a, bb, s, l, placement, ia3_outer):
    """An IA³ and a LoRA on one Linear, composed as the hook site nests them (fp32).

    ``ia3_outer``: the IA³ is the outer wrapper (listed after the LoRA in the active
    adapters), so a feed-forward IA³ scales the input the LoRA sees, and an output IA³
    scales the LoRA's contribution too.
    """
    lora = lambda inp: s * F.linear(F.linear(inp, a), bb)  # noqa: E731
    if placement == "in":
        xs = x * l
        return F.linear(xs, w, b) + lora(xs if ia3_outer else x)
    y = F.linear(x, w, b) + lora(x)
    if ia3_outer:
        return y * l
    return (y - lora(x)) * l + lora(x)


def _folded(inp, l, placement, ia3_outer):
    """Op inputs for the composition: IA³ on its side; folded into A or B when outer."""
    out = dict(inp)
    if placement == "in":
        out["l_in"] = l
        if ia3_outer:
            out["lora_a"] = inp["lora_a"] * l[None, :]
    else:
        out["l_out"] = l
        if ia3_outer:
            out["lora_b"] = inp["lora_b"] * l[:, None]
    return {k: nan_embed(v) if isinstance(v, torch.Tensor) else v for k, v in out.items()}


@needs_kernels
@pytest.mark.parametrize("placement", ["in", "out"])
@pytest.mark.parametrize("ia3_outer", [True, False])
@pytest.mark.parametrize("m", [1, 130])
def test_ia3_folded_with_lora(placement, ia3_outer, m):
    inp = make_inputs(m, K, N, 8, torch.float32, seed=m)
    g = torch.Generator().manual_seed(7)
    l = (torch.rand(K if placement == "in" else N, generator=g) + 0.5).to(DEVICE)
    s = float(inp["lora_scale"][0])
    inp["lora_scale"] = nan_embed(torch.full((8,), s, device=DEVICE))
    f = _f32(inp)
    want = _unfused(f["x"], f["weight"], f["bias"], f["lora_a"], f["lora_b"], s, l, placement, ia3_outer)
    folded = _folded(inp, l, placement, ia3_outer)
    torch.testing.assert_close(L.torch_lora_linear(**folded), want, rtol=1e-5, atol=1e-5)
    y = run_op(folded)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    # Folding matters: an outer IA³ that is not folded gives a different function.
    if ia3_outer:
        assert not torch.allclose(run_op(_folded(inp, l, placement, False)), want, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------
# Registration, fallback, errors
# ---------------------------------------------------------------------------------------


@needs_kernels
@pytest.mark.parametrize("with_lora", [True, False])
def test_opcheck(with_lora):
    inp = make_inputs(3, 40, 24, 8 if with_lora else 0, torch.float32, l_in=not with_lora, l_out=True)
    args = (inp["x"], inp["weight"], inp["bias"], inp["lora_a"], inp["lora_b"], inp["lora_scale"],
            inp["l_in"], inp["l_out"], inp["weight_kn"])  # fmt: skip
    torch.library.opcheck(torch.ops.tinytune.lora_linear.default, args)


@needs_kernels
def test_torch_compile_fullgraph_keeps_the_op():
    inp = make_inputs(3, 40, 24, 8, torch.float32)
    counts = {"n": 0}
    real = L.launch

    def counting(*a, **k):
        counts["n"] += 1
        return real(*a, **k)

    def f(x):
        y = torch.ops.tinytune.lora_linear(x, inp["weight"], inp["bias"], inp["lora_a"], inp["lora_b"],
                                           inp["lora_scale"], None, None, False)  # fmt: skip
        return torch.relu(y) * 2

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    mp = pytest.MonkeyPatch()
    mp.setattr(L, "launch", counting)
    try:
        out = compiled(inp["x"])
    finally:
        mp.undo()
    assert counts["n"] >= 1, "the compiled graph did not call the op"
    torch.testing.assert_close(out, f(inp["x"]), rtol=1e-5, atol=1e-5)


def test_cpu_without_interpreter_falls_back_to_reference(monkeypatch):
    monkeypatch.setattr(L, "interpreted", lambda: False)
    monkeypatch.setattr(L, "launch", lambda *a, **k: pytest.fail("launched a kernel on the CPU"))
    x = torch.randn(3, 10)
    w = torch.randn(6, 10)
    a, b = torch.randn(2, 10), torch.randn(6, 2)
    y = torch.ops.tinytune.lora_linear(x, w, None, a, b, None, None, None, False)
    torch.testing.assert_close(y, L.torch_lora_linear(x, w, None, a, b, None, None, None))


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(x=torch.zeros(2, 9)), ValueError, "features"),
        (dict(lora_b=None), ValueError, "both"),
        (dict(lora_a=torch.zeros(300, 10), lora_b=torch.zeros(6, 300), lora_scale=None), ValueError, "256"),
        (dict(lora_b=torch.zeros(6, 3)), ValueError, "lora_b"),
        (dict(bias=torch.zeros(5)), ValueError, "bias"),
        (dict(lora_scale=torch.zeros(3)), ValueError, "lora_scale"),
        (dict(x=torch.zeros(2, 10, dtype=torch.int32)), TypeError, "float"),
    ],
)
def test_bad_inputs(change, exc, match):
    inp = dict(x=torch.zeros(2, 10), weight=torch.zeros(6, 10), bias=None, lora_a=torch.zeros(2, 10),
               lora_b=torch.zeros(6, 2), lora_scale=torch.ones(2), l_in=None, l_out=None, weight_kn=False)  # fmt: skip
    inp.update(change)
    with pytest.raises(exc, match=match):
        L.lora_linear(**inp)
