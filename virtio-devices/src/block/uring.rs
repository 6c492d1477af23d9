//! Reads and writes of a flat (raw) image through io_uring, straight between
//! guest memory and the file, many in flight per queue.
//!
//! A queue worker submits requests as it pops them and reaps completions
//! when the ring's eventfd fires, so one request waiting on the disk no
//! longer holds up the others (with `O_DIRECT` this is what lets a deep
//! guest queue reach the device's parallelism). Only the data moves through
//! the ring; parsing, checks and status bytes stay with the caller, and any
//! request this engine cannot take (buffers split across memory regions,
//! misaligned for `O_DIRECT`, every slot busy) is served synchronously
//! instead, as is one that the kernel completes short or refuses as
//! misaligned.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

use block::FlatFile;
use io_uring::{opcode, types, IoUring};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::Seg;
use crate::GuestMemoryMmap;

/// Requests in flight per queue, at most; more wait their turn in the
/// synchronous path. It bounds what a guest can pin in host memory (each
/// slot keeps up to [`super::MAX_DESCRIPTORS_PER_REQUEST`] iovecs) while
/// leaving room for any queue depth a guest uses in practice.
pub(super) const MAX_IN_FLIGHT: u16 = 128;

/// O_DIRECT needs offsets and lengths aligned to the file's block size and
/// buffers to (at most) 512 bytes; other requests go the synchronous
/// (bounce) way at once.
const DIRECT_MIN_ALIGN: u64 = 512;

/// Which way data moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Op {
    Read,
    Write,
}

impl Op {
    pub(super) fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
        }
    }
}

/// A request in flight: what its completion needs to finish it.
#[derive(Debug)]
pub(super) struct Request {
    pub op: Op,
    pub head: u16,
    pub status: GuestAddress,
    /// Disk byte offset and length.
    pub offset: u64,
    pub len: u64,
    /// The data buffers in guest memory, for a synchronous retry.
    pub data: Vec<Seg>,
    /// When the worker took it off the queue (for the latency counters).
    pub started: Instant,
}

/// A finished request and the kernel's result (bytes moved, or -errno).
pub(super) struct Completion {
    pub request: Request,
    pub result: i32,
}

struct Slot {
    request: Option<Request>,
    /// Host addresses of `request.data`; the kernel reads this array until
    /// the request completes, so it is not touched while one is in flight.
    iovecs: Vec<libc::iovec>,
}

/// One queue's io_uring instance over one image file.
pub(super) struct Uring {
    ring: IoUring,
    eventfd: EventFd,
    file: FlatFile,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Requests pushed to the submission queue but not yet submitted.
    unsubmitted: usize,
    /// Keeps the guest memory mapped for as long as the kernel may use it.
    mem: GuestMemoryMmap,
}

// SAFETY: the iovecs hold pointers into guest memory that `mem` keeps
// mapped; nothing else refers to them, and the ring is used by one thread.
unsafe impl Send for Uring {}

impl Uring {
    /// A ring for up to `depth` (at most [`MAX_IN_FLIGHT`]) requests in
    /// flight on `file`.
    pub(super) fn new(file: FlatFile, depth: u16, mem: GuestMemoryMmap) -> io::Result<Uring> {
        let depth = depth.clamp(1, MAX_IN_FLIGHT);
        let ring = IoUring::new(u32::from(depth))?;
        let eventfd = EventFd::new(libc::EFD_NONBLOCK)?;
        // Every completion signals it, also those reaped within a submit:
        // the "async only" variant stays silent for completions the kernel
        // posts from the submitting thread (O_DIRECT), which would be lost.
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        let slots = (0..depth)
            .map(|_| Slot {
                request: None,
                iovecs: Vec::new(),
            })
            .collect();
        Ok(Uring {
            ring,
            eventfd,
            file,
            slots,
            free: (0..u32::from(depth)).rev().collect(),
            unsubmitted: 0,
            mem,
        })
    }

    /// Readable when completions may be waiting.
    pub(super) fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// Queues `request` (not yet submitted: see [`submit`](Self::submit)).
    /// Gives it back when it must be served synchronously instead.
    pub(super) fn push(&mut self, request: Request) -> Result<(), Request> {
        if self.file.direct && !direct_aligned(&request, self.file.block_size) {
            return Err(request);
        }
        let Some(&index) = self.free.last() else {
            return Err(request);
        };
        let slot = &mut self.slots[index as usize];
        slot.iovecs.clear();
        for seg in &request.data {
            let Ok(slice) = self.mem.get_slice(GuestAddress(seg.addr), seg.len as usize) else {
                // Spans two memory regions: no single host buffer.
                return Err(request);
            };
            slot.iovecs.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: seg.len as usize,
            });
        }
        let Ok(count) = u32::try_from(slot.iovecs.len()) else {
            return Err(request);
        };
        let fd = types::Fd(self.file.fd);
        let iovecs = slot.iovecs.as_ptr();
        let entry = match request.op {
            Op::Read => opcode::Readv::new(fd, iovecs, count)
                .offset(request.offset)
                .build(),
            Op::Write => opcode::Writev::new(fd, iovecs, count)
                .offset(request.offset)
                .build(),
        }
        .user_data(u64::from(index));
        // SAFETY (both pushes): the iovecs point into guest memory, mapped
        // for as long as `self.mem` lives, which drop() outlasts by waiting
        // for every request; the iovec array is left alone until the request
        // completes.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            // The submission queue is full: hand what it holds to the kernel.
            if self.submit().is_err() || unsafe { self.ring.submission().push(&entry) }.is_err() {
                return Err(request);
            }
        }
        self.free.pop();
        self.slots[index as usize].request = Some(request);
        self.unsubmitted += 1;
        Ok(())
    }

    /// Hands every queued request to the kernel.
    pub(super) fn submit(&mut self) -> io::Result<()> {
        if self.unsubmitted > 0 {
            self.ring.submit()?;
            self.unsubmitted = 0;
        }
        Ok(())
    }

    /// Takes every finished request off the completion queue.
    pub(super) fn reap(&mut self, done: &mut Vec<Completion>) {
        let _ = self.eventfd.read();
        for cqe in self.ring.completion() {
            let index = cqe.user_data() as usize;
            let Some(request) = self.slots.get_mut(index).and_then(|s| s.request.take()) else {
                continue;
            };
            self.free.push(index as u32);
            done.push(Completion {
                request,
                result: cqe.result(),
            });
        }
    }

    /// Requests the kernel has not completed yet.
    pub(super) fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

impl Drop for Uring {
    /// Waits for the kernel to finish with guest memory before it may be
    /// unmapped; the results are dropped (the device is being reset).
    fn drop(&mut self) {
        let mut done = Vec::new();
        while self.in_flight() > 0 {
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!("io_uring: cannot wait for requests in flight: {e}");
                    // Leak the memory mapping rather than let the kernel
                    // write into whatever is mapped there next.
                    std::mem::forget(self.mem.clone());
                    return;
                }
            }
            self.reap(&mut done);
            done.clear();
        }
    }
}

fn direct_aligned(request: &Request, block_size: u64) -> bool {
    let in_blocks = |x: u64| x.is_multiple_of(block_size);
    in_blocks(request.offset)
        && request
            .data
            .iter()
            .all(|s| s.addr.is_multiple_of(DIRECT_MIN_ALIGN) && in_blocks(u64::from(s.len)))
}
