/* virtio_guest.h - what the ring-3 C test guests (virtio_hostile.c,
 * net_hostile.c) share: freestanding basics, COM1 output, ACPI power-off,
 * PCI config space over 0xCF8/0xCFC, the virtio-pci layout of kite's BAR 0,
 * device initialisation steps and polled split virtqueues. Included once by
 * each guest (one translation unit each), so the definitions live here;
 * helpers a guest may not use are `static inline`.
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

/* Fills `len` bytes (a multiple of 4) at `addr` (4-aligned) with `value`.
 * Speed matters: on the development machines the ring-3 code of these
 * paging-off guests is not run natively but at about a million instructions
 * per second; `rep stosl` fills 4 KiB some 14 times faster than a loop
 * (measured: ~1 M against ~14 M TSC cycles), so buffers are small and
 * filled with it. */
static inline void fill(u32 addr, u8 value, u32 len)
{
    void *p = (void *)addr;
    u32 n = len / 4;
    __asm__ volatile("rep stosl" : "+D"(p), "+c"(n) : "a"(value * 0x01010101u) : "memory");
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

/* Points `bar` at `slot`'s BAR 0 and turns on memory decoding and bus
 * mastering. Returns 0 (and says why) if BAR 0 is not the 64-bit memory BAR
 * below 4 GiB that kite sets up, which these 32-bit guests need. */
static inline int map_bar0(u32 slot)
{
    u32 lo = cfg_read(slot, 0x10), hi = cfg_read(slot, 0x14);
    if ((lo & 0x6) != 0x4 || hi != 0) {
        puts_("BAR0 not a 64-bit BAR below 4 GiB: ");
        put_hex((u64)hi << 32 | lo);
        puts_("\n");
        return 0;
    }
    bar = lo & ~0xfu;
    u32 cmd = cfg_read(slot, 0x04) & 0xffff;
    cfg_write(slot, 0x04, cmd | 0x6); /* memory space | bus master */
    return 1;
}

/* ---- device initialisation (virtio 1.x, 3.1.1) ------------------------ */

/* Writes 0 to device_status and waits for it to read back 0. */
static inline void reset_device(void)
{
    w8(C_STATUS, 0);
    for (int i = 0; i < 1000 && r8(C_STATUS) != 0; i++)
        cpu_relax();
}

/* ACKNOWLEDGE, DRIVER; returns the 64 feature bits the device offers. */
static inline u64 init_start(void)
{
    w8(C_STATUS, S_ACK);
    w8(C_STATUS, S_ACK | S_DRIVER);
    w32(C_DFSELECT, 0);
    u64 offered = r32(C_DF);
    w32(C_DFSELECT, 1);
    return offered | (u64)r32(C_DF) << 32;
}

static inline void set_features(u64 features)
{
    w32(C_GFSELECT, 0);
    w32(C_GF, (u32)features);
    w32(C_GFSELECT, 1);
    w32(C_GF, (u32)(features >> 32));
}

/* The notification address of the selected queue. */
static inline u32 queue_notify_addr(void) { return bar + BAR_NOTIFY + (u32)r16(C_QNOTIFY) * NOTIFY_MULT; }

/* Gives the selected queue `size` entries and its rings, and enables it;
 * returns its notification address. */
static inline u32 queue_enable(u16 size, u64 desc, u64 avail, u64 used)
{
    w16(C_QSIZE, size);
    w16(C_QMSIX, 0xffff); /* no MSI-X vector: we poll */
    w64(C_QDESC, desc);
    w64(C_QAVAIL, avail);
    w64(C_QUSED, used);
    w16(C_QENABLE, 1);
    return queue_notify_addr();
}

/* ---- the driver's side of a split virtqueue ----------------------------- */

/* Rings at fixed guest-physical addresses: descriptors at `base`, the
 * available ring at base + 0x1000, the used ring at base + 0x2000. */
struct vq {
    u32 base;
    u32 notify;     /* notification address */
    u16 size;       /* entries, as given to the device */
    u16 avail_idx;  /* our copy of avail.idx */
    u16 used_seen;  /* used entries consumed so far */
};

#define VQ_DESC(q)  ((volatile struct desc *)(q)->base)
#define VQ_AVAIL(q) ((volatile struct avail *)((q)->base + 0x1000))
#define VQ_USED(q)  ((volatile struct used *)((q)->base + 0x2000))

static inline void set_desc(volatile struct desc *table, int i, u64 addr, u32 len, u16 flags,
                            u16 next)
{
    table[i].addr = addr;
    table[i].len = len;
    table[i].flags = flags;
    table[i].next = next;
}

/* Makes the chain at `head` available (without a notification). */
static inline void vq_post(struct vq *q, u16 head)
{
    VQ_AVAIL(q)->ring[q->avail_idx % q->size] = head;
    barrier();
    q->avail_idx++;
    VQ_AVAIL(q)->idx = q->avail_idx;
    barrier();
}

static inline void vq_notify(struct vq *q) { *(volatile u16 *)q->notify = 0; }

/* Waits up to `timeout` TSC cycles for the next used entry of `q`. On a
 * timeout prints "NO-COMPLETION <name>" and returns 0. */
static inline int vq_wait_used(struct vq *q, const char *name, u64 timeout, u32 *id, u32 *len)
{
    u64 start = rdtsc();
    while (VQ_USED(q)->idx == q->used_seen) {
        if (rdtsc() - start > timeout) {
            puts_("NO-COMPLETION ");
            puts_(name);
            puts_("\n");
            return 0;
        }
        cpu_relax();
    }
    barrier();
    volatile struct used_elem *e = &VQ_USED(q)->ring[q->used_seen % q->size];
    *id = e->id;
    *len = e->len;
    q->used_seen++;
    return 1;
}

/* Ends a completion line: " len=<n>", " id=<n>" if the used id is not the
 * head submitted, newline. */
static inline void put_used(u32 len, u32 id, int head)
{
    puts_(" len=");
    put_dec(len);
    if ((int)id != head) {
        puts_(" id=");
        put_dec(id);
    }
    puts_("\n");
}

#endif
