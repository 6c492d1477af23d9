#!/bin/sh
# Builds the kite test guests (PVH ELF images, see common.S) into OUTDIR:
#   triple_fault.elf    ring-0 #UD with a zero-limit IDT   -> KVM_EXIT_SHUTDOWN
#   internal_error.elf  ring-0 INT3 (emulation failure here, triple fault on hw KVM)
#   unhandled_io.elf    ring-3 accesses to unimplemented ports/MMIO, then power off
#   serial_flood.elf    ring-3 endless stream of 'x' lines on COM1
#   counter.elf         ring-3 "COUNT <n>" line every ~20 ms, forever
#   poweroff.elf        READY, then ACPI power off (port 0x600 <- 0x34)
#   reset.elf           READY, then i8042 reset (port 0x64 <- 0xfe)
#   virtio_hostile.elf  ring-3 hostile virtio-blk driver (virtio_hostile.c on the
#                       common.S entry in virtio_hostile_entry.S), then power off
#   net_hostile.elf     ring-3 hostile virtio-net driver (net_hostile.c on the
#                       common.S entry in net_hostile_entry.S), then power off
# Usage: build.sh OUTDIR   (needs gcc and GNU ld; exits non-zero on failure)
set -e
if [ $# -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
src=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$1"
out=$(cd "$1" && pwd)
# Older binutils do not know --no-warn-rwx-segments; the single RWX segment is intended.
ldflags=
if ld --help 2>/dev/null | grep -q -- --no-warn-rwx-segments; then
  ldflags=--no-warn-rwx-segments
fi
for name in triple_fault internal_error unhandled_io serial_flood counter poweroff reset; do
  gcc -c -nostdlib -ffreestanding -I"$src" "$src/$name.S" -o "$out/$name.o"
  ld -m elf_x86_64 -static -nostdlib $ldflags -T "$src/guest.ld" "$out/$name.o" -o "$out/$name.elf"
  rm -f "$out/$name.o"
done

# The C guests (virtio_hostile, net_hostile; virtio_guest.h holds what they
# share): C for i386 (-m32) with their common.S entry (NAME_entry.S), linked
# as an i386 ELF, then converted to ELF64 (kite loads ELF64 PVH images only;
# the code stays 32-bit, which is what the PVH entry runs anyway).
# -mgeneral-regs-only: no SSE/x87 (CR4.OSFXSR is off in these guests).
for name in virtio_hostile net_hostile; do
  gcc -m32 -c -ffreestanding -nostdlib -fno-pic -fno-pie -O2 -mgeneral-regs-only \
    -fno-stack-protector -fno-asynchronous-unwind-tables -fno-unwind-tables \
    -Wall -Wextra -I"$src" "$src/$name.c" -o "$out/$name.o"
  gcc -m32 -c -nostdlib -ffreestanding -I"$src" "$src/${name}_entry.S" -o "$out/${name}_entry.o"
  ld -m elf_i386 -static -nostdlib $ldflags -T "$src/guest.ld" \
    "$out/${name}_entry.o" "$out/$name.o" -o "$out/$name.elf32"
  objcopy -O elf64-x86-64 "$out/$name.elf32" "$out/$name.elf"
  rm -f "$out/$name.o" "$out/${name}_entry.o" "$out/$name.elf32"
done
