/* common.S - shared entry and setup for the kite test guests (included by each
 * guest's .S file with #include "common.S"; not built on its own).
 *
 * What it does, in this order:
 *   1. PVH entry (XEN_ELFNOTE_PHYS32_ENTRY, ELF note type 18): the VMM starts us
 *      in 32-bit protected mode, paging off, flat CS/DS/ES/SS, EBX = start_info.
 *      Prints "kite-guest: PVH entry (32-bit protected mode)".
 *   2. Loads our own GDT (ring-0 code/data, ring-3 code/data, a 32-bit TSS with
 *      SS0:ESP0 = kernel stack), reloads every segment register, loads a
 *      zero-limit IDT and the task register.
 *      The zero-limit IDT is deliberate: any exception, interrupt or INT n
 *      cannot be delivered (#GP -> #DF -> triple fault), so a guest that goes
 *      wrong ends in a KVM_EXIT_SHUTDOWN instead of running on silently.
 *      Interrupts stay disabled (EFLAGS.IF = 0) for the whole life of the guest.
 *      Prints "kite-guest: GDT, TSS, IDT (limit 0) loaded".
 *   3. If the guest defines RING0_MAIN (a function name) before including this
 *      file, calls it, still in ring 0.
 *   4. Drops to ring 3 with SYSEXIT (see below why not IRET), EFLAGS = 0x3002
 *      (IOPL = 3, IF = 0), so ring-3 code may use in/out on any port. Checks CPL == 3 and prints
 *      "kite-guest: ring 3 (CPL 3, IOPL 3)", then jumps to user_main, which
 *      each guest defines. If user_main returns, the guest spins forever.
 *
 * Paging stays off for the whole run: linear address == physical address, so
 * ring-3 code can touch any guest-physical address (RAM or MMIO) directly.
 *
 * Why so little ring-0 code: on the development machines /dev/kvm is a nested
 * paravirtual KVM that *interprets* guest ring-0 code (~1-2 M instr/s) while
 * ring-3 code runs natively. Everything that loops lives in ring 3.
 *
 * Helpers for guests (callable in ring 0 and in ring 3, IOPL is 3):
 *   PRINT "text"    macro: writes "text\n" to COM1 (preserves all registers)
 *   puts            ESI = NUL-terminated string -> COM1 (preserves registers)
 *   put_u32         EAX printed in decimal, no newline (preserves registers)
 *   put_hex32       EAX printed as 0x%08x, no newline (preserves registers)
 *   acpi_poweroff   writes 0x34 (SLP_TYP=5 | SLP_EN) to port 0x600; no return
 *   i8042_reset     writes 0xfe to port 0x64; no return
 *   spin_forever    busy loop (`pause`) in whatever ring we are in; no return
 */

#define COM1          0x3f8
#define ACPI_SLEEP    0x600    /* Cloud Hypervisor's ACPI sleep control / reset port */
#define ACPI_S5       0x34
#define I8042_CMD     0x64
#define I8042_RESET   0xfe

#define SEL_KCODE     0x08
#define SEL_KDATA     0x10
#define SEL_UCODE     0x1b     /* GDT index 3, RPL 3 */
#define SEL_UDATA     0x23     /* GDT index 4, RPL 3 */
#define SEL_TSS       0x28
#define USER_EFLAGS   0x3002   /* IOPL = 3, IF = 0, reserved bit 1 */
#define MSR_SYSENTER_CS 0x174  /* SYSEXIT derives ring-3 CS/SS from it */

/* PRINT "text": write text and a newline to COM1. */
.macro PRINT str=""
    .pushsection .rodata
.Lstr\@:
    .ascii "\str"
    .byte 10, 0
    .popsection
    push %esi
    mov $.Lstr\@, %esi
    call puts
    pop %esi
.endm

/* ---- PVH ELF note: 32-bit entry point ---------------------------------- */
    .section .note.Xen, "a"
    .align 4
    .long 4                 /* name size ("Xen\0") */
    .long 4                 /* descriptor size */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long _start


/* ---- ring-0 entry and setup -------------------------------------------- */
    .text
    .code32
    .globl _start
_start:
    cli
    cld
    mov $kstack_top, %esp           /* PVH gives flat DS/SS but no stack */
    PRINT "kite-guest: PVH entry (32-bit protected mode)"

    /* Patch the TSS base into its GDT descriptor (a link-time address cannot
     * be split into descriptor fields by the assembler). */
    mov $tss, %eax
    mov %ax, gdt_tss + 2            /* base 15:0 */
    shr $16, %eax
    mov %al, gdt_tss + 4            /* base 23:16 */
    mov %ah, gdt_tss + 7            /* base 31:24 */

    lgdt gdt_ptr
    ljmp $SEL_KCODE, $1f
1:  mov $SEL_KDATA, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %fs
    mov %ax, %gs
    mov %ax, %ss
    mov $kstack_top, %esp
    lidt idt_ptr                    /* limit 0: nothing can be delivered */
    mov $SEL_TSS, %ax
    ltr %ax
    PRINT "kite-guest: GDT, TSS, IDT (limit 0) loaded"

#ifdef RING0_MAIN
    call RING0_MAIN
#endif

    /* Drop to ring 3 with SYSEXIT, not IRET: KVM's instruction emulator (which
     * runs our ring-0 code on the nested host) implements IRET only in real
     * mode and far RET only to the same privilege level, but it does have
     * SYSEXIT (and so has every x86 CPU in 32-bit protected mode).
     * SYSEXIT loads CS = SYSENTER_CS + 16 (| RPL 3) = 0x1b and
     * SS = SYSENTER_CS + 24 (| RPL 3) = 0x23, EIP = EDX, ESP = ECX; it keeps
     * EFLAGS, so IOPL = 3 (IF = 0) is set beforehand with POPF, and the data
     * segments are switched to the DPL-3 selector by hand. */
    mov $SEL_UDATA, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %fs
    mov %ax, %gs
    mov $MSR_SYSENTER_CS, %ecx
    mov $SEL_KCODE, %eax
    xor %edx, %edx
    wrmsr
    push $USER_EFLAGS
    popf
    mov $ring3_entry, %edx          /* EIP */
    mov $ustack_top, %ecx           /* ESP */
    sysexit

ring3_entry:
    mov %cs, %eax
    and $3, %eax
    cmp $3, %eax
    jne 1f
    PRINT "kite-guest: ring 3 (CPL 3, IOPL 3)"
    call user_main
    jmp spin_forever
1:  PRINT "kite-guest: ERROR: not in ring 3 after SYSEXIT"
    jmp spin_forever

/* ---- helpers ------------------------------------------------------------ */

/* puts: ESI = NUL-terminated string, written byte by byte to COM1 THR.
 * The UART is emulated and always ready, so LSR is not polled. */
puts:
    push %eax
    push %edx
    push %esi
    mov $COM1, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  pop %esi
    pop %edx
    pop %eax
    ret

/* put_u32: EAX in decimal (no newline). */
put_u32:
    pusha
    mov %esp, %ebp
    sub $12, %esp                   /* room for 10 digits + NUL */
    lea 11(%esp), %edi
    movb $0, (%edi)
    mov $10, %ecx
1:  xor %edx, %edx
    div %ecx
    add $'0', %dl
    dec %edi
    mov %dl, (%edi)
    test %eax, %eax
    jnz 1b
    mov %edi, %esi
    call puts
    mov %ebp, %esp
    popa
    ret

/* put_hex32: EAX as "0x" and 8 hex digits (no newline). */
put_hex32:
    pusha
    mov %esp, %ebp
    sub $12, %esp                   /* "0x" + 8 digits + NUL */
    mov %esp, %edi
    movw $0x7830, (%edi)            /* "0x" */
    add $2, %edi
    mov $8, %ecx
1:  rol $4, %eax
    mov %eax, %edx
    and $15, %edx
    movb .Lhexdigits(%edx), %dl
    mov %dl, (%edi)
    inc %edi
    dec %ecx
    jnz 1b
    movb $0, (%edi)
    mov %esp, %esi
    call puts
    mov %ebp, %esp
    popa
    ret
    .pushsection .rodata
.Lhexdigits: .ascii "0123456789abcdef"
    .popsection

acpi_poweroff:
    mov $ACPI_SLEEP, %dx
    mov $ACPI_S5, %al
    out %al, %dx
    jmp spin_forever                /* the VMM stops us; nothing to do meanwhile */

i8042_reset:
    mov $I8042_RESET, %al
    out %al, $I8042_CMD
    jmp spin_forever

spin_forever:
    pause
    jmp spin_forever

/* ---- descriptor tables and stacks --------------------------------------- */
    .data
    .align 8
gdt:
    .quad 0                         /* 0x00 null */
    .quad 0x00cf9a000000ffff        /* 0x08 ring-0 code: flat 4 GiB, 32-bit, DPL 0 */
    .quad 0x00cf92000000ffff        /* 0x10 ring-0 data: flat 4 GiB, DPL 0 */
    /* The ring-3 pair must sit at SYSENTER_CS + 16 / + 24 for SYSEXIT. */
    .quad 0x00cffa000000ffff        /* 0x18 ring-3 code: flat 4 GiB, 32-bit, DPL 3 */
    .quad 0x00cff2000000ffff        /* 0x20 ring-3 data: flat 4 GiB, DPL 3 */
gdt_tss:                            /* 0x28 32-bit available TSS, base patched at run time */
    .word tss_end - tss - 1         /* limit 15:0 */
    .word 0                         /* base 15:0 */
    .byte 0                         /* base 23:16 */
    .byte 0x89                      /* P=1, DPL=0, type 9 (32-bit TSS, available) */
    .byte 0                         /* G=0, limit 19:16 = 0 */
    .byte 0                         /* base 31:24 */
gdt_end:

    .align 4
    .word 0
gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
    .word 0
idt_ptr:
    .word 0                         /* limit 0: every vector is out of bounds */
    .long 0

    .align 4
tss:                                /* 32-bit TSS; only SS0:ESP0 matter */
    .long 0                         /* 0x00 previous task link */
    .long kstack_top                /* 0x04 ESP0 */
    .long SEL_KDATA                 /* 0x08 SS0 */
    .fill 22, 4, 0                  /* 0x0c..0x63 ESP1..LDT selector */
    .word 0                         /* 0x64 T flag */
    .word tss_end - tss             /* 0x66 I/O map base beyond the limit: no bitmap */
tss_end:

    .bss
    .align 16
kstack:
    .skip 4096
kstack_top:
ustack:
    .skip 16384
ustack_top:

    .text
