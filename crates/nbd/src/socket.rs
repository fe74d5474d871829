//! Listening and connected sockets: Unix (the default, private to the user) or TCP.
//!
//! A Unix socket is bound inside a fresh 0700 folder beside its final path, made 0600,
//! then renamed into place: no other user can connect in the moment between bind and
//! chmod, whatever the folder it ends up in.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A Unix socket at this path (created 0600; its folder is created 0700 if missing).
    Unix(PathBuf),
    /// A TCP address. Without TLS only loopback addresses are accepted.
    Tcp(SocketAddr),
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Unix(p) => write!(f, "{}", p.display()),
            Listen::Tcp(a) => write!(f, "{a}"),
        }
    }
}

pub(crate) enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    pub(crate) fn bind(listen: &Listen) -> Result<Listener> {
        match listen {
            Listen::Tcp(addr) => {
                let l = TcpListener::bind(addr).map_err(|e| Error::io(format!("listen on {addr}"), e))?;
                Ok(Listener::Tcp(l))
            }
            Listen::Unix(path) => bind_unix(path).map(|l| Listener::Unix(l, path.clone())),
        }
    }

    pub(crate) fn fd(&self) -> RawFd {
        match self {
            Listener::Unix(l, _) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }

    pub(crate) fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Unix(l, _) => l.set_nonblocking(true),
            Listener::Tcp(l) => l.set_nonblocking(true),
        }
    }

    pub(crate) fn accept(&self) -> io::Result<(Socket, String)> {
        match self {
            Listener::Unix(l, _) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                larger_send_buffer(s.as_raw_fd());
                Ok((Socket::Unix(s), "unix".to_string()))
            }
            Listener::Tcp(l) => {
                let (s, a) = l.accept()?;
                s.set_nonblocking(false)?;
                let _ = s.set_nodelay(true);
                larger_send_buffer(s.as_raw_fd());
                Ok((Socket::Tcp(s), a.to_string()))
            }
        }
    }

    pub(crate) fn local(&self) -> Listen {
        match self {
            Listener::Unix(_, p) => Listen::Unix(p.clone()),
            Listener::Tcp(l) => Listen::Tcp(l.local_addr().expect("a bound socket has an address")),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn bind_unix(path: &Path) -> Result<UnixListener> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&parent)
            .map_err(|e| Error::io(format!("create the socket folder {}", parent.display()), e))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            // A socket nobody listens on is left over from a server that died.
            if UnixStream::connect(path).is_ok() {
                return Err(Error::invalid(format!(
                    "{} is a socket another server is listening on",
                    path.display()
                )));
            }
        }
        Ok(_) => {
            return Err(Error::invalid(format!("{} exists and is not a socket", path.display())));
        }
        Err(_) => {}
    }
    let private = parent.join(format!(".tern-nbd-{}-{}", std::process::id(), unique()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(|e| Error::io(format!("create {}", private.display()), e))?;
    let tmp = private.join("s");
    let result = (|| {
        let l =
            UnixListener::bind(&tmp).map_err(|e| Error::io(format!("listen on {}", path.display()), e))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(format!("make {} private", path.display()), e))?;
        std::fs::rename(&tmp, path)
            .map_err(|e| Error::io(format!("move the socket to {}", path.display()), e))?;
        Ok(l)
    })();
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&private);
    result
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Ask for a send buffer that holds a few large replies (the kernel caps it at
/// `net.core.wmem_max`): a 1 MiB read reply then leaves the write lock as soon as it is
/// queued, instead of when the client has read most of it. Best effort.
fn larger_send_buffer(fd: RawFd) {
    let size: libc::c_int = 4 << 20;
    // SAFETY: setsockopt reads one c_int through a pointer to a live local.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// A connected socket.
#[derive(Debug)]
pub(crate) enum Socket {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Socket {
    pub(crate) fn try_clone(&self) -> io::Result<Socket> {
        Ok(match self {
            Socket::Unix(s) => Socket::Unix(s.try_clone()?),
            Socket::Tcp(s) => Socket::Tcp(s.try_clone()?),
        })
    }

    pub(crate) fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Socket::Unix(s) => s.shutdown(how),
            Socket::Tcp(s) => s.shutdown(how),
        };
    }

    /// Whether bytes are waiting to be read (`FIONREAD`); false when it cannot tell.
    pub(crate) fn pending(&self) -> bool {
        let fd = match self {
            Socket::Unix(s) => s.as_raw_fd(),
            Socket::Tcp(s) => s.as_raw_fd(),
        };
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int through the pointer, which is valid.
        let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
        r == 0 && n > 0
    }

    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Socket::Unix(s) => s.set_read_timeout(t),
            Socket::Tcp(s) => s.set_read_timeout(t),
        }
    }

    pub(crate) fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Socket::Unix(s) => s.set_write_timeout(t),
            Socket::Tcp(s) => s.set_write_timeout(t),
        }
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.read(buf),
            Socket::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.write(buf),
            Socket::Tcp(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.write_vectored(bufs),
            Socket::Tcp(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Wait until `fd` is readable or `timeout` passes; `Ok(true)` when readable.
pub(crate) fn wait_readable(fd: RawFd, timeout: Duration) -> io::Result<bool> {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd on the stack, count 1; poll writes only its revents.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(r > 0)
}
