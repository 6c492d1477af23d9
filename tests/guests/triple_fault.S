/* triple_fault.elf - the guest triple-faults.
 * Setup (common.S) loads an IDT with limit 0. In ring 0 the guest prints
 * READY and TRIPLE-FAULT-NOW, then executes UD2: the #UD cannot be delivered
 * (vector outside the IDT limit) -> #GP, which cannot be delivered either ->
 * #DF -> triple fault. A divide by zero follows as a second chance.
 * The VMM should: see KVM_EXIT_SHUTDOWN and treat it like a guest reset/
 * shutdown request (Cloud Hypervisor resets the VM), never hang or crash. */
#define RING0_MAIN triple_fault
#include "common.S"

triple_fault:
    PRINT "READY"
    PRINT "TRIPLE-FAULT-NOW"
    ud2                             /* #UD -> #GP -> #DF -> shutdown */
    xor %ecx, %ecx                  /* not reached: #DE -> ... -> shutdown */
    div %ecx
    PRINT "kite-guest: ERROR: still running after the triple fault"
    jmp spin_forever

user_main:                          /* never reached */
    ret
