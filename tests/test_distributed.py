"""Distributed training on the CPU: 2 processes, gloo, started by the tests themselves.

FSDP2 (``fully_shard``) and tensor parallelism (``ColwiseParallel``/``RowwiseParallel``)
over an AdapterWrapper must train exactly as one process on the whole batch. Every
test runs its workers with a deadline, so a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import json
import os
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

import conftest  # noqa: E402
from tinytune import AdapterStateError, AdapterWrapper, LoraConfig  # noqa: E402
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


def run_workers(fn, tmp_path: Path, world: int = WORLD, timeout: float = TIMEOUT, expect_exit: int | None = None) -> None:
    """Run ``fn(rank, tmp_path)`` in ``world`` fresh processes; fail on error or timeout.

    With ``expect_exit``, a worker must end the run by exiting with that code (a rank
    dying on purpose); the launcher then stops the others, as torchrun would.
    """
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        _entry, args=(fn.__name__, str(tmp_path), world), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{fn.__name__}: workers still running after {timeout}s (a hang?)")
        if expect_exit is not None:
            raise RuntimeError(f"{fn.__name__}: no worker exited with code {expect_exit}")
    except mp.ProcessExitedException as exc:
        if exc.exit_code != expect_exit:
            errors = "\n".join(p.read_text() for p in sorted(tmp_path.glob("error-*.txt")))
            raise RuntimeError(f"{fn.__name__} failed in a worker:\n{errors or exc}") from None
    except mp.ProcessRaisedException as exc:
        errors = "\n".join(p.read_text() for p in sorted(tmp_path.glob("error-*.txt")))
        raise RuntimeError(f"{fn.__name__} failed in a worker:\n{errors or exc}") from None
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


# --------------------------------------------------------------------------------------
# the model and the data (the same in every process)
# --------------------------------------------------------------------------------------
def tiny_llama(seed: int = 0) -> nn.Module:
    """conftest's tiny Llama at this file's sizes, in training mode (as constructed)."""
    return conftest.tiny_llama(
        seed, vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_attention_heads=2,
        max_position_embeddings=64,
    ).train()


LORA = dict(target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], r=4, lora_alpha=8)


def wrapped(seed: int = 0) -> AdapterWrapper:
    base = tiny_llama(seed)
    torch.manual_seed(seed + 1)
    return AdapterWrapper.from_config(base, LoraConfig(init_lora_weights=False, **LORA))


def batches(steps: int = 3, rows: int = 4, seq: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, VOCAB, (rows, seq), generator=g) for _ in range(steps)]


def train(model: nn.Module, params, data, sgd: bool = False) -> None:
    # AdamW divides each gradient element by its own running size, which magnifies the
    # last-bit differences of a sharded reduction order on elements whose gradients are
    # tiny; SGD shows the gradients themselves.
    opt = torch.optim.SGD(params, lr=0.5) if sgd else torch.optim.AdamW(params, lr=1e-2)
    for ids in data:
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()


def reference_state(sgd: bool = False, steps: int = 3) -> dict[str, torch.Tensor]:
    """One process, whole batches."""
    w = wrapped()
    train(w, list(w.adapter_parameters()), batches(steps), sgd=sgd)
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
    # save_adapter alone cannot gather the shards: a tinytune error naming the call to use
    with pytest.raises(AdapterStateError, match="save_adapter_distributed"):
        w.save_adapter(tmp / f"plain-{rank}")
    assert not (tmp / f"plain-{rank}").exists()
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


def test_fsdp2_training_equals_one_process_on_the_whole_batch(dist_run):
    tmp_path = scenario_dir(dist_run, "fsdp_worker")
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


# --------------------------------------------------------------------------------------
# tensor parallelism
# --------------------------------------------------------------------------------------
def tp_plan() -> dict:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {}
    for i in range(2):
        p = f"model.layers.{i}."
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[p + name] = ColwiseParallel()
        plan[p + "self_attn.o_proj"] = RowwiseParallel()
        plan[p + "mlp.down_proj"] = RowwiseParallel()
    return plan


def tp_worker(rank: int, tmp: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import parallelize_module

    from tinytune import IA3Config, MixedBatchError, UnsupportedModuleError
    from tinytune.training import parallelize_adapters

    mesh = init_device_mesh("cpu", (WORLD,))
    ids = batches()[0]
    want = wrapped().eval()
    with torch.no_grad():
        want_logits = want(input_ids=ids).logits
    results = {}
    for order in ("wrap_first", "parallelize_first"):
        if order == "wrap_first":  # tinytune's hooks run before the TP layers' own hooks
            w = wrapped()
            parallelize_module(w.model, mesh, tp_plan())
        else:  # ... or after them
            base = tiny_llama(0)
            parallelize_module(base, mesh, tp_plan())
            torch.manual_seed(1)
            w = AdapterWrapper.from_config(base, LoraConfig(init_lora_weights=False, **LORA))
        assert parallelize_adapters(w) == 10
        layers = w.adapters["default"]
        q = layers["model.layers.0.self_attn.q_proj"]  # column-parallel: B on its output dim
        assert q.lora_A.weight.placements == (Replicate(),) and q.lora_B.weight.placements == (Shard(0),)
        down = layers["model.layers.0.mlp.down_proj"]  # row-parallel: A on its input dim
        assert down.lora_A.weight.placements == (Shard(1),) and down.lora_B.weight.placements == (Replicate(),)
        assert down.lora_A.weight.to_local().shape == (4, 16)
        w.eval()
        with torch.no_grad():
            torch.testing.assert_close(w(input_ids=ids).logits, want_logits, atol=1e-5, rtol=1e-5)
        w.train()
        # Every rank sees the whole batch (tensor parallelism splits the layers, not the data).
        train(w, list(w.adapter_parameters()), batches(), sgd=True)
        assert all(isinstance(p, DTensor) for p in w.adapter_parameters())
        save_adapter_distributed(w, tmp / order)
        results[order] = {k: p.full_tensor().detach().clone() for k, p in w.named_adapter_parameters()}
        # Loading the saved full weights back into the shards, in place.
        with torch.no_grad():
            for p in w.adapter_parameters():
                p.zero_()
        load_adapter_weights(w, tmp / order)
        for k, p in w.named_adapter_parameters():
            assert torch.equal(p.full_tensor(), results[order][k]), k
        # Mixed batches are refused clearly.
        try:
            w(input_ids=ids[:2], adapter_names=["default", "__base__"])
        except MixedBatchError as exc:
            assert "tensor parallelism" in str(exc)
        else:
            raise AssertionError("mixed batch on a TP adapter was not refused")
    # IA3 on a parallelized module is refused, and nothing changes.
    base = tiny_llama(0)
    parallelize_module(base, mesh, tp_plan())
    w = AdapterWrapper.from_config(base, IA3Config(target_modules=["q_proj"]))
    try:
        parallelize_adapters(w)
    except UnsupportedModuleError as exc:
        assert "LinearIA3Layer" in str(exc) and "q_proj" in str(exc)
    else:
        raise AssertionError("IA3 on a TP module was not refused")
    assert not any(isinstance(p, DTensor) for p in w.adapter_parameters())
    if rank == 0:
        torch.save(results, tmp / "state.pt")


def test_tensor_parallel_lora_equals_the_unsharded_model(dist_run):
    tmp_path = scenario_dir(dist_run, "tp_worker")
    want = reference_state(sgd=True)
    results = torch.load(tmp_path / "state.pt")
    for order, got in results.items():
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0, msg=f"{order}: {k}")
        saved = load_file(str(tmp_path / order / "adapter_model.safetensors"))
        a = saved["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"]
        assert a.shape == (4, 32)  # gathered: the full input dimension
        torch.testing.assert_close(a, want["default.model.layers.0.mlp.down_proj.lora_A.weight"], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------
# the example script (examples/fsdp_finetune.py, run by torchrun in the README)
# --------------------------------------------------------------------------------------
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fsdp_finetune.py"


def example_worker(rank: int, tmp: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("fsdp_finetune", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    small = ["--rows", "4", "--seq", "8", "--save-every", "2"]
    example.main(["--out", str(tmp / "full"), "--steps", "4", *small])
    # Stopped after step 2, then resumed from its checkpoint (adapters + optimizer shards).
    example.main(["--out", str(tmp / "resumed"), "--steps", "2", *small])
    example.main(["--out", str(tmp / "resumed"), "--steps", "4", "--resume", *small])


def test_example_script_trains_saves_and_resumes_exactly(dist_run):
    tmp = scenario_dir(dist_run, "example_worker")
    full = load_file(str(tmp / "full" / "adapter_model.safetensors"))
    resumed = load_file(str(tmp / "resumed" / "adapter_model.safetensors"))
    assert full.keys() == resumed.keys() and len(full) == 18
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], atol=1e-6, rtol=0, msg=k)
    assert any(k.endswith("lora_B.weight") and full[k].abs().sum() > 0 for k in full)
    assert json.loads((tmp / "full" / "checkpoint" / "step.json").read_text()) == {"step": 4}


# --------------------------------------------------------------------------------------
# a rank dying mid-run
# --------------------------------------------------------------------------------------
CRASH_EXIT = 17


def crash_worker(rank: int, tmp: Path) -> None:
    from torch.distributed.fsdp import fully_shard

    import tinytune.io as tio

    w = wrapped()
    for block in w.model.model.layers:
        fully_shard(block)
    fully_shard(w)
    opt = torch.optim.SGD(list(w.adapter_parameters()), lr=0.5)
    for step, ids in enumerate(batches(4)[:3], start=1):
        ids = rank_rows(ids, rank)
        opt.zero_grad()
        w(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        if step == 2:
            save_adapter_distributed(w, tmp / "ckpt")
    if rank == 0:
        # Rank 0 dies half-way through writing the next save: the weights file is
        # partly written when the process ends (no Python cleanup runs).
        def die(tensors, tmp_file, metadata):
            tmp_file.write_bytes(b"\x00" * 100)
            os._exit(CRASH_EXIT)

        tio.write_safetensors = die
    save_adapter_distributed(w, tmp / "ckpt")  # rank 1 then waits until the launcher stops it


def all_scenarios(rank: int, tmp: Path) -> None:
    # One set of processes for every scenario: starting Python, torch and transformers
    # twice per test would cost more than the tests themselves.
    for name in ("fsdp_worker", "tp_worker", "example_worker", "crash_worker"):
        sub = tmp / name
        sub.mkdir(exist_ok=True)
        globals()[name](rank, sub)
        if rank == 0:
            (sub / "done").touch()
        dist.barrier()


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    try:
        run_workers(all_scenarios, tmp, expect_exit=CRASH_EXIT)
    except RuntimeError as exc:
        return tmp, str(exc)
    return tmp, None


def scenario_dir(dist_run, name: str) -> Path:
    tmp, error = dist_run
    done = (tmp / name / "done").exists() or name == "crash_worker"
    if error is not None and (not done or name == "crash_worker"):
        pytest.fail(f"the distributed run failed before {name} finished:\n{error}")
    return tmp / name


def test_a_rank_dying_mid_save_leaves_the_last_adapter_intact_and_resuming_matches(dist_run):
    ckpt = scenario_dir(dist_run, "crash_worker") / "ckpt"
    names = os.listdir(ckpt)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(names)
    assert any(n.endswith(".tmp") for n in names)  # the interrupted write, never renamed
    # The files are the step-2 save, intact: they load, and hold what 2 full-batch steps give.
    after2 = reference_state(sgd=True, steps=2)
    resumed = AdapterWrapper.from_pretrained(tiny_llama(), str(ckpt))
    for k, p in resumed.named_adapter_parameters():
        torch.testing.assert_close(p, after2[k], atol=1e-5, rtol=0, msg=k)
    # Resuming from it (in place, into a freshly built model) gives the uninterrupted run.
    w = wrapped()
    load_adapter_weights(w, ckpt)
    train(w, list(w.adapter_parameters()), batches(4)[2:], sgd=True)
    want = reference_state(sgd=True, steps=4)
    for k, p in w.named_adapter_parameters():
        torch.testing.assert_close(p.detach(), want[k], atol=1e-5, rtol=0, msg=k)
