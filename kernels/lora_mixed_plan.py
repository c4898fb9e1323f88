"""How ``lora_mixed_linear`` runs a call: its strategy, tiles and device-side segment plan.

Everything here depends on shapes only (never on which row uses which adapter), so
every assignment of a batch launches the same kernels with the same grids (CUDA-graph
safe):

* :func:`choose_strategy`: ``"rows"`` (decode) or ``"segments"`` (prefill), from an
  H200 roofline estimate of what the adapters cost on top of the base GEMM;
* :func:`rows_config`, :func:`segments_config`: each strategy's tiles (the compile
  report, ``report_configs.py``, builds exactly these);
* :func:`k_splits`: the decode GEMM's split over K when its tiles cannot fill the GPU;
* :func:`segment_tiles`: slot-homogeneous token tiles, built on the device.

This module imports torch (and triton, when present) only, never tinytune.
"""

from __future__ import annotations

import torch

from .triton_support import triton

__all__ = ["choose_strategy", "rows_config", "segments_config", "k_splits", "programs_wanted",
           "segment_tiles"]


# Roofline constants of the target GPU (H200): HBM and L2 bandwidth (bytes/s), CUDA-core
# fp32 FMA rate (FLOP/s), and the cost of the device-side segment plan (a stable sort,
# a scatter_add, two cumsums, a searchsorted and a few element-wise ops: ~8 tiny
# kernels at ~1 us each inside a CUDA graph).
_HBM_BPS = 4.8e12
_L2_BPS = 10e12
_FP32_FLOPS = 60e12
_TC_FLOPS = 989e12
_PLAN_SECONDS = 8e-6


def choose_strategy(m: int, n: int, k: int, r_max: int, slots: int, elem: int) -> str:
    """Pick ``"rows"`` (decode) or ``"segments"`` (prefill) from the shapes alone.

    Both strategies stream W and compute the base product on tensor cores; they differ in
    what the adapters cost on top, estimated with the H200's roofline:

    * rows: every token re-reads its slot's A in the shrink (``m r K`` elements, mostly
      L2 hits) and gathers B^T rows in the epilogue on the CUDA cores
      (``2 m r (K + N)`` FLOPs), and W is re-read once per 64-token tile.
    * segments: a fixed ~8 us for the device-side plan, and tiles padded at the end of
      each slot's segment (on average half a tile per slot) run the base GEMM for nothing.

    For d = 4096, r = 16 this gives rows for 64 decode tokens (~1 us of adapter cost
    against ~9 us) and segments for 8 x 512 prefill tokens. Only shapes enter, never the
    assignment, so every assignment of a batch launches the same kernels.

    Args:
        m: Tokens (rows times tokens per row).
        n: Output features.
        k: Input features.
        r_max: Padded rank of the stacks (0 without LoRA).
        slots: Number of slots ``S``.
        elem: Bytes per element of the adapter stacks.

    Returns:
        ``"rows"`` or ``"segments"``.
    """
    rows_cost = m * r_max * k * elem / _L2_BPS + 2.0 * m * r_max * (k + n) / _FP32_FLOPS
    rows_cost += (triton.cdiv(m, 64) - 1) * n * k * elem / _HBM_BPS
    block_m = 128
    padded = min(slots, m) * block_m / 2
    seg_cost = _PLAN_SECONDS + 2.0 * padded * n * k / _TC_FLOPS
    return "rows" if rows_cost <= seg_cost else "segments"


def rows_config(m: int, fp32: bool, quantized: bool = False, arch: int = 90) -> dict:
    """Block sizes for the "rows" kernels (one place, also read by report_configs.py).

    The same on a GPU and under Triton's interpreter (which runs the GPU's tiles and
    control flow, emulating only the 16-bit dots' arithmetic).

    Args:
        m: Tokens.
        fp32: Whether the dots run in IEEE fp32 (``DOT_FP32``).
        quantized: Whether W holds int8/fp8 codes (converted in registers).
        arch: Compute capability ``10 * major + minor`` of the GPU (``lora_linear.device_arch``;
            90 on a CPU): ptxas allocates registers differently per arch, so the quantized
            decode tiles differ between sm_80 and sm_90a.

    Returns:
        ``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``, ``num_warps``, ``num_stages`` of the GEMM
        and ``SHRINK_K``, ``SHRINK_R`` of the shrink.
    """
    # Each program reads BLOCK_M x K of x (from L2) per BLOCK_N x K of W (from HBM): wide
    # N-tiles keep the x re-reads below W's bytes, split-K (see k_splits) restores the
    # parallelism they take away. Shared memory: <= 96 KiB over 4 stages (sm_80 has 163).
    # The shrink walks the rank 16 rows at a time (a slot's padding costs < 16 rows).
    if m <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4)
    elif m <= 32:
        cfg = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, num_warps=4)
    else:
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8)
    if fp32:  # ieee fp32 dots run on the CUDA cores, operands in registers: short K-steps
        # and at most 64 columns (wider or longer tiles spill on sm_80, compile report)
        cfg.update(BLOCK_K=16, BLOCK_N=64, num_warps=4)
    if quantized:  # the converted W tile in registers: 8 warps, at most 64 columns and
        # (16-bit) K steps of 64 (4 warps, 64x128 or K steps of 128 left 8-24 B of stack
        # frame on sm_80/sm_90a; compile report)
        cfg.update(BLOCK_N=64, num_warps=8, **({} if fp32 else dict(BLOCK_K=64)))
        if arch >= 90 and not fp32 and m <= 32:
            # sm_90a: 8 warps left 8 B of stack frame at 16 and 32 rows (fp16 int8 codes,
            # 47-56 registers); 4 warps compile clean there, and at 16 rows with 32
            # columns (64 kept 8 B for fp16 fp8 codes at split-K; compile report)
            cfg.update(num_warps=4, **(dict(BLOCK_N=32) if m <= 16 else {}))
    return dict(cfg, num_stages=4, SHRINK_K=256, SHRINK_R=16)


_SM_COUNT: dict = {}
SMS_DEFAULT = 132  # H100/H200 SXM: the production count, under the interpreter too


def programs_wanted(device: torch.device) -> int:
    """Programs that fill the GPU once: its SM count (132, an H100/H200's, on a CPU,
    so the interpreter runs the production split-K). Both kernels' launchers ask it
    (``lora_linear`` for its shrink's grid splits)."""
    if device.type != "cuda":
        return SMS_DEFAULT
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def k_splits(tiles: int, k: int, block_k: int, sms: int) -> tuple:
    """How the rows GEMM splits K: while the output tiles alone cannot fill the GPU
    (decode), keeping at least 4 K-blocks per split (fewer and the partial tiles'
    traffic outweighs the gain). Shapes only.

    Args:
        tiles: Output tiles of the GEMM.
        k: Input features.
        block_k: The GEMM's ``BLOCK_K``.
        sms: Programs that fill the GPU once (:func:`programs_wanted`).

    Returns:
        ``(SPLIT_K, K_CHUNK)``: the number of splits and each one's K range, a multiple
        of ``block_k``.
    """
    split = max(1, min(8, sms // tiles, k // (4 * block_k)))
    chunk = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    return triton.cdiv(k, chunk), chunk


def segments_config(fp32: bool, r_max: int, quantized: bool = False) -> dict:
    """Block sizes for the "segments" kernels (also read by report_configs.py), on a
    GPU and under the interpreter alike.

    Args:
        fp32: Whether the dots run in IEEE fp32 (``DOT_FP32``).
        r_max: Padded rank of the stacks.
        quantized: Whether W holds int8/fp8 codes (fp32 takes 8 warps: with 4, fp8
            codes spilled 8 B at r_max 64 on sm_90a).

    Returns:
        ``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``, ``BLOCK_R``, ``num_warps``, ``num_stages``.
    """
    block_r = 16 if r_max <= 16 else 32
    if fp32:  # ieee fp32 dots run on the CUDA cores: smaller tiles (64 rows spill on sm_80)
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, BLOCK_R=block_r, num_warps=8 if quantized else 4,
                    num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, BLOCK_R=block_r, num_warps=8, num_stages=3)


def segment_tiles(row_index: torch.Tensor, slots: int, tokens: int, block_m: int):
    """Slot-homogeneous token tiles, built on the device without a host sync.

    Rows are stably sorted by slot; slot ``s`` owns the sorted token positions
    ``[seg_start[s], seg_end[s])`` and ``cdiv(count, block_m)`` tiles of them. The table
    has a fixed length ``cdiv(M, block_m) + S`` (a bound on the real tile count), so the
    grid depends only on shapes; entries past the real count are empty (start == end).

    Args:
        row_index: ``(B,)`` int64 slot of each row.
        slots: Number of slots ``S``.
        tokens: Tokens per row.
        block_m: Tokens per tile.

    Returns:
        ``(tiles (3, NT) int32 [slot, start, end], order (B,) int64)``.
    """
    dev = row_index.device
    m = row_index.shape[0] * tokens
    nt = triton.cdiv(m, block_m) + slots
    order = torch.argsort(row_index, stable=True)
    counts = torch.zeros(slots, dtype=torch.long, device=dev)
    counts.scatter_add_(0, row_index, torch.ones_like(row_index))
    tok = counts * tokens
    seg_end = torch.cumsum(tok, 0)
    seg_start = seg_end - tok
    ntiles = (tok + block_m - 1) // block_m
    tiles_end = torch.cumsum(ntiles, 0)
    t = torch.arange(nt, device=dev)
    slot = torch.searchsorted(tiles_end, t, right=True)
    valid = slot < slots
    slot = slot.clamp(max=slots - 1)
    start = seg_start[slot] + (t - (tiles_end[slot] - ntiles[slot])) * block_m
    end = seg_end[slot]
    zero = torch.zeros((), dtype=torch.long, device=dev)
    start = torch.where(valid, start, zero)
    end = torch.where(valid, end, zero)
    return torch.stack([slot, start, end]).to(torch.int32), order
