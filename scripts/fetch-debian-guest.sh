#!/bin/sh
# Fetches a Debian cloud kernel (a bzImage) and busybox with apt-get download
# and builds build/debian-guest/{vmlinuz,initrd.cpio.gz}: the guest for hosts
# with hardware KVM. Needs apt (Debian/Ubuntu), cpio and gzip.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/build/debian-guest"
[ -f "$out/vmlinuz" ] && [ -f "$out/initrd.cpio.gz" ] && exit 0
work="$out/work"
rm -rf "$work" && mkdir -p "$work" && cd "$work"
apt-get update -qq || true
pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$pkg" ] || { echo "no linux-image-*-cloud-amd64 package found" >&2; exit 1; }
apt-get download "$pkg" busybox-static
dpkg-deb -x linux-image-*.deb kernel
dpkg-deb -x busybox-static_*.deb busybox
cp kernel/boot/vmlinuz-* "$out/vmlinuz"
mkdir -p initramfs/bin initramfs/proc initramfs/sys initramfs/dev initramfs/tmp
cp busybox/bin/busybox initramfs/bin/busybox
cp "$root/scripts/guest-init.sh" initramfs/init
chmod 755 initramfs/init
(cd initramfs && find . | cpio -o -H newc --quiet | gzip -9) > "$out/initrd.cpio.gz"
cd "$root" && rm -rf "$work"
echo "guest: $out/vmlinuz ($pkg), $out/initrd.cpio.gz"
