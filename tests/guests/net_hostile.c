/* net_hostile.c - a hostile virtio-net driver (ring 3, polling only).
 *
 * Built with net_hostile_entry.S (common.S: PVH entry, GDT/TSS, SYSEXIT to
 * ring 3 with IOPL 3, paging off so linear == guest-physical) into
 * net_hostile.elf; tests/hostile_net.rs runs it with a TAP in a network
 * namespace. Structure as in virtio_hostile.c: PCI scan via 0xCF8/0xCFC,
 * kite's fixed BAR 0 layout, completions found by polling the used ring with
 * a bounded TSC spin.
 *
 * Assumes 128 MiB of RAM and the NIC as the first virtio-net function
 * (vendor 0x1af4, device 0x1041) on PCI bus 0. Features: VIRTIO_F_VERSION_1
 * only (12-byte virtio_net_hdr, one receive chain per frame).
 *
 * Output on COM1, one line per event, parsed by the test:
 *   SETUP status=<hex>
 *   TX <name> len=<n> [id=<n>]      a transmit chain came back
 *   RX <name> len=<n> [id=<n>]      a receive chain came back
 *   NO-COMPLETION <name>            nothing in the used ring within the spin
 *   NET-HOSTILE-DONE                then ACPI power-off (port 0x600 <- 0x34)
 *
 * Cases:
 *  tx-valid       a 12-byte zero header + 60-byte broadcast frame
 *  tx-loop        desc 0 -> 1 -> 0 -> ...
 *  tx-hole        the frame at 0xF0000000 (the MMIO hole)
 *  tx-writable    the frame device-writable
 *  tx-empty       a single 0-byte descriptor
 *  tx-oversized   200 KiB over 13 descriptors of 16 KiB (the same buffer)
 *  tx-hdr-only    just the 12-byte header
 *  tx-after-bad   a valid frame again
 *  rx-readable, rx-hole, rx-tiny (4 bytes): hostile receive buffers, used
 *                 up (empty) by frames the host sends to the TAP
 *  rx-valid       a 2048-byte writable buffer: receives a frame
 *  tx-final       a valid frame: the queue still works
 */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define COM1        0x3f8
#define ACPI_SLEEP  0x600
#define ACPI_S5     0x34
#define PCI_ADDR    0xcf8
#define PCI_DATA    0xcfc
#define HOLE        0xf0000000ULL

#define VIRTIO_VENDOR   0x1af4
#define VIRTIO_NET_ID   0x1041
#define BAR_COMMON      0x0000
#define BAR_NOTIFY      0x3000
#define NOTIFY_MULT     4

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

#define F_VERSION_1 (1ULL << 32)

#define D_NEXT      1
#define D_WRITE     2

#define QSIZE       16
#define HDR_LEN     12
#define FRAME_ADDR  0x210000u       /* header + frame to send */
#define FRAME_LEN   (HDR_LEN + 60)
#define BIG_ADDR    0x300000u       /* 16 KiB, zero, for the oversized frame */
#define BIG_CHUNK   0x4000u
#define RXBUF_ADDR  0x220000u       /* receive buffers */

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

/* One virtqueue: rings at fixed addresses, our indices. */
struct vq {
    u32 base; /* descriptors at base, avail at +0x1000, used at +0x2000 */
    u32 notify;
    u16 avail_idx;
    u16 used_seen;
};

static struct vq rxq = {0x200000u, 0, 0, 0};
static struct vq txq = {0x204000u, 0, 0, 0};

#define DESC(q)  ((volatile struct desc *)(q)->base)
#define AVAIL(q) ((volatile struct avail *)((q)->base + 0x1000))
#define USED(q)  ((volatile struct used *)((q)->base + 0x2000))

#define barrier() __asm__ volatile("" ::: "memory")

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

static void putc_(char c) { outb(COM1, (u8)c); }

static void puts_(const char *s)
{
    while (*s)
        putc_(*s++);
}

static void put_dec(u32 v)
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

static void put_hex(u64 v)
{
    int shift = 60;
    puts_("0x");
    while (shift > 0 && ((v >> shift) & 0xf) == 0)
        shift -= 4;
    for (; shift >= 0; shift -= 4)
        putc_("0123456789abcdef"[(v >> shift) & 0xf]);
}

static __attribute__((noreturn)) void poweroff(void)
{
    outb(ACPI_SLEEP, ACPI_S5);
    for (;;)
        cpu_relax();
}

static u32 cfg_read(u32 slot, u32 reg)
{
    outl(PCI_ADDR, 0x80000000u | slot << 11 | (reg & 0xfc));
    return inl(PCI_DATA);
}

static void cfg_write(u32 slot, u32 reg, u32 v)
{
    outl(PCI_ADDR, 0x80000000u | slot << 11 | (reg & 0xfc));
    outl(PCI_DATA, v);
}

static u32 bar;

static u8 r8(u32 off) { return *(volatile u8 *)(bar + off); }
static u16 r16(u32 off) { return *(volatile u16 *)(bar + off); }
static u32 r32(u32 off) { return *(volatile u32 *)(bar + off); }
static void w8(u32 off, u8 v) { *(volatile u8 *)(bar + off) = v; }
static void w16(u32 off, u16 v) { *(volatile u16 *)(bar + off) = v; }
static void w32(u32 off, u32 v) { *(volatile u32 *)(bar + off) = v; }
static void w64(u32 off, u64 v)
{
    w32(off, (u32)v);
    w32(off + 4, (u32)(v >> 32));
}

static int find_device(void)
{
    for (u32 slot = 1; slot < 32; slot++) {
        u32 id = cfg_read(slot, 0);
        if (id != (VIRTIO_NET_ID << 16 | VIRTIO_VENDOR))
            continue;
        u32 lo = cfg_read(slot, 0x10), hi = cfg_read(slot, 0x14);
        if ((lo & 0x6) != 0x4 || hi != 0) {
            puts_("BAR0 not a 64-bit BAR below 4 GiB\n");
            return 0;
        }
        bar = lo & ~0xfu;
        u32 cmd = cfg_read(slot, 0x04) & 0xffff;
        cfg_write(slot, 0x04, cmd | 0x6); /* memory space | bus master */
        puts_("VIRTIO-NET slot ");
        put_dec(slot);
        puts_(" bar ");
        put_hex(bar);
        puts_("\n");
        return 1;
    }
    return 0;
}

static void clear(u32 addr, u32 len)
{
    void *p = (void *)addr;
    u32 n = len / 4;
    __asm__ volatile("rep stosl" : "+D"(p), "+c"(n) : "a"(0) : "memory");
}

static void queue_setup(u16 index, struct vq *q)
{
    clear(q->base, 0x3000);
    q->avail_idx = 0;
    q->used_seen = 0;
    w16(C_QSELECT, index);
    w16(C_QSIZE, QSIZE);
    w16(C_QMSIX, 0xffff);
    w64(C_QDESC, q->base);
    w64(C_QAVAIL, q->base + 0x1000);
    w64(C_QUSED, q->base + 0x2000);
    w16(C_QENABLE, 1);
    q->notify = bar + BAR_NOTIFY + (u32)r16(C_QNOTIFY) * NOTIFY_MULT;
}

static u8 setup(void)
{
    w8(C_STATUS, 0);
    for (int i = 0; i < 1000 && r8(C_STATUS) != 0; i++)
        cpu_relax();
    w8(C_STATUS, S_ACK);
    w8(C_STATUS, S_ACK | S_DRIVER);
    w32(C_DFSELECT, 1);
    u32 offered_hi = r32(C_DF);
    w32(C_GFSELECT, 0);
    w32(C_GF, 0);
    w32(C_GFSELECT, 1);
    w32(C_GF, (u32)(F_VERSION_1 >> 32));
    w8(C_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    queue_setup(0, &rxq);
    queue_setup(1, &txq);
    w8(C_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    u8 got = r8(C_STATUS);
    puts_("SETUP offered-hi=");
    put_hex(offered_hi);
    puts_(" status=");
    put_hex(got);
    puts_("\n");
    return got;
}

static void d(struct vq *q, int i, u64 addr, u32 len, u16 flags, u16 next)
{
    volatile struct desc *t = DESC(q);
    t[i].addr = addr;
    t[i].len = len;
    t[i].flags = flags;
    t[i].next = next;
}

static void post(struct vq *q, u16 head)
{
    AVAIL(q)->ring[q->avail_idx % QSIZE] = head;
    barrier();
    q->avail_idx++;
    AVAIL(q)->idx = q->avail_idx;
    barrier();
}

static void notify(struct vq *q) { *(volatile u16 *)q->notify = 0; }

/* Waits for the next used entry of `q` and prints it as `kind name`. */
static int wait_used(struct vq *q, const char *kind, const char *name, int head, u64 timeout)
{
    u64 start = rdtsc();
    while (USED(q)->idx == q->used_seen) {
        if (rdtsc() - start > timeout) {
            puts_("NO-COMPLETION ");
            puts_(name);
            puts_("\n");
            return 0;
        }
        cpu_relax();
    }
    barrier();
    volatile struct used_elem *e = &USED(q)->ring[q->used_seen % QSIZE];
    u32 id = e->id, len = e->len;
    q->used_seen++;
    puts_(kind);
    puts_(name);
    puts_(" len=");
    put_dec(len);
    if ((int)id != head) {
        puts_(" id=");
        put_dec(id);
    }
    puts_("\n");
    return 1;
}

static int tx(const char *name, int head)
{
    post(&txq, (u16)head);
    notify(&txq);
    return wait_used(&txq, "TX ", name, head, TIMEOUT_CYCLES);
}

/* The frame: zero virtio_net_hdr, broadcast Ethernet frame of a local
 * ethertype (0x88b5), payload "KITE-NET-HOSTILE" then zeros. */
static void make_frame(void)
{
    static const u8 eth[14] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0x00,
                               0x00, 0x00, 0x00, 0x01, 0x88, 0xb5};
    clear(FRAME_ADDR, 0x100);
    memcpy((void *)(FRAME_ADDR + HDR_LEN), eth, sizeof(eth));
    memcpy((void *)(FRAME_ADDR + HDR_LEN + 14), "KITE-NET-HOSTILE", 16);
}

static void tx_valid(const char *name)
{
    d(&txq, 0, FRAME_ADDR, FRAME_LEN, 0, 0);
    tx(name, 0);
}

static void tx_cases(void)
{
    tx_valid("tx-valid");

    d(&txq, 0, FRAME_ADDR, HDR_LEN, D_NEXT, 1);
    d(&txq, 1, FRAME_ADDR + HDR_LEN, 60, D_NEXT, 0);
    tx("tx-loop", 0);

    d(&txq, 0, HOLE, FRAME_LEN, 0, 0);
    tx("tx-hole", 0);

    d(&txq, 0, FRAME_ADDR, FRAME_LEN, D_WRITE, 0);
    tx("tx-writable", 0);

    d(&txq, 0, FRAME_ADDR, 0, 0, 0);
    tx("tx-empty", 0);

    /* 12 + 13 * 16 KiB: header, then 13 chunks (descriptors 1..13). */
    d(&txq, 0, FRAME_ADDR, HDR_LEN, D_NEXT, 1);
    for (int i = 1; i <= 13; i++)
        d(&txq, i, BIG_ADDR, BIG_CHUNK, i < 13 ? D_NEXT : 0, (u16)(i + 1));
    tx("tx-oversized", 0);

    d(&txq, 0, FRAME_ADDR, HDR_LEN, 0, 0);
    tx("tx-hdr-only", 0);

    tx_valid("tx-after-bad");
}

static void rx_cases(void)
{
    /* Three hostile buffers; each frame from the host uses one up. */
    d(&rxq, 0, RXBUF_ADDR, 2048, 0, 0);      /* device-readable */
    d(&rxq, 1, HOLE, 2048, D_WRITE, 0);      /* outside RAM */
    d(&rxq, 2, RXBUF_ADDR + 0x1000, 4, D_WRITE, 0); /* smaller than the header */
    post(&rxq, 0);
    post(&rxq, 1);
    post(&rxq, 2);
    notify(&rxq);
    wait_used(&rxq, "RX ", "rx-readable", 0, 4 * TIMEOUT_CYCLES);
    wait_used(&rxq, "RX ", "rx-hole", 1, 4 * TIMEOUT_CYCLES);
    wait_used(&rxq, "RX ", "rx-tiny", 2, 4 * TIMEOUT_CYCLES);

    d(&rxq, 3, RXBUF_ADDR + 0x2000, 2048, D_WRITE, 0);
    post(&rxq, 3);
    notify(&rxq);
    wait_used(&rxq, "RX ", "rx-valid", 3, 4 * TIMEOUT_CYCLES);
}

void user_main(void)
{
    puts_("NET-HOSTILE start\n");
    if (!find_device()) {
        puts_("NET-HOSTILE no virtio-net device\n");
        poweroff();
    }
    if ((setup() & 0x4f) != 0x0f) {
        puts_("NET-HOSTILE setup failed\n");
        poweroff();
    }
    make_frame();
    puts_("PHASE tx\n");
    tx_cases();
    puts_("PHASE rx\n");
    rx_cases();
    puts_("PHASE final\n");
    tx_valid("tx-final");
    puts_("NET-HOSTILE-DONE\n");
    poweroff();
}
