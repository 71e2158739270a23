//! TCP on the event loop's reactor: a socket registered (edge-triggered)
//! with the loop's epoll, its readiness and wakers in the loop's slab.
//!
//! Readiness is cleared by a short read or write, as tokio clears it: the
//! socket gave all it had (or took all it had room for), so the next
//! attempt waits for the next edge instead of costing a syscall that would
//! say EAGAIN. One loop, so no event can arrive between a read and its
//! clearing: events are applied only between task polls. A closed side is
//! kept apart and never cleared (as tokio's `READ_CLOSED`): a peer's FIN
//! that came with the last data gives no edge of its own after the read
//! that took the data.

use std::cell::RefMut;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use mio::{Interest, Token};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{Core, current};

/// A registered socket's state.
pub(crate) struct Slot {
    readable: bool,
    writable: bool,
    /// The peer's FIN, a reset or an error: sticky.
    read_closed: bool,
    write_closed: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

/// Applies an epoll event (`flags` of the socket in slot `token`) to its
/// socket, read as mio reads them (`mio::event::Event`'s `is_*`). The wakers
/// woken here only queue their task (they are the task's, or
/// `relay::wakeups`' that wake it), so the slab stays borrowed while they
/// run.
pub(super) fn dispatch(core: &Core, token: usize, flags: u32) {
    let mut io = core.io.borrow_mut();
    let Some(slot) = io.get_mut(token) else {
        return;
    };
    let has = |f: libc::c_int| flags & f as u32 != 0;
    let error = has(libc::EPOLLERR);
    // Both halves closed, or the peer's FIN (or our shutdown of reading).
    let read_closed = has(libc::EPOLLHUP) || (has(libc::EPOLLIN) && has(libc::EPOLLRDHUP)) || error;
    if has(libc::EPOLLIN) || has(libc::EPOLLPRI) || read_closed {
        slot.readable = true;
        slot.read_closed |= read_closed;
        if let Some(w) = &slot.reader {
            w.wake_by_ref();
        }
    }
    let write_closed = has(libc::EPOLLHUP) || error;
    if has(libc::EPOLLOUT) || write_closed {
        slot.writable = true;
        slot.write_closed |= write_closed;
        if let Some(w) = &slot.writer {
            w.wake_by_ref();
        }
    }
}

/// Keeps the waker to wake, cloning it only when it is another one (a
/// task's waker is the same on every poll).
fn register(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

/// recv(2) and send(2) as plain syscalls rather than through glibc's
/// wrappers: those are cancellation points, and once a process has a second
/// thread (the relay has its tokio runtimes' threads) each call switches
/// asynchronous cancellation on and off around the syscall, about 90
/// user-space instructions per relayed 64 B round trip in all (callgrind,
/// docs/relay.md) for thread cancellation, which the relay never uses.
/// musl's wrappers do no such bookkeeping; the syscalls are the same.
fn sys_recv(fd: libc::c_int, buf: *mut libc::c_void, len: usize) -> isize {
    // SAFETY: the caller passes `len` writable bytes at `buf`; no address out.
    unsafe {
        libc::syscall(
            libc::SYS_recvfrom,
            libc::c_long::from(fd),
            buf,
            len,
            0 as libc::c_long,
            std::ptr::null_mut::<libc::sockaddr>(),
            std::ptr::null_mut::<libc::socklen_t>(),
        ) as isize
    }
}

/// [`sys_recv`]'s twin. MSG_NOSIGNAL: a peer gone is an error here, not a
/// SIGPIPE.
fn sys_send(fd: libc::c_int, buf: *const libc::c_void, len: usize) -> isize {
    // SAFETY: the caller passes `len` readable bytes at `buf`; no address.
    unsafe {
        libc::syscall(
            libc::SYS_sendto,
            libc::c_long::from(fd),
            buf,
            len,
            libc::c_long::from(libc::MSG_NOSIGNAL),
            std::ptr::null::<libc::sockaddr>(),
            0 as libc::c_long,
        ) as isize
    }
}

fn not_on_its_loop() -> io::Error {
    io::Error::other("an event loop socket was used off its loop's thread")
}

/// A TCP stream of the event loop of the thread that made it, usable only
/// there (elsewhere every operation fails).
#[derive(Debug)]
pub struct TcpStream {
    sock: mio::net::TcpStream,
    slot: usize,
    home: usize,
}

impl TcpStream {
    /// Takes over a connected socket (from another runtime, e.g. after an
    /// HTTP upgrade there). On a loop's thread.
    pub fn from_std(sock: std::net::TcpStream) -> io::Result<Self> {
        sock.set_nonblocking(true)?;
        Self::register(mio::net::TcpStream::from_std(sock), true)
    }

    /// Connects to `addr`. On a loop's thread.
    pub async fn connect(addr: SocketAddr) -> io::Result<Self> {
        let stream = Self::register(mio::net::TcpStream::connect(addr)?, false)?;
        loop {
            std::future::poll_fn(|cx| stream.poll_writable(cx)).await?;
            // Writable: connected, or failed (mio's documented check).
            if let Some(e) = stream.sock.take_error()? {
                return Err(e);
            }
            match stream.sock.peer_addr() {
                Ok(_) => {
                    stream.with_slot(|s| s.readable = true)?;
                    return Ok(stream);
                }
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                    stream.with_slot(|s| {
                        s.writable = false;
                        s.write_closed = false;
                    })?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn register(mut sock: mio::net::TcpStream, ready: bool) -> io::Result<Self> {
        let core = current().ok_or_else(not_on_its_loop)?;
        let mut io = core.io.borrow_mut();
        let entry = io.vacant_entry();
        let slot = entry.key();
        core.registry
            .register(&mut sock, Token(slot), Interest::READABLE | Interest::WRITABLE)?;
        entry.insert(Slot {
            readable: ready,
            writable: ready,
            read_closed: false,
            write_closed: false,
            reader: None,
            writer: None,
        });
        Ok(Self {
            sock,
            slot,
            home: core.id,
        })
    }

    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.sock.set_nodelay(on)
    }

    fn core<'a>(&self) -> io::Result<&'a Core> {
        current()
            .filter(|c| c.id == self.home)
            .ok_or_else(not_on_its_loop)
    }

    /// This socket's slot in its loop's slab, borrowed.
    fn slot(&self) -> io::Result<RefMut<'_, Slot>> {
        let core = self.core()?;
        Ok(RefMut::map(core.io.borrow_mut(), |io| &mut io[self.slot]))
    }

    fn with_slot<R>(&self, f: impl FnOnce(&mut Slot) -> R) -> io::Result<R> {
        Ok(f(&mut *self.slot()?))
    }

    fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut slot = match self.slot() {
            Ok(s) => s,
            Err(e) => return Poll::Ready(Err(e)),
        };
        if slot.writable || slot.write_closed {
            return Poll::Ready(Ok(()));
        }
        register(&mut slot.writer, cx);
        Poll::Pending
    }
}

impl AsyncRead for TcpStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let mut slot = match self.slot() {
            Ok(s) => s,
            Err(e) => return Poll::Ready(Err(e)),
        };
        // SAFETY: only the kernel writes into it, and nothing here
        // de-initialises a byte.
        let dst = unsafe { buf.unfilled_mut() };
        let len = dst.len();
        if len == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !slot.readable && !slot.read_closed {
                register(&mut slot.reader, cx);
                return Poll::Pending;
            }
            // recv into the buffer's uninitialised part: the kernel only
            // writes it, and `assume_init` covers exactly what it wrote.
            let n = sys_recv(self.sock.as_raw_fd(), dst.as_mut_ptr().cast(), len);
            if n >= 0 {
                let n = n as usize;
                // 0 is EOF, which stays readable: no edge would come again.
                if n > 0 && n < len {
                    slot.readable = false;
                }
                // SAFETY: recv wrote these `n` bytes.
                unsafe { buf.assume_init(n) };
                buf.advance(n);
                return Poll::Ready(Ok(()));
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => slot.readable = false,
                io::ErrorKind::Interrupted => {}
                _ => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for TcpStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let mut slot = match self.slot() {
            Ok(s) => s,
            Err(e) => return Poll::Ready(Err(e)),
        };
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            if !slot.writable && !slot.write_closed {
                register(&mut slot.writer, cx);
                return Poll::Pending;
            }
            let n = sys_send(self.sock.as_raw_fd(), buf.as_ptr().cast(), buf.len());
            if n >= 0 {
                let n = n as usize;
                if n < buf.len() {
                    slot.writable = false;
                }
                return Poll::Ready(Ok(n));
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => slot.writable = false,
                io::ErrorKind::Interrupted => {}
                _ => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Nothing is buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.sock.shutdown(Shutdown::Write) {
            Err(e) if e.kind() != io::ErrorKind::NotConnected => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(())),
        }
    }
}

impl Drop for TcpStream {
    fn drop(&mut self) {
        // Off its loop (not done by the relay) the socket still closes,
        // which takes it out of the epoll set; only its slot stays.
        if let Ok(core) = self.core() {
            let _ = core.registry.deregister(&mut self.sock);
            core.io.borrow_mut().try_remove(self.slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::EventLoop;
    use super::*;
    use std::io::{Read, Write};
    use std::sync::mpsc;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Runs `f`'s future on a new loop; its result comes back here.
    fn on_loop<T: Send + 'static, F: Future<Output = T> + 'static>(
        f: impl FnOnce() -> F + Send + 'static,
    ) -> T {
        let lp = EventLoop::start("test-loop").unwrap();
        let (tx, rx) = mpsc::channel();
        lp.spawn_with(move || {
            let fut = f();
            Some(async move {
                let _ = tx.send(fut.await);
            })
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the task finished")
    }

    #[test]
    fn connects_reads_writes_and_sees_eof_more_than_once() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).unwrap();
            // Two writes: the reader sees them in one read or two.
            s.write_all(&buf).unwrap();
            s.write_all(b"!").unwrap();
        });
        let got = on_loop(move || async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"hello").await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            // EOF is sticky: no edge comes after it, and none is needed.
            let mut more = [0u8; 4];
            assert_eq!(s.read(&mut more).await.unwrap(), 0);
            got
        });
        peer.join().unwrap();
        assert_eq!(got, b"hello!");
    }

    #[test]
    fn a_refused_connect_is_an_error() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let err = on_loop(move || async move { TcpStream::connect(addr).await.err() });
        assert_eq!(err.map(|e| e.kind()), Some(io::ErrorKind::ConnectionRefused));
    }

    #[test]
    fn a_write_the_peer_does_not_take_waits_and_resumes_when_it_reads() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (go_tx, go) = mpsc::channel::<()>();
        let peer = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            // Not read until told: the writer fills both socket buffers.
            go.recv().unwrap();
            let mut n = 0;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match s.read(&mut buf).unwrap() {
                    0 => break n,
                    k => n += k,
                }
            }
        });
        const TOTAL: usize = 16 << 20;
        let (blocked_tx, blocked) = mpsc::channel();
        let writer = std::thread::spawn(move || {
            on_loop(move || async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                let chunk = vec![7u8; 1 << 16];
                let mut sent = 0;
                let mut told = false;
                while sent < TOTAL {
                    let part = &chunk[..(TOTAL - sent).min(chunk.len())];
                    let n = std::future::poll_fn(|cx| {
                        let p = Pin::new(&mut s).poll_write(cx, part);
                        if p.is_pending() && !told {
                            told = true;
                            let _ = blocked_tx.send(());
                        }
                        p
                    })
                    .await
                    .unwrap();
                    sent += n;
                }
                s.shutdown().await.unwrap();
                sent
            })
        });
        blocked
            .recv_timeout(Duration::from_secs(10))
            .expect("the writer had to wait");
        go_tx.send(()).unwrap();
        assert_eq!(writer.join().unwrap(), TOTAL);
        assert_eq!(peer.join().unwrap(), TOTAL);
    }

    #[test]
    fn a_socket_used_off_its_loop_fails_instead_of_touching_another() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let s = on_loop(move || async move { TcpStream::connect(addr).await.unwrap() });
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut s = s;
        let err = rt.block_on(async { s.write_all(b"x").await.unwrap_err() });
        assert!(err.to_string().contains("off its loop"), "{err}");
    }
}
