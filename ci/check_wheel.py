"""Build tinytune's wheel, install it into a fresh venv and import it from there.

Checks what a checkout cannot show: the kernels install as ``tinytune.kernels`` (the
top-level name ``kernels`` belongs to another PyPI package), the installed package
imports without the source tree, and the ``tinytune-bench`` console script is installed
and starts (``--help``).

The probe venv is created without ``--system-site-packages``: that flag would expose the
*base* interpreter's packages (not the running venv's), so the check would pass or fail
depending on what happens to be installed globally. Instead the probe gets a ``.pth``
file listing the running environment's site-packages directories (plain paths, so their
own ``.pth`` files, such as an editable install of this checkout, are not processed):
torch and friends come from the environment that runs this script, nothing is
downloaded, and tinytune can only come from the wheel.

    python ci/check_wheel.py
"""

from __future__ import annotations

import importlib.util
import os
import site
import subprocess
import sys
import sysconfig
import tempfile
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run ``cmd``; on failure print its output (stderr included) and raise."""
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        print(f"FAIL: {' '.join(cmd)} exited with {result.returncode}")
        print(f"--- stdout ---\n{result.stdout}--- stderr ---\n{result.stderr}")
        raise SystemExit(1)
    return result


def running_site_dirs() -> list[str]:
    """The running interpreter's site-packages directories, in import order."""
    candidates = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        candidates.append(site.getusersitepackages())
    candidates += [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    # Whatever sys.path holds that is a site directory (covers unusual layouts).
    candidates += [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")]
    out: list[str] = []
    for p in candidates:
        if p and os.path.isdir(p) and p not in out:
            out.append(p)
    return out


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
             "-w", str(tmp_path / "dist"), str(ROOT)])
        (wheel,) = (tmp_path / "dist").glob("tinytune-*.whl")
        names = zipfile.ZipFile(wheel).namelist()
        tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
        if tops != {"tinytune"}:
            print(f"FAIL: top-level names in the wheel: {sorted(tops)}")
            return 1
        kernel_files = {f"tinytune/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
        if not kernel_files <= set(names):
            print(f"FAIL: missing from the wheel: {sorted(kernel_files - set(names))}")
            return 1
        env_dir = tmp_path / "venv"
        venv.EnvBuilder(system_site_packages=False, with_pip=False).create(env_dir)
        py = env_dir / "bin" / "python"
        site_dir = run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
        ).stdout.strip()
        # pip --python installs into the probe as its own pip would: console scripts too.
        run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
             "--no-index", str(wheel)])
        # After the probe's own site-packages, so the wheel's tinytune wins.
        (Path(site_dir) / "zz_running_env.pth").write_text("\n".join(running_site_dirs()) + "\n")
        probe = "import tinytune.kernels.lora_linear as m; print(m.__file__)"
        out = run([str(py), "-I", "-c", probe], cwd=tmp).stdout.strip()
        if not out.startswith(site_dir):
            print(f"FAIL: tinytune.kernels imported from {out}, not from the venv {site_dir}")
            return 1
        # Hugging Face's PyPI package `kernels` (a transformers dependency) stays reachable
        # next to the installed tinytune, from the source tree's root as well.
        hf_probe = "import kernels, transformers; print(getattr(kernels, '__file__', None))"
        if importlib.util.find_spec("kernels") is not None:
            for cwd, code in ((tmp, "import tinytune.kernels.lora_linear; " + hf_probe),
                              (str(ROOT), hf_probe)):
                out = run([str(py), "-c", code], cwd=cwd).stdout.strip()
                if out == "None" or not out.startswith(tuple(running_site_dirs())):
                    print(f"FAIL: `import kernels` from {cwd} found {out}, not Hugging Face's")
                    return 1
        script = env_dir / "bin" / "tinytune-bench"
        if not script.is_file():
            print("FAIL: the wheel installs no tinytune-bench console script")
            return 1
        usage = run([str(script), "--help"], cwd=tmp).stdout
        if "usage: tinytune-bench" not in usage:
            print(f"FAIL: tinytune-bench --help printed:\n{usage}")
            return 1
        print(f"ok: {wheel.name} holds only tinytune/ (with tinytune/kernels/), imports from {site_dir}, "
              "installs tinytune-bench")
    return 0


if __name__ == "__main__":
    sys.exit(main())
