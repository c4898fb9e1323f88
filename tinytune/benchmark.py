"""``tinytune-bench``: forward latency of merged, unmerged and mixed-adapter models.

Runs on a built-in small decoder-only transformer with random weights (pure PyTorch,
nothing downloaded), on the best device present (CUDA if there, else CPU), in the
largest dtype the device runs fast (bf16 on CUDA, fp32 on CPU), and times:

* the bare model; LoRA merged; LoRA unmerged on the PyTorch path; unmerged on the fused
  Triton path (CUDA with Triton only);
* mixed-adapter batches (``adapter_names=``) with 1, 4, 16 and 64 distinct adapters;
* PEFT unmerged and PEFT ``adapter_names`` with the same weights (when ``peft`` is
  installed; outputs are checked equal to tinytune's before anything is timed);
* each of these eager and ``torch.compile``d, at token counts from decode size (one token
  per row) to prefill size.

Method: every case is warmed up (which also compiles), then timed in interleaved rounds,
each round running every case once in a new random order. A case's figure is the median
over rounds; its ratio to the bare model (or to merged) is the median of the per-round
ratios, so noise that hits one round hits both sides of its ratio. On CPU the time comes
from ``torch.utils.benchmark.Timer`` with one torch thread by default; on CUDA from CUDA
events around the calls, synchronised, and compiled cases use CUDA graphs
(``mode="reduce-overhead"``).

    tinytune-bench                     # full run, prints one table
    tinytune-bench --quick --out DIR   # short run; DIR/results.json and DIR/*.png
    tinytune-bench --quantize nf4      # on a quantized base: bare, tinytune and PEFT

With ``--quantize KIND`` (see :data:`QUANTIZE_KINDS`) every linear layer of the model but
the output head is quantized once (bitsandbytes or torchao), and the bare quantized
model, tinytune unmerged and PEFT unmerged (and the mixed batches of both) run on copies
of that one quantized model; the float model is timed too (``float bare``). A quantized
base is never merged, so ratios are to the bare quantized model and to PEFT's matching
variant (``x PEFT``).

The timing code (warm-up, interleaved rounds, medians and per-round ratios, the
environment record) lives in :mod:`tinytune.timing`, which the studies in ``bench/`` and
the GPU benchmarks in ``ci/`` use too; :func:`time_cases`, :func:`summarize` and
:func:`environment` stay importable from here.

Floor 10 (the ``tinytune-bench`` command): may import any tinytune module.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import importlib
import importlib.util
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import tinytune

from .config import LoraConfig
from .errors import TinytuneError
from .kernels.triton_support import HAS_TRITON
from .timing import cpu_name, device_name, environment, git_sha, summarize, time_cases
from .wrapper import AdapterWrapper

# Old private names, still imported by code written before tinytune.timing existed.
_cpu_name, _git_sha = cpu_name, git_sha

__all__ = [
    "BenchmarkError",
    "OutputMismatchError",
    "QUANTIZE_KINDS",
    "TinyDecoder",
    "TARGETS",
    "environment",
    "fused_unavailable",
    "main",
    "parse_args",
    "quantize_model",
    "quantize_unavailable",
    "run",
    "summarize",
    "time_cases",
]

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DISTINCT = (1, 4, 16, 64)


class BenchmarkError(TinytuneError, ValueError):
    """A ``tinytune-bench`` argument is out of range or does not fit the machine."""


class OutputMismatchError(TinytuneError, RuntimeError):
    """Two variants that must compute the same logits do not: nothing is timed."""


# --------------------------------------------------------------------------- the model


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (as in Llama)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


class Attention(nn.Module):
    """Causal multi-head self-attention with Llama's projection names."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (
            p(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        # is_causal as a constant: a test on the token count would be a SymBool under
        # dynamic shapes and break the compiled graph (one token is causal either way).
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    """SwiGLU feed-forward block with Llama's projection names."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(hidden)
        self.self_attn = Attention(hidden, heads)
        self.post_attention_layernorm = RMSNorm(hidden)
        self.mlp = MLP(hidden, intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyDecoder(nn.Module):
    """A small Llama-style decoder-only language model (no positional encoding, no cache).

    Module names follow Llama (``layers.0.self_attn.q_proj``, ``layers.0.mlp.down_proj``),
    so adapter configs written for Llama apply unchanged.

    Args:
        vocab: Vocabulary size.
        hidden: Model width.
        layers: Number of decoder layers.
        heads: Attention heads (must divide ``hidden``).
        intermediate: Feed-forward width.

    Forward:
        input_ids (batch, tokens) int64 -> logits (batch, tokens, vocab).
    """

    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, intermediate: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(DecoderLayer(hidden, heads, intermediate) for _ in range(layers))
        self.norm = RMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


# --------------------------------------------------------------------------- quantized bases

#: ``--quantize`` kinds: name -> (the package that quantizes, what the layers become).
QUANTIZE_KINDS: dict[str, tuple[str, str]] = {
    "nf4": ("bitsandbytes", "bitsandbytes Linear4bit, 4-bit NormalFloat (QLoRA's), blocks of 64"),
    "fp4": ("bitsandbytes", "bitsandbytes Linear4bit, 4-bit float, blocks of 64"),
    "int8-bnb": ("bitsandbytes", "bitsandbytes Linear8bitLt (LLM.int8(): int8 weights, one scale per "
                 "output channel, outlier threshold 6.0 as in transformers' BitsAndBytesConfig)"),
    "int8": ("torchao", "torchao Int8WeightOnlyConfig: int8 weights, one scale per output channel"),
    "fp8": ("torchao", "torchao Float8WeightOnlyConfig: float8_e4m3fn weights, one scale per output channel"),
}

# bitsandbytes' CPU repack for AVX512-BF16 (done on the first forward without autograd in
# eval mode) asserts on these divisibilities; modules that miss them keep the plain layout.
_REPACK_BLOCK_N = 32


def quantize_unavailable(kind: str) -> str | None:
    """Why ``--quantize kind`` cannot run here, or ``None`` when it can.

    Args:
        kind: A key of :data:`QUANTIZE_KINDS`.

    Returns:
        A message naming the package to install, or ``None``.
    """
    package = QUANTIZE_KINDS[kind][0]
    if importlib.util.find_spec(package) is None:
        return f"--quantize {kind} needs {package}: pip install {package}"
    return None


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if head is not None else getattr(model, "lm_head", None)


def _bnb_linear(child: nn.Linear, kind: str) -> nn.Module:
    import bitsandbytes as bnb

    device, bias = child.weight.device, child.bias
    # bitsandbytes quantizes when a parameter moves off the CPU copy it was made from.
    data = child.weight.detach().to("cpu", copy=True)
    if kind == "int8-bnb":
        new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=bias is not None,
                                  has_fp16_weights=False, threshold=6.0)
        new.weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False)
    else:
        new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=bias is not None,
                                compute_dtype=child.weight.dtype, quant_type=kind)
        new.weight = bnb.nn.Params4bit(data, requires_grad=False, quant_type=kind)
    new = new.to(device)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    if kind != "int8-bnb" and hasattr(new, "support_avx512bf16_for_cpu"):
        blocksize = new.weight.quant_state.blocksize
        if child.out_features % _REPACK_BLOCK_N or child.in_features % blocksize:
            new.support_avx512bf16_for_cpu = False
    return new


def quantize_model(model: nn.Module, kind: str) -> nn.Module:
    """Quantize every ``nn.Linear`` of ``model`` but its output head, in place.

    The output head (``get_output_embeddings()`` or ``lm_head``) stays in float, as
    transformers' ``BitsAndBytesConfig`` and ``TorchAoConfig`` leave it.

    Args:
        model: A float model, on the device and in the dtype it runs in.
        kind: A key of :data:`QUANTIZE_KINDS`: ``nf4``, ``fp4`` and ``int8-bnb`` replace
            the layers by bitsandbytes' ``Linear4bit``/``Linear8bitLt`` (computing in the
            model's dtype); ``int8`` and ``fp8`` keep each ``nn.Linear`` and give it a
            torchao weight-only weight.

    Returns:
        ``model``, in eval mode. A 4-bit layer whose shape does not fit bitsandbytes'
        AVX512-BF16 CPU layout (``out_features % 32``, ``in_features % 64``) keeps the
        plain 4-bit layout, where that layout would otherwise fail.

    Raises:
        BenchmarkError: The kind is unknown, its package is missing, or the model has no
            linear layer to quantize.
    """
    if kind not in QUANTIZE_KINDS:
        raise BenchmarkError(f"unknown --quantize kind {kind!r}: use one of {', '.join(QUANTIZE_KINDS)}")
    reason = quantize_unavailable(kind)
    if reason is not None:
        raise BenchmarkError(reason)
    head = _output_head(model)
    found = [(name, m) for name, m in model.named_modules()
             if type(m) is nn.Linear and m is not head]
    if not found:
        raise BenchmarkError(f"--quantize {kind}: the model has no nn.Linear layer to quantize "
                             "(its output head stays in float)")
    if QUANTIZE_KINDS[kind][0] == "bitsandbytes":
        for name, child in found:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, _bnb_linear(child, kind))
    else:
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        chosen = {id(m) for _, m in found}
        config = Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig()
        quantize_(model, config, filter_fn=lambda m, fqn: id(m) in chosen)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


# --------------------------------------------------------------------------- arguments


class _Parser(argparse.ArgumentParser):
    """Bad input gets one line (not the usage block) and exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse's signature
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return sorted(set(values))


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


@dataclass
class Settings:
    """Everything a run needs, after defaults and checks (see ``tinytune-bench --help``)."""

    device: str
    dtype: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    rank: int
    adapters: int
    distinct: list[int]
    rows: int
    tokens: list[int]
    compile: bool
    threads: int
    rounds: int
    warmup: int
    min_time: float
    peft: bool
    quick: bool
    peft_requested: bool | None = None
    out: str | None = None
    # --model: the user's model instead of the built-in one; ``vocab`` is then read from
    # it when the models are built. ``targets``: None for the default of each model.
    model: str | None = None
    targets: list[str] | None = None
    # --quantize: a key of QUANTIZE_KINDS, or None for the float model.
    quantize: str | None = None
    skipped: dict[str, str] = field(default_factory=dict)


def build_parser() -> argparse.ArgumentParser:
    """The ``tinytune-bench`` argument parser."""
    p = _Parser(
        prog="tinytune-bench",
        description="Forward latency of tinytune's merged, unmerged and mixed-adapter models "
        "against the bare model (and PEFT, when installed), on a built-in random-weight "
        "decoder-only transformer or on your own model (--model).",
    )
    p.add_argument("--model", default=None, metavar="SPEC",
                   help="your model instead of the built-in one: 'package.module:function' or "
                   "'path/to/file.py:function' (a function without arguments returning an nn.Module that "
                   "takes token ids (rows, tokens) and returns logits or an output with .logits), or a "
                   "transformers config name or directory (the model is built from it with random weights)")
    p.add_argument("--targets", default=None, type=lambda v: [x for x in v.split(",") if x],
                   help="modules to put LoRA on, comma-separated (default: the seven projections of the "
                   "built-in model; all-linear with --model)")
    p.add_argument("--quantize", default=None, choices=list(QUANTIZE_KINDS), metavar="KIND",
                   help="quantize every linear layer but the output head, then time the bare quantized model, "
                   "tinytune unmerged and PEFT unmerged on it (and the float model): "
                   + "; ".join(f"{k}: {v[1]}" for k, v in QUANTIZE_KINDS.items())
                   + ". The built-in model's intermediate width is rounded up to a multiple of 64.")
    p.add_argument("--quick", action="store_true",
                   help="a small model (hidden 128, one layer), 64x1 and 64x16 tokens, 5 rounds, torch.compile "
                   "at the first token count only, PEFT eager only: under a minute on a 2-core CPU")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present, else cpu)")
    p.add_argument("--dtype", default=None,
                   help="float32, bfloat16 or float16 (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--rank", type=_positive, default=None, help="LoRA rank (default 16)")
    p.add_argument("--hidden", type=_positive, default=None, help="model width (default 512; --quick 128)")
    p.add_argument("--layers", type=_positive, default=None, help="decoder layers (default 2; --quick 1)")
    p.add_argument("--adapters", type=_positive, default=None,
                   help="adapters loaded for the mixed batches (default 64); the batches use 1, 4, 16 "
                   "and 64 distinct ones, up to this number")
    p.add_argument("--rows", type=_positive, default=None,
                   help="rows per batch (default: the largest number of distinct adapters)")
    p.add_argument("--tokens", type=_positive_list, default=None,
                   help="tokens per row, comma-separated (default CPU 1,8,32; CUDA 1,16,128,512; --quick 1,16)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time every variant under torch.compile (default: on)")
    p.add_argument("--peft", action=argparse.BooleanOptionalAction, default=None,
                   help="also time PEFT with the same weights (default: when peft is installed)")
    p.add_argument("--threads", type=_positive, default=None,
                   help="torch threads (default 1 on CPU, for stable ratios; torch's default on CUDA)")
    p.add_argument("--rounds", type=_positive, default=None, help="timed rounds (default CPU 15, CUDA 30; --quick 5)")
    p.add_argument("--out", default=None, help="write results.json and PNG plots into this directory")
    return p


def _resolve_device(text: str | None) -> torch.device:
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise BenchmarkError(f"unknown device {text!r}: use cpu, cuda or cuda:N")
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise BenchmarkError(f"unsupported device {text!r}: use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise BenchmarkError(f"--device {text}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise BenchmarkError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _resolve_dtype(text: str | None, device: torch.device) -> torch.dtype:
    if text is None:
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else (
            torch.float16 if device.type == "cuda" else torch.float32)
    dtype = _DTYPES.get(text.lower())
    if dtype is None:
        raise BenchmarkError(f"unknown dtype {text!r}: use float32, bfloat16 or float16")
    if device.type == "cuda" and dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise BenchmarkError(f"--dtype {text}: {device_name(device)} does not run bfloat16; use float16")
    try:  # the ops the model uses, once, tiny
        x = torch.ones(2, 1, 2, 8, device=device, dtype=dtype)
        F.scaled_dot_product_attention(x, x, x, is_causal=True)
        F.linear(x, torch.ones(8, 8, device=device, dtype=dtype))
    except RuntimeError as exc:
        raise BenchmarkError(f"--dtype {text}: {device} cannot run it ({str(exc).splitlines()[0]})")
    return dtype


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    """Parse and check ``tinytune-bench`` arguments.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The settings of the run.

    Raises:
        SystemExit: Status 2 with a one-line message for bad input (argparse's way).
    """
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        return _settings(a)
    except BenchmarkError as exc:
        parser.error(str(exc))
        raise  # unreachable: error() exits


def _settings(a: argparse.Namespace) -> Settings:
    if a.model is not None and (a.hidden or a.layers):
        raise BenchmarkError("--hidden and --layers describe the built-in model; leave them out with --model")
    device = _resolve_device(a.device)
    dtype = _resolve_dtype(a.dtype, device)
    cuda = device.type == "cuda"
    hidden = a.hidden or (128 if a.quick else 512)
    heads = next(h for h in (8, 4, 2, 1) if hidden % h == 0 and hidden // h >= min(16, hidden))
    adapters = a.adapters or 64
    distinct = sorted({d for d in DISTINCT if d <= adapters} | ({adapters} if adapters < max(DISTINCT) else set()))
    rows = a.rows or max(distinct)
    if rows < max(distinct):
        raise BenchmarkError(f"--rows {rows} is fewer than the {max(distinct)} distinct adapters a batch "
                             f"needs; pass --rows {max(distinct)} or more, or fewer --adapters")
    if a.peft is not False:
        try:
            import peft  # noqa: F401

            have_peft = True
        except Exception:  # noqa: BLE001 - absent or broken: run without it (unless --peft)
            have_peft = False
        if a.peft and not have_peft:
            raise BenchmarkError("--peft: peft is not installed (pip install peft)")
    if a.out is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise BenchmarkError("--out writes PNG plots, which need matplotlib: "
                                 "pip install 'tinytune[bench]' (or pip install matplotlib)")
        out = Path(a.out)
        if out.exists() and not out.is_dir():
            raise BenchmarkError(f"--out {a.out}: exists and is not a directory")
    use_peft = have_peft if a.peft is None else a.peft
    intermediate = hidden * 43 // 16 if hidden >= 16 else 2 * hidden  # 1376 for 512, as in the other studies
    if a.quantize is not None:
        reason = quantize_unavailable(a.quantize)
        if reason is not None:
            raise BenchmarkError(reason)
        # bitsandbytes' 4-bit CPU layout wants widths in multiples of 64 (see quantize_model);
        # every kind gets the same model, so that their tables compare.
        intermediate = -(-intermediate // 64) * 64
    return Settings(
        device=str(device), dtype=str(dtype).removeprefix("torch."), hidden=hidden,
        layers=a.layers or (1 if a.quick else 2), heads=heads,
        intermediate=intermediate,
        vocab=1024 if not a.quick else 512, rank=a.rank or 16, adapters=adapters, distinct=distinct,
        rows=rows, tokens=a.tokens or ([1, 16] if a.quick else [1, 16, 128, 512] if cuda else [1, 8, 32]),
        compile=a.compile, threads=a.threads or (1 if not cuda else torch.get_num_threads()),
        rounds=a.rounds or (5 if a.quick else 30 if cuda else 15), warmup=2 if a.quick else 3,
        min_time=0.002 if a.quick else 0.02, peft=use_peft, quick=a.quick, out=a.out,
        peft_requested=a.peft, model=a.model, targets=a.targets, quantize=a.quantize,
    )


# --------------------------------------------------------------------------- the models


def _kernel_mode(mode: str):
    """``tinytune.kernel_mode(mode)`` where this tinytune has it; else nothing to set."""
    if hasattr(tinytune, "kernel_mode"):
        return tinytune.kernel_mode(mode)
    return contextlib.nullcontext()


def fused_unavailable(device: torch.device, quantize: str | None = None) -> str | None:
    """Why the fused Triton path cannot be timed on ``device``, or None when it can.

    Args:
        device: Where the benchmark runs.
        quantize: The ``--quantize`` kind, or ``None`` for the float model.

    Returns:
        A reason to print (CPU device, no Triton, a quantized base, ...), or ``None``.
    """
    if device.type != "cuda":
        return "the fused Triton kernels run on CUDA only"
    if quantize is not None:
        return (f"--quantize {quantize}: the fused kernels of this benchmark run float weights; "
                "on a quantized base tinytune runs the module's own forward plus the adapter's term")
    if not HAS_TRITON:
        return "Triton is not installed (pip install 'tinytune[triton]')"
    if not hasattr(tinytune, "kernel_mode"):
        return "this tinytune has no kernel_mode() to select the fused path"
    return None


@dataclass
class Models:
    bare: nn.Module
    merged: nn.Module | None  # None on a quantized base (--quantize): it is never merged
    unmerged: nn.Module
    fused: nn.Module | None
    peft: nn.Module | None
    names: list[str]
    float_bare: nn.Module | None = None  # --quantize: the float model it was quantized from


def load_model(spec: str) -> nn.Module:
    """The model that ``tinytune-bench --model SPEC`` names.

    Args:
        spec: ``package.module:function`` (imported with the current directory on the
            path) or ``path/to/file.py:function``: a function without arguments that
            returns an ``nn.Module``; anything else is a transformers config name or
            directory, built with ``AutoModelForCausalLM.from_config`` (random weights).

    Returns:
        The model, in training mode as built.

    Raises:
        BenchmarkError: The module, function or config cannot be found, or the result is
            not an ``nn.Module``.
    """
    where, sep, name = spec.rpartition(":")
    if sep and name.isidentifier():
        try:
            if where.endswith(".py"):
                found = importlib.util.spec_from_file_location(Path(where).stem, where)
                if found is None or not Path(where).is_file():
                    raise ImportError(f"no file {where}")
                module = importlib.util.module_from_spec(found)
                found.loader.exec_module(module)
            else:
                if os.getcwd() not in sys.path:  # as `python -m` would find it
                    sys.path.insert(0, os.getcwd())
                module = importlib.import_module(where)
        except ImportError as exc:
            raise BenchmarkError(f"--model {spec}: cannot import {where} ({exc})") from None
        factory = getattr(module, name, None)
        if not callable(factory):
            raise BenchmarkError(f"--model {spec}: {where} has no function {name!r}")
        model = factory()
    else:
        try:
            import transformers
        except ImportError:
            raise BenchmarkError(f"--model {spec}: a transformers config needs transformers "
                                 "(pip install 'tinytune[bench]'); or pass module:function") from None
        try:
            config = transformers.AutoConfig.from_pretrained(spec)
        except Exception as exc:  # noqa: BLE001 - any failure means: not a config we can use
            raise BenchmarkError(f"--model {spec}: neither module:function nor a transformers config "
                                 f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
        model = transformers.AutoModelForCausalLM.from_config(config)
    if not isinstance(model, nn.Module):
        raise BenchmarkError(f"--model {spec}: returned {type(model).__name__}, not an nn.Module")
    return model


def _vocab_size(model: nn.Module, spec: str) -> int:
    """How many token ids the model takes: its config's ``vocab_size`` or its first embedding's."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        vocab = next((m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if vocab is None:
        raise BenchmarkError(f"--model {spec}: the benchmark feeds token ids, but the model has neither "
                             "config.vocab_size nor an nn.Embedding")
    return int(vocab)


def build_models(s: Settings) -> Models:
    """The bare model, merged and unmerged wrappers and PEFT's model, all with one set of weights."""
    device, dtype = torch.device(s.device), getattr(torch, s.dtype)
    torch.manual_seed(0)
    if s.model is None:
        base = TinyDecoder(s.vocab, s.hidden, s.layers, s.heads, s.intermediate).eval()
    else:
        base = load_model(s.model).eval()
        s.vocab = _vocab_size(base, s.model)
    for p in base.parameters():  # keep activations O(1) through the layers
        p.requires_grad_(False)
    base.to(device=device, dtype=dtype)
    float_bare = None
    if s.quantize is not None:
        # Quantized once: the bare model, tinytune and PEFT run on copies of these weights.
        float_bare, base = base, quantize_model(copy.deepcopy(base), s.quantize)
    targets = s.targets or (TARGETS if s.model is None else "all-linear")
    config = LoraConfig(target_modules=targets, r=s.rank, lora_alpha=2 * s.rank, init_lora_weights=False)
    names = [f"a{i}" for i in range(s.adapters)]
    unmerged = AdapterWrapper(copy.deepcopy(base))
    unmerged.add_adapter_from_config(config, "default")
    for name in names:
        unmerged.add_adapter_from_config(config, name, activate=False)
    unmerged.set_active_adapters("default")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in unmerged.named_adapter_parameters():
            # nonzero A and B, of a size that changes the logits visibly but not wildly
            p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(p.dtype))
    unmerged.eval()
    merged = None
    if s.quantize is None:
        merged = AdapterWrapper(copy.deepcopy(base))
        merged.add_adapter_from_config(config, "default")
        with torch.no_grad():
            src = dict(unmerged.adapters["default"].named_adapter_parameters())
            for n, p in merged.adapters["default"].named_adapter_parameters():
                p.copy_(src[n])
        merged.eval()
        merged.merge_adapters()
    fused = None
    if fused_unavailable(device, s.quantize) is None:
        fused = copy.deepcopy(unmerged)  # its own compiled graphs, never shared with the torch path
    peft_model = _build_peft(s, base, unmerged, names) if s.peft else None
    return Models(base, merged, unmerged, fused, peft_model, names, float_bare)


def _build_peft(s: Settings, base: nn.Module, ours: nn.Module, names: list[str]) -> nn.Module:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    # The modules tinytune adapted, by full path: PEFT's own reading of "all-linear" differs.
    config = PeftLoraConfig(target_modules=[path for path, _ in ours.adapters["default"].items()], r=s.rank, lora_alpha=2 * s.rank)
    model = get_peft_model(copy.deepcopy(base), config, adapter_name="default")
    for name in names:
        model.add_adapter(name, config)
    with torch.no_grad():
        for name in ["default", *names]:
            for path, layer in ours.adapters[name].items():
                target = model.base_model.model.get_submodule(path)
                target.lora_A[name].weight.copy_(layer.lora_A.weight)
                target.lora_B[name].weight.copy_(layer.lora_B.weight)
    model.set_adapter("default")
    return model.to(device=s.device).eval()


# --------------------------------------------------------------------------- variants


@dataclass
class Variant:
    """One timed case: what runs, how, and what its output is checked against."""

    name: str
    # bare | float-bare | merged | unmerged-torch | unmerged-fused | mixed | peft-unmerged | peft-mixed
    kind: str
    compiled: bool
    distinct: int | None
    kernels: str
    call: Callable[[torch.Tensor], torch.Tensor]


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def make_variants(s: Settings, m: Models) -> tuple[list[Variant], dict[str, str]]:
    """Every variant to time (eager and compiled), and the ones left out with why."""
    device = torch.device(s.device)
    skipped: dict[str, str] = {}
    rng = random.Random(2)
    assignments = {}
    for k in s.distinct:
        rows = [m.names[(i % k) * (s.adapters // k)] for i in range(s.rows)]
        rng.shuffle(rows)
        assignments[k] = rows

    def plain(module, mode=None):
        def call(ids):
            with _kernel_mode(mode) if mode else contextlib.nullcontext():
                return _logits(module(ids))
        return call

    def mixed(module, names, mode=None):
        def call(ids):
            with _kernel_mode(mode) if mode else contextlib.nullcontext():
                return _logits(module(ids, adapter_names=names))
        return call

    compile_kwargs: dict[str, Any] = {"mode": "reduce-overhead"} if device.type == "cuda" else {}
    torch_mode = "torch" if device.type == "cuda" else None
    variants: list[Variant] = []
    for compiled in ([False, True] if s.compile else [False]):
        tag = " compiled" if compiled else ""

        def wrap(module):
            return torch.compile(module, **compile_kwargs) if compiled else module

        variants.append(Variant(f"bare{tag}", "bare", compiled, None, "-", plain(wrap(m.bare))))
        if m.float_bare is not None:
            variants.append(Variant(f"float bare{tag}", "float-bare", compiled, None, "-",
                                    plain(wrap(m.float_bare))))
        if m.merged is not None:
            variants.append(Variant(f"merged{tag}", "merged", compiled, None, "-", plain(wrap(m.merged))))
        elif not compiled:
            skipped["merged"] = (f"--quantize {s.quantize}: a quantized base is not merged in place "
                                 "(merging would round the update into the quantized weights)")
        unmerged = wrap(m.unmerged)
        variants.append(Variant(f"unmerged torch{tag}", "unmerged-torch", compiled, None, "torch",
                                plain(unmerged, torch_mode)))
        reason = fused_unavailable(device, s.quantize)
        if reason is None:
            variants.append(Variant(f"unmerged fused{tag}", "unmerged-fused", compiled, None, "triton",
                                    plain(wrap(m.fused), "triton")))
        else:
            skipped[f"unmerged fused{tag}"] = reason
        for k in s.distinct:
            # "auto": the fused kernels where they run (CUDA), the PyTorch path elsewhere
            variants.append(Variant(f"mixed {k}{tag}", "mixed", compiled, k, "auto",
                                    mixed(unmerged, assignments[k])))
        if m.peft is None:
            if not compiled:
                skipped["PEFT"] = "--no-peft" if s.peft_requested is False else \
                    "peft is not installed (pip install 'tinytune[bench]')"
        elif compiled and s.quick:
            skipped["PEFT compiled"] = "--quick leaves it out (compiling PEFT takes about 20 s more on a CPU)"
        else:
            peft_model = wrap(m.peft)
            variants.append(Variant(f"PEFT unmerged{tag}", "peft-unmerged", compiled, None, "-", plain(peft_model)))
            if compiled:
                # PEFT's adapter_names path loops over the batch's adapters in Python:
                # dynamo unrolls the loop and recompiles for every new assignment
                # (47 s for one adapter, 190 s for 16 on a 2-core CPU, the limit soon hit).
                skipped["PEFT mixed compiled"] = ("PEFT's adapter_names loop recompiles for every assignment "
                                                  "(minutes per variant); timed eager only")
            else:
                for k in s.distinct:
                    variants.append(Variant(f"PEFT mixed {k}", "peft-mixed", False, k, "-",
                                            mixed(peft_model, assignments[k])))
    return variants, skipped


def _tolerance(dtype: torch.dtype, quantize: str | None = None) -> float:
    tol = {torch.float32: 2e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
    if quantize is not None and QUANTIZE_KINDS[quantize][0] == "bitsandbytes":
        # bitsandbytes rounds each layer's input to 16 bits (bf16 in its AVX512-BF16 4-bit
        # CPU kernel, fp16 for int8): an fp32 rounding difference upstream (a compiled
        # graph's fusions, another summation order) can move an input by one 16-bit ulp,
        # 2**-8 of it in bf16, and the next layer's output with it.
        tol = max(tol, 1e-2)
    return tol


def check_outputs(variants: list[Variant], s: Settings, ids: torch.Tensor,
                  progress: Callable[[str], None] | None = None) -> dict[str, float]:
    """Check that variants that should agree do, before anything is timed.

    Returns:
        check name -> largest absolute difference seen.

    Raises:
        OutputMismatchError: Outputs differ beyond the dtype's tolerance, or the adapters
            do not change the output at all.
    """
    dtype = getattr(torch, s.dtype)
    tol = _tolerance(dtype, s.quantize)
    outs = {}
    with torch.inference_mode():
        for v in variants:
            if progress:
                progress(f"first call of {v.name}" + (" (compiling)" if v.compiled else ""), False)
            outs[v.name] = v.call(ids).float().clone()
            if progress:
                progress(f"first call of {v.name}", True)
    diffs: dict[str, float] = {}

    def same(a: str, b: str) -> None:
        if a in outs and b in outs:
            diffs[f"{a} == {b}"] = float((outs[a] - outs[b]).abs().max())
            try:
                torch.testing.assert_close(outs[a], outs[b], atol=tol, rtol=tol)
            except AssertionError as exc:
                raise OutputMismatchError(f"{a} and {b} give different logits, so timing them would compare "
                                          f"different computations: {' '.join(str(exc).split())}") from None

    for v in variants:
        if v.compiled:
            same(v.name, v.name.removesuffix(" compiled"))
    same("merged", "unmerged torch")
    same("unmerged fused", "unmerged torch")
    same("PEFT unmerged", "unmerged torch")
    for k in s.distinct:
        same(f"PEFT mixed {k}", f"mixed {k}")
    if "bare" in outs and "unmerged torch" in outs:
        # the adapters must change the output, or the comparisons above prove nothing
        if float((outs["bare"] - outs["unmerged torch"]).abs().max()) <= 10 * tol:
            raise OutputMismatchError("the adapters do not change the logits: the benchmark would compare "
                                      "equal models")
    return diffs


# --------------------------------------------------------------------------- running


def _references(v: Variant, s: Settings) -> dict[str, str]:
    """Ratio label -> the case ``v`` is divided by (of the same mode, eager or compiled).

    The float model: the bare model and the merged one. A quantized base (never merged):
    the bare quantized model, and PEFT's variant doing the same work on it.
    """
    tag = " compiled" if v.compiled else ""
    if s.quantize is None:
        return {"bare": f"bare{tag}", "merged": f"merged{tag}"}
    refs = {"bare": f"bare{tag}"}
    if v.kind == "unmerged-torch":
        refs["PEFT"] = f"PEFT unmerged{tag}"
    elif v.kind == "mixed":
        refs["PEFT"] = f"PEFT mixed {v.distinct}{tag}"
    return refs


def run(s: Settings, *, progress: bool = True) -> dict[str, Any]:
    """Build the models, check their outputs, time every variant at every token count.

    Args:
        s: Settings from :func:`parse_args`.
        progress: Show a progress bar on stderr.

    Returns:
        The results (what ``results.json`` holds).
    """
    from tqdm.auto import tqdm

    started = time.time()
    device = torch.device(s.device)
    torch.set_num_threads(s.threads)
    env = environment(device)  # at the start: the code that runs, not HEAD at the end
    # Every wrapper shares one forward: give dynamo room for all the variants' graphs
    # instead of silently falling back to eager when the default limit (8) is reached.
    dynamo_config = torch._dynamo.config
    for key in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dynamo_config, key):
            setattr(dynamo_config, key, max(getattr(dynamo_config, key), 256))
    # disable=None: a bar on a terminal, none in a log file
    bar = tqdm(total=1, desc="tinytune-bench", unit="step", disable=None if progress else True,
               dynamic_ncols=True, leave=False)
    bar.set_postfix_str(f"building the models ({s.adapters} adapters{', and PEFT' if s.peft else ''})")
    bar.refresh()
    models = build_models(s)
    variants, skipped = make_variants(s, models)
    if not s.compile:
        skipped["compiled variants"] = "--no-compile"
    per_shape = 2 * len(variants) + s.rounds + 1
    bar.total = 1 + per_shape * len(s.tokens)
    bar.update(1)
    shapes: list[dict[str, Any]] = []
    all_variants = variants
    for i, t in enumerate(s.tokens):
        variants = all_variants
        if s.quick and i > 0 and any(v.compiled for v in variants):
            # Compiling is most of a quick run's time (about a minute on a 2-core CPU).
            variants = [v for v in all_variants if not v.compiled]
            skipped[f"compiled variants at {s.rows}x{t} tokens"] = \
                "--quick compiles at the first token count only"
            bar.total -= 2 * (len(all_variants) - len(variants))
        g = torch.Generator().manual_seed(t)
        ids = torch.randint(0, s.vocab, (s.rows, t), generator=g).to(device)

        def step(label: str, done: bool = True, t=t) -> None:
            bar.set_postfix_str(f"{s.rows}x{t} tokens: {label}", refresh=not done)
            if done:
                bar.update(1)

        checks = check_outputs(variants, s, ids, progress=step)
        step("outputs checked")

        cases = {v.name: (lambda v=v: v.call(ids)) for v in variants}
        with torch.inference_mode():
            times = time_cases(cases, s.rounds, device=device, threads=s.threads, warmup=s.warmup,
                               min_time=s.min_time, seed=t, progress=step)
        refs = {v.name: _references(v, s) for v in variants}
        stats = {}
        for v in variants:
            entry = summarize({v.name: times[v.name], **{r: times[r] for r in refs[v.name].values() if r in times}},
                              refs[v.name])[v.name]
            entry.update(kind=v.kind, compiled=v.compiled, distinct_adapters=v.distinct, kernels=v.kernels,
                         tokens_per_s=s.rows * t / (entry["median_ms"] / 1e3))
            stats[v.name] = entry
        if "bare compiled" in times:
            extra = summarize({"bare compiled": times["bare compiled"], "bare": times["bare"]},
                              {"eager bare": "bare"})["bare compiled"]["ratio"]["eager bare"]
        else:
            extra = None
        shapes.append({"rows": s.rows, "tokens_per_row": t, "tokens": s.rows * t, "checks_max_abs_diff": checks,
                       "variants": stats, "compiled_bare_over_eager_bare": extra})
    bar.close()
    settings = asdict(s)
    settings.pop("skipped")
    return {
        "tool": "tinytune-bench",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv[:1] + sys.argv[1:],
        "settings": settings,
        "model": model_description(s),
        "method": ("warm-up, then interleaved rounds in shuffled order; medians over rounds; ratios "
                   "are medians of per-round ratios against the bare model / merged of the same "
                   "mode (eager or compiled); spread = 25th-75th percentile; "
                   + ("CUDA events, synchronised; compiled = torch.compile(mode='reduce-overhead'), "
                      "CUDA graphs" if device.type == "cuda" else "torch.utils.benchmark.Timer")),
        "environment": env,
        "skipped": skipped,
        "shapes": shapes,
        "wall_s": time.time() - started,
    }


def model_description(s: Settings) -> str:
    quantized = ""
    if s.quantize is not None:
        quantized = f"; linear layers but the output head quantized: {s.quantize} ({QUANTIZE_KINDS[s.quantize][1]})"
    if s.model is not None:
        return (f"--model {s.model} (vocab {s.vocab}); LoRA r={s.rank} on "
                f"{', '.join(s.targets) if s.targets else 'all-linear'}; {s.adapters} adapters loaded{quantized}")
    return (f"built-in decoder (random weights): hidden {s.hidden}, intermediate {s.intermediate}, "
            f"{s.layers} layer(s), {s.heads} heads, vocab {s.vocab}; LoRA r={s.rank} on "
            f"{', '.join(s.targets or TARGETS)}; {s.adapters} adapters loaded{quantized}")


# --------------------------------------------------------------------------- output


def _fmt_ratio(r: dict | None) -> str:
    if r is None:
        return "-"
    return f"{r['median']:.3f} ({r['p25']:.3f}-{r['p75']:.3f})"


def format_table(res: dict[str, Any]) -> str:
    """The terminal table: a header with model, machine, versions, then one block per size."""
    s, env = res["settings"], res["environment"]
    v = env["versions"]
    lines = [
        f"tinytune-bench  model: {res['model']}",
        f"device: {env['device']} ({env['device_name']})  dtype: {s['dtype']}  torch threads: "
        f"{env['torch_threads']}  rounds: {s['rounds']}  git: {env['git_sha'] or 'unknown'}",
        "versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
    ]
    second = "PEFT" if s.get("quantize") else "merged"
    if second == "PEFT":
        lines += [
            "ms: median over rounds (p25-p75). x bare, x PEFT: median of the per-round ratios to the bare",
            "quantized model / PEFT's variant doing the same work on it, of the same mode (eager or",
            "compiled), p25-p75 in brackets; a ratio of medians can differ from it a little.",
        ]
    else:
        lines += [
            "ms: median over rounds (p25-p75). x bare, x merged: median of the per-round ratios to the bare",
            "model / merged model of the same mode (eager or compiled), p25-p75 in brackets; a ratio",
            "of medians can differ from it a little.",
        ]
    head = ("variant", "ms (p25-p75)", "tokens/s", "x bare", f"x {second}")
    for shape in res["shapes"]:
        rows = []
        for name, e in shape["variants"].items():
            rows.append((
                name, f"{e['median_ms']:.3f} ({e['p25_ms']:.3f}-{e['p75_ms']:.3f})",
                f"{e['tokens_per_s']:,.0f}", _fmt_ratio(e["ratio"].get("bare")),
                _fmt_ratio(e["ratio"].get(second)),
            ))
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines.append("")
        lines.append(f"{shape['rows']} rows x {shape['tokens_per_row']} token(s) = {shape['tokens']} tokens")
        lines.append("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths))))
        for r in rows:
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if shape.get("compiled_bare_over_eager_bare"):
            lines.append(f"compiled bare / eager bare: {_fmt_ratio(shape['compiled_bare_over_eager_bare'])}")
    for name, why in res["skipped"].items():
        lines.append(f"not timed: {name}: {why}")
    return "\n".join(lines)


def write_plots(res: dict[str, Any], out: Path) -> list[Path]:
    """PNG plots: latency vs tokens per variant; latency vs number of distinct adapters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = f"{res['environment']['device_name']}, {res['settings']['dtype']}"
    shapes = res["shapes"]
    names = list(shapes[0]["variants"])
    paths = []

    # one color per variant in both panels; PEFT dashed
    base_names = list(dict.fromkeys(n.removesuffix(" compiled") for n in names))
    cmap = plt.get_cmap("tab20")
    colors = {n: cmap(i % 20) for i, n in enumerate(base_names)}
    fig, axes = plt.subplots(1, 2, figsize=(14, 6), sharey=True)
    for ax, compiled in zip(axes, (False, True)):
        for name in names:
            if shapes[0]["variants"][name]["compiled"] != compiled:
                continue
            xs = [sh["tokens"] for sh in shapes if name in sh["variants"]]
            ys = [sh["variants"][name]["median_ms"] for sh in shapes if name in sh["variants"]]
            style = "--" if "PEFT" in name else "-"
            short = name.removesuffix(" compiled")
            ax.plot(xs, ys, style, marker="o", markersize=4, color=colors[short], label=short)
        if ax.lines:
            ax.legend(fontsize=7, ncol=2)
        else:
            ax.text(0.5, 0.5, "not timed", transform=ax.transAxes, ha="center")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"tokens per forward ({shapes[0]['rows']} rows)")
        ax.set_title("compiled" if compiled else "eager")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("median latency (ms)")
    fig.suptitle(f"tinytune-bench: latency vs tokens ({label})")
    fig.tight_layout()
    paths.append(out / "latency_vs_tokens.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    distinct = res["settings"]["distinct"]
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.5 * len(shapes), 4.5), squeeze=False)
    for ax, sh in zip(axes[0], shapes):
        v = sh["variants"]
        for prefix, tag, style, color in (("mixed", "", "-", "C0"), ("mixed", " compiled", "-.", "C2"),
                                          ("PEFT mixed", "", "--", "C1"), ("PEFT mixed", " compiled", ":", "C3")):
            key = [f"{prefix} {k}{tag}" for k in distinct]
            if all(k in v for k in key):
                ax.plot(distinct, [v[k]["median_ms"] for k in key], style, marker="o", color=color,
                        label=f"{'tinytune' if prefix == 'mixed' else 'PEFT'} adapter_names{tag}")
        for ref, color in (("bare", "gray"), ("merged", "black")):
            if ref in v:
                ax.axhline(v[ref]["median_ms"], color=color, linestyle=":", label=f"{ref} (eager)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(distinct, [str(d) for d in distinct])
        ax.set_xlabel("distinct adapters in the batch")
        ax.set_title(f"{sh['rows']} rows x {sh['tokens_per_row']} token(s)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("median latency (ms)")
    fig.suptitle(f"tinytune-bench: mixed batches ({label})")
    fig.tight_layout()
    paths.append(out / "latency_vs_adapters.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tinytune-bench`` console script.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        Exit status: 0, or 1 when variants that must agree give different outputs. Bad
        input (a ``--model`` that cannot be loaded included) exits with status 2 and a
        one-line message.
    """
    s = parse_args(argv)
    try:
        res = run(s, progress=True)
    except OutputMismatchError as exc:
        print(f"tinytune-bench: error: {exc}", file=sys.stderr)
        return 1
    except BenchmarkError as exc:  # --model: found out only when the model is loaded
        print(f"tinytune-bench: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(res))
    if s.out is not None:
        out = Path(s.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(res, indent=1))
        plots = write_plots(res, out)
        print(f"\nwrote {out / 'results.json'}, " + ", ".join(str(p) for p in plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
