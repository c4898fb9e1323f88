#!/usr/bin/env bash
# The README's commands, exactly as written, in a brand-new virtual environment on a clean
# clone of the committed HEAD: every ```bash block of README.md's "## Install and run"
# section, in order (the install-and-run command, then the test command, which is .ci/run).
# A separate CI step, not part of the test command: it installs everything from the
# package index and runs the whole suite (about 10 minutes on a 2-core machine).
#
# No pip cache (PIP_NO_CACHE_DIR for every pip call of the README's commands): each run
# resolves and downloads the newest versions that pyproject.toml allows, so the next
# upstream release that breaks us breaks this check first.
#
#   bash ci/fresh_venv.sh            # uses python3 from PATH
#   PYTHON=python3.12 bash ci/fresh_venv.sh
set -euo pipefail
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'
    exit 0
fi
export PIP_NO_CACHE_DIR=1
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git clone -q "$root" "$work/clone"
"${PYTHON:-python3}" -m venv "$work/venv"
# shellcheck disable=SC1091
. "$work/venv/bin/activate"
cd "$work/clone"
python - <<'PY' > "$work/commands.sh"
import re
readme = open("README.md").read()
section = readme.split("## Install and run", 1)[1].split("\n## ", 1)[0]
for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
    print(block.strip())
PY
echo "fresh venv $VIRTUAL_ENV; running:"; cat "$work/commands.sh"
bash -euo pipefail "$work/commands.sh"
test -z "$(git status --porcelain)" || { echo "FAIL: the commands left changes in the clone:"; git status --porcelain; exit 1; }
echo "ok: README commands passed in a fresh venv on a clean clone"
