/* virtio_guest.h - what the ring-3 C test guests (virtio_hostile.c,
 * net_hostile.c) share: freestanding basics, COM1 output, ACPI power-off,
 * PCI config space over 0xCF8/0xCFC, and the virtio-pci layout of kite's
 * BAR 0. Included once by each guest (one translation unit each), so the
 * definitions live here; helpers a guest may not use are `static inline`.
 */
#ifndef VIRTIO_GUEST_H
#define VIRTIO_GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

/* ---- platform -------------------------------------------------------- */
#define COM1        0x3f8
#define ACPI_SLEEP  0x600
#define ACPI_S5     0x34
#define PCI_ADDR    0xcf8
#define PCI_DATA    0xcfc
#define HOLE        0xf0000000ULL   /* no RAM and no device: the MMIO hole */

/* ---- virtio-pci (kite's fixed layout of BAR 0, announced by capabilities) */
#define VIRTIO_VENDOR   0x1af4
#define BAR_COMMON      0x0000
#define BAR_DEVCFG      0x2000
#define BAR_NOTIFY      0x3000
#define NOTIFY_MULT     4

/* struct virtio_pci_common_cfg */
#define C_DFSELECT  0x00
#define C_DF        0x04
#define C_GFSELECT  0x08
#define C_GF        0x0c
#define C_STATUS    0x14
#define C_QSELECT   0x16
#define C_QSIZE     0x18
#define C_QMSIX     0x1a
#define C_QENABLE   0x1c
#define C_QNOTIFY   0x1e
#define C_QDESC     0x20
#define C_QAVAIL    0x28
#define C_QUSED     0x30

#define S_ACK         0x01
#define S_DRIVER      0x02
#define S_DRIVER_OK   0x04
#define S_FEATURES_OK 0x08
#define S_NEEDS_RESET 0x40

#define F_VERSION_1 (1ULL << 32)

#define D_NEXT      1
#define D_WRITE     2

/* Spin this many TSC cycles for a completion (~0.6-1 s on usual hosts). */
#define TIMEOUT_CYCLES (1ULL << 31)

struct desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};

struct avail {
    u16 flags;
    u16 idx;
    u16 ring[];
};

struct used_elem {
    u32 id;
    u32 len;
};

struct used {
    u16 flags;
    u16 idx;
    struct used_elem ring[];
};

#define barrier() __asm__ volatile("" ::: "memory")

/* ---- freestanding basics ---------------------------------------------- */

/* gcc may emit calls to these (only tiny uses here). Plain loops through
 * volatile pointers, so gcc cannot turn them into calls to themselves. */
void *memset(void *d, int c, unsigned n)
{
    volatile u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, unsigned n)
{
    volatile u8 *p = d;
    const u8 *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u32 inl(u16 port)
{
    u32 v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }

/* ---- COM1 output, power-off ------------------------------------------- */

static inline void putc_(char c) { outb(COM1, (u8)c); }

static inline void puts_(const char *s)
{
    while (*s)
        putc_(*s++);
}

static inline void put_dec(u32 v)
{
    char b[11];
    int i = 10;
    b[i] = 0;
    do {
        b[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    puts_(b + i);
}

static inline void put_hex(u64 v)
{
    int shift = 60;
    puts_("0x");
    while (shift > 0 && ((v >> shift) & 0xf) == 0)
        shift -= 4;
    for (; shift >= 0; shift -= 4)
        putc_("0123456789abcdef"[(v >> shift) & 0xf]);
}

static inline __attribute__((noreturn)) void poweroff(void)
{
    outb(ACPI_SLEEP, ACPI_S5);
    for (;;)
        cpu_relax();
}

/* ---- PCI config space (mechanism #1: ports 0xCF8/0xCFC) -------------- */

static inline u32 cfg_read(u32 slot, u32 reg)
{
    outl(PCI_ADDR, 0x80000000u | slot << 11 | (reg & 0xfc));
    return inl(PCI_DATA);
}

static inline void cfg_write(u32 slot, u32 reg, u32 v)
{
    outl(PCI_ADDR, 0x80000000u | slot << 11 | (reg & 0xfc));
    outl(PCI_DATA, v);
}

/* ---- the device's BAR 0 ------------------------------------------------ */

static u32 bar; /* guest-physical; paging is off, so also the address to use */

static inline u8 r8(u32 off) { return *(volatile u8 *)(bar + off); }
static inline u16 r16(u32 off) { return *(volatile u16 *)(bar + off); }
static inline u32 r32(u32 off) { return *(volatile u32 *)(bar + off); }
static inline void w8(u32 off, u8 v) { *(volatile u8 *)(bar + off) = v; }
static inline void w16(u32 off, u16 v) { *(volatile u16 *)(bar + off) = v; }
static inline void w32(u32 off, u32 v) { *(volatile u32 *)(bar + off) = v; }
static inline void w64(u32 off, u64 v)
{
    w32(off, (u32)v);
    w32(off + 4, (u32)(v >> 32));
}

#endif
