//! The QEMU tracking source's host side: QMP, QEMU's JSON control protocol, over a
//! UNIX socket, and the cut built on it. See `docs/continuous.md`.

pub mod caps;
pub mod cut;
pub mod push;
pub mod qmp;
pub mod source;
pub mod stage;

pub use cut::{bitmaps, BitmapInfo, FrozenCut, FrozenDisk, NbdEndpoint, QemuDisk, Tracker};
pub use qmp::{Qmp, QmpError, QmpVersion};
