/* serial_flood.elf - floods the COM1 UART from ring 3, forever.
 * Prints READY and SERIAL-FLOOD-NOW, then writes lines of 79 'x' followed by
 * '\n' to port 0x3f8 (THR) in a tight loop, as fast as the VMM takes them
 * (every byte is a port-I/O exit). It never powers off.
 * The VMM should: stay responsive (API: info, pause, resume, shutdown,
 * delete; serial output to file/tty keeps up or drops, but never blocks the
 * VMM), and be able to stop the VM at any moment. */
#include "common.S"

user_main:
    PRINT "READY"
    PRINT "SERIAL-FLOOD-NOW"
    mov $COM1, %dx
1:  mov $79, %ecx
    mov $'x', %al
2:  out %al, %dx
    dec %ecx
    jnz 2b
    mov $10, %al
    out %al, %dx
    jmp 1b
