"""The shrink kernel's grid split (issue 20, target 5).

``lora_linear``'s two-launch path computes ``h = (x Aᵀ) ⊙ s`` in a kernel of its own.
With one program per ``BLOCK_M`` rows it left most SMs idle (one program streaming all
of ``A`` at decode with padded rank 128-256; 4-32 programs at 256-2048 rows and small
ranks), so ``shrink_config`` now splits it: 16-row tiles, then rank blocks, then K
(serial split-K: fp32 partial tiles summed in split order by the last program to
arrive at the tile's counter). These tests run the split kernel under the interpreter
(or on a GPU) with every input inside a NaN-filled buffer, on the production splits and
on forced ones at odd shapes, against the forward error bound of
``tests/test_kernel_twins.py`` (tight enough that a LoRA term scaled by 0.95 fails), and
check the rule and the roofline model that chose it (and that 16-bit batched decode at
padded rank 128-256 keeps its 32-row GEMM tiles with the split shrink). Whether the split-K's memory
ordering is right cannot show in the interpreter (it runs programs one after another):
``tests/test_split_k_ordering.py`` checks the compiled code for it.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

L = pytest.importorskip("tinytune.kernels.lora_linear")

if not L.HAS_TRITON:  # pragma: no cover - depends on the platform
    pytest.skip("triton is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ci"))
import kernel_report  # noqa: E402

ON_CUDA = torch.cuda.is_available() and not L.interpreted()
DEVICE = "cuda" if ON_CUDA else "cpu"
needs_kernels = pytest.mark.skipif(
    not (ON_CUDA or L.interpreted()),
    reason="needs a CUDA GPU or TRITON_INTERPRET=1 (the Triton CPU interpreter)",
)

U = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
U32 = 2.0**-24
N = 90


def _nan_embed(t: torch.Tensor) -> torch.Tensor:
    buf = torch.full((t.shape[0] + 3, t.shape[1] + 5), float("nan"), dtype=t.dtype, device=t.device)
    view = buf[1 : 1 + t.shape[0], 2 : 2 + t.shape[1]]
    view.copy_(t)
    return view


def _inputs(m: int, k: int, r: int, dtype: torch.dtype, seed: int = 0, aligned: bool = False) -> dict:
    """Random inputs in NaN-filled buffers; ``aligned``: x, A, B non-negative (the LoRA
    term's rounding bound is then ``u`` times the term, so a 5% error shows)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0, pos=False):
        t = torch.randn(*shape, generator=g) * std
        return _nan_embed((t.abs() if pos else t).to(dtype).to(DEVICE))

    return dict(
        x=rnd(m, k, pos=aligned),
        weight=rnd(N, k, std=1 / math.sqrt(k)),
        bias=rnd(1, N)[0],
        lora_a=rnd(r, k, std=1 / math.sqrt(k), pos=aligned),
        lora_b=rnd(N, r, std=1 / math.sqrt(r), pos=aligned),
        lora_scale=(torch.rand(r, generator=g) * 2 + 0.5).to(DEVICE),
    )


def _run(inp: dict, config=None) -> torch.Tensor:
    return L.launch(inp["x"], inp["weight"], inp["bias"], inp["lora_a"], inp["lora_b"],
                     inp["lora_scale"], None, None, False, config=config)  # fmt: skip


def _excess(y: torch.Tensor, inp: dict) -> float:
    """How far ``y`` lies outside the forward error bound (<= 0: inside); see
    tests/test_kernel_twins.py for its derivation (16-bit: ``h`` and the output rounded
    once each, 2u per rounding; fp32 sums on both sides)."""
    f = {k: v.double() for k, v in inp.items()}
    h = (f["x"] @ f["lora_a"].t()) * f["lora_scale"]
    exact = f["x"] @ f["weight"].t() + f["bias"] + h @ f["lora_b"].t()
    a = {k: v.abs() for k, v in f.items()}
    lora_abs = ((a["x"] @ a["lora_a"].t()) * a["lora_scale"]) @ a["lora_b"].t()
    y_abs = a["x"] @ a["weight"].t() + a["bias"] + lora_abs
    u = U[y.dtype]
    k, r = inp["x"].shape[1], inp["lora_a"].shape[0]
    bound = 2 * u * (exact.abs() + lora_abs) + 2 * (k + r + 2) * U32 * y_abs
    assert torch.isfinite(y).all(), "non-finite output: an unmasked load read the NaN padding"
    return ((y.double() - exact).abs() - bound).max().item()


@pytest.fixture
def shrink_launches(monkeypatch):
    """(grid, meta) of every launch of the shrink kernel."""
    seen = []
    kernel = L.triton_kernels()["_lora_shrink_kernel"]
    real = kernel.run

    def run(*args, grid, **meta):
        seen.append((tuple(grid), meta))
        return real(*args, grid=grid, **meta)

    monkeypatch.setattr(kernel, "run", run)
    return seen


def _check_and_scaled_lora_fails(inp_seed: tuple, config=None) -> None:
    m, k, r, dtype, seed = inp_seed
    inp = _inputs(m, k, r, dtype, seed)
    assert _excess(_run(inp, config), inp) <= 0
    inp = _inputs(m, k, r, dtype, seed + 1, aligned=True)
    assert _excess(_run(inp, config), inp) <= 0
    wrong = dict(inp, lora_scale=inp["lora_scale"] * 0.95)
    assert _excess(_run(wrong, config), inp) > 0


# Production splits (pick_config with the H100/H200's 132 SMs, as the launcher picks
# under the interpreter). K-splits run where few programs each stream >= 256 KiB: decode
# at padded rank 128 with K = 8200 (bf16) and at padded rank 32 with K = 4100 (fp32);
# 17 rows at padded rank 128 (batched decode's two-launch path) and 130 rows at a small
# rank take 16-row tiles and rank blocks only (K = 520).
PRODUCTION = [(1, 100, 8200, torch.bfloat16), (3, 20, 4100, torch.float32),
              (17, 100, 520, torch.float16), (130, 24, 520, torch.bfloat16)]


@needs_kernels
@pytest.mark.parametrize("m,r,k,dtype", PRODUCTION, ids=[f"m{m}-r{r}-k{k}-{str(d)[6:]}" for m, r, k, d in PRODUCTION])
def test_production_split_within_bound(m, r, k, dtype, shrink_launches):
    sc = L.pick_config(m, N, k, r, dtype)["shrink"]
    assert sc is not None and sc["BLOCK_M"] == 16 and sc["BLOCK_R"] == 16
    assert (sc["SPLIT_K"] > 1) == (k > 520)
    _check_and_scaled_lora_fails((m, k, r, dtype, m))
    (grid, meta), *_ = shrink_launches
    tiles_r, tiles_m, split = grid
    assert (split > 1) == (k > 520) and meta["REDUCE"] is (split > 1)
    assert (tiles_r, tiles_m) == (triton_cdiv(r, sc["BLOCK_R"]), triton_cdiv(m, sc["BLOCK_M"]))
    assert meta["BLOCK_R"] == sc["BLOCK_R"] and meta["BLOCK_M"] == sc["BLOCK_M"]
    assert meta["DOT_FP32"] is (dtype == torch.float32)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# Forced splits at odd shapes (K = 150: 64-wide K-blocks, the last one partial; rank
# not a multiple of the rank block; rows not a multiple of the tile), including a split
# whose K-range is empty (SPLIT_K = 4 of 3 K-blocks: the launcher recomputes 3) and a
# rank block wider than the rank.
FORCED = [  # (m, r, BLOCK_M, BLOCK_R, SPLIT_K, dtype)
    (1, 9, 16, 16, 3, torch.bfloat16),
    (17, 40, 16, 16, 2, torch.float16),
    (33, 100, 32, 32, 4, torch.bfloat16),
    (130, 200, 16, 64, 3, torch.bfloat16),
    (70, 24, 64, 16, 2, torch.float32),
]


@needs_kernels
@pytest.mark.parametrize("m,r,bm,br,split,dtype", FORCED, ids=[f"m{c[0]}-r{c[1]}-{c[2]}x{c[3]}-s{c[4]}" for c in FORCED])
def test_forced_splits_at_odd_shapes(m, r, bm, br, split, dtype, shrink_launches):
    k = 150
    cfg = L.pick_config(max(m, 17), N, k, max(r, 65), dtype)  # a two-launch GEMM tile
    cfg = dict(cfg, R_PAD=L.pad_rank(r), shrink_in_loop=False,
               shrink=dict(L.shrink_config(L.pad_rank(r), m <= 16, dtype == torch.float32),
                           BLOCK_M=bm, BLOCK_R=br, SPLIT_K=split))
    _check_and_scaled_lora_fails((m, k, r, dtype, 7 * m), config=cfg)
    grid, meta = shrink_launches[0]
    block_k = cfg["shrink"]["BLOCK_K"]
    chunk = triton_cdiv(triton_cdiv(k, split), block_k) * block_k
    assert grid == (triton_cdiv(r, min(br, L.pad_rank(r))), triton_cdiv(m, bm), triton_cdiv(k, chunk))
    assert meta["REDUCE"] is (grid[2] > 1)


def _programs(m: int, k: int, r: int) -> tuple[int, int]:
    """(programs of the split shrink, programs of one per BLOCK_M rows), bf16."""
    r_pad = L.pad_rank(r)
    sc = L.shrink_config(r_pad, m <= 16, False, m, k)
    chunk = triton_cdiv(triton_cdiv(k, sc["SPLIT_K"]), sc["BLOCK_K"]) * sc["BLOCK_K"]
    split = triton_cdiv(k, chunk)
    unsplit = triton_cdiv(m, L.shrink_config(r_pad, m <= 16, False)["BLOCK_M"])
    return triton_cdiv(m, sc["BLOCK_M"]) * triton_cdiv(r, sc["BLOCK_R"]) * split, unsplit


@pytest.mark.parametrize("k", [4096, 14336])
@pytest.mark.parametrize("r", [16, 64, 128, 256])
def test_split_fills_the_gpu(r, k):
    """Where one program per BLOCK_M rows gives at most a quarter of the 132 SMs a
    program, the split gives 8 times as many or at least a quarter of the SMs one (16-
    row tiles and rank blocks; K-splits add more where they pay for their memset); it
    never gives fewer programs."""
    for m in (1, 16, 17, 32, 64, 128, 256, 1024, 2048, 4096, 8192):
        split, unsplit = _programs(m, k, r)
        assert split >= unsplit
        if unsplit <= L.SMS_DEFAULT // 4:
            assert split >= min(L.SMS_DEFAULT // 4, unsplit * 8, triton_cdiv(m, 16) * L.pad_rank(r) // 16), (m, split)
    assert _programs(1, k, r)[1] == 1  # decode: one program streamed all of A


@pytest.mark.parametrize("k,n", [*kernel_report.BENCH_SHAPES, (14336, 4096)])
@pytest.mark.parametrize("r", [128, 256])
def test_roofline_counts_the_split_shrink(k, n, r):
    """The model prices the shrink on its split grid (CTAs per SM, the split-K memset as
    one more launch): at decode and 17-256 rows the split shrink is several times faster
    and the two-launch path never slower than with one program per BLOCK_M rows."""
    for m in (1, 16, 17, 64, 128, 256, 1024, 2048):
        p = kernel_report.roofline(m, k, n, r)
        assert p["path"] == "two"
        assert p["two_l"] <= p["two_unsplit_l"] * (1 + 1e-9)
        if m <= 256:
            assert p["shrink_programs"] >= 8 * p["shrink_unsplit_programs"] or p["shrink_programs"] >= 64
            assert p["shrink"] < p["shrink_unsplit"] / 4


@pytest.mark.parametrize("m", [17, 64, 128])
def test_batched_decode_at_large_rank_keeps_32_row_tiles(m):
    """16-bit batched decode at padded rank 128-256 runs the split shrink and the 32-row
    GEMM tiles (the 64x128 prefill tiles gave 32 programs at N = 4096); fp32 keeps its
    prefill tiles."""
    for r in (100, 256):
        cfg = L.pick_config(m, 4096, 4096, r, torch.bfloat16)
        assert cfg["case"] == "batched-decode" and not cfg["shrink_in_loop"]
        assert cfg["BLOCK_M"] == 32 and cfg["shrink"] is not None
        assert triton_cdiv(m, cfg["BLOCK_M"]) * triton_cdiv(4096, cfg["BLOCK_N"]) >= 64
    assert L.pick_config(m, 4096, 4096, 100, torch.float32)["case"] == "prefill"
