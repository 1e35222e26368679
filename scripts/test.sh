#!/usr/bin/env bash
# Sets everything up (as root) and runs the whole test suite, then lint and type checks.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bash "$here/scripts/setup.sh"
venv="${CORRAL_VENV:-/opt/corral/venv}"
cd "$here"
"$venv/bin/ruff" check src tests bench examples
"$venv/bin/ruff" format --check src tests bench examples
"$venv/bin/mypy" src/corral
exec "$venv/bin/pytest" -q -p no:cacheprovider "$@"
