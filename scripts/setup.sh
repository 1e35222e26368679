#!/usr/bin/env bash
# Installs everything Corral needs on a fresh Debian 12 machine (run as root):
# system packages, a world-readable virtualenv at $CORRAL_VENV (default /opt/corral/venv)
# built from Debian's /usr/bin/python3 (so unprivileged users and sandboxed uids can run it),
# and this checkout installed into it in editable mode. Idempotent.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${CORRAL_VENV:-/opt/corral/venv}"

apt_packages=(
  bubblewrap passt slirp4netns nftables iproute2 libseccomp2 python3-venv python3-dev
  busybox-static qemu-system-x86 xvfb x11-utils xclip xdotool socat procps acl gcc libc6-dev
)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "corral setup: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The micro-VM guest kernel (Debian's, unpacked into /opt/corral/guest; cached).
bash "$here/scripts/fetch-guest-kernel.sh"

# Long-lived sandboxes keep their state under /run/corral/<uid>/ (sticky, like /tmp).
mkdir -p /run/corral && chmod 1733 /run/corral

# Unprivileged user-mode networking (pasta/slirp4netns) needs the tun device usable (no udev here).
[ -c /dev/net/tun ] && chmod 0666 /dev/net/tun || true

if [ ! -x "$venv/bin/python" ]; then
  mkdir -p "$(dirname "$venv")"
  /usr/bin/python3 -m venv "$venv"
fi
stamp="$venv/.corral-installed"
installed_here() {  # the editable install points at this checkout (not another clone's)
  "$venv/bin/python" -c 'import corral, os, sys; sys.exit(os.path.dirname(corral.__file__) != sys.argv[1])' "$here/src/corral" 2>/dev/null
}
if [ ! -f "$stamp" ] || [ "$here/pyproject.toml" -nt "$stamp" ] || ! installed_here; then
  "$venv/bin/pip" install -q --disable-pip-version-check -e "$here[net,service,microvm,test]"
  touch "$stamp"
fi
# The native launcher the process backend runs every sandbox through.
"$venv/bin/python" -c 'from corral.native import build; build("gcc")'
# Byte-compile once: `corral` starts faster, also where PYTHONDONTWRITEBYTECODE is set.
"$venv/bin/python" -m compileall -q "$here/src" >/dev/null || true
chmod -R a+rX "$(dirname "$venv")"
echo "corral setup: ready ($venv)" >&2
