"""Distributed training on the CPU: 2 processes, gloo, started by the tests themselves.

FSDP2 (``fully_shard``) and tensor parallelism (``ColwiseParallel``/``RowwiseParallel``)
over an AdapterWrapper must train exactly as one process on the whole batch. Every
test runs its workers with a deadline, so a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

transformers = pytest.importorskip("transformers")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is needed", allow_module_level=True)

from safetensors.torch import load_file  # noqa: E402

from tinytune import AdapterWrapper, LoraConfig  # noqa: E402
from tinytune.training import load_adapter_weights, save_adapter_distributed  # noqa: E402

WORLD = 2
VOCAB = 64
TIMEOUT = 120  # seconds for a whole multi-process run, start-up included


# --------------------------------------------------------------------------------------
# running workers
# --------------------------------------------------------------------------------------
def _entry(rank: int, fn_name: str, tmp: str, world: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        globals()[fn_name](rank, Path(tmp))
    except BaseException:
        (Path(tmp) / f"error-{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_workers(fn, tmp_path: Path, world: int = WORLD, timeout: float = TIMEOUT) -> None:
    """Run ``fn(rank, tmp_path)`` in ``world`` fresh processes; fail on error or timeout."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        _entry, args=(fn.__name__, str(tmp_path), world), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{fn.__name__}: workers still running after {timeout}s (a hang?)")
    except mp.ProcessRaisedException as exc:
        errors = "\n".join(p.read_text() for p in sorted(tmp_path.glob("error-*.txt")))
        pytest.fail(f"{fn.__name__} failed in a worker:\n{errors or exc}")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


# --------------------------------------------------------------------------------------
# the model and the data (the same in every process)
# --------------------------------------------------------------------------------------
def tiny_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg)


LORA = dict(target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], r=4, lora_alpha=8)


def wrapped(seed: int = 0) -> AdapterWrapper:
    base = tiny_llama(seed)
    torch.manual_seed(seed + 1)
    return AdapterWrapper.from_config(base, LoraConfig(init_lora_weights=False, **LORA))


def batches(steps: int = 3, rows: int = 4, seq: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, VOCAB, (rows, seq), generator=g) for _ in range(steps)]


def train(model: nn.Module, params, data, lr: float = 1e-2) -> None:
    opt = torch.optim.AdamW(params, lr=lr)
    for ids in data:
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()


def reference_state() -> dict[str, torch.Tensor]:
    """One process, whole batches."""
    w = wrapped()
    train(w, list(w.adapter_parameters()), batches())
    return {k: p.detach().clone() for k, p in w.named_adapter_parameters()}


def rank_rows(ids: torch.Tensor, rank: int) -> torch.Tensor:
    n = ids.shape[0] // WORLD
    return ids[rank * n : (rank + 1) * n]


# --------------------------------------------------------------------------------------
# FSDP2
# --------------------------------------------------------------------------------------
def fsdp_worker(rank: int, tmp: Path) -> None:
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor

    w = wrapped()
    # The natural recipe: shard each decoder block, then the root (the wrapper, which
    # holds the adapters).
    for block in w.model.model.layers:
        fully_shard(block)
    fully_shard(w)
    assert isinstance(w, FSDPModule) and isinstance(w, AdapterWrapper)
    params = [p for p in w.parameters() if p.requires_grad]
    adapter_ids = {id(p) for p in w.adapter_parameters()}
    assert params and {id(p) for p in params} == adapter_ids
    assert all(isinstance(p, DTensor) for p in params)
    data = [rank_rows(ids, rank) for ids in batches()]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for ids in data:
        opt.zero_grad()
        w(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    # Only adapter parameters got gradients and optimizer state.
    assert all(p.grad is None for p in w.model.parameters())
    assert set(opt.state) == set(params)
    save_adapter_distributed(w, tmp / "adapter")
    # Loading back into the sharded adapter, in place (what resuming does).
    before = {k: p.full_tensor().clone() for k, p in w.named_adapter_parameters()}
    with torch.no_grad():
        for p in w.adapter_parameters():
            p.zero_()
    load_adapter_weights(w, tmp / "adapter")
    for k, p in w.named_adapter_parameters():
        assert torch.equal(p.full_tensor(), before[k]), k
    if rank == 0:
        torch.save(before, tmp / "state.pt")


def test_fsdp2_training_equals_one_process_on_the_whole_batch(tmp_path):
    run_workers(fsdp_worker, tmp_path)
    want = reference_state()
    got = torch.load(tmp_path / "state.pt")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0, msg=k)
    # The saved file is a normal adapter: it loads into an unsharded model.
    files = sorted(os.listdir(tmp_path / "adapter"))
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    again = AdapterWrapper.from_pretrained(tiny_llama(), str(tmp_path / "adapter"))
    for k, p in again.named_adapter_parameters():
        torch.testing.assert_close(p, want[k], atol=1e-5, rtol=0, msg=k)
    assert "lora_A" in next(iter(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))))
