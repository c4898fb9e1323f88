"""Build tinytune's wheel, install it into a fresh venv and import it from there.

Checks what a checkout cannot show: the kernels install as ``tinytune.kernels`` (the
top-level name ``kernels`` belongs to another PyPI package), and the installed package
imports without the source tree. Torch comes from the running interpreter
(``--system-site-packages``) so nothing is downloaded.

    python ci/check_wheel.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
             "-w", str(tmp_path / "dist"), str(ROOT)],
            check=True,
        )
        (wheel,) = (tmp_path / "dist").glob("tinytune-*.whl")
        names = zipfile.ZipFile(wheel).namelist()
        tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
        if tops != {"tinytune"}:
            print(f"FAIL: top-level names in the wheel: {sorted(tops)}")
            return 1
        if "tinytune/kernels/__init__.py" not in names:
            print("FAIL: tinytune/kernels/__init__.py is missing from the wheel")
            return 1
        env_dir = tmp_path / "venv"
        venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
        py = env_dir / "bin" / "python"
        site = subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
             "--target", site, str(wheel)],
            check=True,
        )
        probe = "import tinytune, tinytune.kernels; print(tinytune.kernels.__file__)"
        out = subprocess.run(
            [str(py), "-I", "-c", probe], check=True, capture_output=True, text=True, cwd=tmp
        ).stdout.strip()
        if not out.startswith(site):
            print(f"FAIL: tinytune.kernels imported from {out}, not from the venv {site}")
            return 1
        print(f"ok: {wheel.name} holds only tinytune/ (with tinytune/kernels/), imports from {site}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
