"""The per-row (mixed-batch) fused op ``tinytune::lora_mixed_linear`` and its kernels.

Kernel tests run on CUDA tensors when a GPU is present, otherwise on CPU tensors through
Triton's interpreter (``TRITON_INTERPRET=1``, as the README's test command sets); without
either they are skipped. The reference ``torch_lora_mixed_linear`` is itself checked
against a plain per-row loop of ``nn.Linear`` + LoRA + IA³, so it is not trusted blindly.

Every kernel input sits inside a larger NaN-filled buffer, and every stack holds NaN in
its padded rank rows and in the identity slot: an unmasked load, a read of a padded rank
or adapter work on a base row turns the output into NaN and fails the comparison.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from tinytune.kernels.triton_support import HAS_TRITON
from tinytune.kernels import lora_mixed as lm
from tinytune.kernels import lora_mixed_plan as plan
from tinytune.kernels import report_configs
from tinytune.kernels.lora_mixed import lora_mixed_linear, torch_lora_mixed_linear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = HAS_TRITON and (DEVICE == "cuda" or lm.interpreted())
needs_kernels = pytest.mark.skipif(
    not KERNELS, reason="needs Triton with a GPU or TRITON_INTERPRET=1"
)
RANKS = (1, 4, 16, 64, 128)
K, N = 72, 40  # not multiples of any block size (the production tiles, as on a GPU)


U = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}  # unit roundoff of the 16-bit dtypes
U32 = 2.0**-24


def _terms(args, absolute: bool = False) -> tuple:
    """``(base, l_in_part, lora)`` of the op's formula in float64, from the inputs as given.

    ``base = l_out ⊙ ((l_in ⊙ x) Wᵀ + b)``, ``l_in_part = |l_out| ⊙ ((|l_in| |x|) |W|ᵀ)``
    and ``lora = scale (x Aᵀ) Bᵀ`` per row's slot, rank rows past the slot's rank dropped
    (they hold NaN). ``absolute``: every input replaced by its absolute value (the terms'
    magnitudes, for the bound).
    """
    x, weight, bias, row_index, a, bt, scale, ranks, l_in, l_out, weight_kn = args
    f = (lambda t: t.double().abs()) if absolute else (lambda t: t.double())
    b, k = x.shape[0], x.shape[-1]
    idx = row_index.long()
    x3 = f(x.reshape(b, -1, k))
    w = f(weight.t() if weight_kn else weight)
    lin = f(l_in)[idx].unsqueeze(1) if l_in is not None else torch.ones((), dtype=torch.float64, device=x.device)
    lout = f(l_out)[idx].unsqueeze(1) if l_out is not None else torch.ones((), dtype=torch.float64, device=x.device)
    base = (x3 * lin) @ w.t()
    lin_part = ((x3.abs() * lin.abs()) @ w.abs().t()) * lout.abs()
    if bias is not None:
        base = base + f(bias)
    base = base * lout
    lora = torch.zeros_like(base)
    if a is not None:
        live = torch.arange(a.shape[1], device=a.device)[None, :] < (
            ranks.long() if ranks is not None else torch.full((a.shape[0],), a.shape[1], device=a.device))[:, None]
        zero = torch.zeros((), dtype=torch.float64, device=a.device)
        aa = torch.where(live[:, :, None], f(a), zero)[idx]
        bb = torch.where(live[:, :, None], f(bt), zero)[idx]
        h = x3 @ aa.transpose(1, 2)
        if scale is not None:
            h = h * f(scale)[idx].view(b, 1, 1)
        lora = h @ bb
    return base, lin_part, lora


def _excess(got: torch.Tensor, args) -> float:
    """How far a 16-bit result lies outside its forward error bound (<= 0: inside).

    The kernels take the GPU's 16-bit branch on a GPU and under the interpreter alike
    (the interpreter widens only the rounded 16-bit operands of each ``tl.dot``: exact
    products, fp32 sums, as the tensor cores). With x, W, b, A, Bᵀ and the IA³ scales
    given in the dtype, the only roundings to 16 bits are ``l_in ⊙ x`` before the base
    dot (at most ``u |l_in| |x|`` per element, carried through ``|W|`` and ``|l_out|``),
    ``h`` before the segments' expand dot (``u |h|``, carried through ``|B|``; the rows
    kernel keeps h in fp32) and the output (``u |y|``); the rest are fp32 sums of at most
    ``K + R + 2`` terms on both sides. Each 16-bit rounding counts ``2u``: the GPU rounds
    to nearest, Triton's interpreter truncates. So

        |y - y_exact| <= 2u (|y_exact| + l_in_part + lora_abs) + 2 (K + R + 2) u32 y_abs

    with ``*_abs`` the formula on absolute values. Tight enough that a LoRA term scaled
    by 0.95 fails it where the LoRA term is not small next to the base one
    (``test_16bit_branch_bound_catches_a_scaled_lora``).
    """
    base, _, lora = _terms(args)
    base_abs, lin_part, lora_abs = _terms(args, absolute=True)
    exact = base + lora
    x, a = args[0], args[4]
    u = U[x.dtype]
    r = a.shape[1] if a is not None else 0
    bound = 2 * u * (exact.abs() + lora_abs + (lin_part if args[8] is not None else 0))
    bound = bound + 2 * (x.shape[-1] + r + 2) * U32 * (base_abs + lora_abs)
    got = got.double().reshape(exact.shape)
    assert torch.isfinite(got).all()
    return ((got - exact).abs() - bound).max().item()


def _assert_matches(got: torch.Tensor, args) -> None:
    """fp32: kernel and reference both accumulate in fp32 (ieee dots: no TF32) and differ
    only in summation order, ~1e-6 at these sizes. fp16/bf16: the bound of :func:`_excess`."""
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, torch_lora_mixed_linear(*args), rtol=2e-5, atol=2e-5)
    else:
        assert _excess(got, args) <= 0


def _in_nan(shape: tuple, dtype: torch.dtype, fill: torch.Tensor) -> torch.Tensor:
    """``fill`` copied into the corner of a bigger NaN buffer (a strided view of it)."""
    big = torch.full(tuple(s + 3 for s in shape), float("nan"), dtype=dtype, device=DEVICE)
    view = big[tuple(slice(0, s) for s in shape)]
    view.copy_(fill)
    return view


def _problem(rows: int, tokens: int, n_adapters: int, dtype: torch.dtype, *, seed: int = 0,
             lora: bool = True, ia3: bool = True, bias: bool = True, weight_kn: bool = False,
             k: int = K, aligned: bool = False):
    """A mixed batch: ``n_adapters`` slots (ranks cycling through RANKS; with IA³ on, every
    third slot is IA³ only and every other one also has IA³) plus the identity slot,
    ``__base__`` rows interleaved. Returns the op's positional arguments. ``aligned``:
    x, A and Bᵀ non-negative, so the LoRA term's products share a sign and its rounding
    bound is ``u`` times the term itself (a 5% error of it shows)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dtype)

    slots = n_adapters + 1  # last one: identity
    ranks = [RANKS[(i + seed) % len(RANKS)] for i in range(n_adapters)] + [0]
    if ia3:
        ranks = [0 if i % 3 == 2 and i < n_adapters else r for i, r in enumerate(ranks)]
    r_max = max(max(ranks), 1)
    pos = (lambda t: t.abs()) if aligned else (lambda t: t)
    x = _in_nan((rows, tokens, k), dtype, pos(rnd(rows, tokens, k)))
    w_shape = (k, N) if weight_kn else (N, k)
    weight = _in_nan(w_shape, dtype, rnd(*w_shape, s=k**-0.5))
    b = _in_nan((N,), dtype, rnd(N)) if bias else None
    a_stack = bt_stack = scale = rank_t = None
    if lora:
        a_full = torch.full((slots, r_max, k), float("nan"))
        bt_full = torch.full((slots, r_max, N), float("nan"))
        for s, r in enumerate(ranks):
            a_full[s, :r] = pos(torch.randn(r, k, generator=g) * k**-0.5)
            bt_full[s, :r] = pos(torch.randn(r, N, generator=g) * max(r, 1) ** -0.5)
        a_stack = _in_nan(a_full.shape, dtype, a_full.to(dtype))
        bt_stack = _in_nan(bt_full.shape, dtype, bt_full.to(dtype))
        scale = _in_nan((slots,), torch.float32, torch.rand(slots, generator=g) + 0.5)
        rank_t = torch.tensor(ranks, dtype=torch.int32, device=DEVICE)
    l_in = l_out = None
    if ia3:
        lin = torch.rand(slots, k, generator=g) + 0.5
        lout = torch.rand(slots, N, generator=g) + 0.5
        for s in range(slots):  # slots without IA³ (and the identity) hold ones
            if s == slots - 1 or (s % 2 == 1 and ranks[s] > 0):
                lin[s] = 1.0
                lout[s] = 1.0
        l_in = _in_nan((slots, k), dtype, lin.to(dtype))
        l_out = _in_nan((slots, N), dtype, lout.to(dtype))
    # Rows cycle through the adapters in a shuffled order, every third row is a base row.
    perm = torch.randperm(n_adapters, generator=g).tolist()
    assign = [slots - 1 if i % 3 == 1 else perm[i % n_adapters] for i in range(rows)]
    row_index = torch.tensor(assign, dtype=torch.long, device=DEVICE)
    return (x, weight, b, row_index, a_stack, bt_stack, scale, rank_t, l_in, l_out, weight_kn)


# ---------------------------------------------------------------------------------------
# the reference against a plain loop over rows
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("weight_kn", [False, True])
def test_reference_matches_per_row_modules(weight_kn):
    args = _problem(7, 3, 5, torch.float32, seed=1, weight_kn=weight_kn)
    x, weight, bias, row_index, a, bt, scale, ranks, l_in, l_out, _ = args
    expected = []
    for i in range(x.shape[0]):
        s = int(row_index[i])
        lin = nn.Linear(K, N, bias=True, device=DEVICE)
        with torch.no_grad():
            lin.weight.copy_(weight.t() if weight_kn else weight)
            lin.bias.copy_(bias)
        r = int(ranks[s])
        y = lin(x[i] * l_in[s]) * l_out[s]
        if r:
            lora_a = nn.Linear(K, r, bias=False, device=DEVICE)
            lora_b = nn.Linear(r, N, bias=False, device=DEVICE)
            with torch.no_grad():
                lora_a.weight.copy_(a[s, :r])
                lora_b.weight.copy_(bt[s, :r].t())
            y = y + lora_b(lora_a(x[i])) * scale[s]
        expected.append(y)
    got = torch_lora_mixed_linear(*args)
    assert not got.isnan().any()
    torch.testing.assert_close(got, torch.stack(expected).detach(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# the kernels against the reference
# ---------------------------------------------------------------------------------------
SHAPES = [  # (rows, tokens, distinct adapters)
    (1, 1, 1),
    (1, 7, 1),
    (5, 1, 3),
    (5, 7, 3),
    (33, 1, 17),
    (33, 7, 17),
]
# Every shape in fp32; the 16-bit dtypes on the shapes that mix the most (the interpreter
# is slow, and the dtype only changes loads, casts and the final store).
CASES = [(torch.float32, *shape) for shape in SHAPES] + [
    (dtype, *shape)
    for dtype in (torch.float16, torch.bfloat16)
    for shape in ((5, 7, 3), (33, 1, 17))
]


def _check(args, strategy):
    ref = torch_lora_mixed_linear(*args)
    got = lm.launch(*args, strategy=strategy)
    assert got.shape == ref.shape and got.dtype == args[0].dtype
    assert not got.isnan().any(), "NaN: a masked load read padding, a padded rank or an identity slot"
    _assert_matches(got, args)


@needs_kernels
@pytest.mark.parametrize("strategy", ["rows", "segments"])
@pytest.mark.parametrize("dtype,rows,tokens,adapters", CASES, ids=str)
def test_kernels_match_reference(strategy, dtype, rows, tokens, adapters):
    # 17 adapters carry every rank in RANKS several times, LoRA-only, IA³-only and
    # LoRA+IA³ slots, and base rows interleaved, all in one batch.
    # seed=rows gives the 1-adapter batches rank 4, the 3-adapter batches ranks 1 and 4
    # and an IA³-only slot, the 17-adapter batches every rank in RANKS (1 to 128).
    _check(_problem(rows, tokens, adapters, dtype, seed=rows), strategy)


@needs_kernels
@pytest.mark.parametrize("strategy", ["rows", "segments"])
@pytest.mark.parametrize(
    "features",
    [dict(ia3=False), dict(lora=False), dict(bias=False, ia3=False), dict(weight_kn=True)],
    ids=["lora-only", "ia3-only", "no-bias", "conv1d"],
)
def test_kernels_feature_subsets(strategy, features):
    _check(_problem(5, 3, 4, torch.float32, seed=3, **features), strategy)


@needs_kernels
def test_kernels_without_ranks_or_scale_use_full_stacks():
    x, w, b, ri, a, bt, _, _, _, _, kn = _problem(4, 2, 2, torch.float32, seed=5, ia3=False)
    a = torch.nan_to_num(a.contiguous())  # every rank row is read now
    bt = torch.nan_to_num(bt.contiguous())
    args = (x, w, b, ri, a, bt, None, None, None, None, kn)
    for strategy in ("rows", "segments"):
        _check(args, strategy)


@needs_kernels
@pytest.mark.parametrize("strategy", ["rows", "segments"])
def test_kernels_take_strided_vectors(strategy):
    # bias, row_index, scale and ranks as views with stride 2 into buffers whose other
    # elements are poison (NaN; for the integer vectors, the identity slot and rank 0):
    # the kernels index these vectors with unit stride, so the launcher must hand them
    # over contiguous.
    args = list(_problem(5, 3, 4, torch.float32, seed=3))
    slots = args[6].shape[0]
    for i, poison in ((2, float("nan")), (3, slots - 1), (6, float("nan")), (7, 0)):
        t = args[i]
        args[i] = torch.stack([t, torch.full_like(t, poison)], dim=1)[:, 0]
        assert args[i].stride() == (2,) and torch.equal(args[i], t)
    _check(tuple(args), strategy)


@needs_kernels
def test_op_dispatches_to_kernels_and_matches_reference():
    args = _problem(5, 7, 3, torch.bfloat16, seed=7)
    got = torch.ops.tinytune.lora_mixed_linear(*args)
    _assert_matches(got, args)


def test_cpu_without_interpreter_falls_back_to_reference(monkeypatch):
    monkeypatch.setattr(lm, "interpreted", lambda: False)
    args = tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in _problem(3, 2, 2, torch.float32))
    launches = []
    if HAS_TRITON:
        for kernel in _KERNELS():
            monkeypatch.setattr(kernel, "run", lambda *a, **k: launches.append(1))
    got = lora_mixed_linear(*args)
    assert launches == []
    torch.testing.assert_close(got, torch_lora_mixed_linear(*args))


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(row_index=torch.zeros(2, dtype=torch.long)), "row_index must have shape"),
        (dict(a_stack=torch.zeros(4, 2, K + 1)), "a_stack has shape"),
        (dict(l_out_stack=torch.ones(3, N)), "l_out_stack has 3 slots"),
        (dict(bt_stack=None), "both a_stack and bt_stack"),
        (dict(weight=torch.zeros(N, K).t()), "weight"),
    ],
)
def test_bad_shapes_raise_value_error(change, message):
    names = ["x", "weight", "bias", "row_index", "a_stack", "bt_stack", "scale", "ranks",
             "l_in_stack", "l_out_stack", "weight_kn"]
    args = dict(zip(names, _problem(3, 2, 3, torch.float32)))
    args.update({k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in change.items()})
    with pytest.raises(ValueError, match=message):
        lora_mixed_linear(*args.values())


# ---------------------------------------------------------------------------------------
# registration: opcheck, torch.compile
# ---------------------------------------------------------------------------------------
@needs_kernels
def test_opcheck():
    args = _problem(3, 2, 2, torch.float32, seed=0)
    args = tuple(t.contiguous() if isinstance(t, torch.Tensor) else t for t in args)
    torch.library.opcheck(lora_mixed_linear, args)


@needs_kernels
def test_compile_fullgraph_keeps_the_op():
    seen = []

    def backend(gm, example_inputs):
        seen.extend(node.target for node in gm.graph.nodes if node.op == "call_function")
        return gm

    args = _problem(3, 2, 2, torch.float32, seed=4)

    @torch.compile(fullgraph=True, backend=backend)
    def layer(*a):
        return lora_mixed_linear(*a) * 2

    got = layer(*args)
    assert torch.ops.tinytune.lora_mixed_linear.default in seen
    torch.testing.assert_close(got, 2 * torch_lora_mixed_linear(*args), rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------------------------------
# same launches for every assignment (CUDA-graph safety)
# ---------------------------------------------------------------------------------------
def _KERNELS():
    return list(lm.triton_kernels().values())


@pytest.fixture
def launches(monkeypatch):
    """Record (kernel, grid) of every real launch: wraps each jitted kernel's ``run``, the
    method that ``kernel[grid](...)`` calls to compile (or interpret) and launch."""
    log = []
    for kernel in _KERNELS():
        real = kernel.run

        def run(*args, _real=real, _name=kernel.__name__, grid, **kwargs):
            log.append((_name, tuple(grid)))
            return _real(*args, grid=grid, **kwargs)

        monkeypatch.setattr(kernel, "run", run)
    return log


@needs_kernels
@pytest.mark.parametrize("strategy", ["rows", "segments", None])
def test_same_launches_for_every_assignment(launches, strategy):
    args = list(_problem(6, 5, 3, torch.float32, seed=6))
    slots = args[4].shape[0]
    identity = slots - 1
    assignments = [
        [identity] * 6,  # all base rows
        [0] * 6,  # one adapter everywhere
        [0, 1, 2, 0, 1, 2],  # all distinct, interleaved
        [2, 2, identity, 1, identity, 0],  # sorted backwards, base rows between
    ]
    seen = []
    for assign in assignments:
        args[3] = torch.tensor(assign, dtype=torch.long, device=DEVICE)
        launches.clear()
        if strategy is None:
            got = lora_mixed_linear(*args)
        else:
            got = lm.launch(*args, strategy=strategy)
        torch.testing.assert_close(got, torch_lora_mixed_linear(*args), rtol=2e-5, atol=2e-5)
        seen.append(list(launches))
    assert seen[0], "no kernel launch was observed"
    kinds = {name for name, _ in seen[0]}
    assert len(seen[0]) == 2 and ("_shrink_rows_kernel" in kinds or "_shrink_segments_kernel" in kinds)
    assert all(s == seen[0] for s in seen), seen


@needs_kernels
def test_split_k_decode_reduces_partial_tiles(launches):
    # 2 rows x 3 tokens: one M-tile and one N-tile cannot fill the GPU (132 SMs, the
    # production count, under the interpreter too), so K is split into ranges of at
    # least 4 K-blocks and the last program of each tile reduces.
    args = _problem(2, 3, 3, torch.float32, seed=8, k=1000)
    _check(args, "rows")
    grids = [grid for name, grid in launches if name == "_mixed_rows_kernel"]
    assert grids and grids[0][2] > 1
    _check(_problem(2, 3, 3, torch.float32, seed=8, lora=False, k=1000), "rows")  # no shrink: memset
    # Without l_out each K-split adds a slice of the rank to its partial tile.
    _check(_problem(2, 3, 3, torch.float32, seed=8, ia3=False, k=1000), "rows")


# ---------------------------------------------------------------------------------------
# the device-side plan and the strategy choice
# ---------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
@pytest.mark.parametrize("seed", range(4))
def test_segment_tiles_cover_every_token_once_by_slot(seed):
    g = torch.Generator().manual_seed(seed)
    rows, tokens, slots, block = 11, 3, 5, 4
    row_index = torch.randint(0, slots, (rows,), generator=g)
    tiles, order = plan.segment_tiles(row_index, slots, tokens, block)
    assert tiles.shape == (3, triton_cdiv(rows * tokens, block) + slots)
    covered = []
    for slot, start, end in tiles.t().tolist():
        stop = min(start + block, end)
        for p in range(start, stop):
            row = int(order[p // tokens])
            assert int(row_index[row]) == slot  # the tile is slot-homogeneous
            covered.append(row * tokens + p % tokens)
    assert sorted(covered) == list(range(rows * tokens))
    assert torch.equal(row_index[order], torch.sort(row_index, stable=True).values)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_strategy_from_shapes():
    # The GPU benchmark's shapes (d = 4096, rank 16): decode by rows, prefill by segments.
    assert plan.choose_strategy(64, 4096, 4096, 16, 65, 2) == "rows"
    assert plan.choose_strategy(8 * 512, 4096, 4096, 16, 5, 2) == "segments"
    assert plan.choose_strategy(1, 4096, 4096, 128, 2, 2) == "rows"


def test_report_configs_cover_both_strategies():
    records = report_configs.lora_mixed_configs()
    if not HAS_TRITON or lm.interpreted():
        assert records == []
        return
    kernels = {r["kernel"] for r in records}
    assert kernels == {f.__name__ for f in _KERNELS()}
    for r in records:
        names = r["fn"].arg_names
        assert set(r["signature"]) == set(names)
        assert set(r["constexprs"]) <= set(names)
        assert r["case"] in ("decode", "prefill")


# ---------------------------------------------------------------------------------------
# the GPU's 16-bit branch under the interpreter (issue 20, target 6)
# ---------------------------------------------------------------------------------------
@pytest.fixture
def launch_meta(monkeypatch):
    """(kernel name, grid, constexprs) of every launch."""
    log = []
    for kernel in _KERNELS():
        real = kernel.run

        def run(*args, _real=real, _name=kernel.__name__, grid, **meta):
            log.append((_name, tuple(grid), meta))
            return _real(*args, grid=grid, **meta)

        monkeypatch.setattr(kernel, "run", run)
    return log


@needs_kernels
@pytest.mark.parametrize("strategy", ["rows", "segments"])
def test_interpreter_runs_the_gpu_branch_and_tiles(launch_meta, strategy):
    """16-bit inputs take DOT_FP32=False and the production tiles under the interpreter
    too; only UPCAST_DOT (the dots' arithmetic) differs from a GPU."""
    args = _problem(5, 3, 3, torch.bfloat16, seed=2)
    lm.launch(*args, strategy=strategy)
    metas = {name: meta for name, _, meta in launch_meta}
    if strategy == "rows":
        cfg = plan.rows_config(15, False)
        meta = metas["_mixed_rows_kernel"]
    else:
        cfg = plan.segments_config(False, args[4].shape[1])
        meta = metas["_mixed_segments_kernel"]
        assert meta["LORA_FP32"] is False and metas["_shrink_segments_kernel"]["DOT_FP32"] is False
        assert metas["_shrink_segments_kernel"]["BLOCK_M"] == cfg["BLOCK_M"]
    assert meta["DOT_FP32"] is False
    assert meta["UPCAST_DOT"] is (DEVICE == "cpu")
    assert (meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]) == (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"])
    assert (meta["num_warps"], meta["num_stages"]) == (cfg["num_warps"], cfg["num_stages"])


# (rows, tokens, adapters, K): decode with the production split-K of 132 SMs (K = 1030:
# two ranges of >= 4 128-wide K-blocks), a decode batch of every rank, a prefill mix.
TWIN_SHAPES = [(5, 1, 3, 1030, "rows"), (33, 1, 17, K, "rows"), (5, 7, 3, K, "segments"),
               (33, 1, 17, K, "segments")]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows,tokens,adapters,k,strategy", TWIN_SHAPES,
                         ids=[f"{s}-{r}x{t}-{a}-k{k}" for r, t, a, k, s in TWIN_SHAPES])
def test_16bit_branch_bound_catches_a_scaled_lora(launch_meta, dtype, rows, tokens, adapters, k, strategy):
    args = _problem(rows, tokens, adapters, dtype, seed=rows + k, k=k)
    assert _excess(lm.launch(*args, strategy=strategy), args) <= 0
    args = _problem(rows, tokens, adapters, dtype, seed=rows + k + 1, k=k, aligned=True)
    assert _excess(lm.launch(*args, strategy=strategy), args) <= 0
    if k > K:
        (grid,) = [g for name, g, _ in launch_meta if name == "_mixed_rows_kernel"][:1]
        assert grid[2] > 1  # split-K at the production SM count
    # A LoRA term scaled by 0.95 (a wrong scale, a lost rank block) must fail the bound.
    wrong = list(args)
    wrong[6] = args[6] * 0.95
    assert _excess(lm.launch(*wrong, strategy=strategy), args) > 0
