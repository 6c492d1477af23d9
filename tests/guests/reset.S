/* reset.elf - guest-initiated reset through the i8042 controller.
 * Prints READY and RESET-NOW, then (from ring 3) writes 0xfe (pulse reset
 * line) to port 0x64.
 * The VMM should: reset / reboot the VM (Cloud Hypervisor reloads the kernel
 * and starts it again, so READY appears once per boot), never crash. */
#include "common.S"

user_main:
    PRINT "READY"
    PRINT "RESET-NOW"
    jmp i8042_reset
