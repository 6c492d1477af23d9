/* virtio_hostile.c - a hostile virtio-blk driver (ring 3, polling only).
 *
 * Built with virtio_hostile_entry.S (common.S: PVH entry, GDT/TSS, SYSEXIT to
 * ring 3 with IOPL 3, paging off so linear == guest-physical) into
 * virtio_hostile.elf; tests/hostile_virtio.rs runs it. All of this code runs
 * in ring 3: port I/O (COM1, PCI config 0xCF8/0xCFC, ACPI) is allowed by
 * IOPL 3 and the device's BAR is plain MMIO at its guest-physical address.
 * No interrupts: completions are found by polling the used ring, with a
 * bounded spin (about 0.6-1 s of TSC cycles).
 *
 * Assumes a VM with 128 MiB of RAM (RAM_END) and the disk as the first
 * virtio-blk function (vendor 0x1af4, device 0x1042) on PCI bus 0.
 *
 * Output on COM1, one line per event, parsed by the test:
 *   SETUP <name> offered=<hex> max=<n> qsize=<n> status=<hex>
 *   SETUP <name> features-refused status=<hex>   (FEATURES_OK did not stick)
 *   REQ <name> status=<s> len=<n>   a completion: s is the status byte (255 =
 *                                   never written, it is preset to 0xff) and
 *                                   n the used length; " id=<n>" is added if
 *                                   the used id is not the head submitted
 *   NO-COMPLETION <name>            nothing in the used ring within the spin
 *   CHECK <name> OK|FAIL            guest-side checks of buffers
 *   HOSTILE-DONE                    then ACPI power-off (port 0x600 <- 0x34)
 *
 * Statuses: 0 OK, 1 IOERR, 2 UNSUPP. "No status" below means: the status
 * byte stays 255 and the request is either returned with used length 0 or
 * not returned at all. What the VMM must do in every case: stay up, keep
 * serving the API, never touch host memory or disk bytes outside the request,
 * never write the disk for a rejected request, and keep the queue usable.
 *
 * Phase 1: features VIRTIO_F_VERSION_1 only, queue 0 of QSIZE entries.
 *  a  valid requests: a-write (sector 1 <- "KITE-GOOD-WRITE"), a-read (read
 *     back, CHECK), a-getid, a-flush, a-read-last (last sector, all 0x5a)
 *                                                      -> OK
 *  b  descriptor loops:
 *     b-loop: desc 0 (header OUT) -> 1 (data) -> 0 -> ... both NEXT, no
 *       writable descriptor                            -> no status, no write
 *     b-loop-status: header -> data -> status(W) -> header again (a
 *       readable descriptor after a writable one)      -> IOERR (or no status)
 *     b-loop-self: header OUT sector 4 -> data "KITE-LOOP-WRITE" -> status(W)
 *       whose NEXT points at itself: a chain that never ends. It must be
 *       rejected (no write to sector 4), like QEMU does ("looped descriptor")
 *     b-next-oob: the header's NEXT points past the queue -> no status
 *  c  buffers outside guest RAM: OUT data at 0xF0000000 (MMIO hole), at
 *     0x7fff00000000 with 256 MiB, at 0xFFFFFFFFFFFFFF00 (wraps), straddling
 *     the end of RAM, IN data into the device's own BAR and into the hole
 *                                                      -> IOERR
 *     c-hdr-hole: header at 0xF0000000                 -> IOERR
 *     c-status-hole: status descriptor at 0xF0000000   -> no status
 *  d  wrong directions:
 *     d-status-readable: OUT whose status descriptor is device-readable
 *                                                      -> no status, no write
 *     d-in-data-readable: IN whose data is device-readable -> OK (0 bytes) or
 *       IOERR, and the buffer is not written
 *     d-out-data-writable: OUT whose data is device-writable -> OK (0 bytes)
 *       or IOERR, nothing written to the disk nor the buffer
 *     d-hdr-writable: header device-writable           -> IOERR
 *  e  wrong lengths:
 *     e-hdr-8: an 8-byte header descriptor, then 512 bytes of data (so the
 *       16-byte header continues into the data)        -> IOERR
 *     e-hdr-8-only: an 8-byte header and the status    -> IOERR
 *     e-out-100 / e-in-100: data of 100 bytes          -> IOERR
 *     e-out-max / e-in-max: data of 0xFFFFFFFF bytes (the chain is longer
 *       than 4 GiB)                                    -> IOERR or no status
 *     e-out-2g: data of 0x7FFFFE00 bytes (beyond RAM)  -> IOERR
 *     e-out-0: data of 0 bytes                         -> OK or IOERR
 *  f  sectors outside the disk (capacity from device config):
 *     f-write-cap (sector = capacity), f-write-straddle (2 sectors at
 *     capacity-1), f-write-ovf (0xFFFFFFFFFFFFFFF0), f-write-ovf2
 *     (0x007FFFFFFFFFFFFF: offset fits, end overflows), f-read-cap,
 *     f-read-ovf                                       -> IOERR, no write
 *  g  request types: g-type-55 and g-type-ffffffff     -> UNSUPP;
 *     g-write-zeroes, g-discard (features not negotiated, sector 5)
 *                                                      -> UNSUPP, no write
 *  h  indirect descriptors while VIRTIO_RING_F_INDIRECT_DESC is NOT
 *     negotiated (a protocol violation; the device may refuse or serve):
 *     h-ind-hole (table at 0xF0000000), h-ind-len40 (table length not a
 *     multiple of 16)                                  -> no status
 *     h-ind-unneg-valid (a well-formed indirect read)  -> anything but a crash
 *  i  available ring abuse:
 *     i-avail-jump: avail.idx += 1000 with nothing new in the ring
 *                                                      -> no completion
 *     i-after-jump: a valid read                       -> OK (the queue works)
 *     i-head-oob: a head index of 200 (queue of 16)    -> no status
 *     i-after-oob: a valid read                        -> OK
 * Phase 2: reset, features VERSION_1 | INDIRECT_DESC.
 *     h2-ind-valid: indirect read of sector 1          -> OK, CHECK
 *     h2-ind-hole, h2-ind-len40, h2-ind-len0, h2-ind-huge (0xFFFFFFF0 bytes),
 *     h2-ind-nested (INDIRECT inside the table)        -> no status
 *     h2-ind-loop: table entry 1 (status, W) -> entry 0 (header, R)
 *                                                      -> IOERR or no status
 *     h2-ind-data-hole: data in the table at 0xF0000000 -> IOERR
 * Phase 3 (k): bad setups, each followed by a reset. DRIVER_OK must not
 *     activate the device: NEEDS_RESET (0x40) is set or DRIVER_OK does not
 *     stick; FEATURES_OK must not stick for bad features:
 *     k-qsize-7, k-qsize-8000, k-qsize-0, k-desc-hole (descriptor table at
 *     0xF0000000), k-used-edge (used ring crossing the end of RAM)
 *                                                      -> not activated
 *     k-inactive: a request on the k-qsize-7 device    -> no completion
 *     k-no-version1, k-unknown-feature (bit 50)        -> features refused
 *     k-no-features-ok: DRIVER_OK without FEATURES_OK, then a request
 *                                                      -> no completion
 *     log flood: FAILED, and FEATURES_OK without VERSION_1, 1000 times each
 *       (with resets between)                  -> a bounded number of warnings
 * Phase 4 (j): reset and a clean setup, then:
 *     j-write (sector 2 <- "KITE-FINAL-WRITE"), j-read (CHECK), j-read-good
 *     (sector 1 still holds the first write)           -> OK
 *     l-frozen: queue registers written after DRIVER_OK (descriptor table
 *     moved to 0xF0000000, size 7, queue 0 disabled, through a bogus
 *     queue_select too) are ignored: a read          -> OK
 *  m  BAR 0 reprogrammed with memory decoding on: m-move (to 0xD0000000, the
 *     device and its notify address follow; a read -> OK), m-overlap (onto
 *     the rng's BAR, 1000 times: refused, the rng keeps its BAR; a read
 *     -> OK), the
 *     sizing protocol (all ones; reads back the size mask), m-restored (back
 *     at the original address; a read -> OK)
 */

#include "virtio_guest.h"

#define RAM_END     0x8000000ULL    /* 128 MiB; the test runs the VM with it */
#define VIRTIO_BLK_ID   0x1042

#define F_INDIRECT  (1ULL << 28)

#define D_INDIRECT  4

#define T_IN            0
#define T_OUT           1
#define T_FLUSH         4
#define T_GET_ID        8
#define T_DISCARD       11
#define T_WRITE_ZEROES  13

/* ---- guest-physical memory used (the image is at 1 MiB, far below) ---- */
#define QSIZE       16
#define FLOOD       1000
/* Queue 0, laid out as struct vq expects: descriptor table (16 * QSIZE
 * bytes), available ring, used ring. */
#define DESC_ADDR   0x200000u
#define AVAIL_ADDR  0x201000u
#define USED_ADDR   0x202000u
#define HDR_ADDR    0x203000u       /* request header */
#define STATUS_ADDR 0x203800u       /* status byte */
#define IND_ADDR    0x204000u       /* indirect descriptor table */
#define DATA_ADDR   0x210000u       /* data to write (BUF_LEN) */
#define RBUF_ADDR   0x220000u       /* read buffer (BUF_LEN) */
#define BUF_LEN     0x400u          /* the most any request here moves */
#define SECTOR      512

#define IND    ((volatile struct desc *)IND_ADDR)
#define STATUS (*(volatile u8 *)STATUS_ADDR)
#define BYTES(a) ((volatile u8 *)(a))

static int all_bytes(u32 addr, u8 value, u32 len)
{
    for (u32 i = 0; i < len; i++)
        if (BYTES(addr)[i] != value)
            return 0;
    return 1;
}

static int same(u32 addr, const char *s, u32 len)
{
    for (u32 i = 0; i < len; i++)
        if (BYTES(addr)[i] != (u8)s[i])
            return 0;
    return 1;
}

static u32 str_len(const char *s)
{
    u32 n = 0;
    while (s[n])
        n++;
    return n;
}

static void check(const char *name, int ok)
{
    puts_("CHECK ");
    puts_(name);
    puts_(ok ? " OK\n" : " FAIL\n");
}

/* ---- the device ---------------------------------------------------------- */

static u32 blk_slot;    /* PCI slot of the virtio-blk function */
static u32 other_bar;   /* BAR 0 of another virtio function (the rng), or 0 */
static u64 capacity;    /* sectors */
static struct vq q0 = {.base = DESC_ADDR}; /* queue 0, the only one used */

/* Finds the virtio-blk function and turns on memory decoding and bus
 * mastering. Returns 0 if there is none. */
static int find_device(void)
{
    for (u32 slot = 1; slot < 32; slot++) {
        u32 id = cfg_read(slot, 0);
        if (id == 0xffffffffu)
            continue;
        puts_("PCI slot ");
        put_dec(slot);
        puts_(" id ");
        put_hex(id);
        puts_("\n");
        if ((id & 0xffff) == VIRTIO_VENDOR && id != (VIRTIO_BLK_ID << 16 | VIRTIO_VENDOR) &&
            !other_bar && (cfg_read(slot, 0x10) & 0x6) == 0x4 && cfg_read(slot, 0x14) == 0)
            other_bar = cfg_read(slot, 0x10) & ~0xfu;
        if (id != (VIRTIO_BLK_ID << 16 | VIRTIO_VENDOR) || bar)
            continue;
        if (!map_bar0(slot))
            return 0;
        blk_slot = slot;
        puts_("VIRTIO-BLK slot ");
        put_dec(slot);
        puts_(" bar ");
        put_hex(bar);
        puts_(" command ");
        put_hex(cfg_read(slot, 0x04) & 0xffff);
        puts_("\n");
    }
    return bar != 0;
}

/* The driver side of initialisation (virtio 1.x, 3.1.1), with queue 0 at
 * `desc`/`avail`/`used` of `size` entries; the other queues stay disabled.
 * `ok_bits` is the status written at the end (normally FEATURES_OK |
 * DRIVER_OK). Prints a SETUP line; returns the device status read back. */
static u8 setup_with(const char *name, u64 features, u16 size, u64 desc, u64 avail, u64 used,
                     u8 ok_bits)
{
    reset_device();
    fill(DESC_ADDR, 0, sizeof(struct desc) * QSIZE); /* descriptor table */
    fill(AVAIL_ADDR, 0, 0x100);                      /* available ring */
    fill(USED_ADDR, 0, 0x100);                       /* used ring */
    q0.avail_idx = 0;
    q0.used_seen = 0;
    q0.size = size;

    u64 offered = init_start();
    set_features(features);
    u8 status = S_ACK | S_DRIVER;
    if (ok_bits & S_FEATURES_OK) {
        w8(C_STATUS, status | S_FEATURES_OK);
        u8 got = r8(C_STATUS);
        if (!(got & S_FEATURES_OK)) {
            puts_("SETUP ");
            puts_(name);
            puts_(" features-refused status=");
            put_hex(got);
            puts_("\n");
            return got;
        }
        status |= S_FEATURES_OK;
    }
    w16(C_QSELECT, 0);
    u16 max = r16(C_QSIZE);
    q0.notify = queue_enable(size, desc, avail, used);
    w8(C_STATUS, status | (ok_bits & S_DRIVER_OK));
    u8 got = r8(C_STATUS);
    capacity = r32(BAR_DEVCFG) | (u64)r32(BAR_DEVCFG + 4) << 32;
    puts_("SETUP ");
    puts_(name);
    puts_(" offered=");
    put_hex(offered);
    puts_(" max=");
    put_dec(max);
    puts_(" qsize=");
    put_dec(size);
    puts_(" status=");
    put_hex(got);
    puts_("\n");
    return got;
}

static u8 setup(const char *name, u64 features)
{
    return setup_with(name, features, QSIZE, DESC_ADDR, AVAIL_ADDR, USED_ADDR,
                      S_FEATURES_OK | S_DRIVER_OK);
}

/* ---- requests ------------------------------------------------------------ */

static void d(int i, u64 addr, u32 len, u16 flags, u16 next)
{
    set_desc(VQ_DESC(&q0), i, addr, len, flags, next);
}

static void header(u32 at, u32 type, u64 sector)
{
    volatile u32 *h = (volatile u32 *)at;
    h[0] = type;
    h[1] = 0;
    h[2] = (u32)sector;
    h[3] = (u32)(sector >> 32);
}

/* Fresh state for a request: clean descriptor table, status preset to 0xff,
 * the write data all 'H' (so a hostile write that reaches the disk shows),
 * the read buffer all 0xee. */
static void begin(void)
{
    fill(DESC_ADDR, 0, sizeof(struct desc) * QSIZE);
    fill(IND_ADDR, 0, 0x100);
    STATUS = 0xff;
    fill(DATA_ADDR, 'H', BUF_LEN);
    fill(RBUF_ADDR, 0xee, BUF_LEN);
}

/* Puts `head` in the available ring (unless head < 0: only a
 * notification), notifies, waits and prints REQ / NO-COMPLETION.
 * Returns the status byte if completed, -1 otherwise. */
static int run(const char *name, int head)
{
    u32 id, len;
    if (head >= 0)
        vq_post(&q0, (u16)head);
    vq_notify(&q0);
    if (!vq_wait_used(&q0, name, TIMEOUT_CYCLES, &id, &len))
        return -1;
    u8 status = STATUS;
    puts_("REQ ");
    puts_(name);
    puts_(" status=");
    put_dec(status);
    put_used(len, id, head);
    return status;
}

/* Into `table` from entry 0: header at HDR_ADDR (readable) -> data (dflags)
 * -> status (writable). */
static void chain(volatile struct desc *table, u64 data, u32 dlen, u16 dflags)
{
    set_desc(table, 0, HDR_ADDR, 16, D_NEXT, 1);
    set_desc(table, 1, data, dlen, dflags | D_NEXT, 2);
    set_desc(table, 2, STATUS_ADDR, 1, D_WRITE, 0);
}

/* A request of `type` on `sector` with one data descriptor. */
static int simple(const char *name, u32 type, u64 sector, u64 data, u32 dlen, u16 dflags)
{
    header(HDR_ADDR, type, sector);
    chain(VQ_DESC(&q0), data, dlen, dflags);
    return run(name, 0);
}

/* Fresh state and a valid chain (descriptors 0-2) writing DATA to sector 3,
 * for the caller to spoil one descriptor of. */
static void begin_spoiled_write(void)
{
    begin();
    header(HDR_ADDR, T_OUT, 3);
    chain(VQ_DESC(&q0), DATA_ADDR, SECTOR, 0);
}

/* A sector holding `tag` followed by zeros, at DATA_ADDR. */
static void tag_sector(const char *tag)
{
    fill(DATA_ADDR, 0, SECTOR);
    memcpy((void *)DATA_ADDR, tag, str_len(tag));
}

/* Reads `sector` into RBUF and checks it holds `tag` then zeros. */
static void read_tag(const char *name, u64 sector, const char *tag)
{
    begin();
    int s = simple(name, T_IN, sector, RBUF_ADDR, SECTOR, D_WRITE);
    u32 n = str_len(tag);
    check(name, s == 0 && same(RBUF_ADDR, tag, n) && all_bytes(RBUF_ADDR + n, 0, SECTOR - n));
}

static void write_tag(const char *name, u64 sector, const char *tag)
{
    begin();
    tag_sector(tag);
    simple(name, T_OUT, sector, DATA_ADDR, SECTOR, 0);
}

/* A valid read of sector 1 (holds the a-write tag once a-write is done). */
static void valid_read(const char *name) { read_tag(name, 1, "KITE-GOOD-WRITE"); }

/* After a case that may leave completions behind: wait, then consume
 * whatever the device returned meanwhile. */
static void resync(const char *name)
{
    u64 start = rdtsc();
    while (rdtsc() - start < TIMEOUT_CYCLES / 4)
        cpu_relax();
    u16 now = VQ_USED(&q0)->idx;
    if (now != q0.used_seen) {
        puts_("RESYNC ");
        puts_(name);
        puts_(" skipped=");
        put_dec((u16)(now - q0.used_seen));
        puts_("\n");
        q0.used_seen = now;
    }
}

/* ---- the cases ---------------------------------------------------------- */

static void case_a(void)
{
    write_tag("a-write", 1, "KITE-GOOD-WRITE");
    valid_read("a-read");

    begin();
    simple("a-getid", T_GET_ID, 0, RBUF_ADDR, 20, D_WRITE);

    begin();
    header(HDR_ADDR, T_FLUSH, 0);
    d(0, HDR_ADDR, 16, D_NEXT, 1);
    d(1, STATUS_ADDR, 1, D_WRITE, 0);
    run("a-flush", 0);

    begin();
    int s = simple("a-read-last", T_IN, capacity - 1, RBUF_ADDR, SECTOR, D_WRITE);
    check("a-read-last", s == 0 && all_bytes(RBUF_ADDR, 0x5a, SECTOR));
}

static void case_b(void)
{
    /* 0 -> 1 -> 0 -> ...: header and data, no status. */
    begin();
    header(HDR_ADDR, T_OUT, 3);
    d(0, HDR_ADDR, 16, D_NEXT, 1);
    d(1, DATA_ADDR, SECTOR, D_NEXT, 0);
    run("b-loop", 0);

    /* header -> data -> status -> header -> ... */
    begin_spoiled_write();
    d(2, STATUS_ADDR, 1, D_WRITE | D_NEXT, 0);
    run("b-loop-status", 0);

    /* header -> data -> status -> status -> status ...: well-formed until the
     * status descriptor, which then loops on itself forever. */
    begin();
    tag_sector("KITE-LOOP-WRITE");
    header(HDR_ADDR, T_OUT, 4);
    d(0, HDR_ADDR, 16, D_NEXT, 1);
    d(1, DATA_ADDR, SECTOR, D_NEXT, 2);
    d(2, STATUS_ADDR, 1, D_WRITE | D_NEXT, 2);
    run("b-loop-self", 0);

    /* header whose NEXT is beyond the descriptor table. */
    begin();
    header(HDR_ADDR, T_OUT, 3);
    d(0, HDR_ADDR, 16, D_NEXT, 200);
    run("b-next-oob", 0);
}

static void case_c(void)
{
    begin();
    simple("c-out-hole", T_OUT, 3, HOLE, SECTOR, 0);
    begin();
    simple("c-out-high", T_OUT, 3, 0x7fff00000000ULL, 0x10000000, 0);
    begin();
    simple("c-out-wrap", T_OUT, 3, 0xffffffffffffff00ULL, SECTOR, 0);
    begin();
    simple("c-out-edge", T_OUT, 3, RAM_END - 256, SECTOR, 0);

    begin();
    int s = simple("c-in-bar", T_IN, 0, bar + BAR_DEVCFG, SECTOR, D_WRITE);
    /* The device config must still read back the same capacity. */
    u64 cap = r32(BAR_DEVCFG) | (u64)r32(BAR_DEVCFG + 4) << 32;
    check("c-in-bar", s != 0 && cap == capacity);
    begin();
    simple("c-in-hole", T_IN, 0, HOLE, SECTOR, D_WRITE);

    begin_spoiled_write();
    d(0, HOLE, 16, D_NEXT, 1);
    run("c-hdr-hole", 0);

    begin_spoiled_write();
    d(2, HOLE, 1, D_WRITE, 0);
    run("c-status-hole", 0);
}

static void case_d(void)
{
    begin_spoiled_write();
    d(2, STATUS_ADDR, 1, 0, 0); /* status device-readable */
    run("d-status-readable", 0);

    begin();
    simple("d-in-data-readable", T_IN, 1, RBUF_ADDR, SECTOR, 0);
    check("d-in-data-readable", all_bytes(RBUF_ADDR, 0xee, SECTOR));

    begin();
    simple("d-out-data-writable", T_OUT, 3, DATA_ADDR, SECTOR, D_WRITE);
    check("d-out-data-writable", all_bytes(DATA_ADDR, 'H', SECTOR));

    begin();
    header(HDR_ADDR, T_OUT, 3);
    d(0, HDR_ADDR, 16, D_WRITE | D_NEXT, 1);
    d(1, STATUS_ADDR, 1, D_WRITE, 0);
    run("d-hdr-writable", 0);
}

static void case_e(void)
{
    /* 8-byte header: the device reads the sector from the data's first
     * 8 bytes ("HHHHHHHH", far outside the disk) and 504 bytes remain. */
    begin_spoiled_write();
    d(0, HDR_ADDR, 8, D_NEXT, 1);
    run("e-hdr-8", 0);

    begin();
    header(HDR_ADDR, T_OUT, 3);
    d(0, HDR_ADDR, 8, D_NEXT, 1);
    d(1, STATUS_ADDR, 1, D_WRITE, 0);
    run("e-hdr-8-only", 0);

    begin();
    simple("e-out-100", T_OUT, 3, DATA_ADDR, 100, 0);
    begin();
    simple("e-in-100", T_IN, 1, RBUF_ADDR, 100, D_WRITE);
    check("e-in-100", all_bytes(RBUF_ADDR, 0xee, 100));
    begin();
    simple("e-out-max", T_OUT, 3, DATA_ADDR, 0xffffffffu, 0);
    begin();
    simple("e-in-max", T_IN, 1, RBUF_ADDR, 0xffffffffu, D_WRITE);
    begin();
    simple("e-out-2g", T_OUT, 3, DATA_ADDR, 0x7ffffe00u, 0);
    begin();
    simple("e-out-0", T_OUT, 3, DATA_ADDR, 0, 0);
}

static void case_f(void)
{
    begin();
    simple("f-write-cap", T_OUT, capacity, DATA_ADDR, SECTOR, 0);
    begin();
    simple("f-write-straddle", T_OUT, capacity - 1, DATA_ADDR, 2 * SECTOR, 0);
    begin();
    simple("f-write-ovf", T_OUT, 0xfffffffffffffff0ULL, DATA_ADDR, SECTOR, 0);
    begin();
    simple("f-write-ovf2", T_OUT, 0x007fffffffffffffULL, DATA_ADDR, 2 * SECTOR, 0);
    begin();
    simple("f-read-cap", T_IN, capacity, RBUF_ADDR, SECTOR, D_WRITE);
    check("f-read-cap", all_bytes(RBUF_ADDR, 0xee, SECTOR));
    begin();
    simple("f-read-ovf", T_IN, 0xfffffffffffffff0ULL, RBUF_ADDR, SECTOR, D_WRITE);
    check("f-read-ovf", all_bytes(RBUF_ADDR, 0xee, SECTOR));
}

static void case_g(void)
{
    begin();
    simple("g-type-55", 0x55, 3, DATA_ADDR, SECTOR, 0);
    begin();
    simple("g-type-ffffffff", 0xffffffffu, 3, DATA_ADDR, SECTOR, 0);

    /* One discard / write-zeroes segment: sector 5, 1 sector, flags 0. */
    volatile u32 *seg = (volatile u32 *)DATA_ADDR;
    for (int zeroes = 1; zeroes >= 0; zeroes--) {
        begin();
        seg[0] = 5; /* sector, low half */
        seg[1] = 0;
        seg[2] = 1; /* num_sectors */
        seg[3] = 0; /* flags */
        simple(zeroes ? "g-write-zeroes" : "g-discard", zeroes ? T_WRITE_ZEROES : T_DISCARD, 0,
               DATA_ADDR, 16, 0);
    }
}

/* A well-formed indirect table at IND_ADDR: a read of sector 1 into RBUF. */
static void indirect_read_table(void)
{
    header(HDR_ADDR, T_IN, 1);
    chain(IND, RBUF_ADDR, SECTOR, D_WRITE);
}

/* That read, through a descriptor that gives the table `len` bytes. */
static int indirect_read(const char *name, u32 len)
{
    begin();
    indirect_read_table();
    d(0, IND_ADDR, len, D_INDIRECT, 0);
    return run(name, 0);
}

/* Indirect cases, named h-* before INDIRECT_DESC is negotiated, h2-* after. */
static void indirect_cases(int negotiated)
{
    const char *n_hole = negotiated ? "h2-ind-hole" : "h-ind-hole";
    const char *n_len40 = negotiated ? "h2-ind-len40" : "h-ind-len40";

    begin();
    d(0, HOLE, 48, D_INDIRECT, 0);
    run(n_hole, 0);

    indirect_read(n_len40, 40);

    if (!negotiated) {
        indirect_read("h-ind-unneg-valid", 48);
        return;
    }

    int s = indirect_read("h2-ind-valid", 48);
    check("h2-ind-valid",
          s == 0 && same(RBUF_ADDR, "KITE-GOOD-WRITE", 15) && all_bytes(RBUF_ADDR + 15, 0, SECTOR - 15));

    indirect_read("h2-ind-len0", 0);
    indirect_read("h2-ind-huge", 0xfffffff0u);

    begin();
    indirect_read_table();
    set_desc(IND, 0, IND_ADDR + 0x100, 48, D_INDIRECT, 0); /* nested */
    d(0, IND_ADDR, 48, D_INDIRECT, 0);
    run("h2-ind-nested", 0);

    begin();
    header(HDR_ADDR, T_OUT, 3);
    set_desc(IND, 0, HDR_ADDR, 16, D_NEXT, 1);
    set_desc(IND, 1, STATUS_ADDR, 1, D_WRITE | D_NEXT, 0);
    d(0, IND_ADDR, 32, D_INDIRECT, 0);
    run("h2-ind-loop", 0);

    begin();
    header(HDR_ADDR, T_OUT, 3);
    chain(IND, HOLE, SECTOR, 0);
    d(0, IND_ADDR, 48, D_INDIRECT, 0);
    run("h2-ind-data-hole", 0);
}

static void case_i(void)
{
    /* avail.idx jumps 1000 ahead; the ring holds nothing new. */
    begin();
    q0.avail_idx += 1000;
    VQ_AVAIL(&q0)->idx = q0.avail_idx;
    barrier();
    run("i-avail-jump", -1);
    resync("i-avail-jump");
    valid_read("i-after-jump");

    /* A head index beyond the queue. */
    begin();
    run("i-head-oob", 200);
    resync("i-head-oob");
    valid_read("i-after-oob");
}

/* Things a device may warn about, a thousand times each: the VMM's log must
 * not grow with them (the test counts its warnings). */
static void log_flood(void)
{
    for (int i = 0; i < FLOOD; i++) {
        w8(C_STATUS, 0x80); /* FAILED */
        reset_device();
    }
    for (int i = 0; i < FLOOD; i++) {
        /* Features without VERSION_1: FEATURES_OK is refused each time. */
        w32(C_GFSELECT, 1);
        w32(C_GF, 0);
        w8(C_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        reset_device();
    }
    puts_("FLOOD done status=");
    put_hex(r8(C_STATUS));
    puts_("\n");
}

static void case_k(void)
{
    setup_with("k-qsize-7", F_VERSION_1, 7, DESC_ADDR, AVAIL_ADDR, USED_ADDR,
               S_FEATURES_OK | S_DRIVER_OK);
    /* The device is not active: a request must not be served. */
    begin();
    simple("k-inactive", T_IN, 1, RBUF_ADDR, SECTOR, D_WRITE);

    setup_with("k-qsize-8000", F_VERSION_1, 0x8000, DESC_ADDR, AVAIL_ADDR, USED_ADDR,
               S_FEATURES_OK | S_DRIVER_OK);
    setup_with("k-qsize-0", F_VERSION_1, 0, DESC_ADDR, AVAIL_ADDR, USED_ADDR,
               S_FEATURES_OK | S_DRIVER_OK);
    setup_with("k-desc-hole", F_VERSION_1, QSIZE, HOLE, AVAIL_ADDR, USED_ADDR,
               S_FEATURES_OK | S_DRIVER_OK);
    /* used ring: 4 + 8 * 16 bytes starting 64 bytes before the end of RAM. */
    setup_with("k-used-edge", F_VERSION_1, QSIZE, DESC_ADDR, AVAIL_ADDR, RAM_END - 64,
               S_FEATURES_OK | S_DRIVER_OK);
    setup_with("k-no-version1", 0, QSIZE, DESC_ADDR, AVAIL_ADDR, USED_ADDR,
               S_FEATURES_OK | S_DRIVER_OK);
    setup_with("k-unknown-feature", F_VERSION_1 | 1ULL << 50, QSIZE, DESC_ADDR, AVAIL_ADDR,
               USED_ADDR, S_FEATURES_OK | S_DRIVER_OK);

    setup_with("k-no-features-ok", F_VERSION_1, QSIZE, DESC_ADDR, AVAIL_ADDR, USED_ADDR,
               S_DRIVER_OK);
    begin();
    simple("k-no-features-ok", T_IN, 1, RBUF_ADDR, SECTOR, D_WRITE);
    reset_device();
    puts_("RESET status=");
    put_hex(r8(C_STATUS));
    puts_("\n");
    log_flood();
}

/* Queue registers written while DRIVER_OK is set must be ignored. */
static void case_l(void)
{
    w16(C_QSELECT, 0);
    w64(C_QDESC, HOLE);
    w16(C_QSIZE, 7);
    w16(C_QENABLE, 0);
    w16(C_QSELECT, 0x1234); /* no such queue */
    w16(C_QSIZE, 7);
    w64(C_QDESC, HOLE);
    u16 bogus_size = r16(C_QSIZE);
    w16(C_QSELECT, 0);
    u32 desc_lo = r32(C_QDESC);
    puts_("L queue0 desc=");
    put_hex(desc_lo);
    puts_(" size=");
    put_dec(r16(C_QSIZE));
    puts_(" enable=");
    put_dec(r16(C_QENABLE));
    puts_(" bogus-queue-size=");
    put_dec(bogus_size);
    puts_("\n");
    valid_read("l-frozen");
}

/* Points our MMIO accessors at `addr` (where the BAR now is). */
static void use_bar(u32 addr)
{
    bar = addr;
    q0.notify = queue_notify_addr();
}

/* BAR 0 reprogrammed while memory decoding is on (a driver would turn it
 * off first): the device must follow to a free address, refuse an address
 * that overlaps another device, survive the sizing protocol, and keep its
 * queue (and its notification address) working wherever it ends up. */
static void case_m(void)
{
    u32 orig = bar;
    u32 moved = 0xd0000000u; /* free: in the PCI window, above kite's BARs */

    cfg_write(blk_slot, 0x10, moved);
    use_bar(moved);
    puts_("M moved status=");
    put_hex(r8(C_STATUS));
    puts_("\n");
    valid_read("m-move");

    if (other_bar) {
        /* Onto the rng's BAR: must be refused; the rng keeps its BAR (its
         * device config reads 0, not our capacity) and we stay put. */
        for (int i = 0; i < FLOOD; i++)
            cfg_write(blk_slot, 0x10, other_bar);
        u32 other_cfg = *(volatile u32 *)(other_bar + BAR_DEVCFG);
        puts_("M overlap status=");
        put_hex(r8(C_STATUS));
        puts_(" other-devcfg=");
        put_hex(other_cfg);
        puts_("\n");
        check("m-overlap-refused", r8(C_STATUS) == 0x0f && other_cfg != (u32)capacity);
        valid_read("m-overlap");
    }

    /* BAR sizing with decoding on: all ones into both halves. */
    cfg_write(blk_slot, 0x10, 0xffffffffu);
    cfg_write(blk_slot, 0x14, 0xffffffffu);
    u32 lo = cfg_read(blk_slot, 0x10), hi = cfg_read(blk_slot, 0x14);
    puts_("M sizing lo=");
    put_hex(lo);
    puts_(" hi=");
    put_hex(hi);
    puts_("\n");
    check("m-sizing", lo == 0xffff8004u && hi == 0xffffffffu);

    /* Back where the VMM put it. */
    cfg_write(blk_slot, 0x10, orig);
    cfg_write(blk_slot, 0x14, 0);
    use_bar(orig);
    puts_("M restored status=");
    put_hex(r8(C_STATUS));
    puts_("\n");
    valid_read("m-restored");
}

void user_main(void)
{
    puts_("VIRTIO-HOSTILE start\n");
    if (!find_device()) {
        puts_("VIRTIO-HOSTILE no virtio-blk device\n");
        poweroff();
    }

    /* Phase 1. */
    u8 s = setup("main", F_VERSION_1);
    if ((s & 0x4f) != 0x0f) {
        puts_("VIRTIO-HOSTILE setup failed\n");
        poweroff();
    }
    puts_("CAPACITY ");
    put_hex(capacity);
    puts_("\n");
    puts_("PHASE a\n");
    case_a();
    puts_("PHASE b\n");
    case_b();
    puts_("PHASE c\n");
    case_c();
    puts_("PHASE d\n");
    case_d();
    puts_("PHASE e\n");
    case_e();
    puts_("PHASE f\n");
    case_f();
    puts_("PHASE g\n");
    case_g();
    puts_("PHASE h\n");
    indirect_cases(0);
    puts_("PHASE i\n");
    case_i();

    /* Phase 2. */
    puts_("PHASE h2\n");
    setup("indirect", F_VERSION_1 | F_INDIRECT);
    indirect_cases(1);

    /* Phase 3. */
    puts_("PHASE k\n");
    case_k();

    /* Phase 4. */
    puts_("PHASE j\n");
    setup("final", F_VERSION_1);
    write_tag("j-write", 2, "KITE-FINAL-WRITE");
    read_tag("j-read", 2, "KITE-FINAL-WRITE");
    valid_read("j-read-good");
    puts_("PHASE l\n");
    case_l();
    puts_("PHASE m\n");
    case_m();

    puts_("HOSTILE-DONE\n");
    poweroff();
}
