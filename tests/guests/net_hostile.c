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

static struct vq rxq = {.base = 0x200000u};
static struct vq txq = {.base = 0x204000u};

static int find_device(void)
{
    for (u32 slot = 1; slot < 32; slot++) {
        u32 id = cfg_read(slot, 0);
        if (id != (VIRTIO_NET_ID << 16 | VIRTIO_VENDOR))
            continue;
        if (!map_bar0(slot))
            return 0;
        puts_("VIRTIO-NET slot ");
        put_dec(slot);
        puts_(" bar ");
        put_hex(bar);
        puts_("\n");
        return 1;
    }
    return 0;
}

static void queue_setup(u16 index, struct vq *q)
{
    fill(q->base, 0, 0x3000);
    q->size = QSIZE;
    q->avail_idx = 0;
    q->used_seen = 0;
    w16(C_QSELECT, index);
    q->notify = queue_enable(QSIZE, q->base, q->base + 0x1000, q->base + 0x2000);
}

static u8 setup(void)
{
    reset_device();
    u64 offered = init_start();
    set_features(F_VERSION_1);
    w8(C_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    queue_setup(0, &rxq);
    queue_setup(1, &txq);
    w8(C_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    u8 got = r8(C_STATUS);
    puts_("SETUP offered-hi=");
    put_hex(offered >> 32);
    puts_(" status=");
    put_hex(got);
    puts_("\n");
    return got;
}

static void d(struct vq *q, int i, u64 addr, u32 len, u16 flags, u16 next)
{
    set_desc(VQ_DESC(q), i, addr, len, flags, next);
}

/* Waits for the next used entry of `q` and prints it as `kind name`. */
static void wait_used(struct vq *q, const char *kind, const char *name, int head, u64 timeout)
{
    u32 id, len;
    if (!vq_wait_used(q, name, timeout, &id, &len))
        return;
    puts_(kind);
    puts_(name);
    put_used(len, id, head);
}

static void tx(const char *name, int head)
{
    vq_post(&txq, (u16)head);
    vq_notify(&txq);
    wait_used(&txq, "TX ", name, head, TIMEOUT_CYCLES);
}

/* The frame: zero virtio_net_hdr, broadcast Ethernet frame of a local
 * ethertype (0x88b5), payload "KITE-NET-HOSTILE" then zeros. */
static void make_frame(void)
{
    static const u8 eth[14] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0x00,
                               0x00, 0x00, 0x00, 0x01, 0x88, 0xb5};
    fill(FRAME_ADDR, 0, 0x100);
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
    vq_post(&rxq, 0);
    vq_post(&rxq, 1);
    vq_post(&rxq, 2);
    vq_notify(&rxq);
    wait_used(&rxq, "RX ", "rx-readable", 0, 4 * TIMEOUT_CYCLES);
    wait_used(&rxq, "RX ", "rx-hole", 1, 4 * TIMEOUT_CYCLES);
    wait_used(&rxq, "RX ", "rx-tiny", 2, 4 * TIMEOUT_CYCLES);

    d(&rxq, 3, RXBUF_ADDR + 0x2000, 2048, D_WRITE, 0);
    vq_post(&rxq, 3);
    vq_notify(&rxq);
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
