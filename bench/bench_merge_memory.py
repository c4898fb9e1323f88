"""Peak extra memory of merge_adapters, unmerge_adapters and merge_and_unload (CPU).

A stack of ``--layers`` square linear layers (``--dim`` wide, ``--dtype``) with LoRA
(r=16) on every one. Each operation runs in a fresh process, so peaks do not mix:

* the peak resident set (``VmHWM`` in ``/proc/self/status``) is reset just before the
  operation by writing ``5`` to ``/proc/self/clear_refs`` (Linux), then read after it;
  the extra memory is that peak minus the resident set just before (``VmRSS``);
* the child runs with ``MALLOC_MMAP_THRESHOLD_=65536``, so glibc ``mmap``-s every large
  tensor and unmaps it when freed: a freed temporary leaves the resident set, and a
  peak counts only what was alive at the same time.

On the CPU the model's "device" is host memory, so ``merge_adapters``' exact copies
show up here (they are the point of exact unmerging); on a GPU they stay in host
memory and the device sees only the chunked temporaries. ``--tinytune PATH`` measures
another checkout (e.g. an older version, for comparison).

    python bench/bench_merge_memory.py                      # 8 x 2048^2 fp32 (128 MiB)
    python bench/bench_merge_memory.py --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, re, sys
sys.path.insert(0, {path!r}) if {path!r} else None
import torch
from torch import nn
from tinytune import AdapterWrapper, LoraConfig

def status(key):
    text = open("/proc/self/status").read()
    return int(re.search(key + r":\s+(\d+) kB", text).group(1)) * 1024

torch.manual_seed(0)
dtype = getattr(torch, {dtype!r})
model = nn.Sequential(*[nn.Linear({dim}, {dim}, bias=False, dtype=dtype) for _ in range({layers})])
w = AdapterWrapper(model)
w.add_adapter_from_config(LoraConfig(target_modules=[str(i) for i in range({layers})], r=16,
                                     init_lora_weights=False))
if {op!r} == "unmerge":
    w.merge_adapters()
weights = sum(p.numel() * p.element_size() for p in model.parameters())
one = model[0].weight.numel() * model[0].weight.element_size()
with torch.no_grad():
    # Warm-up: the first matmul and mixed-dtype add load kernels and thread buffers,
    # which are not the operation's memory.
    small = torch.randn(64, 64, dtype=dtype)
    torch.randn(64, 64).add_(small @ small.float().to(dtype))
    before = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    if {op!r} == "merge":
        w.merge_adapters()
    elif {op!r} == "unmerge":
        w.unmerge_adapters()
    else:
        w.merge_and_unload()
    peak = status("VmHWM")
print(json.dumps({{"op": {op!r}, "extra_peak_bytes": peak - before, "weights_bytes": weights,
                   "one_weight_bytes": one}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tinytune", default="", help="import tinytune from this checkout")
    args = parser.parse_args()
    rows = []
    for op in ("merge", "unmerge", "merge_and_unload"):
        code = CHILD.format(
            path=args.tinytune, dtype=args.dtype, dim=args.dim, layers=args.layers, op=op
        )
        # A fixed mmap threshold: every large block is mmap-ed and unmapped when freed
        # (glibc otherwise raises the threshold after the first free and keeps later
        # blocks on its heap, so freed temporaries would still count as resident).
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
        ).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    mib = 2**20
    print(f"{args.layers} x Linear({args.dim}, {args.dim}) {args.dtype}, LoRA r=16 on each; "
          f"weights {rows[0]['weights_bytes'] / mib:.0f} MiB, one weight "
          f"{rows[0]['one_weight_bytes'] / mib:.0f} MiB")
    for row in rows:
        extra = row["extra_peak_bytes"]
        print(f"  {row['op']:<17} peak extra {extra / mib:8.1f} MiB "
              f"({extra / row['one_weight_bytes']:.2f} x one weight)")


if __name__ == "__main__":
    main()
