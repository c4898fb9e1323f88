"""The compile report's registry: every kernel configuration the launchers can choose.

``ci/kernel_report.py`` compiles each record for sm_80 and sm_90a on a machine without
a GPU and checks registers, spills, shared memory and tensor-core use; its docstring
documents the record keys. One function per op, each reading its op's planner (the
tiles are the launchers' own choices, never copies):

* :func:`lora_linear_configs`: ``lora_linear.pick_config`` over decode and prefill,
  every padded rank class, dtypes, weight layouts and both architectures;
* :func:`lora_mixed_configs`: ``lora_mixed_plan.rows_config`` and ``segments_config``
  for both strategies, dtypes and feature sets.

Shapes are the benchmarks' (d = 4096, rank-16 stacks, ...). Strides of 1 are constexprs
and sizes/strides divisible by 16 are listed in ``divisible_by_16``, as the JIT would
specialize them. Every list is empty without Triton or under ``TRITON_INTERPRET=1``
(the kernels are then interpreter functions, not compilable).

This module imports torch (and triton, when present) only, never tinytune.
"""

from __future__ import annotations

import itertools

import torch

from . import lora_linear, lora_mixed
from .lora_mixed_plan import rows_config, segments_config
from .triton_support import is_interpreted, triton

__all__ = ["report_configs", "lora_linear_configs", "lora_mixed_configs"]

_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# Weight codes (``weight_scale``): Triton type and the archs that convert them. fp8
# (e4m3) -> 16-bit conversions need sm_89+, so fp8 is built for sm_90a only.
_QUANT = {None: (None, (80, 90)), "int8": ("i8", (80, 90)), "fp8": ("fp8e4nv", (90,))}


def report_configs() -> list[dict]:
    """Every record of every op, for ``ci/kernel_report.py`` (see its docstring).

    Returns:
        The records of :func:`lora_linear_configs` and :func:`lora_mixed_configs`, each
        with its op's file stem under ``module``.
    """
    return lora_linear_configs() + lora_mixed_configs()


def lora_linear_configs() -> list[dict]:
    """Every (kernel, configuration) ``lora_linear``'s launcher can choose.

    Covers, for sm_80 and sm_90 (``archs``), decode, batched decode and prefill at each padded rank
    class (16, 32, 64: fused decode shrink; 128, 256: precomputed h), no LoRA (pure IA³
    and base), fp32/fp16/bf16, both weight layouts (the unit-stride argument is what
    the JIT specializes), with bias, IA³ in and out enabled (the superset of loads);
    and every shrink-kernel variant ``shrink_config`` can split into (row tile, rank
    block, split-K reduction or not) over M = 1-8192; then the GEMM again with int8
    weight codes (sm_80 and sm_90a) and fp8 codes (sm_90a) and their ``weight_scale``
    (``W_SCALED``), in the ``(N, K)`` layout (the shrink kernel does not read W, so it
    has no quantized variant); and every configuration with LoRA once more with DoRA's
    column scale on
    (``HAS_COL_SCALE``, variant ``dora``), as dispatch runs DoRA: with bias, without
    IA³ (a DoRA layer is fused alone).

    Returns:
        Records with the keys ``ci/kernel_report.py`` documents.
    """
    kernels = lora_linear.triton_kernels()
    if not kernels or any(is_interpreted(f) for f in kernels.values()):
        return []
    recs: list[dict] = []
    seen = set()
    # Batched decode's two tiles (64 and 128 rows); prefill-small's at 200 rows.
    ms = {"decode": 8, "batched-64": 64, "batched-128": 128, "prefill-small": 200, "prefill-large": 4096}
    for arch in (80, 90):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            dt = _DTYPES[dtype]
            for case, m in ms.items():
                for n in (4096, 14336):  # decode's BLOCK_N depends on N
                    for r in (0, 16, 32, 64, 128, 256):
                        cfg = lora_linear.pick_config(m, n, 4096, r, dtype, arch)
                        for weight_kn, dora in itertools.product((False, True), (False, True) if r else (False,)):
                            tile = tuple(cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"))
                            key = (arch, dt, tile, cfg["R_BLOCK"], cfg["shrink_in_loop"],
                                   r > 0, cfg["R_PAD"] if r > 0 else 0, weight_kn, dora)  # fmt: skip
                            if key in seen:
                                continue
                            seen.add(key)
                            rec = _linear_gemm_record(kernels, dt, cfg, r, weight_kn, dora)
                            rec["archs"] = [arch]
                            rec["quick"] = (dt == "bf16" and r == 16 and not weight_kn and n == 4096
                                            and (not dora or cfg["case"] == "decode"))
                            recs.append(rec)
                            for quant, (_, q_archs) in _QUANT.items():
                                if quant is None or weight_kn or arch not in q_archs:
                                    continue
                                qcfg = lora_linear.pick_config(m, n, 4096, r, dtype, arch, quantized=True)
                                qtile = tuple(qcfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps",
                                                                "num_stages"))
                                qkey = (quant, arch, dt, qtile, qcfg["shrink_in_loop"], r > 0,
                                        qcfg["R_PAD"] if r > 0 else 0)
                                if qkey in seen:
                                    continue
                                seen.add(qkey)
                                rec = _linear_gemm_record(kernels, dt, qcfg, r, weight_kn, quant=quant)
                                rec["archs"] = [arch]
                                rec["quick"] = (dt == "bf16" and r == 16 and n == 4096
                                                and cfg["case"] == "decode")
                                recs.append(rec)
    # The shrink's tile and split depend on M and the rank (shrink_config): every distinct
    # compiled variant (tile, rank block, split-K reduction or not) over rows and ranks.
    for arch in (80, 90):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            dt = _DTYPES[dtype]
            # K = 14336 (down_proj) splits where 4096 does not; K = 256 is too short to split:
            # the same tiles without the reduction.
            ms_ks = itertools.product((1, 16, 17, 64, 128, 200, 256, 1024, 2048, 4096, 8192),
                                      (4096, 14336, 256))
            for (m, k), r in itertools.product(ms_ks, (16, 32, 64, 128, 256)):
                cfg = lora_linear.pick_config(m, 4096, k, r, dtype, arch)
                sc = cfg["shrink"]
                if sc is None:
                    continue
                skey = (arch, "shrink", dt, sc["BLOCK_M"], sc["BLOCK_R"], sc["BLOCK_K"],
                        sc["SPLIT_K"] > 1, sc["num_warps"], sc["num_stages"])
                if skey in seen:
                    continue
                seen.add(skey)
                rec = _linear_shrink_record(kernels, dt, cfg)
                rec["archs"] = [arch]
                # one split-K tile (decode) and one plain tile (prefill)
                tile = (sc["BLOCK_M"], sc["BLOCK_R"], sc["SPLIT_K"] > 1)
                rec["quick"] = dt == "bf16" and tile in ((16, 16, True), (64, 16, False))
                recs.append(rec)
    return recs


def _linear_gemm_record(kernels: dict, dt: str, cfg: dict, r: int, weight_kn: bool,
                        dora: bool = False, quant: str | None = None) -> dict:
    has_lora = r > 0
    w_ty = _QUANT[quant][0] or dt
    sig = {
        "x_ptr": f"*{dt}", "w_ptr": f"*{w_ty}", "wscale_ptr": "*fp32", "bias_ptr": f"*{dt}", "a_ptr": f"*{dt}",
        "b_ptr": f"*{dt}", "s_ptr": "*fp32", "h_ptr": "*fp32", "lin_ptr": f"*{dt}",
        "lout_ptr": f"*{dt}", "col_ptr": "*fp32", "y_ptr": f"*{dt}",
        "M": "i32", "N": "i32", "K": "i32", "R": "i32",
        "stride_xm": "i32", "stride_xk": "constexpr", "stride_wn": "i32", "stride_wk": "i32",
        "stride_wscale": "constexpr", "stride_bias": "constexpr", "stride_ar": "i32", "stride_ak": "constexpr",
        "stride_bn": "i32", "stride_br": "constexpr", "stride_s": "constexpr",
        "stride_hm": "i32", "stride_lin": "constexpr", "stride_lout": "constexpr",
        "stride_col": "constexpr", "stride_ym": "i32",
    }  # fmt: skip
    # Unit strides are specialized to the constant 1 by the JIT (contiguous tensors).
    unit = ["stride_xk", "stride_wscale", "stride_bias", "stride_ak", "stride_br", "stride_s", "stride_lin",
            "stride_lout", "stride_col"]
    unit.append("stride_wn" if weight_kn else "stride_wk")
    for name in unit:
        sig[name] = "constexpr"
    if not has_lora:
        sig["stride_hm"] = "i32"
    constexprs = {name: 1 for name in unit}
    meta = dict(
        HAS_BIAS=True, HAS_LORA=has_lora, SHRINK_IN_LOOP=bool(cfg["shrink_in_loop"]) and has_lora,
        HAS_SCALE=has_lora, HAS_L_IN=not dora, HAS_L_OUT=not dora, HAS_COL_SCALE=dora,
        W_SCALED=quant is not None,
        R_PAD=cfg["R_PAD"], R_BLOCK=cfg["R_BLOCK"], BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        DOT_FP32=dt == "fp32", UPCAST_DOT=False,
    )  # fmt: skip
    for name, v in meta.items():
        sig[name] = "constexpr"
        constexprs[name] = v
    ptrs = [k for k, v in sig.items() if v.startswith("*")]
    # Contiguous (M, K), (N, K), (N, R) tensors with sizes that are multiples of 16: the
    # pointers and the row strides are what the JIT hints as divisible by 16.
    div16 = ptrs + ["M", "N", "K", "stride_xm", "stride_ym", "stride_ar", "stride_bn", "stride_hm"]
    div16.append("stride_wk" if weight_kn else "stride_wn")
    if not has_lora:
        div16 = [d for d in div16 if d not in ("stride_ar", "stride_bn", "stride_hm", "R")]
    else:
        div16.append("R")
    return {
        "module": "lora_linear",
        "kernel": "lora_linear_fwd" + ("_kn" if weight_kn else ""),
        "fn": kernels["_lora_linear_fwd_kernel"],
        "signature": sig,
        "constexprs": constexprs,
        "divisible_by_16": div16,
        "config": {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "R_BLOCK")},
        "case": cfg["case"] + ("-fused" if meta["SHRINK_IN_LOOP"] else ""),
        "variant": f"{dt}{'-' + quant if quant else ''} r_pad={cfg['R_PAD'] if has_lora else 0}"
                   + (" kn" if weight_kn else "") + (" dora" if dora else ""),
    }


def _linear_shrink_record(kernels: dict, dt: str, cfg: dict) -> dict:
    sc = cfg["shrink"]
    reduce = sc["SPLIT_K"] > 1
    sig = {
        "x_ptr": f"*{dt}", "a_ptr": f"*{dt}", "s_ptr": "*fp32", "h_ptr": "*fp32",
        "ws_ptr": "*fp32", "cnt_ptr": "*i32",
        "M": "i32", "K": "i32", "R": "i32", "SPLIT_K": "i32", "K_CHUNK": "i32",
        "stride_xm": "i32", "stride_xk": "constexpr", "stride_ar": "i32", "stride_ak": "constexpr",
        "stride_s": "constexpr", "stride_hm": "i32",
    }  # fmt: skip
    constexprs = {"stride_xk": 1, "stride_ak": 1, "stride_s": 1}
    meta = dict(HAS_SCALE=True, BLOCK_M=sc["BLOCK_M"], BLOCK_R=sc["BLOCK_R"], BLOCK_K=sc["BLOCK_K"],
                REDUCE=reduce, DOT_FP32=dt == "fp32", UPCAST_DOT=False)
    for name, v in meta.items():
        sig[name] = "constexpr"
        constexprs[name] = v
    return {
        "module": "lora_linear",
        "kernel": "lora_shrink",
        "fn": kernels["_lora_shrink_kernel"],
        "signature": sig,
        "constexprs": constexprs,
        "divisible_by_16": ["x_ptr", "a_ptr", "s_ptr", "h_ptr", "ws_ptr", "cnt_ptr", "M", "K", "R",
                            "K_CHUNK", "stride_xm", "stride_ar", "stride_hm"],
        "config": {"BLOCK_M": sc["BLOCK_M"], "BLOCK_N": sc["BLOCK_R"], "BLOCK_K": sc["BLOCK_K"],
                   "num_warps": sc["num_warps"], "num_stages": sc["num_stages"]},  # fmt: skip
        "case": cfg["case"] + "-shrink" + ("-splitk" if reduce else ""),
        "variant": f"{dt} block_r={sc['BLOCK_R']}",
    }


def lora_mixed_configs() -> list[dict]:
    """Every kernel configuration ``lora_mixed``'s launcher can choose.

    Shapes are the benchmark's (d = 4096, rank-16 stacks, decode: 1 token per row,
    prefill: 512 tokens per row); every feature flag is on (bias, LoRA, both IA³
    scales), the configuration with the most live registers, and LoRA + bias alone;
    both again with DoRA's column scales (``all+dora``, ``dora``).

    Returns:
        A list of dicts with keys ``kernel``, ``fn``, ``signature``, ``constexprs``,
        ``divisible_by_16``, ``config``, ``case``, ``variant`` and (some) ``quick``, as
        ``ci/kernel_report.py`` documents them (empty without Triton).
    """
    kernels = lora_mixed.triton_kernels()
    if not kernels or any(is_interpreted(f) for f in kernels.values()):
        return []
    records = []
    for dtype, ty in _DTYPES.items():
        fp32 = dtype == torch.float32
        flags = dict(HAS_BIAS=True, HAS_LORA=True, HAS_L_IN=True, HAS_L_OUT=True, HAS_COL_SCALE=False,
                     W_SCALED=False)
        # every feature on (the most loads) and LoRA + bias alone (the benchmark's case):
        # ptxas allocates registers differently for each, so both are checked for spills;
        # each again with DoRA's column scales
        lora_only = dict(flags, HAS_L_IN=False, HAS_L_OUT=False)
        flag_sets = (("all", flags), ("lora", lora_only), ("all+dora", dict(flags, HAS_COL_SCALE=True)),
                     ("dora", dict(lora_only, HAS_COL_SCALE=True)))
        for block_m in (16, 32, 64):
            cfg = rows_config(block_m, fp32)
            shrink_sig = {
                "x_ptr": f"*{ty}", "a_ptr": f"*{ty}", "row_ptr": "*i64", "rank_ptr": "*i32",
                "scale_ptr": "*fp32", "hp_ptr": "*fp32", "cnt_ptr": "*i32", "T": "constexpr",
                "K": "i32", "K_CHUNK": "i32", "N_CNT": "i32", "stride_xb": "i32", "stride_xt": "i32", "stride_xk": "constexpr",
                "stride_as": "i32", "stride_ar": "i32", "stride_ak": "constexpr",
                "stride_hs": "i32", "stride_hm": "i32", "HAS_SCALE": "constexpr",
                "BLOCK_R": "constexpr", "BLOCK_K": "constexpr",
            }
            if block_m == 16:  # the shrink's config does not depend on M
                records.append(dict(
                    module="lora_mixed", kernel="_shrink_rows_kernel", fn=kernels["_shrink_rows_kernel"], signature=shrink_sig,
                    constexprs=dict(T=1, stride_xk=1, stride_ak=1, HAS_SCALE=True,
                                    BLOCK_R=cfg["SHRINK_R"],
                                    BLOCK_K=cfg["SHRINK_K"]),
                    divisible_by_16=["x_ptr", "a_ptr", "row_ptr", "rank_ptr", "scale_ptr",
                                     "hp_ptr", "cnt_ptr", "K", "N_CNT", "K_CHUNK", "stride_xb", "stride_xt",
                                     "stride_as", "stride_ar", "stride_hs", "stride_hm"],
                    config=dict(BLOCK_M=1, BLOCK_N=cfg["SHRINK_R"], BLOCK_K=cfg["SHRINK_K"], num_warps=4,
                                num_stages=3),
                    case="decode", variant=ty,
                ))
            sig = {
                "x_ptr": f"*{ty}", "w_ptr": f"*{ty}", "wscale_ptr": "*fp32", "bias_ptr": f"*{ty}", "row_ptr": "*i64",
                "rank_ptr": "*i32", "bt_ptr": f"*{ty}", "hp_ptr": "*fp32", "lin_ptr": f"*{ty}",
                "lout_ptr": f"*{ty}", "col_ptr": "*fp32", "y_ptr": f"*{ty}", "ws_ptr": "*fp32", "cnt_ptr": "*i32",
                "M": "i32", "N": "i32", "K": "i32", "T": "constexpr", "SPLIT": "i32",
                "K_CHUNK": "i32", "stride_xb": "i32", "stride_xt": "i32", "stride_xk": "constexpr",
                "stride_wn": "i32", "stride_wk": "constexpr", "stride_bs": "i32",
                "stride_br": "i32", "stride_bn": "constexpr", "stride_hs": "i32",
                "stride_hm": "i32", "stride_lis": "i32", "stride_lik": "constexpr",
                "stride_los": "i32", "stride_lon": "constexpr", "stride_cs": "i32",
                "stride_cn": "constexpr", "stride_yb": "i32", "stride_yt": "i32", "stride_yn": "constexpr",
            }
            sig.update({name: "constexpr" for name in (*flags, "DOT_FP32", "UPCAST_DOT", "SPLIT_K", "SPREAD_LORA", "BLOCK_M", "BLOCK_N", "BLOCK_K")})
            # d = 4096 on 132 SMs (the launcher's split_k for one M-tile); no split once
            # the tiles fill the GPU (larger M).
            splits = (1, _rows_split(cfg))
            for (fname, fl), split_k in itertools.product(flag_sets, splits):
                records.append(dict(
                    module="lora_mixed", kernel="_mixed_rows_kernel", fn=kernels["_mixed_rows_kernel"], signature=sig,
                    constexprs=dict(T=1, stride_xk=1, stride_wk=1, stride_bn=1, stride_lik=1,
                                    stride_lon=1, stride_cn=1, stride_yn=1, **fl, DOT_FP32=fp32,
                                    UPCAST_DOT=False, SPLIT_K=split_k, SPREAD_LORA=split_k > 1 and not fl["HAS_L_OUT"],
                                    BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                                    BLOCK_K=cfg["BLOCK_K"]),
                    divisible_by_16=["x_ptr", "w_ptr", "wscale_ptr", "bias_ptr", "row_ptr", "rank_ptr", "bt_ptr",
                                     "hp_ptr", "lin_ptr", "lout_ptr", "col_ptr", "y_ptr", "ws_ptr",
                                     "cnt_ptr", "M", "N", "K", "K_CHUNK", "stride_xb", "stride_xt",
                                     "stride_wn", "stride_bs", "stride_br", "stride_hs",
                                     "stride_hm", "stride_lis", "stride_los", "stride_cs", "stride_yb",
                                     "stride_yt"],
                    config={key: cfg[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")},
                    case="decode", variant=f"{ty} {fname} split_k={split_k}",
                    quick=ty == "bf16" and block_m == 64 and split_k > 1 and fname in ("lora", "dora"),
                ))
        for r_max in (16, 64):
            cfg = segments_config(fp32, r_max)
            shrink_sig = {
                "x_ptr": f"*{ty}", "a_ptr": f"*{ty}", "tiles_ptr": "*i32", "order_ptr": "*i64",
                "rank_ptr": "*i32", "scale_ptr": "*fp32", "h_ptr": "*fp32", "T": "i32", "K": "i32",
                "NT": "i32", "stride_xb": "i32", "stride_xt": "i32", "stride_xk": "constexpr",
                "stride_as": "i32", "stride_ar": "i32", "stride_ak": "constexpr",
                "stride_hm": "i32",
            }
            shrink_sig.update({n: "constexpr" for n in ("HAS_SCALE", "DOT_FP32", "UPCAST_DOT", "BLOCK_M", "BLOCK_R", "BLOCK_K")})
            records.append(dict(
                module="lora_mixed", kernel="_shrink_segments_kernel", fn=kernels["_shrink_segments_kernel"], signature=shrink_sig,
                constexprs=dict(stride_xk=1, stride_ak=1, HAS_SCALE=True, DOT_FP32=fp32, UPCAST_DOT=False,
                                BLOCK_M=cfg["BLOCK_M"], BLOCK_R=cfg["BLOCK_R"], BLOCK_K=cfg["BLOCK_K"]),
                divisible_by_16=["x_ptr", "a_ptr", "tiles_ptr", "order_ptr", "rank_ptr",
                                 "scale_ptr", "h_ptr", "T", "K", "stride_xb", "stride_xt",
                                 "stride_as", "stride_ar", "stride_hm"],
                config=dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_R"], BLOCK_K=cfg["BLOCK_K"],
                            num_warps=4, num_stages=cfg["num_stages"]),
                case="prefill", variant=f"{ty} r_max={r_max}",
            ))
            sig = {
                "x_ptr": f"*{ty}", "w_ptr": f"*{ty}", "wscale_ptr": "*fp32", "bias_ptr": f"*{ty}", "tiles_ptr": "*i32",
                "order_ptr": "*i64", "rank_ptr": "*i32", "bt_ptr": f"*{ty}", "h_ptr": "*fp32",
                "lin_ptr": f"*{ty}", "lout_ptr": f"*{ty}", "col_ptr": "*fp32", "y_ptr": f"*{ty}", "N": "i32",
                "K": "i32", "T": "i32", "NT": "i32",
                "stride_xb": "i32", "stride_xt": "i32", "stride_xk": "constexpr",
                "stride_wn": "i32", "stride_wk": "constexpr", "stride_bs": "i32",
                "stride_br": "i32", "stride_bn": "constexpr", "stride_hm": "i32",
                "stride_lis": "i32", "stride_lik": "constexpr", "stride_los": "i32",
                "stride_lon": "constexpr", "stride_cs": "i32", "stride_cn": "constexpr",
                "stride_yb": "i32", "stride_yt": "i32", "stride_yn": "constexpr",
            }
            sig.update({n: "constexpr" for n in (*flags, "DOT_FP32", "LORA_FP32", "UPCAST_DOT", "BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R")})
            for fname, fl in flag_sets:
                records.append(dict(
                    module="lora_mixed", kernel="_mixed_segments_kernel", fn=kernels["_mixed_segments_kernel"], signature=sig,
                    constexprs=dict(stride_xk=1, stride_wk=1, stride_bn=1, stride_lik=1,
                                    stride_lon=1, stride_cn=1, stride_yn=1, **fl, DOT_FP32=fp32, LORA_FP32=fp32,
                                    UPCAST_DOT=False,
                                    BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                                    BLOCK_K=cfg["BLOCK_K"], BLOCK_R=cfg["BLOCK_R"]),
                    divisible_by_16=["x_ptr", "w_ptr", "wscale_ptr", "bias_ptr", "tiles_ptr", "order_ptr",
                                     "rank_ptr", "bt_ptr", "h_ptr", "lin_ptr", "lout_ptr", "col_ptr",
                                     "y_ptr", "N", "K", "T", "stride_xb", "stride_xt", "stride_wn",
                                     "stride_bs", "stride_br", "stride_hm", "stride_lis",
                                     "stride_los", "stride_cs", "stride_yb", "stride_yt"],
                    config={key: cfg[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")},
                    case="prefill", variant=f"{ty} {fname} r_max={r_max}",
                    quick=ty == "bf16" and r_max == 16 and fname in ("lora", "dora"),
                ))
    return records + _mixed_quant_records(records)


def _rows_split(cfg: dict) -> int:
    """The rows GEMM's split-K at d = 4096 on 132 SMs with one M-tile (the launcher's
    ``k_splits``), at least 2."""
    tiles = triton.cdiv(4096, cfg["BLOCK_N"])
    return max(2, min(8, 132 // tiles, 4096 // (4 * cfg["BLOCK_K"])))


def _mixed_quant_records(records: list[dict]) -> list[dict]:
    """The per-row GEMM records again with int8 (sm_80, sm_90a) and fp8 (sm_90a) weight
    codes and their ``weight_scale`` (``W_SCALED``), on ``rows_config(...,
    quantized=True)``'s tiles; the shrinks do not read W."""
    out = []
    for rec in records:
        if rec["kernel"] not in ("_mixed_rows_kernel", "_mixed_segments_kernel"):
            continue
        for quant, (w_ty, archs) in _QUANT.items():
            if quant is None:
                continue
            # the rows tiles depend on the arch (rows_config's ``arch``): one record per
            # distinct tile, listing the archs whose launcher picks it
            by_tile: dict = {}
            for arch in archs:
                ce, config = dict(rec["constexprs"], W_SCALED=True), dict(rec["config"])
                if rec["kernel"] == "_mixed_rows_kernel":
                    cfg = rows_config(config["BLOCK_M"], ce["DOT_FP32"], quantized=True, arch=arch)
                    config.update({k: cfg[k] for k in config})
                    ce.update(BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                              SPLIT_K=1 if ce["SPLIT_K"] == 1 else _rows_split(cfg))
                else:
                    cfg = segments_config(ce["DOT_FP32"], ce["BLOCK_R"], quantized=True)
                    config.update({k: cfg[k] for k in config})
                key = tuple(sorted(config.items())) + (ce.get("SPLIT_K"),)
                if key in by_tile:
                    by_tile[key]["archs"].append(arch)
                    continue
                dt, rest = rec["variant"].split(" ", 1)
                by_tile[key] = dict(
                    rec, signature=dict(rec["signature"], w_ptr=f"*{w_ty}"), constexprs=ce, config=config,
                    archs=[arch], quick=False,
                    variant=f"{dt}-{quant} {rest.split(' split_k=')[0]}"
                            + (f" split_k={ce['SPLIT_K']}" if "SPLIT_K" in ce else ""),
                )
            out.extend(by_tile.values())
    return out
