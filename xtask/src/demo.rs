//! `cargo xtask demo`: queue replication between two brokers, end to end (issue 4, point 10).
//!
//! Builds every binary (`cargo build --workspace --bins`, the dev profile, in the target
//! directory cargo reports), starts two brokers `node1` and `node2` with
//! `qpidd --port 0 --interface 127.0.0.1 --auth no --ha-queue-replication yes`, each with its
//! own data directory under `<target-dir>/demo/run-*` and its log (stderr) next to it, then
//! runs the documented commands one by one, each printed as a shell line before it runs:
//!
//! 1. `qpid-config add queue myqueue` on node1 and 100 messages published there
//!    (`qpid-perftest --no-consume`);
//! 2. `qpid-config --broker=node2 add queue --start-replica node1 myqueue` (the seed's first
//!    form): node2 catches up;
//! 3. 50 more messages published on node1 while a consumer empties the queue, then 25 more
//!    published: node2 follows the enqueues and the dequeues;
//! 4. `qpid-ha replicate -b node2 node1 otherqueue` (the seed's second form) into an empty
//!    queue created on node2 first;
//! 5. `qpid-ha query` on both brokers: the replica rows on node2, the subscriptions on node1.
//!
//! After each change it polls both brokers' depths (`qpid-config list queue --json`) until
//! node2's equals node1's, with a deadline, and prints the depth tables. Then it stops the
//! brokers (SIGTERM, SIGKILL after a deadline) and removes the run directory. On a failure it
//! prints what failed and the tail of both brokers' logs, stops the brokers, keeps the run
//! directory (its path is printed) and exits non-zero. Every wait is bounded and everything
//! listens and connects on 127.0.0.1 only.

use super::{Xtask, describe, run_cmd, run_with_timeout};
use anyhow::{Context, Result, bail, ensure};
use std::ffi::OsString;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a broker has to print its port.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a broker has to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound for each command the demo shows.
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// How long node2 has to reach node1's depth after a change.
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(30);
/// The programs the demo runs; all are built by `cargo build --workspace --bins`.
const PROGRAMS: &[&str] = &["qpidd", "qpid-config", "qpid-ha", "qpid-perftest"];

/// Builds everything, then runs the demo as one announced step; `Ok(false)` when a step failed.
pub fn run() -> Result<bool> {
    let mut x = Xtask::new()?;
    let build = x.cargo_cmd(["build", "--workspace", "--bins"]);
    let built = x.step("cargo build --workspace --bins", |x| {
        run_cmd(build)?;
        let qpidd = x.qpidd_bin()?;
        let dir = qpidd
            .parent()
            .context("qpidd has no directory")?
            .to_path_buf();
        for p in PROGRAMS {
            let bin = dir.join(format!("{p}{}", std::env::consts::EXE_SUFFIX));
            ensure!(
                bin.is_file(),
                "the build finished but {} does not exist",
                bin.display()
            );
        }
        Ok(dir)
    });
    if let Ok(bin_dir) = built {
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let work = x
            .target_dir
            .join("demo")
            .join(format!("run-{stamp}-{}", std::process::id()));
        let _ = x.step(
            "demo: myqueue replicated from node1 to node2 (qpid-config, qpid-ha)",
            |_| demo(&bin_dir, &work),
        );
    }
    Ok(x.summary())
}

/// Runs the script, then stops the brokers and cleans up (or keeps the logs on failure).
fn demo(bin_dir: &Path, work: &Path) -> Result<()> {
    fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
    let d = Demo::new(bin_dir)?;
    let mut brokers = Vec::new();
    let result = d.script(work, &mut brokers);
    if let Err(e) = &result {
        eprintln!("\nxtask demo: FAILED: {e:#}");
    }
    println!("\n# stopping the brokers (SIGTERM), the replica first");
    let mut stop_failed = None;
    for b in brokers.iter_mut().rev() {
        match b.stop() {
            Ok(()) => println!("{} stopped cleanly", b.name),
            Err(e) => {
                eprintln!("xtask demo: {e:#}");
                stop_failed = Some(e);
            }
        }
    }
    if result.is_err() || stop_failed.is_some() {
        for b in &brokers {
            b.print_log_tail();
        }
        eprintln!(
            "the brokers' data directories and logs are kept in {}",
            work.display()
        );
    } else {
        fs::remove_dir_all(work).with_context(|| format!("removing {}", work.display()))?;
        if let Some(parent) = work.parent() {
            let _ = fs::remove_dir(parent); // `<target-dir>/demo`, when no other run is in it
        }
        println!("removed {}", work.display());
    }
    result?;
    stop_failed.map_or(Ok(()), Err)
}

/// Runs the workspace's programs by name, so the printed commands read like a shell session.
struct Demo {
    /// `PATH` for the children: the build's bin directory first.
    path: OsString,
}

impl Demo {
    fn new(bin_dir: &Path) -> Result<Demo> {
        let inherited = std::env::var_os("PATH").unwrap_or_default();
        let dirs = std::iter::once(bin_dir.to_path_buf()).chain(std::env::split_paths(&inherited));
        let path = std::env::join_paths(dirs).context("the bin directory cannot go in PATH")?;
        Ok(Demo { path })
    }

    /// A command for one of the built programs (resolved through the child's `PATH`, whose
    /// first entry is the build's bin directory).
    fn cmd(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(program);
        cmd.args(args).env("PATH", &self.path);
        cmd
    }

    /// Prints `# comment`, then `$ command line`, then runs it with its output shown.
    fn show(&self, comment: &str, program: &str, args: &[&str]) -> Result<()> {
        println!("\n# {comment}");
        run_with_timeout(self.cmd(program, args), CLI_TIMEOUT)
    }

    /// `qpid-config list queue` with the depth columns.
    fn depth_table(&self, broker: &Broker) -> Result<()> {
        let addr = broker.addr();
        let args = [
            "-b",
            addr.as_str(),
            "list",
            "queue",
            "--show-property",
            "name",
            "--show-property",
            "msgDepth",
            "--show-property",
            "byteDepth",
        ];
        self.show(&format!("{}'s queues", broker.name), "qpid-config", &args)
    }

    /// `(msgDepth, byteDepth)` of `queue` on `broker`, read silently from the JSON listing.
    fn depth(&self, broker: &Broker, queue: &str) -> Result<(u64, u64)> {
        let addr = broker.addr();
        let args = [
            "-b",
            addr.as_str(),
            "--timeout",
            "5",
            "list",
            "queue",
            "--show-property",
            "name",
            "--show-property",
            "msgDepth",
            "--show-property",
            "byteDepth",
            "--json",
        ];
        let mut cmd = self.cmd("qpid-config", &args);
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("could not start `{}`", describe(&cmd)))?;
        ensure!(
            out.status.success(),
            "`{}` failed ({}): {}",
            describe(&cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let json = String::from_utf8_lossy(&out.stdout);
        queue_depth(&json, queue).with_context(|| {
            let compact: String = json.split_whitespace().collect();
            format!("no depth of {queue} on {} in {compact}", broker.name)
        })
    }

    /// Polls until node2's `queue` has node1's depth; prints it and the depth tables.
    fn wait_follow(&self, node1: &Broker, node2: &Broker, queue: &str) -> Result<()> {
        let started = Instant::now();
        let deadline = started + FOLLOW_TIMEOUT;
        loop {
            let want = self.depth(node1, queue)?;
            let have = self.depth(node2, queue).ok();
            if have == Some(want) {
                println!(
                    "\n# node2's {queue} follows node1's: {} messages, {} bytes on both \
                     (polled for {:.2}s)",
                    want.0,
                    want.1,
                    started.elapsed().as_secs_f64()
                );
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "node2's {queue} did not reach node1's depth (messages, bytes) {want:?} \
                     within {}s; it has {have:?}",
                    FOLLOW_TIMEOUT.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.depth_table(node1)?;
        self.depth_table(node2)
    }

    /// `qpid-perftest` publishing `count` confirmed messages to `queue` on `broker`, no consumer.
    fn perftest(&self, comment: &str, broker: &Broker, queue: &str, count: u64) -> Result<()> {
        self.perftest_args(comment, broker, queue, count, &["--no-consume"])
    }

    /// `qpid-perftest` publishing `count` confirmed messages to `queue` on `broker`, with
    /// `extra` flags (without `--no-consume` it also consumes until its own `count` arrived).
    fn perftest_args(
        &self,
        comment: &str,
        broker: &Broker,
        queue: &str,
        count: u64,
        extra: &[&str],
    ) -> Result<()> {
        let uri = format!("amqp://guest:guest@{}/%2f", broker.addr());
        let count = count.to_string();
        let mut args = vec![
            "--uri",
            uri.as_str(),
            "--queue",
            queue,
            "--predeclared",
            "--count",
            count.as_str(),
            "--confirm",
            count.as_str(),
        ];
        args.extend_from_slice(extra);
        self.show(comment, "qpid-perftest", &args)
    }

    /// The demo itself; the brokers it starts go into `brokers` so the caller can stop them
    /// and show their logs whatever happens here.
    fn script(&self, work: &Path, brokers: &mut Vec<Broker>) -> Result<()> {
        println!("\n# two brokers with queue replication enabled, on free ports of 127.0.0.1");
        brokers.push(Broker::start(self, "node1", work)?);
        brokers.push(Broker::start(self, "node2", work)?);
        let (node1, node2) = (&brokers[0], &brokers[1]);
        let (a1, a2) = (node1.addr(), node2.addr());
        println!("node1 = {a1}, node2 = {a2}");

        self.show(
            "a queue on node1 (the original)",
            "qpid-config",
            &["-b", &a1, "add", "queue", "myqueue"],
        )?;
        self.perftest("100 messages published on node1", node1, "myqueue", 100)?;
        let start_replica = format!("--broker={a2}");
        self.show(
            "node2 creates myqueue and replicates it from node1 (it catches up first)",
            "qpid-config",
            &[
                &start_replica,
                "add",
                "queue",
                "--start-replica",
                &a1,
                "myqueue",
            ],
        )?;
        self.wait_follow(node1, node2, "myqueue")?;

        self.perftest_args(
            "50 more published on node1 while a consumer empties the queue \
             (perftest counts the 100 older messages as `foreign`)",
            node1,
            "myqueue",
            50,
            &[],
        )?;
        self.perftest("then 25 more published on node1", node1, "myqueue", 25)?;
        self.wait_follow(node1, node2, "myqueue")?;

        self.show(
            "the seed's second form: replicate into an existing, empty queue",
            "qpid-config",
            &["-b", &a1, "add", "queue", "otherqueue"],
        )?;
        self.perftest("10 messages published on node1", node1, "otherqueue", 10)?;
        self.show(
            "an empty otherqueue on node2",
            "qpid-config",
            &["-b", &a2, "add", "queue", "otherqueue"],
        )?;
        self.show(
            "node2 replicates it from node1",
            "qpid-ha",
            &["replicate", "-b", &a2, &a1, "otherqueue"],
        )?;
        self.wait_follow(node1, node2, "otherqueue")?;

        self.show(
            "node2's HA status: its replica queues",
            "qpid-ha",
            &["query", "-b", &a2],
        )?;
        self.show(
            "node1's HA status: the replicating subscriptions it serves",
            "qpid-ha",
            &["query", "-b", &a1],
        )
    }
}

/// `(msgDepth, byteDepth)` of the object named `queue` in `qpid-config list queue --json`.
fn queue_depth(json: &str, queue: &str) -> Option<(u64, u64)> {
    let compact: String = json.chars().filter(|c| !c.is_whitespace()).collect();
    let name = format!("\"name\":\"{queue}\"");
    let object = compact
        .split('{')
        .find(|o| o.split([',', '}']).any(|field| field == name))?;
    let number = |key: &str| -> Option<u64> {
        let field = format!("\"{key}\":");
        let at = object.find(&field)? + field.len();
        let digits: String = object[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    Some((number("msgDepth")?, number("byteDepth")?))
}

/// One `qpidd` started by the demo; stopped (SIGTERM, then SIGKILL) when dropped.
struct Broker {
    name: &'static str,
    child: Child,
    port: u16,
    log: PathBuf,
    stopped: bool,
}

impl Broker {
    /// Starts `qpidd --port 0` with its data directory `<work>/<name>` and its log in
    /// `<work>/<name>.log`, and waits (bounded) for the port it prints.
    fn start(d: &Demo, name: &'static str, work: &Path) -> Result<Broker> {
        let data = work.join(name);
        fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
        let log = work.join(format!("{name}.log"));
        let data_arg = data.to_string_lossy();
        let mut cmd = d.cmd(
            "qpidd",
            &[
                "--port",
                "0",
                "--interface",
                "127.0.0.1",
                "--data-dir",
                &data_arg,
                "--auth",
                "no",
                "--ha-queue-replication",
                "yes",
            ],
        );
        println!("$ {} 2>{} &", describe(&cmd), log.display());
        let stderr =
            fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("could not start `{}`", describe(&cmd)))?;
        let stdout = child.stdout.take().context("qpidd's stdout is not piped")?;
        let mut broker = Broker {
            name,
            child,
            port: 0,
            log,
            stopped: false,
        };
        // The first line is the port; the rest is drained so the broker never blocks on it.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = tx.send(reader.read_line(&mut line).map(|_| line));
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let line = match rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(line)) => line,
            Ok(Err(e)) => bail!("reading {name}'s port: {e}; see {}", broker.log.display()),
            Err(_) => bail!(
                "{name} did not print its port within {}s; see {}",
                START_TIMEOUT.as_secs(),
                broker.log.display()
            ),
        };
        broker.port = line.trim().parse().with_context(|| {
            format!(
                "{name} printed {line:?} instead of its port (did it exit?); see {}",
                broker.log.display()
            )
        })?;
        Ok(broker)
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// SIGTERM, then SIGKILL after [`STOP_TIMEOUT`]; an error unless it exited 0 in time.
    fn stop(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        if let Some(status) = self.child.try_wait()? {
            bail!("{} had exited already ({status})", self.name);
        }
        // xtask has no libc binding: `kill -TERM PID` sends the signal.
        let _ = Command::new("kill")
            .args(["-TERM", "--", &self.child.id().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                ensure!(status.success(), "{} exited with {status}", self.name);
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!(
                    "{} did not exit within {}s of SIGTERM and was killed",
                    self.name,
                    STOP_TIMEOUT.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The log's path and its last lines, on stderr.
    fn print_log_tail(&self) {
        const LINES: usize = 20;
        eprintln!(
            "\n--- {} log: {} (last {LINES} lines)",
            self.name,
            self.log.display()
        );
        match fs::read_to_string(&self.log) {
            Ok(text) => {
                let lines: Vec<&str> = text.lines().collect();
                for l in &lines[lines.len().saturating_sub(LINES)..] {
                    eprintln!("{l}");
                }
            }
            Err(e) => eprintln!("(cannot read it: {e})"),
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::queue_depth;

    #[test]
    fn reads_the_depth_of_the_named_queue() {
        let json = r#"{
  "objects": [
    {"byteDepth": 10, "msgDepth": 2, "name": "myqueue2"},
    {
      "byteDepth": 1600,
      "msgDepth": 100,
      "name": "myqueue"
    }
  ],
  "type": "queue",
  "version": 1
}"#;
        assert_eq!(queue_depth(json, "myqueue"), Some((100, 1600)));
        assert_eq!(queue_depth(json, "myqueue2"), Some((2, 10)));
        assert_eq!(queue_depth(json, "other"), None);
    }
}
