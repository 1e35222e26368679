#!/bin/sh
# Fetch the micro-VM guest kernel and the few modules the guest needs into a cache directory,
# without installing a kernel on the host (`apt-get download` + `dpkg-deb -x`).
# Debian's generic kernel, not the cloud flavour: the cloud kernel is built without 9p
# (CONFIG_NET_9P), which Corral's guest uses to see the policy's host directories.
# Idempotent: returns at once when the cache already holds a kernel.
#   usage: scripts/fetch-guest-kernel.sh [CACHE_DIR]    (default $CORRAL_GUEST_DIR or /opt/corral/guest)
set -eu

cache="${1:-${CORRAL_GUEST_DIR:-/opt/corral/guest}}"
meta="linux-image-amd64"
# Loaded in this order by the guest's init (the package ships no modules.dep).
# (dependencies first, as their .modinfo `depends=` says).
modules="drivers/virtio/virtio_ring.ko drivers/virtio/virtio.ko drivers/virtio/virtio_mmio.ko
drivers/char/virtio_console.ko fs/netfs/netfs.ko fs/fscache/fscache.ko net/9p/9pnet.ko
net/9p/9pnet_virtio.ko fs/9p/9p.ko net/core/failover.ko drivers/net/net_failover.ko
drivers/net/virtio_net.ko"
wanted_order=$(echo "$modules" | tr ' ' '\n' | sed 's|.*/||')

# Cached when the kernel is there with exactly this module list (an older cache without the
# network modules is fetched again).
if [ -e "$cache/vmlinuz" ] && [ -e "$cache/modules/version" ] &&
    [ "$(cat "$cache/modules/order" 2>/dev/null)" = "$wanted_order" ]; then
    echo "guest kernel cached: $cache/$(readlink "$cache/vmlinuz")"
    exit 0
fi

# The metapackage depends on exactly one versioned image package; download that one.
image=$(apt-cache depends "$meta" 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9].*\)$/\1/p' | head -n 1)
if [ -z "$image" ]; then
    echo "cannot resolve $meta: run 'apt-get update' (Debian's main archive must be reachable)" >&2
    exit 1
fi

mkdir -p "$cache"
work=$(mktemp -d "$cache/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -q -o APT::Sandbox::User=root "$image" >/dev/null)
dpkg-deb -x "$work"/"$image"_*.deb "$work/tree"

version=${image#linux-image-}
mkdir "$work/modules"
for m in $modules; do
    cp "$work/tree/lib/modules/$version/kernel/$m" "$work/modules/"
done
echo "$wanted_order" > "$work/modules/order"
mv "$work/tree/boot/vmlinuz-$version" "$cache/vmlinuz-$version"
rm -rf "$cache/modules"
mv "$work/modules" "$cache/modules"
echo "$version" > "$cache/modules/version"
ln -sfn "vmlinuz-$version" "$cache/vmlinuz"
echo "guest kernel: $cache/vmlinuz-$version"
