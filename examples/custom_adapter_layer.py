"""Write your own adapter: a subclass of ``AdapterLayer``, trained, merged, saved and loaded.

    python examples/custom_adapter_layer.py --steps 100

``ScaleShift`` learns a per-feature gain and shift of a linear layer's output. It shows
the four things a custom layer may define: ``reset_params`` (parameters shaped for the
module, called when the layer is attached), ``post_forward`` (or ``pre_forward``),
``merge`` (fold into the module's weights, so merged inference runs no hook) and
``get_config`` (its constructor arguments, saved in the file). Saved adapters with custom
layers use the ``TINYTUNE`` format; loading takes the class back through
``custom_layers`` (nothing named in a file is ever imported).
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from torch import nn

from tinytune import AdapterLayer, AdapterWrapper


class ScaleShift(AdapterLayer):
    """``y * (1 + gain) + shift`` per output feature; starts as the identity."""

    def __init__(self, init_gain: float = 0.0):
        super().__init__()
        self.init_gain = init_gain

    def get_config(self) -> dict:
        return {"init_gain": self.init_gain}

    def reset_params(self, prefix: str, target: nn.Module) -> None:
        self.gain = nn.Parameter(torch.full((target.out_features,), self.init_gain))
        self.shift = nn.Parameter(torch.zeros(target.out_features))

    def post_forward(self, module, args, kwargs, output):
        return output * (1 + self.gain) + self.shift

    def merge(self, module: nn.Module) -> None:
        # y * (1 + g) + s == x W'^T + b' with W' = diag(1 + g) W and b' = (1 + g) b + s
        with torch.no_grad():
            module.weight.mul_((1 + self.gain)[:, None])
            module.bias.mul_(1 + self.gain).add_(self.shift)


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100, help="training steps (default 100)")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    X = torch.randn(128, 8)
    y = base(X).detach() * 1.5 + 0.3  # a target the layer can learn exactly

    model = AdapterWrapper(base)
    model.add_adapter("scaled")
    model.add_adapter_layer("scaled", "2", ScaleShift)
    opt = torch.optim.Adam(model.adapter_parameters(), lr=5e-2)
    for _ in range(args.steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(X), y)
        loss.backward()
        opt.step()
    print(f"loss after {args.steps} steps: {loss.item():.5f}")

    with torch.no_grad():
        out = model(X)
        model.merge_adapters()  # folded into layer 2's weights: no hook runs now
        torch.testing.assert_close(model(X), out, rtol=1e-5, atol=1e-5)
        model.unmerge_adapters()  # the original weights, bit for bit
    with tempfile.TemporaryDirectory() as tmp:
        model.save_adapter(tmp, "scaled")
        again = AdapterWrapper(model.unload())
        again.load_adapter(tmp, custom_layers=[ScaleShift])
        with torch.no_grad():
            torch.testing.assert_close(again(X), out)
    print("merged = unmerged; saved and loaded back: same outputs")
    return loss.item()


if __name__ == "__main__":
    main()
