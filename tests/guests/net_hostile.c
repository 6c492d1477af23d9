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

#include "virtio_guest.h"

#define VIRTIO_NET_ID   0x1041

#define QSIZE       16
#define HDR_LEN     12
#define FRAME_ADDR  0x210000u       /* header + frame to send */
#define FRAME_LEN   (HDR_LEN + 60)
#define BIG_ADDR    0x300000u       /* 16 KiB, zero, for the oversized frame */
#define BIG_CHUNK   0x4000u
#define RXBUF_ADDR  0x220000u       /* receive buffers */

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
