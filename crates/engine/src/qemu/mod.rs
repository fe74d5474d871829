//! The QEMU tracking source's host side: QMP, QEMU's JSON control protocol, over a
//! UNIX socket. See `docs/continuous.md` for the cycle built on it.

pub mod qmp;

pub use qmp::{Qmp, QmpError, QmpVersion};
