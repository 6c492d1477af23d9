#!/bin/busybox sh
# /init of the busybox initramfs that fetch-debian-guest.sh builds: prints
# the same KITE-* lines as the test guest, then powers off.
B=/bin/busybox
echo "KITE-GUEST-UP"
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "KITE-UNAME: $($B uname -a)"
echo "KITE-CPUS: $($B grep -c ^processor /proc/cpuinfo)"
echo "KITE-MEM: $($B grep MemTotal /proc/meminfo)"
echo "KITE-CMDLINE: $($B cat /proc/cmdline)"
case " $($B cat /proc/cmdline) " in
  *" kite.shell=1 "*) $B --install -s /bin; export PATH=/bin; exec $B sh ;;
esac
echo "KITE-GUEST-DONE"
$B poweroff -f
