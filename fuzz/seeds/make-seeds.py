#!/usr/bin/env python3
"""Regenerates the seed inputs in fuzz/seeds/. The seeds are tracked in git;
run this only to change them (it overwrites seeds/qcow2_image/,
seeds/qcow2_header/, seeds/base.qcow2 and seeds/virtio_blk_queue/).

The qcow2 seeds are small images made by qemu-img and qemu-io.

Every image has a 1 MiB (or smaller) virtual disk and 512-byte to 8 KiB
clusters, so each file stays a few KiB and the whole corpus well under 1 MB.

qcow2_image seeds are the image files, some followed by a control trailer
(see fuzz_targets/qcow2_image.rs) that asks for reads, writes and
write-zeroes. qcow2_header seeds are an 8-byte big-endian file length and the
image's first cluster (what the block crate passes to Header::parse).

virtio_blk_queue seeds are virtqueues laid out as a Linux driver would lay
them out (see fuzz_targets/virtio_blk_queue.rs for the control block), each
holding a few requests of one kind: IN, OUT, FLUSH, GET_ID, DISCARD,
WRITE_ZEROES, an unknown type, a malformed chain, indirect descriptors.
"""
import os, shutil, struct, subprocess, sys, tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGE_DIR = os.path.join(HERE, "qcow2_image")
HEADER_DIR = os.path.join(HERE, "qcow2_header")
VIRTIO_BLK_DIR = os.path.join(HERE, "virtio_blk_queue")

OPS = 4  # keep in sync with qcow2_image.rs


def run(*args):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)


def trailer(flags, ops):
    """ops: up to OPS (kind, shift, offset, length/4) tuples."""
    ops = list(ops) + [(0, 0, 0, 0)] * (OPS - len(ops))
    out = bytes([flags])
    for kind, shift, offset, len4 in ops:
        out += struct.pack(">BBIH", kind, shift, offset, len4)
    return out


READ, WRITE, ZEROES, FLUSH = 0, 3, 6, 7
RETRY_RO, EXTEND = 4, 8


def main():
    tmp = tempfile.mkdtemp()
    try:
        images = []  # (name, path, trailer or None)

        def create(name, opts, size="1M", *, backing=None, qemu_io=(), trail=None):
            path = os.path.join(tmp, name)
            args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts]
            if backing:
                args += ["-u", "-b", backing[0], "-F", backing[1]]
            run(*args, path, size)
            for cmd in qemu_io:
                run("qemu-io", "-f", "qcow2", "-c", cmd, path)
            images.append((name, path, trail))
            return path

        # Empty images: v3 and v2, smallest clusters.
        create("v3-512.qcow2", "cluster_size=512",
               trail=trailer(0, [(WRITE, 0, 1000, 300), (READ, 0, 900, 200),
                                 (WRITE, 9, 700, 128), (FLUSH, 0, 0, 0)]))
        create("v2-512.qcow2", "compat=0.10,cluster_size=512",
               qemu_io=["write -P 0xaa 0 4k", "write -P 0x55 512k 1k"],
               trail=trailer(0, [(READ, 0, 0, 2048), (WRITE, 0, 100, 50),
                                 (ZEROES, 0, 4096, 256), (READ, 10, 512, 512)]))
        # Data, zero clusters (v3 only) and unaligned I/O, 4 KiB clusters.
        create("v3-4k-data.qcow2", "cluster_size=4096",
               qemu_io=["write -P 0x11 0 12k", "write -z 4k 4k",
                        "write -P 0x22 700k 5k", "write -z 900k 64k"],
               trail=trailer(0, [(READ, 0, 0, 4096), (WRITE, 0, 5000, 2000),
                                 (ZEROES | 8, 0, 700 * 1024, 1024), (FLUSH, 0, 0, 0)]))
        create("v3-8k.qcow2", "cluster_size=8192",
               qemu_io=["write -P 0x33 8k 8k"],
               trail=trailer(1, [(READ, 0, 8000, 1000), (WRITE, 0, 9000, 3000),
                                 (READ, 0, 4096, 4096)]))
        # Preallocated metadata: zero clusters that keep a host cluster.
        create("v3-512-prealloc.qcow2", "cluster_size=512,preallocation=metadata",
               size="16K",
               trail=trailer(0, [(WRITE, 0, 600, 100), (READ, 0, 0, 1024)]))
        # Backing files: the fuzz target puts base.raw (64 KiB) and
        # base.qcow2 (seeds/base.qcow2) next to the image it opens.
        create("v3-512-backing-raw.qcow2", "cluster_size=512", size="128K",
               backing=("base.raw", "raw"),
               trail=trailer(0, [(READ, 0, 60000, 2048), (WRITE, 0, 1000, 10),
                                 (READ, 0, 0, 4096), (ZEROES, 0, 2048, 1024)]))
        create("v2-512-backing-qcow2.qcow2", "compat=0.10,cluster_size=512", size="64K",
               backing=("base.qcow2", "qcow2"),
               trail=trailer(0, [(READ, 0, 0, 8192), (WRITE, 0, 4000, 100),
                                 (READ, 0, 3000, 1024)]))
        create("v3-512-backing-missing.qcow2", "cluster_size=512",
               backing=("missing.raw", "raw"))
        # Lazy refcounts, extra header extensions in qemu's own layout.
        create("v3-1k-lazy.qcow2", "cluster_size=1024,lazy_refcounts=on",
               qemu_io=["write -P 0x44 0 3k"],
               trail=trailer(0, [(WRITE, 0, 1024, 256), (READ, 0, 0, 1024)]))
        # Extended (sparse) to 8 MiB, where the one-cluster refcount table
        # of a 512-byte-cluster image ends: writes must grow the table.
        create("v3-512-grow.qcow2", "cluster_size=512",
               trail=trailer(EXTEND | (4 << 4), [(WRITE, 0, 0, 256), (WRITE, 0, 70000, 2000),
                                                 (FLUSH, 0, 0, 0), (READ, 0, 0, 1024)]))
        # Internal snapshot: refused read-write, so retry read-only.
        snap = create("v3-512-snapshot.qcow2", "cluster_size=512",
                      qemu_io=["write -P 0x66 0 1k"],
                      trail=trailer(RETRY_RO, [(READ, 0, 0, 512), (WRITE, 0, 0, 16)]))
        run("qemu-img", "snapshot", "-c", "s1", snap)
        # Compressed clusters (which kite refuses to read).
        raw = os.path.join(tmp, "data.raw")
        with open(raw, "wb") as f:
            f.write(bytes(range(256)) * 64)
        comp = os.path.join(tmp, "v3-512-compressed.qcow2")
        run("qemu-img", "convert", "-q", "-c", "-f", "raw", "-O", "qcow2",
            "-o", "cluster_size=512", raw, comp)
        images.append(("v3-512-compressed.qcow2", comp,
                       trailer(0, [(READ, 0, 0, 256), (WRITE, 0, 0, 16)])))

        # The qcow2 backing file the fuzz target provides (include_bytes!).
        base = os.path.join(tmp, "base.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", base, "64K")
        run("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 0 4k", base)
        run("qemu-io", "-f", "qcow2", "-c", "write -z 1k 1k", base)
        shutil.copy(base, os.path.join(HERE, "base.qcow2"))

        for d in (IMAGE_DIR, HEADER_DIR):
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
        total = 0
        for name, path, trail in images:
            data = open(path, "rb").read()
            # The trailer written over the last bytes would damage tables at
            # the end of the file, so append it instead.
            seed = data + (trail or b"")
            open(os.path.join(IMAGE_DIR, name), "wb").write(seed)
            cluster_bits = struct.unpack(">I", data[20:24])[0]
            first = data[: 1 << cluster_bits]
            hdr = struct.pack(">Q", len(data)) + first
            open(os.path.join(HEADER_DIR, name), "wb").write(hdr)
            total += len(seed) + len(hdr)
        print(f"{len(images)} images, {total} bytes of seeds", file=sys.stderr)
    finally:
        shutil.rmtree(tmp)


# virtio-blk -----------------------------------------------------------------

F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
FEAT_FLUSH, FEAT_DISCARD, FEAT_WZ, FEAT_EVENT_IDX, RO, DISK_DISCARD = 1, 2, 4, 8, 16, 32


class Guest:
    """Guest memory (the part the seed holds) with a split queue at its
    start: descriptor table, then available ring, then used ring, as
    the Linux driver allocates them; buffers follow from 0x400."""

    def __init__(self, qsize=8):
        self.qsize = qsize
        self.mem = bytearray(0x400)
        self.desc = 0
        self.avail = 16 * qsize
        self.used = (self.avail + 6 + 2 * qsize + 3) & ~3
        self.next_desc = 0
        self.heads = []
        self.brk = 0x400

    def put(self, addr, data):
        end = addr + len(data)
        if end > len(self.mem):
            self.mem.extend(bytes(end - len(self.mem)))
        self.mem[addr:end] = data

    def buf(self, data=b"", size=None):
        """Allocates a buffer holding data (or size zero bytes)."""
        size = len(data) if size is None else size
        addr = self.brk
        self.brk = (self.brk + size + 15) & ~15
        self.put(addr, data.ljust(size, b"\0"))
        return addr

    def write_desc(self, table, index, addr, length, flags, nxt):
        self.put(table + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))

    def chain(self, descs):
        """descs: list of (addr, len, flags); NEXT is added as needed."""
        head = self.next_desc
        for i, (addr, length, flags) in enumerate(descs):
            last = i + 1 == len(descs)
            idx = self.next_desc
            self.next_desc += 1
            self.write_desc(self.desc, idx, addr, length,
                            flags | (0 if last else F_NEXT), 0 if last else idx + 1)
        assert self.next_desc <= self.qsize, "descriptor table overflow"
        self.heads.append(head)

    def indirect_chain(self, descs):
        table = self.buf(size=16 * len(descs))
        for i, (addr, length, flags) in enumerate(descs):
            last = i + 1 == len(descs)
            self.write_desc(table, i, addr, length,
                            flags | (0 if last else F_NEXT), 0 if last else i + 1)
        self.chain([(table, 16 * len(descs), F_INDIRECT)])

    def request(self, rtype, sector=0, out=b"", in_len=0, split_header=False):
        hdr = struct.pack("<IIQ", rtype, 0, sector)
        descs = []
        if split_header:
            descs += [(self.buf(hdr[:5]), 5, 0), (self.buf(hdr[5:]), 11, 0)]
        else:
            descs.append((self.buf(hdr), 16, 0))
        if out:
            descs.append((self.buf(out), len(out), 0))
        if in_len:
            descs.append((self.buf(size=in_len), in_len, F_WRITE))
        descs.append((self.buf(size=1), 1, F_WRITE))
        return descs

    def seed(self, features, disk_bytes=64 << 10, faults=0, start=0):
        avail = struct.pack("<HH", 0, (start + len(self.heads)) & 0xFFFF)
        ring = [0] * self.qsize
        for i, head in enumerate(self.heads):
            ring[(start + i) % self.qsize] = head
        avail += struct.pack(f"<{self.qsize}H", *ring) + struct.pack("<H", 0)
        self.put(self.avail, avail)
        ctrl = bytes([self.qsize.bit_length() - 1, features, faults])
        ctrl += struct.pack(">HHHHH", disk_bytes // 2, self.desc, self.avail, self.used,
                            start)
        return ctrl + bytes(self.mem)


def segments(*segs):
    return b"".join(struct.pack("<QII", sector, num, flags) for sector, num, flags in segs)


def virtio_blk_seeds():
    seeds = {}

    g = Guest(16)
    g.chain(g.request(T_IN, sector=1, in_len=1024))
    g.chain(g.request(T_IN, sector=120, in_len=4096))  # ends at the disk's end
    g.chain(g.request(T_IN, sector=0, in_len=512, split_header=True))
    seeds["in"] = g.seed(FEAT_FLUSH)

    g = Guest()
    g.chain(g.request(T_OUT, sector=3, out=bytes(range(256)) * 2))
    g.chain(g.request(T_OUT, sector=127, out=b"\xaa" * 1024))  # past the end
    g.chain(g.request(T_FLUSH))
    seeds["out-flush"] = g.seed(FEAT_FLUSH)

    g = Guest()
    g.chain(g.request(T_OUT, sector=5, out=b"\x42" * 512))  # write-through
    g.chain(g.request(T_IN, sector=5, in_len=512))
    seeds["writethrough"] = g.seed(0)

    g = Guest(16)
    g.chain(g.request(T_GET_ID, in_len=20))
    g.chain(g.request(T_GET_ID, in_len=7))
    g.chain(g.request(99))
    seeds["get-id-unsupported"] = g.seed(FEAT_FLUSH)

    g = Guest(16)
    g.chain(g.request(T_DISCARD, out=segments((8, 8, 0), (64, 16, 0))))
    g.chain(g.request(T_WRITE_ZEROES, out=segments((0, 4, 1), (100, 28, 0))))
    g.chain(g.request(T_WRITE_ZEROES, out=segments((126, 4, 0))))  # past the end
    seeds["discard-zeroes"] = g.seed(FEAT_FLUSH | FEAT_DISCARD | FEAT_WZ | DISK_DISCARD)

    g = Guest(16)
    g.indirect_chain(g.request(T_OUT, sector=9, out=b"\x17" * 1024))
    g.indirect_chain(g.request(T_IN, sector=9, in_len=1024))
    seeds["indirect"] = g.seed(FEAT_FLUSH | FEAT_EVENT_IDX)

    g = Guest(16)
    # A readable descriptor after a writable one; then no status at all.
    hdr = struct.pack("<IIQ", T_IN, 0, 0)
    g.chain([(g.buf(hdr), 16, 0), (g.buf(size=512), 512, F_WRITE),
             (g.buf(hdr), 16, 0), (g.buf(size=1), 1, F_WRITE)])
    g.chain([(g.buf(hdr), 16, 0)])
    g.chain(g.request(T_OUT, sector=1, out=b"\x01" * 512))  # read-only disk
    seeds["malformed-readonly"] = g.seed(FEAT_FLUSH | RO)

    g = Guest(16)
    g.chain(g.request(T_IN, sector=2, in_len=512))
    g.chain(g.request(T_OUT, sector=2, out=b"\x02" * 512))
    g.chain(g.request(T_FLUSH))
    seeds["faults-wrapped"] = g.seed(FEAT_FLUSH, faults=7, start=0xFFFE)

    shutil.rmtree(VIRTIO_BLK_DIR, ignore_errors=True)
    os.makedirs(VIRTIO_BLK_DIR)
    for name, data in seeds.items():
        open(os.path.join(VIRTIO_BLK_DIR, name), "wb").write(data)
    total = sum(len(d) for d in seeds.values())
    print(f"{len(seeds)} virtio-blk queues, {total} bytes of seeds", file=sys.stderr)


if __name__ == "__main__":
    main()
    virtio_blk_seeds()
