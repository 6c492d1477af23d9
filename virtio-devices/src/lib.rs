//! Virtio devices over PCI (not built yet).
