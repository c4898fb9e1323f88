"""Quick start: put LoRA on a small network, train it, save it in PEFT's format, load it back.

    python examples/quickstart.py --steps 200 --out out/quickstart

The adapter lands in ``OUT/my-lora`` (``adapter_config.json`` and
``adapter_model.safetensors``); the script loads it onto a fresh copy of the base model and
checks that the outputs are the trained model's.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from torch import nn

from tinytune import AdapterWrapper, LoraConfig


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100, help="training steps (default 100)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--out", default=None, help="where to save the adapter (default: a temporary directory)")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 1))
    X = torch.randn(256, 10)
    y = (X**2).sum(1, keepdim=True)

    model = AdapterWrapper.from_config(base, LoraConfig(target_modules=["0", "2"], r=args.rank))
    model.print_trainable_parameters()  # the adapters only: the base is frozen
    opt = torch.optim.AdamW(model.adapter_parameters(), lr=1e-2)
    for step in range(args.steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(X), y)
        loss.backward()
        opt.step()
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")

    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.out or tmp
        model.save_adapter(f"{out_dir}/my-lora")
        with torch.no_grad():
            trained = model(X)
        # unload() returns the base model exactly as it was; load the adapter onto it again
        fresh = AdapterWrapper.from_pretrained(model.unload(), f"{out_dir}/my-lora")
        with torch.no_grad():
            torch.testing.assert_close(fresh(X), trained)
        print(f"saved to {out_dir}/my-lora; loaded back: same outputs")
    return loss.item()


if __name__ == "__main__":
    main()
