//! Process management: the data-dir lock, the pidfile, `--daemon`, `--check` and `--quit`.
//!
//! * The data dir holds `lock`, held with an exclusive `flock` while a broker uses the dir.
//! * The pidfile (default `<pid-dir>/qpidd.<port>.pid`, `<port>` being the `--port` value as
//!   given, so `qpidd.0.pid` for `--port 0`) holds the broker's pid and is held with an
//!   exclusive `flock` for the broker's lifetime. A pidfile that nobody holds is stale, so a
//!   reused pid never fools `--check` or `--quit`.
//! * `--daemon` re-executes `qpidd` with the same arguments and [`DAEMON_CHILD_ENV`] set; the
//!   child becomes a session leader, binds, writes the pidfile, prints the port and detaches
//!   its standard streams. The parent forwards the child's stderr until then, prints the port
//!   line and exits 0, or exits 1 if the child fails or does not start within `--wait`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::options::Options;

/// Set in the environment of the background child started by `--daemon`.
pub const DAEMON_CHILD_ENV: &str = "QPIDD_DAEMON_CHILD";

/// Whether this process is the background child of `--daemon`.
pub fn is_daemon_child() -> bool {
    std::env::var_os(DAEMON_CHILD_ENV).is_some()
}

/// Creates `dir` if missing and takes its lock file `lock`; the lock lasts as long as the
/// returned value. A second broker on the same dir gets an error naming it.
pub fn lock_data_dir(dir: &Path) -> anyhow::Result<Flock<File>> {
    fs::create_dir_all(dir)
        .with_context(|| format!("cannot create data directory {}", dir.display()))?;
    let path = dir.join("lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open lock file {}", path.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((_, Errno::EWOULDBLOCK)) => bail!(
            "data directory {} is in use by another broker (its lock file is held)",
            dir.display()
        ),
        Err((_, e)) => bail!("cannot lock {}: {e}", path.display()),
    }
}

/// The pidfile of this broker, locked while it lives.
#[derive(Debug)]
pub struct Pidfile {
    path: PathBuf,
    _lock: Flock<File>,
}

impl Pidfile {
    /// Creates (or takes over a stale) pidfile holding this process's pid.
    pub fn create(path: &Path) -> anyhow::Result<Pidfile> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent)
                .with_context(|| format!("cannot create pidfile directory {}", parent.display()))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("cannot open pidfile {}", path.display()))?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, Errno::EWOULDBLOCK)) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                bail!(
                    "a broker is already running (pid {}, pidfile {})",
                    pid.trim(),
                    path.display()
                )
            }
            Err((_, e)) => bail!("cannot lock pidfile {}: {e}", path.display()),
        };
        lock.set_len(0)?;
        writeln!(*lock, "{}", std::process::id())
            .with_context(|| format!("cannot write pidfile {}", path.display()))?;
        Ok(Pidfile {
            path: path.to_path_buf(),
            _lock: lock,
        })
    }

    /// Removes the file; the lock goes when the value is dropped.
    pub fn remove(&self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// The pid of the live broker holding `path`, with the pidfile open, or `None` if the pidfile
/// is missing or stale.
fn running_pid(path: &Path) -> anyhow::Result<Option<(i32, File)>> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot open pidfile {}", path.display())),
    };
    match Flock::lock(file.try_clone()?, FlockArg::LockSharedNonblock) {
        Ok(_unheld) => return Ok(None),
        Err((_, Errno::EWOULDBLOCK)) => {}
        Err((_, e)) => bail!("cannot check pidfile {}: {e}", path.display()),
    }
    // Held: the broker may be writing its pid right now.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let mut text = String::new();
        file.read_to_string(&mut text)?;
        if let Ok(pid) = text.trim().parse::<i32>() {
            return Ok(Some((pid, file)));
        }
        if Instant::now() > deadline {
            bail!("pidfile {} is held but holds no pid", path.display());
        }
        thread::sleep(Duration::from_millis(20));
        file = File::open(path)?;
    }
}

/// `--check`: prints the running broker's pid and returns true, or says none runs.
pub fn check(options: &Options) -> anyhow::Result<bool> {
    match running_pid(&options.pidfile)? {
        Some((pid, _)) => {
            println!("{pid}");
            Ok(true)
        }
        None => {
            eprintln!(
                "qpidd: no broker is running (pidfile {})",
                options.pidfile.display()
            );
            Ok(false)
        }
    }
}

/// `--quit`: sends SIGTERM to the running broker and waits (up to `--wait`) until it exits.
pub fn quit(options: &Options) -> anyhow::Result<()> {
    let path = &options.pidfile;
    let Some((pid, mut file)) = running_pid(path)? else {
        bail!(
            "cannot stop broker: no broker is running (pidfile {})",
            path.display()
        );
    };
    kill(Pid::from_raw(pid), Signal::SIGTERM)
        .with_context(|| format!("cannot send SIGTERM to broker pid {pid}"))?;
    let deadline = Instant::now() + options.wait;
    loop {
        match Flock::lock(file, FlockArg::LockSharedNonblock) {
            Ok(_) => return Ok(()),
            Err((f, Errno::EWOULDBLOCK)) => file = f,
            Err((_, e)) => bail!("cannot watch pidfile {}: {e}", path.display()),
        }
        if Instant::now() > deadline {
            bail!("broker pid {pid} did not exit within {:?}", options.wait);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The parent side of `--daemon`: starts the background broker with `args` and waits for its
/// port line, which it prints. Returns the child's pid.
pub fn spawn(options: &Options, args: &[String]) -> anyhow::Result<u32> {
    if let Some((pid, _)) = running_pid(&options.pidfile)? {
        bail!(
            "a broker is already running (pid {pid}, pidfile {})",
            options.pidfile.display()
        );
    }
    let exe = std::env::current_exe().context("cannot find the qpidd executable")?;
    let mut child = Command::new(&exe)
        .args(args)
        .env(DAEMON_CHILD_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    let (Some(stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        bail!("cannot read the background broker's output");
    };
    let forward = thread::spawn(move || {
        let _ = io::copy(&mut stderr, &mut io::stderr());
    });
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut line = String::new();
        let _ = tx.send(BufReader::new(stdout).read_line(&mut line).map(|_| line));
    });
    match rx.recv_timeout(options.wait) {
        Ok(Ok(line)) if !line.trim().is_empty() => {
            let mut out = io::stdout().lock();
            out.write_all(line.as_bytes())?;
            out.flush()?;
            Ok(child.id())
        }
        Ok(_) | Err(mpsc::RecvTimeoutError::Disconnected) => {
            let status = child.wait()?;
            let _ = forward.join();
            bail!("the background broker failed to start ({status})")
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the background broker did not start within {:?}",
                options.wait
            )
        }
    }
}

/// The child side of `--daemon`, first thing: leave the parent's session and terminal, and
/// close descriptors inherited from whoever started the parent (a caller waiting for a pipe to
/// close must not wait for the daemon).
pub fn detach_from_parent() -> anyhow::Result<()> {
    nix::unistd::setsid().context("setsid")?;
    let inherited: Vec<i32> = fs::read_dir("/proc/self/fd")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .filter(|fd| *fd > 2)
                .collect()
        })
        .unwrap_or_default();
    for fd in inherited {
        // The directory's own descriptor is already closed: EBADF, ignored.
        let _ = nix::unistd::close(fd);
    }
    Ok(())
}

/// The child side of `--daemon`, once started: standard streams go to /dev/null.
pub fn detach_stdio() -> anyhow::Result<()> {
    let null = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    nix::unistd::dup2_stdin(&null)?;
    nix::unistd::dup2_stdout(&null)?;
    nix::unistd::dup2_stderr(&null)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("qpidd-test-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn data_dir_lock_is_exclusive() {
        let dir = temp_dir("lock");
        let first = lock_data_dir(&dir).unwrap();
        let e = lock_data_dir(&dir).unwrap_err().to_string();
        assert!(
            e.contains(&dir.display().to_string()) && e.contains("in use"),
            "{e}"
        );
        drop(first);
        lock_data_dir(&dir).unwrap();
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn pidfile_lifecycle() {
        let dir = temp_dir("pid");
        let path = dir.join("sub/qpidd.5672.pid");
        assert!(running_pid(&path).unwrap().is_none());
        let pidfile = Pidfile::create(&path).unwrap();
        let (pid, _) = running_pid(&path).unwrap().unwrap();
        assert_eq!(pid as u32, std::process::id());
        let e = Pidfile::create(&path).unwrap_err().to_string();
        assert!(e.contains("already running"), "{e}");
        pidfile.remove();
        drop(pidfile);
        assert!(running_pid(&path).unwrap().is_none());
        // A stale pidfile (nobody holds it) is not a running broker, and is taken over.
        fs::write(&path, "999999\n").unwrap();
        assert!(running_pid(&path).unwrap().is_none());
        let again = Pidfile::create(&path).unwrap();
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            format!("{}\n", std::process::id())
        );
        drop(again);
        let _ = fs::remove_dir_all(&dir);
    }
}
