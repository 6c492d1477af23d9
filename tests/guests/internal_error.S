/* internal_error.elf - an instruction KVM's emulator cannot handle, in ring 0.
 * In ring 0 the guest prints READY and INT3-IN-RING0-NOW, then executes INT3.
 * - On the nested paravirtual KVM of the development machines ring-0 code is
 *   interpreted and the emulator has no INT n: KVM_RUN ends with
 *   KVM_EXIT_INTERNAL_ERROR (suberror 1, emulation failure).
 * - On hardware KVM INT3 is delivered to the IDT; common.S loaded an IDT with
 *   limit 0, so it becomes #GP -> #DF -> triple fault (KVM_EXIT_SHUTDOWN).
 * Should INT3 somehow return, INT $0x80 is tried next.
 * The VMM should: report a guest failure (VM state / event, error in the log)
 * and keep serving its API; never panic or hang. */
#define RING0_MAIN do_int3
#include "common.S"

do_int3:
    PRINT "READY"
    PRINT "INT3-IN-RING0-NOW"
    int3
    int $0x80
    PRINT "kite-guest: ERROR: still running after INT3 / INT 0x80"
    jmp spin_forever

user_main:                          /* never reached */
    ret
