"""Tensor-parallel LoRA fine-tuning on the CPU: shard a tiny Llama and its adapters across ranks.

Run with two processes (gloo, no GPU needed):

    torchrun --nproc_per_node=2 examples/tensor_parallel.py --steps 20 --out out/tp-lora

The base model is parallelized with ``torch.distributed.tensor.parallel`` as usual
(attention and MLP projections column- then row-wise); ``parallelize_adapters`` shards
each LoRA to match its layer (``lora_B`` along a column-parallel layer's output,
``lora_A`` along a row-parallel layer's input). Every rank trains on the same batch;
the script checks that the sharded model's logits equal an unsharded copy's before
training, and ``save_adapter_distributed`` writes one ordinary adapter directory.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import transformers
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from tinytune import AdapterWrapper, LoraConfig
from tinytune.training import parallelize_adapters, save_adapter_distributed

VOCAB = 64


def wrapped_llama() -> AdapterWrapper:
    torch.manual_seed(0)  # the same weights on every rank
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4))
    lora = LoraConfig(target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], r=4,
                      init_lora_weights=False)
    return AdapterWrapper.from_config(base, lora)


def tp_plan(layers: int) -> dict:
    plan = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        plan.update({p + f"self_attn.{n}": ColwiseParallel() for n in ("q_proj", "k_proj", "v_proj")})
        plan[p + "self_attn.o_proj"] = RowwiseParallel()
        plan.update({p + f"mlp.{n}": ColwiseParallel() for n in ("gate_proj", "up_proj")})
        plan[p + "mlp.down_proj"] = RowwiseParallel()
    return plan


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="training steps (default 20)")
    p.add_argument("--rows", type=int, default=8, help="rows per batch (default 8)")
    p.add_argument("--seq", type=int, default=16, help="tokens per row (default 16)")
    p.add_argument("--out", default=None, help="where rank 0 writes the adapter (default: a temporary directory)")
    args = p.parse_args(argv)
    if "RANK" not in os.environ:
        raise SystemExit("start it with torchrun, e.g. torchrun --nproc_per_node=2 examples/tensor_parallel.py")
    dist.init_process_group("gloo")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return run(args, args.out or tmp)
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace, out: str) -> float:
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(0)
    ids = (torch.randint(0, VOCAB, (args.rows, 1), generator=g) + torch.arange(args.seq)) % VOCAB

    reference = wrapped_llama().eval()  # unsharded, to compare with
    model = wrapped_llama()
    parallelize_module(model.model, mesh, tp_plan(len(model.model.model.layers)))
    sharded = parallelize_adapters(model)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)
    if rank == 0:
        print(f"{world} rank(s): {sharded} LoRA layers sharded; logits equal the unsharded model's")

    model.train()
    opt = torch.optim.AdamW(model.adapter_parameters(), lr=3e-2)
    for step in range(args.steps):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss  # every rank: the same batch
        loss.backward()
        opt.step()
        if rank == 0 and (step % max(1, args.steps // 4) == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {loss.item():.3f}")
    save_adapter_distributed(model, out)  # gathers the full LoRA weights; rank 0 writes
    if rank == 0:
        print(f"saved {sorted(os.listdir(out))} in {out}")
    return loss.item()


if __name__ == "__main__":
    main()
