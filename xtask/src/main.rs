//! `cargo xtask`: the workspace's developer automation, written in Rust so it needs nothing but
//! the toolchain (std + anyhow, every tool run through `std::process::Command`).
//!
//! * `cargo xtask test` is the README's one test command. On a fresh machine it
//!   1. creates the Python virtualenv `<target-dir>/interop-venv` when missing and installs the
//!      pinned `tests/interop/requirements.txt` (pika, pytest) into it; any failure here fails
//!      the command, so a missing pika can never silently skip the interop tests;
//!   2. builds every binary of the workspace (`cargo build --workspace --bins`);
//!   3. runs all the Rust tests (`cargo test --workspace --no-fail-fast`, so every test binary
//!      runs even when an earlier one fails);
//!   4. runs the pika interop tests (`tests/interop`) with the venv's pytest against the `qpidd`
//!      just built, passed in the environment variable `QPIDD_BIN`.
//! * `cargo xtask ci` is what `.ci/run` runs: `cargo fmt --all -- --check`,
//!   `cargo clippy --workspace --all-targets -- -D warnings`, then everything `test` does.
//! * `cargo xtask interop [PYTEST ARGS...]` sets up the venv, builds `qpidd` and runs only the
//!   interop tests, passing the arguments on to pytest (for example `-k ttl -x`).
//! * `cargo xtask bench` is the speed and memory benchmark (see `bench.rs`).
//! * `cargo xtask demo` is the README's first command: it builds everything, starts two brokers
//!   on free ports with temporary data directories, replicates a queue from one to the other
//!   with `qpid-config` and `qpid-ha`, shows the replica following, and stops them (see
//!   `demo.rs`).
//!
//! Each step is announced as it starts and timed; the checks after the set-up keep going when
//! one fails so a run reports every failure, and the command exits non-zero if any step failed.
//! Environment: `XTASK_PYTHON` (default `python3`) is the interpreter that creates the venv;
//! `CARGO_TARGET_DIR` is honoured (the venv lives in the target directory cargo reports).

mod bench;
mod demo;

use anyhow::{Context, Result, bail, ensure};
use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// The interop suite's Python dependencies, pinned; the venv is (re)provisioned when it changes.
const REQUIREMENTS: &str = "tests/interop/requirements.txt";
/// The interop tests' directory, relative to the workspace root.
const INTEROP_DIR: &str = "tests/interop";
/// Upper bound for the whole pytest run; each test also has its own watchdog (conftest.py).
const PYTEST_TIMEOUT: Duration = Duration::from_secs(20 * 60);

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  test                  set up the interop venv, build the binaries, run all Rust tests and
                        the pika interop tests (the README's test command)
  ci                    cargo fmt --check, cargo clippy -D warnings, then everything `test` does
  interop [ARGS...]     set up the venv, build qpidd, run only the interop tests; ARGS go to pytest
  bench [OPTIONS]       the speed and memory benchmark (`cargo xtask bench --help`)
  demo                  build everything, start two brokers and show a queue replicated from
                        one to the other (the README's first command)
  help                  print this message

environment:
  XTASK_PYTHON          Python 3 interpreter used to create the venv (default: python3)
  CARGO_TARGET_DIR      honoured; the venv is <target-dir>/interop-venv
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Dispatches the command line; `Ok(false)` means some step failed (already reported).
fn run(args: &[String]) -> Result<bool> {
    let Some((cmd, rest)) = args.split_first() else {
        eprint!("{USAGE}");
        bail!("no command given");
    };
    let no_args = |name: &str| -> Result<()> {
        ensure!(
            rest.is_empty(),
            "`cargo xtask {name}` takes no arguments (got {rest:?}); see `cargo xtask help`"
        );
        Ok(())
    };
    match cmd.as_str() {
        // A set-up step that fails stops the run; it has reported its error already, so only
        // the summary is left to print.
        "test" => {
            no_args("test")?;
            let mut x = Xtask::new()?;
            let _ = x.test(&[]);
            Ok(x.summary())
        }
        "ci" => {
            no_args("ci")?;
            let mut x = Xtask::new()?;
            x.lint();
            let _ = x.test(&[]);
            Ok(x.summary())
        }
        "interop" => {
            let mut x = Xtask::new()?;
            let _ = x.interop_only(rest);
            Ok(x.summary())
        }
        "bench" => bench::run(rest),
        "demo" => {
            no_args("demo")?;
            demo::run()
        }
        "help" | "-h" | "--help" => {
            print!("{USAGE}");
            Ok(true)
        }
        other => {
            eprint!("{USAGE}");
            bail!("unknown command `{other}`")
        }
    }
}

/// The outcome of one announced step, for the summary.
struct StepRecord {
    name: String,
    ok: bool,
    elapsed: Duration,
}

struct Xtask {
    /// The workspace root (parent of this crate's manifest directory).
    root: PathBuf,
    /// The cargo that runs us (`$CARGO`), so nested builds use the same toolchain.
    cargo: OsString,
    /// The target directory cargo uses for this workspace.
    target_dir: PathBuf,
    steps: Vec<StepRecord>,
    started: Instant,
}

impl Xtask {
    fn new() -> Result<Self> {
        let started = Instant::now();
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask's manifest directory has no parent")?
            .to_path_buf();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let target_dir = cargo_target_dir(&root, &cargo)?;
        Ok(Xtask {
            root,
            cargo,
            target_dir,
            steps: Vec::new(),
            started,
        })
    }

    /// `cargo fmt --check` and clippy; failures are recorded and the run goes on.
    fn lint(&mut self) {
        let fmt = self.cargo_cmd(["fmt", "--all", "--", "--check"]);
        let _ = self.step("cargo fmt --all -- --check", |_| run_cmd(fmt));
        let clippy = self.cargo_cmd([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]);
        let _ = self.step("cargo clippy --workspace --all-targets -D warnings", |_| {
            run_cmd(clippy)
        });
    }

    /// Venv, build, Rust tests, interop tests. A set-up failure stops the run (`Err`, already
    /// reported by [`Xtask::step`]); test failures are recorded and the remaining tests still run.
    fn test(&mut self, pytest_args: &[String]) -> Result<()> {
        let python = self.step("set up the interop virtualenv (pika, pytest)", |x| {
            x.ensure_venv()
        })?;
        let build = self.cargo_cmd(["build", "--workspace", "--bins"]);
        let qpidd = self.step("cargo build --workspace --bins", |x| {
            run_cmd(build)?;
            x.qpidd_bin()
        })?;
        let mut test = self.cargo_cmd(["test", "--workspace", "--no-fail-fast"]);
        test.env("QPIDD_BIN", &qpidd);
        let _ = self.step("cargo test --workspace --no-fail-fast", |_| run_cmd(test));
        let _ = self.step("interop tests (pytest tests/interop, pika)", |x| {
            x.run_pytest(&python, &qpidd, pytest_args)
        });
        Ok(())
    }

    /// The fast loop for the interop suite alone.
    fn interop_only(&mut self, pytest_args: &[String]) -> Result<()> {
        let python = self.step("set up the interop virtualenv (pika, pytest)", |x| {
            x.ensure_venv()
        })?;
        let build = self.cargo_cmd(["build", "--package", "qpidd", "--bins"]);
        let qpidd = self.step("cargo build --package qpidd --bins", |x| {
            run_cmd(build)?;
            x.qpidd_bin()
        })?;
        let _ = self.step("interop tests (pytest tests/interop, pika)", |x| {
            x.run_pytest(&python, &qpidd, pytest_args)
        });
        Ok(())
    }

    /// Announces, times and records one step.
    fn step<T>(&mut self, name: &str, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        println!("\n==> [xtask] {name}");
        let t0 = Instant::now();
        let result = f(self);
        let elapsed = t0.elapsed();
        match &result {
            Ok(_) => println!("==> [xtask] ok: {name} ({:.1}s)", elapsed.as_secs_f64()),
            Err(e) => eprintln!(
                "==> [xtask] FAILED: {name} ({:.1}s): {e:#}",
                elapsed.as_secs_f64()
            ),
        }
        self.steps.push(StepRecord {
            name: name.to_string(),
            ok: result.is_ok(),
            elapsed,
        });
        result
    }

    /// Prints every step's outcome; true when all passed.
    fn summary(&self) -> bool {
        let mut out = String::from("\n==> [xtask] summary\n");
        for s in &self.steps {
            let _ = writeln!(
                out,
                "    {:<6} {:>7.1}s  {}",
                if s.ok { "ok" } else { "FAILED" },
                s.elapsed.as_secs_f64(),
                s.name
            );
        }
        let all_ok = self.steps.iter().all(|s| s.ok);
        let _ = writeln!(
            out,
            "==> [xtask] {} in {:.1}s",
            if all_ok { "all steps passed" } else { "FAILED" },
            self.started.elapsed().as_secs_f64()
        );
        if all_ok {
            print!("{out}");
        } else {
            eprint!("{out}");
        }
        all_ok
    }

    fn cargo_cmd<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(&self.cargo);
        cmd.args(args).current_dir(&self.root);
        cmd
    }

    fn qpidd_bin(&self) -> Result<PathBuf> {
        let bin = self
            .target_dir
            .join("debug")
            .join(format!("qpidd{}", std::env::consts::EXE_SUFFIX));
        ensure!(
            bin.is_file(),
            "the build finished but {} does not exist",
            bin.display()
        );
        Ok(bin)
    }

    fn venv_dir(&self) -> PathBuf {
        self.target_dir.join("interop-venv")
    }

    /// Makes sure the venv exists and holds exactly the pinned requirements; returns its python.
    ///
    /// A stamp file inside the venv records the requirements it was provisioned with, so a run
    /// with an up-to-date venv costs one `import pika, pytest` check and no network.
    fn ensure_venv(&mut self) -> Result<PathBuf> {
        let venv = self.venv_dir();
        let python = venv_python(&venv);
        let requirements = self.root.join(REQUIREMENTS);
        let wanted = std::fs::read_to_string(&requirements)
            .with_context(|| format!("reading {}", requirements.display()))?;
        let stamp = venv.join(".xtask-requirements.txt");
        let up_to_date = std::fs::read_to_string(&stamp).is_ok_and(|have| have == wanted);
        if up_to_date && check_imports(&python).is_ok() {
            println!(
                "venv {} is up to date ({})",
                venv.display(),
                requirements.display()
            );
            return Ok(python);
        }
        // Provision from scratch if the venv is missing or broken, else just (re)install pins.
        let _ = std::fs::remove_file(&stamp);
        if !python.exists() || run_quiet(Command::new(&python).arg("-c").arg("pass")).is_err() {
            create_venv(&venv)?;
        }
        let mut pip = Command::new(&python);
        pip.args(["-m", "pip", "install"])
            .args(PIP_FLAGS)
            .arg("--requirement")
            .arg(&requirements);
        run_cmd(pip).context(
            "installing the interop test requirements with pip failed (PyPI must be reachable)",
        )?;
        check_imports(&python)
            .context("pika/pytest are not importable from the venv after installing them")?;
        std::fs::write(&stamp, &wanted).with_context(|| format!("writing {}", stamp.display()))?;
        Ok(python)
    }

    /// Runs pytest on the interop suite with `QPIDD_BIN` set, under an overall timeout.
    fn run_pytest(&self, python: &Path, qpidd: &Path, extra: &[String]) -> Result<()> {
        let junit = self.target_dir.join("interop-junit.xml");
        let mut cmd = Command::new(python);
        cmd.current_dir(self.root.join(INTEROP_DIR))
            .args(["-m", "pytest", "-v", "--strict-markers"])
            .arg(format!("--junitxml={}", junit.display()))
            .args(extra)
            .env("QPIDD_BIN", qpidd)
            // Keep the source tree clean: no __pycache__ next to the tests.
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("PYTHONUNBUFFERED", "1");
        run_with_timeout(cmd, PYTEST_TIMEOUT)
    }
}

/// pip flags for unattended runs (CI has no stdin and no need for progress bars).
const PIP_FLAGS: &[&str] = &[
    "--disable-pip-version-check",
    "--no-input",
    "--progress-bar",
    "off",
];

fn venv_python(venv: &Path) -> PathBuf {
    if cfg!(windows) {
        venv.join("Scripts").join("python.exe")
    } else {
        venv.join("bin").join("python")
    }
}

fn base_python() -> OsString {
    std::env::var_os("XTASK_PYTHON").unwrap_or_else(|| "python3".into())
}

/// `python3 -m venv`; where the interpreter lacks ensurepip (Debian without `python3-venv`)
/// falls back to a venv without pip, populated by the base interpreter's own pip.
fn create_venv(venv: &Path) -> Result<()> {
    let py = base_python();
    let mut venv_cmd = Command::new(&py);
    venv_cmd.args(["-m", "venv", "--clear"]).arg(venv);
    let Err(first) = run_cmd(venv_cmd) else {
        return Ok(());
    };
    eprintln!("`python3 -m venv` failed ({first:#}); trying a venv without pip plus the base pip");
    let mut bare = Command::new(&py);
    bare.args(["-m", "venv", "--clear", "--without-pip"])
        .arg(venv);
    let mut pip = Command::new(&py);
    pip.args(["-m", "pip", "--python"])
        .arg(venv_python(venv))
        .args(["install"])
        .args(PIP_FLAGS)
        .arg("pip");
    run_cmd(bare).and_then(|()| run_cmd(pip)).with_context(|| {
        format!(
            "could not create the virtualenv {} with {:?} (first attempt: {first:#}); \
             the interop tests need CPython 3 with the venv module and pip \
             (on Debian: apt-get install python3-venv python3-pip)",
            venv.display(),
            py
        )
    })
}

fn check_imports(python: &Path) -> Result<()> {
    let mut cmd = Command::new(python);
    cmd.args([
        "-c",
        "import pika, pytest; print('pika', pika.__version__, '/ pytest', pytest.__version__)",
    ]);
    run_cmd(cmd)
}

/// Asks cargo where the target directory is (honours `CARGO_TARGET_DIR` and config files).
fn cargo_target_dir(root: &Path, cargo: &OsStr) -> Result<PathBuf> {
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(root)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running `cargo metadata`")?;
    ensure!(
        out.status.success(),
        "`cargo metadata` failed: {}",
        out.status
    );
    let json = String::from_utf8(out.stdout).context("`cargo metadata` printed non-UTF-8")?;
    let dir = json_string_field(&json, "target_directory")
        .context("no target_directory in `cargo metadata` output")?;
    Ok(PathBuf::from(dir))
}

/// Extracts the first top-level-looking `"key":"value"` string from JSON text, unescaping it.
/// Enough for `cargo metadata`'s `target_directory` without pulling in a JSON crate.
fn json_string_field(json: &str, key: &str) -> Option<String> {
    let needle = format!("\"{key}\":\"");
    let start = json.rfind(&needle)? + needle.len();
    let mut out = String::new();
    let mut chars = json[start..].chars();
    loop {
        match chars.next()? {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                'b' => out.push('\u{8}'),
                'f' => out.push('\u{c}'),
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    let code = u32::from_str_radix(&hex, 16).ok()?;
                    out.push(char::from_u32(code)?);
                }
                other => out.push(other), // \" \\ \/
            },
            c => out.push(c),
        }
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command with inherited stdout/stderr and no stdin; error unless it exits 0.
fn run_cmd(mut cmd: Command) -> Result<()> {
    println!("$ {}", describe(&cmd));
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("could not start `{}`", describe(&cmd)))?;
    ensure!(status.success(), "`{}` failed: {status}", describe(&cmd));
    Ok(())
}

/// Runs a command silently, for probes.
fn run_quiet(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    ensure!(status.success(), "{status}");
    Ok(())
}

/// Like [`run_cmd`], but stops the child if it outlives `timeout`: SIGTERM first (pytest then
/// tears its fixtures down and the brokers with them), SIGKILL ten seconds later.
fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Result<()> {
    println!("$ {}", describe(&cmd));
    let mut child = cmd
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("could not start `{}`", describe(&cmd)))?;
    let deadline = Instant::now() + timeout;
    let mut terminated_at: Option<Instant> = None;
    loop {
        if let Some(status) = child.try_wait()? {
            ensure!(
                terminated_at.is_none(),
                "`{}` timed out after {}s and was stopped ({status})",
                describe(&cmd),
                timeout.as_secs()
            );
            ensure!(status.success(), "`{}` failed: {status}", describe(&cmd));
            return Ok(());
        }
        let now = Instant::now();
        match terminated_at {
            None if now >= deadline => {
                eprintln!(
                    "xtask: `{}` still running after {}s, terminating it",
                    describe(&cmd),
                    timeout.as_secs()
                );
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
                terminated_at = Some(now);
            }
            Some(t) if now >= t + Duration::from_secs(10) => {
                let _ = child.kill();
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::json_string_field;

    #[test]
    fn extracts_and_unescapes_target_directory() {
        let json = r#"{"packages":[],"target_directory":"/w\\x \"y\"/\u00e9t","version":1}"#;
        assert_eq!(
            json_string_field(json, "target_directory").as_deref(),
            Some("/w\\x \"y\"/ét")
        );
        assert_eq!(json_string_field(json, "missing"), None);
    }
}
