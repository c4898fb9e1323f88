"""rows_config's per-arch tiles: the compile report lists, per arch, what the launcher picks.

The quantized per-row decode tiles differ between sm_80 and sm_90a (ptxas left an 8-byte
stack frame on sm_90a with 8 warps at 16 and 32 rows); the report's records must carry
each arch's own tile, or the report checks tiles no launcher runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tinytune.kernels.lora_mixed_plan import rows_config

pytest.importorskip("triton")

# report_configs is empty under the interpreter: list the records in a fresh process.
_LIST = """
import json
from tinytune.kernels.report_configs import lora_mixed_configs
out = []
for rec in lora_mixed_configs():
    if rec["kernel"] == "_mixed_rows_kernel" and rec["constexprs"]["W_SCALED"]:
        out.append(dict(config=rec["config"], archs=rec["archs"], fp32=rec["constexprs"]["DOT_FP32"],
                        quant=rec["variant"].split(" ")[0].split("-")[1]))
print(json.dumps(out))
"""


def test_quantized_rows_records_carry_each_archs_tile():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _LIST], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    recs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert recs
    seen = set()
    for rec in recs:
        for arch in rec["archs"]:
            want = rows_config(rec["config"]["BLOCK_M"], rec["fp32"], quantized=True, arch=arch)
            assert rec["config"] == {k: want[k] for k in rec["config"]}, (rec, arch)
            seen.add((rec["quant"], arch, rec["fp32"], rec["config"]["BLOCK_M"]))
    # every row tile, dtype class and arch of each code type is listed
    for quant, archs in (("int8", (80, 90)), ("fp8", (90,))):
        for arch in archs:
            for fp32 in (False, True):
                for block_m in (16, 32, 64):
                    assert (quant, arch, fp32, block_m) in seen
    # the two archs' 16-bit tiles at 16 rows differ (else this test checks nothing)
    assert rows_config(16, False, True, 80) != rows_config(16, False, True, 90)
