/* poweroff.elf - clean ACPI power-off.
 * Prints READY and POWEROFF-NOW, then (from ring 3) writes 0x34 (S5) to the
 * ACPI sleep control port 0x600.
 * The VMM should: stop the VM as a normal guest-initiated shutdown (the
 * process exits / the VM goes to its shut-down state), not as a failure. */
#include "common.S"

user_main:
    PRINT "READY"
    PRINT "POWEROFF-NOW"
    jmp acpi_poweroff
