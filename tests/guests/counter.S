/* counter.elf - a visible, steady sign of guest progress.
 * Prints READY and COUNTING-NOW, then from ring 3 prints "COUNT <n>" (n = 0,
 * 1, 2, ...) about every 20 ms, forever; it never powers off.
 * Timing: RDTSC in ring 3 (CR4.TSD is 0), a new line once TICKS TSC cycles
 * have passed since the previous one. TICKS assumes a ~2.5 GHz TSC, so the
 * period is roughly 15-35 ms on usual hosts; tests must not depend on it
 * more precisely. The deadline is taken from the time of the previous line,
 * so after a pause the count simply continues (no burst of catch-up lines).
 * The VMM should: while the VM is paused no new COUNT line appears; after
 * resume the count continues from where it stopped. */
#include "common.S"

#define TICKS 50000000              /* ~20 ms at 2.5 GHz */

user_main:
    PRINT "READY"
    PRINT "COUNTING-NOW"
    xor %ebx, %ebx                  /* n */
1:  rdtsc
    mov %eax, %esi                  /* EDI:ESI = TSC at this line */
    mov %edx, %edi
    mov $.Lcount, %eax
    push %esi
    mov %eax, %esi
    call puts
    pop %esi
    mov %ebx, %eax
    call put_u32
    mov $.Lnl, %eax
    push %esi
    mov %eax, %esi
    call puts
    pop %esi
    inc %ebx
2:  pause
    rdtsc
    sub %esi, %eax                  /* EDX:EAX = now - then */
    sbb %edi, %edx
    jnz 1b                          /* >= 2^32 cycles (e.g. after a long pause) */
    cmp $TICKS, %eax
    jb 2b
    jmp 1b

    .section .rodata
.Lcount: .asciz "COUNT "
.Lnl:    .asciz "\n"
    .text
