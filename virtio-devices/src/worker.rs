//! A device thread serving one or more virtqueues: it sleeps in epoll on the
//! queues' notify eventfds (plus a stop eventfd and, for the console, a host
//! input fd), hands each notified queue to the device's handler and raises
//! the queue's interrupt when the driver wants one.

use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{ActivateError, ActiveQueue, QueueInterrupt};
use crate::GuestMemoryMmap;

const TOKEN_STOP: u64 = u64::MAX;
const TOKEN_INPUT: u64 = u64::MAX - 1;

/// What a device does with its queues.
pub trait QueueHandler: Send + 'static {
    /// Serves the chains the driver made available on queue `index`; returns
    /// true when it put buffers in the used ring.
    fn process(&mut self, index: u16, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool;
    /// A host fd whose readiness also wakes the worker (console input).
    fn input_fd(&self) -> Option<RawFd> {
        None
    }
    /// The input fd is readable. Return false to stop watching it (EOF).
    fn input_ready(&mut self) -> bool {
        false
    }
    /// True while requests taken from the queue are still in flight and
    /// their completion will wake the worker (through the input fd), which
    /// then looks at the queue anyway: with EVENT_IDX the driver is not asked
    /// to notify meanwhile, which saves the guest a trap per request.
    fn in_flight(&self) -> bool {
        false
    }
}

/// A running worker thread; dropping it stops and joins the thread.
pub struct Worker {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    pub fn spawn<H: QueueHandler>(
        name: String,
        mut handler: H,
        mut queues: Vec<ActiveQueue>,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn QueueInterrupt>,
        event_idx: bool,
    ) -> Result<Worker, ActivateError> {
        let device = name.clone();
        let thread_err = |source| ActivateError::Thread {
            device: device.clone(),
            source,
        };
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(thread_err)?;
        let epoll = Epoll::new().map_err(thread_err)?;
        let add = |fd: RawFd, token: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
        };
        for (i, q) in queues.iter().enumerate() {
            add(q.notify.as_raw_fd(), i as u64).map_err(thread_err)?;
        }
        add(stop.as_raw_fd(), TOKEN_STOP).map_err(thread_err)?;
        if let Some(fd) = handler.input_fd() {
            // A non-pollable input (a regular file) just means no input.
            if let Err(e) = add(fd, TOKEN_INPUT) {
                log::debug!("{name}: input not pollable: {e}");
            }
        }
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let mut events = [EpollEvent::default(); 8];
                loop {
                    let n = match epoll.wait(-1, &mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            log::error!("{name}: epoll failed: {e}");
                            return;
                        }
                    };
                    for ev in &events[..n] {
                        match ev.data() {
                            TOKEN_STOP => return,
                            TOKEN_INPUT => {
                                if !handler.input_ready() {
                                    if let Some(fd) = handler.input_fd() {
                                        let _ = epoll.ctl(
                                            ControlOperation::Delete,
                                            fd,
                                            EpollEvent::default(),
                                        );
                                    }
                                }
                                for q in queues.iter_mut() {
                                    serve(&mut handler, q, &mem, interrupt.as_ref(), event_idx);
                                }
                            }
                            i => {
                                let Some(q) = queues.get_mut(i as usize) else {
                                    continue;
                                };
                                let _ = q.notify.read();
                                serve(&mut handler, q, &mem, interrupt.as_ref(), event_idx);
                            }
                        }
                    }
                }
            })
            .map_err(thread_err)?;
        Ok(Worker {
            stop,
            thread: Some(thread),
        })
    }
}

/// Drains a queue. With EVENT_IDX, re-enabling notifications can reveal
/// buffers made available meanwhile (for which the driver may not have
/// kicked): those are served too. It goes round again only when the driver
/// made more available, so buffers a handler leaves waiting on purpose (a
/// console's receive buffers without host input) or a corrupt ring cannot
/// make it spin. Notifications stay off while the handler has requests in
/// flight: the last completion re-enables them.
fn serve<H: QueueHandler>(
    handler: &mut H,
    q: &mut ActiveQueue,
    mem: &GuestMemoryMmap,
    interrupt: &dyn QueueInterrupt,
    event_idx: bool,
) {
    loop {
        let seen = q.queue.avail_idx(mem, Ordering::Acquire).ok();
        if event_idx {
            let _ = q.queue.disable_notification(mem);
        }
        let used = handler.process(q.index, &mut q.queue, mem);
        if used && q.queue.needs_notification(mem).unwrap_or(true) {
            interrupt.signal_queue(q.index);
        }
        if !event_idx || handler.in_flight() {
            return;
        }
        let more = q.queue.enable_notification(mem).unwrap_or(false);
        let now = q.queue.avail_idx(mem, Ordering::Acquire).ok();
        if !more || now == seen {
            return;
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("a virtio worker thread panicked");
            }
        }
    }
}

/// Recovers from a driver whose available index ran more than a ring ahead
/// of what the device consumed: no chain can be popped then, yet the queue
/// would look non-empty forever. Skips to the driver's index; returns
/// whether it had to. Logged at debug level: a guest can do this at will.
pub(crate) fn skip_corrupt_avail(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    device: impl std::fmt::Display,
) -> bool {
    if let Ok(avail) = queue.avail_idx(mem, Ordering::Acquire) {
        if (avail - Wrapping(queue.next_avail())).0 > queue.size() {
            log::debug!("{device}: driver's available index is corrupt; skipping it");
            queue.set_next_avail(avail.0);
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{add_chains, CountingInterrupt};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    /// Takes every chain and keeps it "in flight" as long as told to.
    struct Holder {
        in_flight: bool,
    }

    impl QueueHandler for Holder {
        fn process(&mut self, _index: u16, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
            while queue.pop_descriptor_chain(mem).is_some() {}
            false
        }
        fn in_flight(&self) -> bool {
            self.in_flight
        }
    }

    #[test]
    fn no_notifications_asked_for_while_requests_are_in_flight() {
        const SIZE: u16 = 16;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, SIZE);
        let mut queue: Queue = vq.create_queue().unwrap();
        queue.set_event_idx(true);
        let mut q = ActiveQueue {
            index: 0,
            queue,
            notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        };
        // avail_event sits after the used ring's entries.
        let avail_event = GuestAddress(vq.used_addr().0 + 4 + 8 * u64::from(SIZE));
        let read_avail_event = || mem.read_obj::<u16>(avail_event).unwrap();

        let next = add_chains(&vq, 0, &[&[(0x8000, 16, 0)], &[(0x8100, 16, 0)]]);
        let interrupt = CountingInterrupt::default();
        let mut handler = Holder { in_flight: true };
        serve(&mut handler, &mut q, &mem, &interrupt, true);
        assert_eq!(q.queue.next_avail(), 2);
        assert_eq!(read_avail_event(), 0, "re-armed with requests in flight");

        add_chains(&vq, next, &[&[(0x8200, 16, 0)]]);
        handler.in_flight = false;
        serve(&mut handler, &mut q, &mem, &interrupt, true);
        assert_eq!(q.queue.next_avail(), 3);
        assert_eq!(read_avail_event(), 3, "not re-armed once idle");
    }
}
