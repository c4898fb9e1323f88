"""The GPU's 16-bit code paths under the interpreter (issue 20, target 6).

Under ``TRITON_INTERPRET=1`` the kernels now take the same branch as on a GPU for fp16
and bf16 inputs (``DOT_FP32`` is False): ``l_in ⊙ x`` and ``h`` are rounded to the input
dtype before their dots, exactly as the tensor cores see them. Only the operands of the
one ``tl.dot`` are widened to fp32 (``UPCAST_DOT``), which is exact for 16-bit values, so
the interpreter computes what the tensor cores compute.

The bound here is the forward error of that arithmetic, not of a generic 16-bit GEMM.
With inputs, ``A`` and ``B`` given in the 16-bit dtype and no ``l_in``, the only
roundings to 16 bits are ``h = (x Aᵀ) ⊙ s`` before ``h Bᵀ`` (at most ``u |h|`` per rank
entry) and the output (``u |y|``); everything else is exact products summed in fp32:

    |y - y_exact| <= 2u |y_exact| + 2u (|h| |B|ᵀ) + 2 (K + R + 2) u32 y_abs

with ``u`` the dtype's unit roundoff and ``y_abs`` the formula on absolute values (as in
tests/test_kernel_lora_linear.py). Each rounding counts ``2u``, not ``u``: the GPU rounds
fp32 to 16 bits to nearest (error <= u), but Triton's interpreter truncates (a plain
``.to()`` converts with no rounding mode: error < 2u), and the bound must hold for both. It is tight enough that scaling the LoRA term by 0.95
fails it, which the existing ``4 u y_abs`` bound of that file does not catch.
"""

from __future__ import annotations

import math

import pytest
import torch

L = pytest.importorskip("tinytune.kernels.lora_linear")

if not L.HAS_TRITON:  # pragma: no cover - depends on the platform
    pytest.skip("triton is not installed", allow_module_level=True)

ON_CUDA = torch.cuda.is_available() and not L.interpreted()
DEVICE = "cuda" if ON_CUDA else "cpu"
needs_kernels = pytest.mark.skipif(
    not (ON_CUDA or L.interpreted()),
    reason="needs a CUDA GPU or TRITON_INTERPRET=1 (the Triton CPU interpreter)",
)

U = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
U32 = 2.0**-24
K, N = 150, 90  # multiples of no block; 2-3 K steps at the production tiles


def _nan_embed(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a view inside a larger NaN-filled buffer (an unmasked load reads NaN)."""
    buf = torch.full((t.shape[0] + 3, t.shape[1] + 5), float("nan"), dtype=t.dtype, device=t.device)
    view = buf[1 : 1 + t.shape[0], 2 : 2 + t.shape[1]]
    view.copy_(t)
    return view


def _inputs(m: int, r: int, dtype: torch.dtype, seed: int = 0, aligned: bool = False) -> dict:
    """Random inputs; ``aligned``: x, A and B non-negative, so the LoRA term's products
    share a sign and its rounding bound ``u (|h| |B|ᵀ)`` is ``u`` times the term itself,
    as tight as a worst-case bound gets (with random signs it grows like sqrt(R) times
    the term, and a 5% error of the term hides under it at rank 100)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0, pos=False):
        t = torch.randn(*shape, generator=g) * std
        return _nan_embed((t.abs() if pos else t).to(dtype).to(DEVICE))

    return dict(
        x=rnd(m, K, pos=aligned),
        weight=rnd(N, K, std=1 / math.sqrt(K)),
        bias=rnd(1, N)[0],
        lora_a=rnd(r, K, std=1 / math.sqrt(K), pos=aligned),
        lora_b=rnd(N, r, std=1 / math.sqrt(r), pos=aligned),
        lora_scale=(torch.rand(r, generator=g) * 2 + 0.5).to(DEVICE),
        l_out=(torch.rand(N, generator=g) + 0.5).to(dtype).to(DEVICE),
    )


def _run(inp: dict, config=None) -> torch.Tensor:
    return L.launch(inp["x"], inp["weight"], inp["bias"], inp["lora_a"], inp["lora_b"],
                     inp["lora_scale"], None, inp["l_out"], False, config=config)  # fmt: skip


def _excess(y: torch.Tensor, inp: dict) -> float:
    """How far ``y`` lies outside the bound of the module docstring (<= 0: inside)."""
    f = {k: v.double() for k, v in inp.items()}
    base = (f["x"] @ f["weight"].t() + f["bias"]) * f["l_out"]
    h = (f["x"] @ f["lora_a"].t()) * f["lora_scale"]
    exact = base + h @ f["lora_b"].t()
    a = {k: v.abs() for k, v in f.items()}
    h_abs = (a["x"] @ a["lora_a"].t()) * a["lora_scale"]
    lora_abs = h_abs @ a["lora_b"].t()
    y_abs = (a["x"] @ a["weight"].t() + a["bias"]) * a["l_out"] + lora_abs
    u = U[y.dtype]
    r = inp["lora_a"].shape[0]
    bound = 2 * u * (exact.abs() + lora_abs) + 2 * (K + r + 2) * U32 * y_abs
    assert torch.isfinite(y).all(), "non-finite output: an unmasked load read the NaN padding"
    return ((y.double() - exact).abs() - bound).max().item()


# (rows, rank): decode with the shrink fused in the K-loop (padded rank 16), decode with
# a precomputed h (padded rank 128), prefill with 64-row tiles, prefill with the large
# 128x256 tiles (M > 256). Each runs pick_config's production tile, as on the GPU.
CASES = [(3, 8, "decode-fused"), (5, 100, "decode"), (33, 100, "prefill"), (257, 24, "prefill-large")]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m,r,case", CASES, ids=[c[2] for c in CASES])
def test_16bit_branch_within_tight_bound_and_scaled_lora_fails(m, r, case, dtype):
    cfg = L.pick_config(m, N, K, r, dtype)
    assert cfg["shrink_in_loop"] == (case == "decode-fused")
    inp = _inputs(m, r, dtype)
    assert _excess(_run(inp), inp) <= 0
    inp = _inputs(m, r, dtype, seed=1, aligned=True)
    assert _excess(_run(inp), inp) <= 0
    # A LoRA term scaled by 0.95 (e.g. a wrong scale, or a lost rank block) must fail it.
    wrong = dict(inp, lora_scale=inp["lora_scale"] * 0.95)
    assert _excess(_run(wrong), inp) > 0


@needs_kernels
def test_interpreter_takes_the_16bit_branch(monkeypatch):
    """The launcher passes DOT_FP32=False for 16-bit inputs under the interpreter too
    (only UPCAST_DOT differs from the GPU), and the production tiles of pick_config."""
    seen = []
    kernel = L.triton_kernels()["_lora_linear_fwd_kernel"]
    real = kernel.run  # what kernel[grid](...) calls, compiled or interpreted

    def run(*args, grid, **meta):
        seen.append(meta)
        return real(*args, grid=grid, **meta)

    monkeypatch.setattr(kernel, "run", run)
    inp = _inputs(3, 8, torch.bfloat16)
    _run(inp)
    (meta,) = seen
    cfg = L.pick_config(3, N, K, 8, torch.bfloat16)
    assert meta["DOT_FP32"] is False
    assert meta["UPCAST_DOT"] is (not ON_CUDA)
    assert (meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]) == (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"])


# Batched decode (issue 20, target 4): 16 < M <= 128 rows in 16 bits take one launch
# (the shrink fused in the K-loop) on 32-row tiles; 130 and 256 rows take the shrink
# kernel and the 64-row GEMM tiles; fp32 keeps its prefill tiles. Each M is a partial
# last tile of its tile (17, 33: partial 32-row tiles; 130: a 2-row last 64-row tile).
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("m", [17, 33, 64, 130, 256])
def test_batched_decode_rows(m, dtype):
    r = 24  # padded to 32: one fused tile class with padded (masked) rank rows
    cfg = L.pick_config(m, N, K, r, dtype)
    batched = dtype != torch.float32 and m <= L.BATCHED_DECODE_MAX_M
    assert (cfg["case"] == "batched-decode") == batched
    assert cfg["shrink_in_loop"] == batched
    if batched:
        assert (cfg["BLOCK_M"], cfg["BLOCK_N"]) == (32, 64 if m <= 64 else 128)
    inp = _inputs(m, r, dtype, seed=m)
    assert _excess(_run(inp), inp) <= 0
    inp = _inputs(m, r, dtype, seed=m + 1, aligned=True)
    assert _excess(_run(inp), inp) <= 0
    wrong = dict(inp, lora_scale=inp["lora_scale"] * 0.95)
    assert _excess(_run(wrong), inp) > 0
