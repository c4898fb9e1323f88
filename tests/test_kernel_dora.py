"""DoRA in the fused kernels (issue 22, part 5): the per-output-column scale ``col_scale``.

DoRA computes ``y = g ⊙ (W x + s·B·A x) + b`` with ``g = m / ‖W + s·B·A‖_row`` (the norm
per output row over the input features). The kernels take ``g`` as ``col_scale`` (the
single-adapter op: ``(N,)``; the per-row op: ``(S, N)``, one row per slot, ones for
slots without DoRA and for the identity slot) and apply it in the epilogue:

    y = l_out ⊙ (g ⊙ W (l_in ⊙ x) + b) + g ⊙ ((x Aᵀ) ⊙ s) Bᵀ

(``g`` scales the base product and the LoRA term, never the bias; ``g = 1`` is the op
without it). The references ``torch_lora_linear``/``torch_lora_mixed_linear`` are first
checked against the DoRA formula written out from ``W``, ``A``, ``B`` and ``m``; the
kernels are then held to a forward error bound of their arithmetic (as in
tests/test_kernel_twins.py), evaluated in float64 from the inputs as given:

    |y - y_exact| <= 2u |y_exact| + 2u |g| (|h| |B|ᵀ) + 2u β + 2 (K + R + 6) u32 y_abs

``u`` is the dtype's unit roundoff, ``h = (x Aᵀ) ⊙ s``, ``y_abs`` the formula on absolute
values, ``β`` the base term on absolute values where ``l_in`` scales ``x`` (0 otherwise).
The 16-bit branch rounds ``h`` (before ``h Bᵀ``), ``l_in ⊙ x`` and the output to 16 bits;
each rounding counts ``2u`` (Triton's interpreter truncates where the GPU rounds to
nearest). The rest is fp32: products and sums in the K- and rank loops, and four more
operations in the epilogue (``l_out``, the LoRA term, ``g``, the bias). The bound is
tight enough that a LoRA term scaled by 0.95, a scale applied to the bias as well, or no
scale at all fails it (each checked below on the kernels' own outputs).

Every input sits inside a larger NaN-filled buffer (an unmasked load turns the output
into NaN), and the per-row stacks hold NaN in their padded rank rows.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

L = pytest.importorskip("tinytune.kernels.lora_linear")
LM = pytest.importorskip("tinytune.kernels.lora_mixed")

if not L.HAS_TRITON:  # pragma: no cover - depends on the platform
    pytest.skip("triton is not installed", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ci"))
import kernel_report  # noqa: E402

ON_CUDA = torch.cuda.is_available() and not L.interpreted()
DEVICE = "cuda" if ON_CUDA else "cpu"
needs_kernels = pytest.mark.skipif(
    not (ON_CUDA or L.interpreted()),
    reason="needs a CUDA GPU or TRITON_INTERPRET=1 (the Triton CPU interpreter)",
)

U = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
U32 = 2.0**-24
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
K, N = 150, 90  # multiples of no block; 2-3 K steps at the production tiles


def _nan_embed(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` as a view inside a larger NaN-filled buffer (an unmasked load reads NaN)."""
    if t is None:
        return None
    buf = torch.full(tuple(s + 3 for s in t.shape), float("nan"), dtype=t.dtype, device=t.device)
    view = buf[tuple(slice(1, 1 + s) for s in t.shape)]
    view.copy_(t)
    return view


def dora_scale(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float,
               m: torch.Tensor) -> torch.Tensor:
    """``m / ‖W + s·B·A‖_row`` in float64 (``weight`` is ``(N, K)``)."""
    merged = weight.double() + s * (b.double() @ a.double())
    return m.double() / merged.norm(dim=1)


# ---------------------------------------------------------------------------------------
# the references against the DoRA formula written out
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("weight_kn", [False, True])
def test_torch_lora_linear_is_dora(weight_kn):
    g = torch.Generator().manual_seed(0)
    r, s = 6, 1.7
    x = torch.randn(4, 3, K, generator=g)
    w = torch.randn(N, K, generator=g) / math.sqrt(K)
    a = torch.randn(r, K, generator=g) / math.sqrt(K)
    b = torch.randn(N, r, generator=g) / math.sqrt(r)
    bias = torch.randn(N, generator=g)
    m = torch.rand(N, generator=g) + 0.5
    gs = dora_scale(w, a, b, s, m)
    merged = w.double() + s * (b.double() @ a.double())
    want = gs * (x.double() @ merged.t()) + bias.double()
    got = L.torch_lora_linear(x, w.t() if weight_kn else w, bias, a, b, torch.full((r,), s), None, None,
                              weight_kn, gs.float())  # fmt: skip
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # g = 1 is the op without a column scale
    ones = L.torch_lora_linear(x, w, bias, a, b, torch.full((r,), s), None, None, False, torch.ones(N))
    torch.testing.assert_close(ones, L.torch_lora_linear(x, w, bias, a, b, torch.full((r,), s), None, None))


def test_torch_lora_mixed_linear_is_dora_per_row():
    """Each row against its own adapter's formula: DoRA, LoRA, IA³ (in and out), base."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 2, K, generator=g)
    w = torch.randn(N, K, generator=g) / math.sqrt(K)
    bias = torch.randn(N, generator=g)
    slots, r_max = 4, 8  # 0: DoRA (rank 8), 1: LoRA (rank 5), 2: IA³, 3: identity
    a = torch.zeros(slots, r_max, K)
    bt = torch.zeros(slots, r_max, N)
    a[0] = torch.randn(8, K, generator=g) / math.sqrt(K)
    bt[0] = torch.randn(8, N, generator=g) / math.sqrt(8)
    a[1, :5] = torch.randn(5, K, generator=g) / math.sqrt(K)
    bt[1, :5] = torch.randn(5, N, generator=g) / math.sqrt(5)
    scale = torch.tensor([1.5, 0.75, 1.0, 1.0])
    ranks = torch.tensor([8, 5, 0, 0], dtype=torch.int32)
    lin, lout, col = torch.ones(slots, K), torch.ones(slots, N), torch.ones(slots, N)
    lin[2] = torch.rand(K, generator=g) + 0.5
    lout[2] = torch.rand(N, generator=g) + 0.5
    m = torch.rand(N, generator=g) + 0.5
    col[0] = dora_scale(w, a[0], bt[0].t(), 1.5, m).float()
    row_index = torch.tensor([0, 3, 1, 2, 0])
    got = LM.torch_lora_mixed_linear(x, w, bias, row_index, a, bt, scale, ranks, lin, lout, False, col)
    xd, wd, bd = x.double(), w.double(), bias.double()
    for i, slot in enumerate(row_index.tolist()):
        if slot == 0:
            merged = wd + 1.5 * (bt[0].double().t() @ a[0].double())
            want = col[0].double() * (xd[i] @ merged.t()) + bd
        elif slot == 1:
            want = xd[i] @ wd.t() + bd + 0.75 * (xd[i] @ a[1, :5].double().t()) @ bt[1, :5].double()
        elif slot == 2:
            want = lout[2].double() * ((xd[i] * lin[2].double()) @ wd.t() + bd)
        else:
            want = xd[i] @ wd.t() + bd
        torch.testing.assert_close(got[i].double(), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# the bound
# ---------------------------------------------------------------------------------------
def _excess(y: torch.Tensor, x, w, bias, a, b, s, col, lout=None, lin=None) -> torch.Tensor:
    """Per output row, how far ``y`` lies outside the bound of the module docstring
    (<= 0: inside). Single-adapter layout: ``w (N, K)``, ``a (R, K)``, ``b (N, R)``,
    ``s (R,)``; ``col``/``lout``/``lin`` broadcast against the rows (a row per slot)."""
    d = lambda t: None if t is None else t.double()  # noqa: E731
    x, w, bias, a, b, s, col, lout, lin = map(d, (x, w, bias, a, b, s, col, lout, lin))
    one = torch.ones((), dtype=torch.float64)
    col = one if col is None else col
    lout = one if lout is None else lout
    lin_ = one if lin is None else lin
    x2 = x.reshape(-1, x.shape[-1])
    base = (x2 * lin_) @ w.t()
    bias_ = 0 if bias is None else bias
    h = (x2 @ a.t()) * s
    lora = h @ b.t()
    exact = lout * (col * base + bias_) + col * lora
    ab = lambda t: t.abs() if isinstance(t, torch.Tensor) else t  # noqa: E731
    base_abs = (x2.abs() * ab(lin_)) @ w.abs().t()
    lora_abs = ((x2.abs() @ a.abs().t()) * s.abs()) @ b.abs().t()
    y_abs = ab(lout) * (ab(col) * base_abs + ab(bias_)) + ab(col) * lora_abs
    u = U[y.dtype]
    bound = 2 * u * (exact.abs() + ab(col) * lora_abs) + 2 * (K + a.shape[0] + 6) * U32 * y_abs
    if lin is not None:
        bound = bound + 2 * u * ab(lout) * ab(col) * base_abs
    assert torch.isfinite(y).all(), "non-finite output: an unmasked load read the NaN padding"
    return ((y.double().reshape(exact.shape) - exact).abs() - bound).amax(dim=-1)


def _single(m: int, r: int, dtype: torch.dtype, seed: int, aligned: bool = False) -> dict:
    """Inputs of one DoRA layer in ``dtype``; ``aligned``: x, A, B non-negative (the LoRA
    term's products share a sign: its rounding bound is ``u`` times the term itself)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0, pos=False):
        t = torch.randn(*shape, generator=g) * std
        return (t.abs() if pos else t).to(dtype)

    w = rnd(N, K, std=1 / math.sqrt(K))
    a = rnd(r, K, std=1 / math.sqrt(K), pos=aligned)
    b = rnd(N, r, std=1 / math.sqrt(r), pos=aligned)
    s = float(torch.rand((), generator=g)) * 2 + 0.5
    # The magnitude away from the norm (as after training), so that g is far from 1.
    mag = dora_scale(w, a, b, s, torch.ones(N)).reciprocal() * (torch.rand(N, generator=g) + 0.5)
    col = dora_scale(w, a, b, s, mag).float()
    return dict(x=rnd(m, K, pos=aligned), weight=w, bias=rnd(N), lora_a=a, lora_b=b,
                lora_scale=torch.full((r,), s), col_scale=col)


def _on_device(inp: dict) -> dict:
    return {k: _nan_embed(v.to(DEVICE)) if isinstance(v, torch.Tensor) else v for k, v in inp.items()}


def _run_single(inp: dict, l_out=None, **over) -> torch.Tensor:
    p = dict(inp, **over)
    return L.launch(p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"], p["lora_scale"], None,
                    l_out, False, col_scale=p["col_scale"])  # fmt: skip


def _excess_single(y: torch.Tensor, inp: dict, l_out=None) -> float:
    return _excess(y, inp["x"], inp["weight"], inp["bias"], inp["lora_a"], inp["lora_b"],
                   inp["lora_scale"], inp["col_scale"], l_out).max().item()  # fmt: skip


# (rows, rank): decode with the shrink fused in the K-loop (padded rank 16), decode with
# a precomputed h (padded rank 128), batched decode (16-bit: fused, 32-row tiles; fp32:
# prefill tiles), prefill on the two-launch path (M = 130 > 128).
CASES = [(3, 8, "decode-fused"), (5, 100, "decode"), (33, 24, "batched-decode"), (130, 12, "prefill")]


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,r,case", CASES, ids=[c[2] for c in CASES])
def test_lora_linear_col_scale_within_bound(m, r, case, dtype):
    cfg = L.pick_config(m, N, K, r, dtype)
    if dtype != torch.float32:
        assert cfg["case"] == case.replace("-fused", "")
    inp = _on_device(_single(m, r, dtype, seed=m + r))
    y = _run_single(inp)
    assert _excess_single(y, inp) <= 0
    # Mutations the bound must catch: g applied to the bias too, and no g at all.
    after_bias = dict(inp, bias=(inp["bias"].float() * inp["col_scale"]).to(dtype))
    assert _excess_single(_run_single(after_bias), inp) > 0
    assert _excess_single(_run_single(inp, col_scale=None), inp) > 0
    # A LoRA term scaled by 0.95 (aligned inputs: the tightest case of the bound).
    inp = _on_device(_single(m, r, dtype, seed=m + r + 1, aligned=True))
    assert _excess_single(_run_single(inp), inp) <= 0
    assert _excess_single(_run_single(inp, lora_scale=inp["lora_scale"] * 0.95), inp) > 0


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lora_linear_col_scale_with_ia3_out_and_conv1d_layout(dtype):
    """IA³ on the output around DoRA (l_out folded into B by the caller, as dispatch folds
    it for LoRA) and transformers' Conv1D layout ``(K, N)``, against the bound and
    against IA³ applied to the DoRA layer's output."""
    inp = _single(5, 16, dtype, seed=7)
    l_out = (torch.rand(N, generator=torch.Generator().manual_seed(3)) + 0.5).to(dtype)
    folded = dict(inp, lora_b=(inp["lora_b"].float() * l_out.float()[:, None]).to(dtype))
    dev = _on_device(folded)
    lo = _nan_embed(l_out.to(DEVICE))
    y = L.launch(dev["x"], _nan_embed(dev["weight"].t().contiguous()), dev["bias"], dev["lora_a"], dev["lora_b"],
                 dev["lora_scale"], None, lo, True, col_scale=dev["col_scale"])  # fmt: skip
    assert _excess_single(y, folded, l_out=l_out) <= 0
    plain = L.torch_lora_linear(*(inp[k] for k in ("x", "weight", "bias", "lora_a", "lora_b", "lora_scale")),
                                None, None, False, inp["col_scale"])  # fmt: skip
    torch.testing.assert_close(y.cpu().float(), (plain.float() * l_out.float()),
                               rtol=8 * U[dtype], atol=8 * U[dtype] * plain.float().abs().max().item())


@needs_kernels
def test_lora_linear_col_scale_in_16_bits_and_without_bias():
    inp = _single(4, 8, torch.float16, seed=11)
    inp["col_scale"] = inp["col_scale"].half()
    dev = _on_device(inp)
    y = _run_single(dev, bias=None)
    assert _excess_single(y, dict(inp, bias=None)) <= 0


def test_col_scale_shape_is_checked():
    inp = _single(2, 4, torch.float32, seed=0)
    with pytest.raises(ValueError, match="col_scale must have shape"):
        L.lora_linear(inp["x"], inp["weight"], inp["bias"], inp["lora_a"], inp["lora_b"], inp["lora_scale"],
                      None, None, False, torch.ones(N + 1))  # fmt: skip
    args = _mixed(2, 1, torch.float32, seed=0)
    with pytest.raises(ValueError, match="col_scale has shape"):
        LM.lora_mixed_linear(*args[:11], col_scale=torch.ones(args[4].shape[0], N - 1))
    with pytest.raises(ValueError, match="col_scale has 2 slots"):
        LM.lora_mixed_linear(*args[:11], col_scale=torch.ones(2, N))


# ---------------------------------------------------------------------------------------
# the per-row op: DoRA rows next to LoRA, IA³ and __base__ rows
# ---------------------------------------------------------------------------------------
# slots: 0 DoRA r=8, 1 LoRA r=5, 2 IA³ (in and out), 3 DoRA r=16, 4 identity
SLOT_RANKS = [8, 5, 0, 16, 0]
DORA_SLOTS = (0, 3)


def _mixed(rows: int, tokens: int, dtype: torch.dtype, seed: int, aligned: bool = False, k: int = K) -> tuple:
    """The per-row op's arguments (plus ``col_scale``) for a batch cycling through the
    slots above (rows ``i % 5``); padded rank rows of the stacks are NaN."""
    g = torch.Generator().manual_seed(seed)
    slots, r_max = len(SLOT_RANKS), max(SLOT_RANKS)

    def rnd(*shape, std=1.0, pos=False):
        t = torch.randn(*shape, generator=g) * std
        return t.abs() if pos else t

    w = rnd(N, k, std=1 / math.sqrt(k)).to(dtype)
    a = torch.full((slots, r_max, k), float("nan"))
    bt = torch.full((slots, r_max, N), float("nan"))
    scale = torch.rand(slots, generator=g) + 0.5
    col = torch.ones(slots, N)
    lin, lout = torch.ones(slots, k), torch.ones(slots, N)
    lin[2] = torch.rand(k, generator=g) + 0.5
    lout[2] = torch.rand(N, generator=g) + 0.5
    for slot, r in enumerate(SLOT_RANKS):
        if r:
            a[slot, :r] = rnd(r, k, std=1 / math.sqrt(k), pos=aligned).to(dtype).float()
            bt[slot, :r] = rnd(r, N, std=1 / math.sqrt(r), pos=aligned).to(dtype).float()
        if slot in DORA_SLOTS:
            s = float(scale[slot])
            ones = dora_scale(w, a[slot, :r], bt[slot, :r].t(), s, torch.ones(N))
            col[slot] = dora_scale(w, a[slot, :r], bt[slot, :r].t(), s,
                                   (torch.rand(N, generator=g) + 0.5) / ones).float()  # fmt: skip
    x = rnd(rows, tokens, k, pos=aligned).to(dtype)
    row_index = torch.tensor([i % slots for i in range(rows)])
    ranks = torch.tensor(SLOT_RANKS, dtype=torch.int32)
    return (x, w, rnd(N).to(dtype), row_index, a.to(dtype), bt.to(dtype), scale, ranks, lin.to(dtype),
            lout.to(dtype), False, col)  # fmt: skip


def _mixed_on_device(args: tuple) -> tuple:
    """Float tensors into NaN-filled buffers; integer ones (slots, ranks) as they are."""
    def move(t):
        if not isinstance(t, torch.Tensor):
            return t
        return _nan_embed(t.to(DEVICE)) if t.is_floating_point() else t.to(DEVICE)

    return tuple(move(t) for t in args)


def _mixed_excess(y: torch.Tensor, args: tuple) -> torch.Tensor:
    """Per batch row, the excess over the bound with the row's own slot."""
    x, w, bias, row_index, a, bt, scale, ranks, lin, lout, _, col = args
    out = []
    for i, slot in enumerate(row_index.tolist()):
        r = int(ranks[slot])
        ra = a[slot, :r] if r else torch.zeros(1, x.shape[-1], dtype=a.dtype)
        rb = bt[slot, :r].t() if r else torch.zeros(N, 1, dtype=bt.dtype)
        lo, li = (None if t is None else t[slot].cpu() for t in (lout, lin))
        out.append(_excess(y[i], x[i], w, bias, ra.cpu(), rb.cpu(), scale[slot].cpu().expand(ra.shape[0]),
                           col[slot].cpu(), lo, li).max())  # fmt: skip
    return torch.stack(out)


def _run_mixed(args: tuple, strategy: str, **over) -> torch.Tensor:
    names = ["x", "weight", "bias", "row_index", "a_stack", "bt_stack", "scale", "ranks",
             "l_in_stack", "l_out_stack", "weight_kn", "col_scale"]
    kw = dict(zip(names, args), **over)
    assert kw["row_index"].shape[0] == kw["x"].shape[0]  # launch() itself checks no shapes
    return LM.launch(**kw, strategy=strategy)


@pytest.fixture
def split_k_seen(monkeypatch):
    """The SPLIT_K / SPREAD_LORA / HAS_COL_SCALE of every _mixed_rows_kernel launch."""
    seen = []
    kernel = LM.triton_kernels()["_mixed_rows_kernel"]
    real = kernel.run

    def run(*a, grid, **meta):
        seen.append((meta["SPLIT_K"], meta["SPREAD_LORA"], meta["HAS_COL_SCALE"]))
        return real(*a, grid=grid, **meta)

    monkeypatch.setattr(kernel, "run", run)
    return seen


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("strategy,tokens", [("rows", 1), ("segments", 2)])
def test_mixed_col_scale_within_bound(strategy, tokens, dtype, split_k_seen):
    args = _mixed(7, tokens, dtype, seed=tokens)
    dev = _mixed_on_device(args)
    y = _run_mixed(dev, strategy)
    assert (_mixed_excess(y, args) <= 0).all()
    dora = torch.tensor([int(s) in DORA_SLOTS for s in args[3]])
    # Without the column scale the DoRA rows leave the bound (and only they change).
    y0 = _run_mixed(dev, strategy, col_scale=None)
    ex0 = _mixed_excess(y0, args)
    assert (ex0[dora] > 0).all() and (ex0[~dora] <= 0).all()
    # A DoRA slot's LoRA term scaled by 0.95 (aligned inputs) leaves it too.
    args = _mixed(7, tokens, dtype, seed=tokens + 10, aligned=True)
    dev = _mixed_on_device(args)
    assert (_mixed_excess(_run_mixed(dev, strategy), args) <= 0).all()
    wrong = dev[6].clone()
    wrong[list(DORA_SLOTS)] *= 0.95
    ex = _mixed_excess(_run_mixed(dev, strategy, scale=wrong), args)
    assert (ex[dora] > 0).all() and (ex[~dora] <= 0).all()
    if strategy == "rows":
        assert split_k_seen[0][2] is True  # the first launch: with the column scale


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mixed_col_scale_split_k_spread_and_bias_mutation(dtype, split_k_seen):
    """Decode with K split over programs: with l_out (the LoRA term after the reduction)
    and without it (each split adds a rank slice to its partial tile, before g). The
    bias scaled by g as well fails the bound on DoRA rows."""
    # K long enough for the production rule (at least 4 K-blocks per split)
    args = _mixed(4, 1, dtype, seed=5, k=1030)
    dev = _mixed_on_device(args)
    assert (_mixed_excess(_run_mixed(dev, "rows"), args) <= 0).all()
    no_ia3 = args[:8] + (None, None) + args[10:]
    dev = _mixed_on_device(no_ia3)
    y = _run_mixed(dev, "rows")
    assert (_mixed_excess(y, no_ia3) <= 0).all()
    assert {(sk > 1, spread) for sk, spread, _ in split_k_seen} >= {(True, False), (True, True)}
    # Only DoRA rows of slot 0: a bias of g[0] ⊙ b is the kernel scaling the bias too.
    only = no_ia3[:3] + (torch.zeros(no_ia3[0].shape[0], dtype=torch.long),) + no_ia3[4:]
    dev = _mixed_on_device(only)
    assert (_mixed_excess(_run_mixed(dev, "rows"), only) <= 0).all()
    moved = (only[2].float() * only[11][0]).to(dtype).to(DEVICE)
    assert (_mixed_excess(_run_mixed(dev, "rows", bias=moved), only) > 0).all()


@needs_kernels
def test_mixed_identity_slot_scale_is_read_as_given():
    """``__base__`` rows take the identity slot's column scale (ones from the library):
    a base row equals the plain layer, and the ones are what keeps it so."""
    args = _mixed(5, 2, torch.float32, seed=3)
    dev = _mixed_on_device(args)
    y = _run_mixed(dev, "segments")
    x, w, bias = args[0], args[1], args[2]
    torch.testing.assert_close(y[4].cpu(), x[4] @ w.t() + bias, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------
@needs_kernels
def test_opcheck_with_col_scale():
    inp = _on_device(_single(3, 8, torch.float32, seed=2))
    args = (inp["x"], inp["weight"], inp["bias"], inp["lora_a"], inp["lora_b"], inp["lora_scale"], None, None,
            False, inp["col_scale"])  # fmt: skip
    torch.library.opcheck(torch.ops.tinytune.lora_linear.default, args)
    m = _mixed_on_device(_mixed(3, 2, torch.float32, seed=4))
    torch.library.opcheck(torch.ops.tinytune.lora_mixed_linear.default, m[:11] + (None, None, m[11]))


# ---------------------------------------------------------------------------------------
# the roofline entry: DoRA's cost over plain LoRA on the fused path
# ---------------------------------------------------------------------------------------
def test_roofline_dora_costs_one_vector_more():
    for m in (1, 64, 2048):
        lo = kernel_report.roofline(m, 4096, 4096, 16)
        do = kernel_report.roofline(m, 4096, 4096, 16, dora=True)
        assert do["path"] == lo["path"] and do["merged"] == lo["merged"]
        # one fp32 (N,) vector next to a bf16 (N, K) weight: at most 2/K more at decode
        assert 1.0 < do["fused"] / lo["fused"] <= 1 + 2 / 4096 + 1e-9
        assert do["unmerged"] > lo["unmerged"]
    rows = kernel_report.print_roofline_dora()
    assert {1, 64, 2048} <= {row["m"] for row in rows}
