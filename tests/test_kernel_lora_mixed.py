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
K, N = 72, 40  # not multiples of any block size (the interpreter config uses 32)


def _eps(dtype: torch.dtype) -> float:
    return {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]


def _tol(dtype: torch.dtype) -> dict:
    """Tolerances against the fp32 reference.

    fp32: kernel and reference both accumulate in fp32 (ieee dots: no TF32) and differ
    only in summation order, ~1e-6 at these sizes. fp16/bf16: inputs are exact in their
    dtype and everything is computed in fp32 (the interpreter upcasts the dot operands),
    so the two fp32 results differ by summation order only and round to the same or an
    adjacent value: one unit in the last place (relative 2^-10 for fp16, 2^-7 for bf16 at
    worst). On a GPU, ``l_in * x`` and ``h`` are rounded to the dtype before their
    tensor-core dots, each adding up to half an ulp of its term, and the terms (base
    product, LoRA term) are O(1) here by construction while their sum may be smaller:
    allow 3 ulp of an O(1) value there, relative and absolute.
    """
    if dtype == torch.float32:
        return dict(rtol=2e-5, atol=2e-5)
    if DEVICE == "cpu":
        return dict(rtol=_eps(dtype), atol=_eps(dtype) * 0.05)
    return dict(rtol=3 * _eps(dtype), atol=3 * _eps(dtype))


def _in_nan(shape: tuple, dtype: torch.dtype, fill: torch.Tensor) -> torch.Tensor:
    """``fill`` copied into the corner of a bigger NaN buffer (a strided view of it)."""
    big = torch.full(tuple(s + 3 for s in shape), float("nan"), dtype=dtype, device=DEVICE)
    view = big[tuple(slice(0, s) for s in shape)]
    view.copy_(fill)
    return view


def _problem(rows: int, tokens: int, n_adapters: int, dtype: torch.dtype, *, seed: int = 0,
             lora: bool = True, ia3: bool = True, bias: bool = True, weight_kn: bool = False,
             k: int = K):
    """A mixed batch: ``n_adapters`` slots (ranks cycling through RANKS; with IA³ on, every
    third slot is IA³ only and every other one also has IA³) plus the identity slot,
    ``__base__`` rows interleaved. Returns the op's positional arguments."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dtype)

    slots = n_adapters + 1  # last one: identity
    ranks = [RANKS[(i + seed) % len(RANKS)] for i in range(n_adapters)] + [0]
    if ia3:
        ranks = [0 if i % 3 == 2 and i < n_adapters else r for i, r in enumerate(ranks)]
    r_max = max(max(ranks), 1)
    x = _in_nan((rows, tokens, k), dtype, rnd(rows, tokens, k))
    w_shape = (k, N) if weight_kn else (N, k)
    weight = _in_nan(w_shape, dtype, rnd(*w_shape, s=k**-0.5))
    b = _in_nan((N,), dtype, rnd(N)) if bias else None
    a_stack = bt_stack = scale = rank_t = None
    if lora:
        a_full = torch.full((slots, r_max, k), float("nan"))
        bt_full = torch.full((slots, r_max, N), float("nan"))
        for s, r in enumerate(ranks):
            a_full[s, :r] = torch.randn(r, k, generator=g) * k**-0.5
            bt_full[s, :r] = torch.randn(r, N, generator=g) * max(r, 1) ** -0.5
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
    torch.testing.assert_close(got.float(), ref.float(), **_tol(args[0].dtype))


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
    torch.testing.assert_close(got.float(), torch_lora_mixed_linear(*args).float(), **_tol(torch.bfloat16))


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
    # 2 rows x 3 tokens: one M-tile and two N-tiles cannot fill the GPU (8 programs under
    # the interpreter), so K is split and the last program of each tile reduces. (A GPU
    # splits only K-ranges of 4 blocks or more: give it a longer K there.)
    args = _problem(2, 3, 3, torch.float32, seed=8, k=K if DEVICE == "cpu" else 1000)
    _check(args, "rows")
    grids = [grid for name, grid in launches if name == "_mixed_rows_kernel"]
    assert grids and grids[0][2] > 1
    _check(_problem(2, 3, 3, torch.float32, seed=8, lora=False), "rows")  # no shrink: memset
    # Without l_out each K-split adds a slice of the rank to its partial tile.
    _check(_problem(2, 3, 3, torch.float32, seed=8, ia3=False, k=K if DEVICE == "cpu" else 1000), "rows")


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
