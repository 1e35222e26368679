#!/usr/bin/env bash
# Sets everything up (as root) and runs Corral's end-to-end demonstration.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bash "$here/scripts/setup.sh"
exec "${CORRAL_VENV:-/opt/corral/venv}/bin/python" "$here/examples/demo/run_demo.py"
