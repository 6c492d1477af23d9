#!/bin/sh
# Debian packages the build, the tests, the demo and the benchmarks use,
# plus any named as arguments (a benchmark's own tools: fio, iperf3).
set -eu
pkgs="gcc g++ binutils make curl python3 cpio gzip iproute2 iputils-ping qemu-utils $*"
missing=""
for p in $pkgs; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  sudo_cmd=""; [ "$(id -u)" = 0 ] || sudo_cmd=sudo
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq $missing
fi
[ -w /dev/kvm ] || { echo "kite needs read/write access to /dev/kvm" >&2; exit 1; }
