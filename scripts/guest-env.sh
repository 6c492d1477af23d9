# Sourced by the other scripts: picks the Linux guest to boot and sets
#   KITE_GUEST_KERNEL, KITE_GUEST_INITRAMFS, KITE_GUEST_CMDLINE.
# On the kvm_pvm development/CI machines that is ../shared/guests/linux-pvm
# (a kernel patched to run there); on a host with hardware KVM it is a Debian
# cloud kernel with a busybox initramfs, fetched by fetch-debian-guest.sh.
# Values already set in the environment win.
root=$(cd "$(dirname "$0")/.." && pwd)
pvm_guest=$(cd "$root/../shared/guests/linux-pvm" 2>/dev/null && pwd) || pvm_guest=/nonexistent
if [ -z "${KITE_GUEST_KERNEL:-}" ]; then
  if [ -d /sys/module/kvm_pvm ] && [ -f "$pvm_guest/vmlinux" ]; then
    KITE_GUEST_KERNEL="$pvm_guest/vmlinux"
    KITE_GUEST_INITRAMFS="$pvm_guest/initrd.cpio.gz"
    KITE_GUEST_CMDLINE="${KITE_GUEST_CMDLINE:-console=ttyS0 quiet pvm}"
  else
    "$root/scripts/fetch-debian-guest.sh" >&2
    KITE_GUEST_KERNEL="$root/build/debian-guest/vmlinuz"
    KITE_GUEST_INITRAMFS="$root/build/debian-guest/initrd.cpio.gz"
    KITE_GUEST_CMDLINE="${KITE_GUEST_CMDLINE:-console=ttyS0 quiet}"
  fi
fi
export KITE_GUEST_KERNEL KITE_GUEST_INITRAMFS KITE_GUEST_CMDLINE
