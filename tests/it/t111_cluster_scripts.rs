//! Cluster-manager integration (issue 5, point 9): the example scripts under `docs/examples/`
//! (`qpidd-primary`, the Pacemaker agent `qpidd-ha.ocf`) run against real cluster members, and
//! their exit codes are checked.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use integration_tests::{TempDir, TestBroker, qpid_ha_path, qpidd_path, wait_until};
use integration_tests::{addr, free_port};

const FOLLOW: Duration = Duration::from_secs(15);
const SCRIPT_DEADLINE: Duration = Duration::from_secs(60);

/// `n` cluster members on fixed free ports, each knowing all of them.
fn cluster(n: usize) -> Vec<TestBroker> {
    integration_tests::cluster(n, &[]).0
}

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/examples")
        .join(name)
}

/// The directory of the binaries under test, first on PATH.
fn path_with_binaries() -> std::ffi::OsString {
    let bin_dir = qpid_ha_path().parent().unwrap().to_path_buf();
    let mut dirs = vec![bin_dir];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(dirs).unwrap()
}

#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `sh <script> <action>` with `env` (and PATH leading to the built binaries, no inherited
/// `QPID*`/`OCF_*` variables), killing it after `SCRIPT_DEADLINE`.
fn run_script(script: &str, action: &str, env: &[(&str, String)]) -> Run {
    let mut command = Command::new("sh");
    command.arg(example(script)).arg(action);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy().into_owned();
        if name.starts_with("QPID") || name.starts_with("OCF_") {
            command.env_remove(name);
        }
    }
    command
        .env("PATH", path_with_binaries())
        .env("QPIDD_DEFAULTS", "")
        .env("OCF_ROOT", "/nonexistent")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("spawn sh");
    let mut status = None;
    let done = wait_until(SCRIPT_DEADLINE, || {
        status = child.try_wait().expect("wait for the script");
        status.is_some()
    });
    if !done {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{script} {action} did not finish within {SCRIPT_DEADLINE:?}");
    }
    let out = child.wait_with_output().expect("the script's output");
    Run {
        code: status.unwrap().code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn primary_script(action: &str, b: &TestBroker) -> Run {
    run_script(
        "qpidd-primary",
        action,
        &[
            ("QPID_HA_BIN", qpid_ha_path().display().to_string()),
            ("QPIDD_ADDRESS", addr(b)),
            ("QPID_HA_OPTIONS", "--timeout 5".into()),
        ],
    )
}

fn agent_at(action: &str, address: &str, extra: &[(&str, String)]) -> Run {
    let mut env = vec![
        ("OCF_RESKEY_address", address.to_string()),
        ("OCF_RESKEY_qpid_ha_options", "--timeout 5".to_string()),
        (
            "OCF_RESKEY_qpid_ha_bin",
            qpid_ha_path().display().to_string(),
        ),
        ("OCF_RESKEY_qpidd_bin", qpidd_path().display().to_string()),
        ("OCF_RESKEY_pidfile", "/nonexistent/qpidd.pid".to_string()),
    ];
    env.extend(extra.iter().cloned());
    run_script("qpidd-ha.ocf", action, &env)
}

fn agent(action: &str, b: &TestBroker) -> Run {
    agent_at(action, &addr(b), &[])
}

fn qpid_ha(args: &[&str]) -> Run {
    let out = Command::new(qpid_ha_path())
        .args(args)
        .args(["--timeout", "5"])
        .output()
        .expect("run qpid-ha");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn status_at(address: &str) -> String {
    qpid_ha(&["status", "-b", address])
        .stdout
        .trim()
        .to_string()
}

fn wait_status(b: &TestBroker, expected: &str) {
    let ok = wait_until(FOLLOW, || status_at(&addr(b)) == expected);
    assert!(
        ok,
        "{} never became {expected}: {}",
        addr(b),
        status_at(&addr(b))
    );
}

fn kill_primary(primary: &mut TestBroker) {
    primary.signal("KILL");
    primary.wait_exit(Duration::from_secs(10));
}

#[test]
fn qpidd_primary_status_stop_and_start_with_their_exit_codes() {
    let mut brokers = cluster(2);
    // start promotes the first primary (every member is joining).
    let r = primary_script("start", &brokers[0]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("Promoting to primary: success"), "{r:?}");
    wait_status(&brokers[1], "ready");

    let r = primary_script("status", &brokers[0]);
    assert_eq!((r.code, r.stdout.trim()), (0, "qpidd is primary"), "{r:?}");
    let r = primary_script("status", &brokers[1]);
    assert_eq!(
        (r.code, r.stdout.trim()),
        (3, "qpidd is not primary"),
        "{r:?}"
    );

    // stop: a backup has no primary role to give up; a primary cannot give it up without
    // stopping the broker, which this script does only through QPID_INIT.
    let r = primary_script("stop", &brokers[1]);
    assert_eq!(r.code, 0, "{r:?}");
    let r = primary_script("stop", &brokers[0]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("cannot be given up"), "{r:?}");
    assert_eq!(status_at(&addr(&brokers[0])), "active");

    // start on the primary again: promotion is ignored, success.
    let r = primary_script("start", &brokers[0]);
    assert_eq!(r.code, 0, "{r:?}");

    // With QPID_INIT (here a script that sends SIGTERM to the broker on `stop`), stop stops
    // the primary broker.
    let dir = TempDir::new("init");
    let init = dir.path().join("qpidd-init");
    std::fs::write(
        &init,
        format!(
            "#!/bin/sh\n[ \"$1\" = stop ] && exec kill -TERM {}\nexit 1\n",
            brokers[0].pid()
        ),
    )
    .unwrap();
    let r = run_script(
        "qpidd-primary",
        "stop",
        &[
            ("QPID_HA_BIN", qpid_ha_path().display().to_string()),
            ("QPIDD_ADDRESS", addr(&brokers[0])),
            ("QPID_INIT", format!("sh {}", init.display())),
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    brokers[0].wait_exit(Duration::from_secs(10));

    // Failover: the primary is gone, start promotes the ready backup.
    let r = primary_script("status", &brokers[0]);
    assert_eq!(r.code, 3, "{r:?}");
    let r = primary_script("start", &brokers[0]);
    assert_eq!(r.code, 7, "{r:?}");
    let r = primary_script("start", &brokers[1]);
    assert_eq!(r.code, 0, "{r:?}");
    wait_status(&brokers[1], "active");
    let r = primary_script("status", &brokers[1]);
    assert_eq!(r.code, 0, "{r:?}");

    // Usage and unsupported actions.
    let r = primary_script("frobnicate", &brokers[1]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("Usage:"), "{r:?}");
    let r = primary_script("reload", &brokers[1]);
    assert_eq!(r.code, 3, "{r:?}");
    let r = run_script(
        "qpidd-primary",
        "status",
        &[("QPID_HA_BIN", "/nonexistent/qpid-ha".into())],
    );
    assert_eq!(r.code, 5, "{r:?}");
}

#[test]
fn qpidd_primary_start_fails_with_1_on_a_broker_that_is_not_a_cluster_member() {
    // A broker that is not a cluster member at all cannot be promoted: exit 1 with the reason.
    let standalone = TestBroker::start();
    let r = primary_script("start", &standalone);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains("failure"), "{r:?}");
    let r = primary_script("status", &standalone);
    assert_eq!(r.code, 3, "{r:?}");
}

#[test]
fn ocf_agent_monitor_reports_primary_backup_and_stopped_and_promotes_after_failover() {
    let mut brokers = cluster(2);
    let r = qpid_ha(&["promote", "--cluster-manager", "-b", &addr(&brokers[0])]);
    assert_eq!(r.code, 0, "{r:?}");
    wait_status(&brokers[1], "ready");

    let r = agent("monitor", &brokers[0]);
    assert_eq!(r.code, 8, "monitor on the primary: {r:?}");
    let r = agent("monitor", &brokers[1]);
    assert_eq!(r.code, 0, "monitor on a backup: {r:?}");
    // Promoting the primary again succeeds; demoting a backup is a no-op success.
    let r = agent("promote", &brokers[0]);
    assert_eq!(r.code, 0, "{r:?}");
    let r = agent("demote", &brokers[1]);
    assert_eq!(r.code, 0, "{r:?}");
    // The agent did not start these brokers (no pidfile): it refuses to "stop" a running one.
    let r = agent("stop", &brokers[1]);
    assert_eq!(r.code, 1, "{r:?}");

    kill_primary(&mut brokers[0]);
    let r = agent("monitor", &brokers[0]);
    assert_eq!(r.code, 7, "monitor on a stopped broker: {r:?}");
    let r = agent("stop", &brokers[0]);
    assert_eq!(r.code, 0, "stop of a stopped broker: {r:?}");
    let r = agent("promote", &brokers[0]);
    assert_eq!(r.code, 7, "promote of a stopped broker: {r:?}");

    let r = agent("promote", &brokers[1]);
    assert_eq!(r.code, 0, "promote of the ready backup: {r:?}");
    wait_status(&brokers[1], "active");
    let r = agent("monitor", &brokers[1]);
    assert_eq!(r.code, 8, "{r:?}");
}

#[test]
fn ocf_agent_monitor_of_a_standalone_broker_is_a_configuration_error() {
    let standalone = TestBroker::start();
    let r = agent("monitor", &standalone);
    assert_eq!(r.code, 6, "{r:?}");
    let r = agent("promote", &standalone);
    assert_eq!(r.code, 1, "{r:?}");
}

/// Kills the broker named by a pidfile when dropped (a broker the agent started).
struct PidfileGuard(PathBuf);

impl PidfileGuard {
    fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.0).ok()?.trim().parse().ok()
    }
}

impl Drop for PidfileGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
        }
    }
}

fn process_alive(pid: u32) -> bool {
    Command::new("kill")
        .arg("-0")
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[test]
fn ocf_agent_starts_promotes_demotes_and_stops_a_broker_it_manages() {
    let dir = TempDir::new("ocf");
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let pidfile = dir.path().join("run/qpidd.pid");
    let logfile = dir.path().join("qpidd.log");
    let guard = PidfileGuard(pidfile.clone());
    let env = [
        ("OCF_RESKEY_pidfile", pidfile.display().to_string()),
        ("OCF_RESKEY_logfile", logfile.display().to_string()),
        (
            "OCF_RESKEY_qpidd_options",
            format!(
                "--port {port} --no-data-dir --auth no --ha-cluster yes --ha-brokers-url {address}"
            ),
        ),
        ("OCF_RESKEY_start_timeout", "20".to_string()),
        ("OCF_RESKEY_stop_timeout", "10".to_string()),
    ];
    let log = || std::fs::read_to_string(&logfile).unwrap_or_default();

    let r = agent_at("monitor", &address, &env);
    assert_eq!(r.code, 7, "probe before start: {r:?}");
    let r = agent_at("start", &address, &env);
    assert_eq!(r.code, 0, "start: {r:?}\n{}", log());
    let pid = guard.pid().expect("the agent's pidfile");
    assert!(process_alive(pid));
    assert_eq!(status_at(&address), "joining");
    let r = agent_at("start", &address, &env);
    assert_eq!(r.code, 0, "start of a running broker: {r:?}");
    let r = agent_at("monitor", &address, &env);
    assert_eq!(r.code, 0, "{r:?}");

    // The only member: promotion from joining succeeds.
    let r = agent_at("promote", &address, &env);
    assert_eq!(r.code, 0, "promote: {r:?}\n{}", log());
    assert!(wait_until(FOLLOW, || status_at(&address) == "active"));
    let r = agent_at("monitor", &address, &env);
    assert_eq!(r.code, 8, "{r:?}");

    // Demote restarts the broker: it comes back as a member that is not primary.
    let r = agent_at("demote", &address, &env);
    assert_eq!(r.code, 0, "demote: {r:?}\n{}", log());
    let new_pid = guard.pid().expect("the agent's pidfile after demote");
    assert_ne!(new_pid, pid, "demote restarts the broker");
    assert!(wait_until(Duration::from_secs(10), || !process_alive(pid)));
    assert_eq!(status_at(&address), "joining");
    let r = agent_at("monitor", &address, &env);
    assert_eq!(r.code, 0, "{r:?}");

    let r = agent_at("stop", &address, &env);
    assert_eq!(r.code, 0, "stop: {r:?}\n{}", log());
    assert!(wait_until(Duration::from_secs(10), || !process_alive(
        new_pid
    )));
    assert!(!pidfile.exists());
    let r = agent_at("monitor", &address, &env);
    assert_eq!(r.code, 7, "{r:?}");
    let r = agent_at("stop", &address, &env);
    assert_eq!(r.code, 0, "stop of a stopped broker: {r:?}");
    assert_ne!(qpid_ha(&["ping", "-b", &address]).code, 0);
    drop(guard);
}

#[test]
fn ocf_agent_meta_data_validate_all_and_unknown_actions() {
    let r = agent_at("meta-data", "127.0.0.1:1", &[]);
    assert_eq!(r.code, 0, "{r:?}");
    let xml = r.stdout.trim_start();
    assert!(xml.starts_with("<?xml"), "{xml}");
    assert!(xml.contains("<resource-agent name=\"qpidd-ha\""), "{xml}");
    assert!(xml.trim_end().ends_with("</resource-agent>"), "{xml}");
    for action in ["start", "stop", "monitor", "promote", "demote", "meta-data"] {
        assert!(
            xml.contains(&format!("<action name=\"{action}\"")),
            "{action}: {xml}"
        );
    }
    // Every element opened is closed (a cheap well-formedness check).
    let opened = xml.matches("<parameter ").count();
    assert_eq!(opened, xml.matches("</parameter>").count());
    assert!(opened >= 5);

    let r = agent_at("validate-all", "127.0.0.1:1", &[]);
    assert_eq!(r.code, 0, "{r:?}");
    let r = agent_at(
        "validate-all",
        "127.0.0.1:1",
        &[("OCF_RESKEY_qpid_ha_bin", "/nonexistent/qpid-ha".into())],
    );
    assert_eq!(r.code, 5, "{r:?}");
    let r = agent_at("frobnicate", "127.0.0.1:1", &[]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stderr.contains("usage:"), "{r:?}");
}
