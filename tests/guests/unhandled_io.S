/* unhandled_io.elf - accesses to ports and MMIO addresses no device handles.
 * Prints READY and UNHANDLED-IO-NOW, then from ring 3:
 *   - port I/O of 1, 2 and 4 bytes, reads and writes, to 0x510/0x511 (QEMU's
 *     fw_cfg, absent in Cloud Hypervisor), 0x3000, 0xfff0 and a 4-byte
 *     read/write of 0xcf8 (PCI config address; written with bit 31 clear, so
 *     it is harmless where PCI config I/O exists);
 *   - MMIO reads and writes of 1, 2 and 4 bytes at 0xd0000000 and 0xd0001000
 *     (no RAM and no device there in a 128 MiB VM; paging is off, so these are
 *     the guest-physical addresses -> KVM_EXIT_MMIO);
 * printing a line after each group, then SURVIVED, and powers off through the
 * ACPI port (0x600 <- 0x34).
 * The VMM should: ignore unhandled writes, complete unhandled reads with some
 * value (typically all ones or zero), keep running, and end with a normal
 * power-off. What the reads returned is printed for information only. */
#include "common.S"

#define MMIO_A 0xd0000000
#define MMIO_B 0xd0001000

user_main:
    PRINT "READY"
    PRINT "UNHANDLED-IO-NOW"

    /* Port writes. */
    mov $0x510, %dx
    mov $0x1234, %ax
    out %ax, %dx                    /* fw_cfg selector, 2 bytes */
    mov $0x511, %dx
    mov $0x5a, %al
    out %al, %dx
    mov $0x3000, %dx
    out %al, %dx
    out %ax, %dx
    mov $0xdeadbeef, %eax
    out %eax, %dx
    mov $0xfff0, %dx
    out %eax, %dx
    mov $0xcf8, %dx
    mov $0x00001234, %eax           /* enable bit 31 clear */
    out %eax, %dx
    PRINT "kite-guest: port writes done"

    /* Port reads. */
    mov $0x510, %dx
    in %dx, %ax
    mov $0x511, %dx
    in %dx, %al
    mov $0x3000, %dx
    in %dx, %al
    in %dx, %ax
    in %dx, %eax
    mov $0xfff0, %dx
    in %dx, %eax
    mov $0xcf8, %dx
    in %dx, %eax
    mov $0x3000, %dx
    in %dx, %eax
    push %eax
    mov $.Lin, %esi
    call puts
    pop %eax
    call put_hex32
    PRINT ""

    /* MMIO writes and reads where there is no memory. */
    movl $0xcafef00d, MMIO_A
    movw $0x1234, MMIO_A + 4
    movb $0x56, MMIO_A + 6
    movl $0x11223344, MMIO_B
    PRINT "kite-guest: MMIO writes done"
    mov MMIO_A, %eax
    movzwl MMIO_A + 4, %ecx
    movzbl MMIO_B + 6, %ecx
    mov MMIO_B, %eax
    push %eax
    mov $.Lmmio, %esi
    call puts
    pop %eax
    call put_hex32
    PRINT ""

    PRINT "SURVIVED"
    jmp acpi_poweroff

    .section .rodata
.Lin:   .asciz "kite-guest: port reads done, inl(0x3000) = "
.Lmmio: .asciz "kite-guest: MMIO reads done, readl(0xd0001000) = "
    .text
