//! The contract between the virtio transport and a device model.

use std::collections::BTreeMap;
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::GuestMemoryMmap;

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("virtio device {device}: {reason}")]
    BadSetup { device: String, reason: String },
    #[error("virtio device {device}: cannot start its worker thread: {source}")]
    Thread {
        device: String,
        source: std::io::Error,
    },
}

/// Raises a device's interrupts (MSI-X vectors chosen by the driver).
pub trait QueueInterrupt: Send + Sync {
    /// Tells the driver queue `queue` has used buffers.
    fn signal_queue(&self, queue: u16);
    /// Tells the driver the device configuration changed.
    fn signal_config(&self);
}

/// A queue the driver enabled, ready for a device to serve.
pub struct ActiveQueue {
    pub index: u16,
    pub queue: Queue,
    /// Signalled (by KVM, through an ioeventfd) when the driver notifies.
    pub notify: EventFd,
}

/// A virtio device model, independent of the transport.
pub trait VirtioDevice: Send {
    /// Virtio device type (2 = block, 3 = console, 4 = entropy).
    fn device_type(&self) -> u32;
    /// The largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Feature bits the device offers.
    fn features(&self) -> u64;
    /// Device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts serving `queues` with the negotiated `features`.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn QueueInterrupt>,
        queues: Vec<ActiveQueue>,
        features: u64,
    ) -> Result<(), ActivateError>;
    /// Stops serving (driver reset); the device must be ready to activate again.
    fn reset(&mut self);
    /// Counters for `vm.counters`.
    fn counters(&self) -> BTreeMap<String, u64> {
        BTreeMap::new()
    }
}

/// Reads a device's configuration space, `config`, at `offset` into `data`:
/// bytes past its end (or at an offset no slice reaches) read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o).copied())
            .unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::read_config_bytes;

    #[test]
    fn config_reads_past_the_end_are_zero() {
        let config = [1, 2, 3];
        let mut d = [9; 4];
        read_config_bytes(&config, 1, &mut d);
        assert_eq!(d, [2, 3, 0, 0]);
        read_config_bytes(&config, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
