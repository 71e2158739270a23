//! Child processes that cannot outlive us.
//!
//! Each component runs in its own process group (so a stop reaches its
//! children too) with `PR_SET_PDEATHSIG=SIGKILL`. The kernel sends that signal
//! when the *thread* that forked the child exits, not the process, so all
//! children are forked from one thread that lives as long as the process:
//! test threads come and go, the control plane must not.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

pub struct Spawner {
    tx: Mutex<mpsc::Sender<SpawnRequest>>,
}

impl Spawner {
    pub fn global() -> &'static Spawner {
        static SPAWNER: OnceLock<Spawner> = OnceLock::new();
        SPAWNER.get_or_init(|| {
            let (tx, rx) = mpsc::channel::<SpawnRequest>();
            std::thread::Builder::new()
                .name("testenv-spawner".into())
                .spawn(move || {
                    for (mut cmd, reply) in rx {
                        let _ = reply.send(cmd.spawn());
                    }
                    // The channel never closes (the sender lives in a static);
                    // park so the thread, and with it our children, live on.
                    loop {
                        std::thread::park();
                    }
                })
                .expect("spawn the spawner thread");
            Spawner { tx: Mutex::new(tx) }
        })
    }

    /// Starts `program args` with stdout and stderr appended to
    /// `<log_dir>/<name>.log`.
    pub fn spawn(
        &self,
        name: &'static str,
        program: &Path,
        args: &[String],
        log_dir: &Path,
    ) -> std::io::Result<ManagedProcess> {
        let log_path = log_dir.join(format!("{name}.log"));
        let log = File::create(&log_path)?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let (reply_tx, reply_rx) = mpsc::channel();
        self.tx
            .lock()
            .expect("spawner lock")
            .send((cmd, reply_tx))
            .map_err(|_| std::io::Error::other("spawner thread is gone"))?;
        let child = reply_rx
            .recv()
            .map_err(|_| std::io::Error::other("spawner thread is gone"))??;
        Ok(ManagedProcess {
            name,
            child: Mutex::new(child),
            log_path,
        })
    }
}

pub struct ManagedProcess {
    pub name: &'static str,
    child: Mutex<Child>,
    log_path: PathBuf,
}

impl ManagedProcess {
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.child.lock().ok()?.try_wait().ok().flatten()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let Ok(mut f) = File::open(&self.log_path) else {
            return String::new();
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
        let mut buf = String::new();
        let _ = f.read_to_string(&mut buf);
        let all: Vec<&str> = buf.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// SIGTERM to the group, a short grace period, then SIGKILL. The
    /// apiserver's graceful shutdown can take longer than a test wants to
    /// wait, so the grace period is short.
    fn stop(&self) {
        let Ok(mut child) = self.child.lock() else { return };
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        let pgid = nix::unistd::Pid::from_raw(-(child.id() as i32));
        let _ = nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGTERM);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(3) {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = child.wait();
    }
}

impl ManagedProcess {
    /// SIGKILL to the group, and reap: for process exit, where nothing is
    /// left to shut down gracefully for.
    pub fn kill(&self) {
        let Ok(mut child) = self.child.lock() else { return };
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        let pgid = nix::unistd::Pid::from_raw(-(child.id() as i32));
        let _ = nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = child.wait();
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        self.stop();
    }
}
