//! Namespaces that make a directory look like a VM: each VM has a network namespace of its own
//! (loopback only, so every VM's server can listen on 8765), kept alive by bind-mounting its
//! `/proc/thread-self/ns/net` onto a file under the data dir; each command runs in a private
//! mount namespace where the VM's directory is bind-mounted onto `/workspace`.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};

/// Where commands see their VM's files.
pub const WORKSPACE: &str = "/workspace";

#[derive(Debug, thiserror::Error)]
pub enum NsError {
    #[error(
        "cannot create a network namespace ({0}); the simulator needs root (CAP_SYS_ADMIN) and \
         unprivileged namespaces are not enough: it refuses to run commands on the host's network"
    )]
    Unshare(nix::Error),
    #[error("cannot bring loopback up in a new network namespace: {0}")]
    Loopback(io::Error),
    #[error("cannot pin the network namespace at {path}: {source}")]
    Pin { path: PathBuf, source: nix::Error },
    #[error("cannot create the {WORKSPACE} mount point on the host: {0}")]
    MountPoint(io::Error),
    #[error("namespace helper thread failed: {0}")]
    Thread(String),
    #[error("I/O on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Checks once, at start-up, that namespaces work here, so that a missing privilege is a clear
/// error rather than commands silently running on the host.
pub fn probe(scratch_dir: &Path) -> Result<(), NsError> {
    std::fs::create_dir_all(WORKSPACE).map_err(NsError::MountPoint)?;
    let pin = scratch_dir.join(".netns-probe");
    ensure_netns(&pin)?;
    remove_netns(&pin);
    Ok(())
}

/// Whether `path` is a live pinned namespace (an nsfs bind mount).
// The statfs type and the constant differ in width between architectures.
#[allow(clippy::unnecessary_cast)]
pub fn is_pinned(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 as i64 == libc::NSFS_MAGIC as i64)
        .unwrap_or(false)
}

/// Creates and pins the VM's network namespace unless it exists (e.g. from before a restart).
pub fn ensure_netns(pin: &Path) -> Result<(), NsError> {
    if is_pinned(pin) {
        return Ok(());
    }
    File::create(pin).map_err(|source| NsError::Io {
        path: pin.to_path_buf(),
        source,
    })?;
    let target = pin.to_path_buf();
    // unshare(CLONE_NEWNET) changes only the calling thread: a throw-away thread keeps the
    // runtime's threads in the host's namespace.
    std::thread::spawn(move || -> Result<(), NsError> {
        unshare(CloneFlags::CLONE_NEWNET).map_err(NsError::Unshare)?;
        loopback_up().map_err(NsError::Loopback)?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|source| NsError::Pin {
            path: target.clone(),
            source,
        })
    })
    .join()
    .map_err(|_| NsError::Thread("panicked".into()))?
}

/// Unpins a VM's namespace (it dies with the last process inside it) and removes the file.
pub fn remove_netns(pin: &Path) {
    if is_pinned(pin) {
        let _ = umount2(pin, MntFlags::MNT_DETACH);
    }
    let _ = std::fs::remove_file(pin);
}

fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket/ioctl calls on a zeroed ifreq whose name is NUL-terminated; the
    // descriptor is owned by `sock` and closed on drop.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let sock = <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd);
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &req) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Connects to `host:port` from inside the namespace pinned at `pin`. The socket is opened on a
/// thread that entered the namespace and keeps it after the thread ends.
pub async fn connect_in(pin: &Path, host: &str, port: u16, timeout: Duration) -> io::Result<TcpStream> {
    let pin = pin.to_path_buf();
    let host = host.to_string();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let result = (|| {
            let ns = File::open(&pin)?;
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
            for addr in (host.as_str(), port).to_socket_addrs()? {
                match TcpStream::connect_timeout(&addr, timeout) {
                    Ok(s) => return Ok(s),
                    Err(e) => last = e,
                }
            }
            Err(last)
        })();
        let _ = tx.send(result);
    });
    rx.await
        .map_err(|_| io::Error::other("namespace connect thread vanished"))?
}

/// What a command's child process does between fork and exec: enter the VM's network
/// namespace, take a private mount namespace, show the VM's directory at `/workspace`, `cd`.
pub struct ChildSetup {
    netns: File,
    workspace: CString,
    target: CString,
    cwd: CString,
    root: CString,
}

impl ChildSetup {
    pub fn new(pin: &Path, workspace: &Path, cwd: &str) -> io::Result<Self> {
        let cstr = |b: &[u8]| CString::new(b).map_err(|_| io::Error::other("path contains NUL"));
        Ok(Self {
            netns: File::open(pin)?,
            workspace: cstr(workspace.as_os_str().as_bytes())?,
            target: cstr(WORKSPACE.as_bytes())?,
            cwd: cstr(cwd.as_bytes())?,
            root: cstr(b"/")?,
        })
    }

    /// Runs in the forked child: only async-signal-safe libc calls, no allocation.
    pub fn apply(&self) -> io::Result<()> {
        let check = |rc: libc::c_int| {
            if rc == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        };
        // SAFETY: raw syscalls on valid, NUL-terminated strings and an open descriptor owned by
        // `self`, which outlives this call.
        unsafe {
            check(libc::setns(self.netns.as_raw_fd(), libc::CLONE_NEWNET))?;
            check(libc::unshare(libc::CLONE_NEWNS))?;
            // Keep our bind mount out of the host's mount table.
            check(libc::mount(
                std::ptr::null(),
                self.root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                self.workspace.as_ptr(),
                self.target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ))?;
            check(libc::chdir(self.cwd.as_ptr()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_file_is_not_a_pinned_namespace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("x");
        std::fs::write(&f, b"").expect("write");
        assert!(!is_pinned(&f));
        assert!(!is_pinned(&dir.path().join("missing")));
    }
}
