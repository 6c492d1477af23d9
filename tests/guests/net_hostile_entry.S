/* net_hostile_entry.S - entry of net_hostile.elf: the shared PVH entry,
 * GDT/TSS setup and drop to ring 3 (common.S). common.S then calls user_main,
 * which lives in net_hostile.c and runs entirely in ring 3 with IOPL 3
 * (see that file for what the guest does). */
#include "common.S"

/* Linked with a C object that has the marker: say the stack is not executable. */
    .section .note.GNU-stack, "", @progbits
