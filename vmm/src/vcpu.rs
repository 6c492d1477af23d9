//! vCPU threads: each runs KVM_RUN in a loop, sends port and MMIO exits to the
//! buses, and parks or stops when the control loop asks. The control loop
//! interrupts KVM_RUN with a signal whose handler sets `immediate_exit`, so a
//! request can never be missed between checking for it and entering the guest.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::{Bus, VmEvent, VmEventSender};
use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::coalesced_pio::CoalescedPio;

/// What the control loop wants the vCPUs to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Stop,
}

struct ControlState {
    want: Want,
    /// vCPU threads currently parked (paused or waiting to be stopped).
    parked: usize,
}

/// Shared between the control loop and a VM's vCPU threads.
pub struct VcpuControl {
    state: Mutex<ControlState>,
    changed: Condvar,
    /// Set whenever `want` changes, so the run loop only locks when needed.
    attention: AtomicBool,
}

impl VcpuControl {
    pub fn new() -> Arc<Self> {
        Arc::new(VcpuControl {
            state: Mutex::new(ControlState {
                want: Want::Run,
                parked: 0,
            }),
            changed: Condvar::new(),
            attention: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ControlState> {
        devices::bus::lock(&self.state)
    }

    fn set(&self, want: Want) {
        self.lock().want = want;
        self.attention.store(want != Want::Run, Ordering::Release);
        self.changed.notify_all();
    }
}

/// The vCPU threads of one VM.
pub struct VcpuThreads {
    control: Arc<VcpuControl>,
    threads: Vec<JoinHandle<()>>,
}

thread_local! {
    /// This thread's `kvm_run` page, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set before
        // the thread first enters KVM_RUN and valid while its VcpuFd lives; the
        // handler runs on that same thread. A byte store is signal-safe.
        unsafe { (*run).immediate_exit = 1 };
    }
}

/// Installs the kick signal handler once per process.
pub fn register_kick_signal() -> std::io::Result<()> {
    register_signal_handler(SIGRTMIN(), kick_handler).map_err(std::io::Error::other)
}

impl VcpuThreads {
    /// Starts one thread per vCPU; they enter the guest at once.
    pub fn start(
        vcpus: Vec<VcpuFd>,
        coalesced: Option<Arc<CoalescedPio>>,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        events: VmEventSender,
    ) -> std::io::Result<VcpuThreads> {
        let control = VcpuControl::new();
        let mut threads = Vec::with_capacity(vcpus.len());
        for (id, fd) in vcpus.into_iter().enumerate() {
            let vcpu = Vcpu {
                id,
                fd,
                coalesced: coalesced.clone(),
                pio: pio.clone(),
                mmio: mmio.clone(),
                events: events.clone(),
                control: control.clone(),
            };
            let handle = std::thread::Builder::new()
                .name(format!("kite-vcpu{id}"))
                .spawn(move || vcpu.run())?;
            threads.push(handle);
        }
        Ok(VcpuThreads { control, threads })
    }

    fn kick(&self) {
        for t in &self.threads {
            // SAFETY: the pthread_t belongs to a thread we spawned and have not
            // joined; the signal only interrupts KVM_RUN.
            unsafe { libc::pthread_kill(t.as_pthread_t(), SIGRTMIN()) };
        }
    }

    /// Stops every vCPU from running guest code; returns when all have parked.
    pub fn pause(&self) {
        self.control.set(Want::Pause);
        self.wait_parked();
    }

    fn wait_parked(&self) {
        let n = self.threads.len();
        let mut state = self.control.lock();
        while state.parked < n {
            drop(state);
            self.kick();
            state = self.control.lock();
            // A kick can land before a thread starts; kick again until all park.
            state = self
                .control
                .changed
                .wait_timeout(state, Duration::from_millis(5))
                .map(|(s, _)| s)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    pub fn resume(&self) {
        self.control.set(Want::Run);
    }
}

/// Dropping the threads ends every vCPU thread and waits for them.
impl Drop for VcpuThreads {
    fn drop(&mut self) {
        self.control.set(Want::Stop);
        self.kick();
        for t in self.threads.drain(..) {
            let name = t.thread().name().unwrap_or("vcpu").to_string();
            // Keep kicking until each thread is gone: one may be about to enter KVM_RUN.
            while !t.is_finished() {
                // SAFETY: as in `kick`; the thread is not joined yet.
                unsafe { libc::pthread_kill(t.as_pthread_t(), SIGRTMIN()) };
                std::thread::sleep(Duration::from_micros(50));
            }
            if t.join().is_err() {
                log::error!("{name} panicked");
            }
        }
    }
}

struct Vcpu {
    id: usize,
    fd: VcpuFd,
    coalesced: Option<Arc<CoalescedPio>>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    events: VmEventSender,
    control: Arc<VcpuControl>,
}

/// What one KVM_RUN exit means for the loop.
enum Outcome {
    Continue,
    /// The guest asked to power off or reset; it runs no further.
    Event(VmEvent),
    /// The guest cannot go on.
    Fail(String),
    InternalError,
}

impl Vcpu {
    fn run(mut self) {
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|r| r.set(run_ptr));
        log::debug!("vCPU {} started", self.id);
        let mut halted = false;
        loop {
            if (halted || self.control.attention.load(Ordering::Acquire))
                && self.wait_for_run(halted) == Want::Stop
            {
                break;
            }
            let outcome = match self.fd.run() {
                Ok(exit) => {
                    if let Some(queued) = &self.coalesced {
                        queued.drain(&self.pio);
                    }
                    handle_exit(self.id, &self.pio, &self.mmio, exit)
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    Outcome::Continue
                }
                Err(e) => Outcome::Fail(format!("KVM_RUN failed: {e}")),
            };
            match outcome {
                Outcome::Continue => {}
                Outcome::Event(event) => {
                    self.events.send(event);
                    halted = true;
                }
                Outcome::Fail(what) => {
                    self.fail(what);
                    halted = true;
                }
                Outcome::InternalError => {
                    // SAFETY: after KVM_EXIT_INTERNAL_ERROR, KVM fills the `internal` member.
                    let suberror =
                        unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    self.fail(format!("KVM internal error, suberror {suberror}"));
                    halted = true;
                }
            }
        }
        KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
        log::debug!("vCPU {} stopped", self.id);
    }

    /// Parks while paused (or, after the guest stopped or failed, until stopped).
    fn wait_for_run(&self, halted: bool) -> Want {
        let mut state = self.control.lock();
        let mut parked = false;
        while state.want == Want::Pause || (halted && state.want != Want::Stop) {
            if !parked {
                state.parked += 1;
                parked = true;
                self.control.changed.notify_all();
            }
            state = self
                .control
                .changed
                .wait(state)
                .unwrap_or_else(|p| p.into_inner());
        }
        if parked && state.want != Want::Stop {
            state.parked -= 1;
        }
        state.want
    }

    /// Logs the failure with the vCPU's registers and tells the control loop.
    fn fail(&self, what: String) {
        let regs = match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} \
                 cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}",
                r.rip,
                r.rsp,
                r.rflags,
                r.rax,
                r.rbx,
                r.rcx,
                r.rdx,
                s.cr0,
                s.cr3,
                s.cr4,
                s.efer,
                s.cs.selector
            ),
            (Err(e), _) | (_, Err(e)) => format!("registers unreadable: {e}"),
        };
        log::error!("vCPU {}: guest failure: {what}; {regs}", self.id);
        self.events
            .send(VmEvent::Failed(format!("vCPU {}: {what}", self.id)));
    }
}

/// Serves one exit. Unknown ports and MMIO read as all ones and ignore writes,
/// like an empty bus on real hardware.
fn handle_exit(id: usize, pio: &Bus, mmio: &Bus, exit: VcpuExit) -> Outcome {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !pio.read(u64::from(port), data) {
                log::trace!("vCPU {id}: read of unhandled port {port:#x}");
                data.fill(0xff);
            }
        }
        VcpuExit::IoOut(port, data) => {
            if !pio.write(u64::from(port), data) {
                log::trace!("vCPU {id}: write to unhandled port {port:#x}");
            }
        }
        VcpuExit::MmioRead(addr, data) => {
            if !mmio.read(addr, data) {
                log::debug!("vCPU {id}: read of unhandled MMIO {addr:#x}");
                data.fill(0xff);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !mmio.write(addr, data) {
                log::debug!("vCPU {id}: write to unhandled MMIO {addr:#x}");
            }
        }
        VcpuExit::SystemEvent(kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN, _) => {
            return Outcome::Event(VmEvent::PowerOff)
        }
        VcpuExit::SystemEvent(kvm_bindings::KVM_SYSTEM_EVENT_RESET, _) => {
            return Outcome::Event(VmEvent::Reset)
        }
        VcpuExit::Hlt => {}
        VcpuExit::Shutdown => return Outcome::Fail("triple fault (KVM_EXIT_SHUTDOWN)".into()),
        VcpuExit::InternalError => return Outcome::InternalError,
        VcpuExit::FailEntry(reason, cpu) => {
            return Outcome::Fail(format!(
                "KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"
            ))
        }
        other => return Outcome::Fail(format!("unhandled vCPU exit {other:?}")),
    }
    Outcome::Continue
}
