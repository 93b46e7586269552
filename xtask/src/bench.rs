//! `cargo xtask bench`: the speed and memory benchmark of issue 2.
//!
//! Builds `qpidd` and `qpid-perftest` in release mode, starts our broker
//! (`qpidd --port 0 --no-data-dir --auth no`) and, when `rabbitmq-server` is installed, a
//! private RabbitMQ node on free loopback ports (its own node name, data and log directories
//! under `target/bench/rabbitmq`; nothing is installed here). Each scenario runs `--runs`
//! times per broker, the brokers alternating, and the table gives median [min–max] over the
//! valid runs and the ratio ours/RabbitMQ against the issue's targets. Every run's full
//! perftest report is kept in `target/bench/bench-<unix time>.json` (and `latest.json`).
//! The memory scenario starts a fresh broker for every run.
//!
//! Options: `--runs N` (5), `--warmup S` (2), `--seconds S` (5), `--only KEY,KEY`,
//! `--no-rabbitmq`. Exits non-zero when a broker misbehaved (crash, lost or duplicated
//! messages, client errors); missed targets are reported, not failed.
//!
//! Issue 3's `qpid-config` speed targets are two more scenarios, `cli-call` and `cli-list-10k`,
//! run against a separate release `qpidd --auth yes --data-dir target/bench/runs-*/…` (guest/guest
//! from 127.0.0.1, SASL PLAIN) with the release `qpid-config`, timed from spawn to exit. They
//! have no RabbitMQ counterpart. See [`BenchEnv::run_cli`].
//!
//! Only std and anyhow, like the rest of xtask: the perftest JSON is read with the small
//! parser at the bottom of this file, and the queues for `cli-list-10k` are declared with the
//! small AMQP 0-9-1 client [`RawAmqp`].

#[path = "bench_replication.rs"]
mod replication;
#[path = "bench_store.rs"]
mod store;

use anyhow::{Context, Result, bail, ensure};
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const USAGE: &str = "\
usage: cargo xtask bench [--runs N] [--warmup S] [--seconds S] [--only KEY,KEY] [--no-rabbitmq]

Runs the issue-2 scenarios against qpidd and (when rabbitmq-server is installed) RabbitMQ,
interleaved, and writes target/bench/latest.json. Scenario keys: auto-ack, manual-ack, 4x4,
latency, memory, lapin, and (issue 3, qpidd only, broker with --auth yes) cli-call (10 x --runs
timed `qpid-config queues` calls) and cli-list-10k (10,000 queues listed --runs times, text and
--json).
Issue 4's replication measures (qpidd only, two brokers with --ha-queue-replication yes):
repl-confirm, repl-lag, repl-reconnect, repl-catchup, or `replication` for all four.
Issue 6's durable-store measures (qpidd with --data-dir, vs RabbitMQ where it has a counterpart):
store-confirm, store-latency, store-replica, store-cluster, store-recovery, store-disk, or
`store` for all six.
";

/// What a scenario measures and how it is judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Measure {
    /// Consumed msgs/s; `cpu_target` adds the broker-CPU-per-message target.
    Throughput { cpu_target: bool },
    /// p99 end-to-end latency at a fixed rate.
    Latency,
    /// RSS growth per queued message, fresh broker per run.
    Memory,
    /// Consumed msgs/s through lapin, without a target.
    Lapin,
    /// Wall time of single `qpid-config` calls (issue 3: < 50 ms each).
    CliCall,
    /// Wall time of `qpid-config queues` over 10,000 queues (issue 3: < 1 s).
    CliList,
}

impl Measure {
    fn is_cli(self) -> bool {
        matches!(self, Measure::CliCall | Measure::CliList)
    }
}

#[derive(Debug, Clone)]
struct Scenario {
    key: &'static str,
    title: &'static str,
    measure: Measure,
    args: &'static [&'static str],
}

/// Publisher confirms (window 1,000) are on in every scenario. Closed-loop scenarios cap the
/// backlog at 50,000 messages so a broker without publisher flow control still has a steady
/// state to measure (RabbitMQ's own flow control keeps it far below that).
fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            key: "auto-ack",
            title: "1 producer, 1 consumer, 16 B, transient, auto-ack",
            measure: Measure::Throughput { cpu_target: true },
            args: &[
                "--producers",
                "1",
                "--consumers",
                "1",
                "--size",
                "16",
                "--auto-ack",
                "--confirm",
                "1000",
                "--max-backlog",
                "50000",
            ],
        },
        Scenario {
            key: "manual-ack",
            title: "same with manual acks, prefetch 1000",
            measure: Measure::Throughput { cpu_target: false },
            args: &[
                "--producers",
                "1",
                "--consumers",
                "1",
                "--size",
                "16",
                "--prefetch",
                "1000",
                "--confirm",
                "1000",
                "--max-backlog",
                "50000",
            ],
        },
        Scenario {
            key: "4x4",
            title: "4 producers, 4 consumers, one queue, 16 B, auto-ack",
            measure: Measure::Throughput { cpu_target: false },
            args: &[
                "--producers",
                "4",
                "--consumers",
                "4",
                "--size",
                "16",
                "--auto-ack",
                "--confirm",
                "1000",
                "--max-backlog",
                "50000",
            ],
        },
        Scenario {
            key: "latency",
            title: "1 KiB at a fixed 5,000 msg/s, auto-ack",
            measure: Measure::Latency,
            args: &[
                "--producers",
                "1",
                "--consumers",
                "1",
                "--size",
                "1024",
                "--rate",
                "5000",
                "--auto-ack",
                "--confirm",
                "1000",
            ],
        },
        Scenario {
            key: "lapin",
            title: "lapin client: 1 producer, 1 consumer, 16 B, auto-ack",
            measure: Measure::Lapin,
            args: &[
                "--client",
                "lapin",
                "--producers",
                "1",
                "--consumers",
                "1",
                "--size",
                "16",
                "--auto-ack",
                "--confirm",
                "1000",
            ],
        },
        Scenario {
            key: "memory",
            title: "500,000 queued 16 B messages, no consumer",
            measure: Measure::Memory,
            args: &[
                "--producers",
                "1",
                "--size",
                "16",
                "--count",
                "500000",
                "--no-consume",
                "--confirm",
                "1000",
                "--queue",
                "bench-fill",
            ],
        },
        Scenario {
            key: "cli-call",
            title: "qpid-config call, --auth yes, PLAIN, loopback",
            measure: Measure::CliCall,
            args: &["queues"],
        },
        Scenario {
            key: "cli-list-10k",
            title: "qpid-config queues, 10,000 queues",
            measure: Measure::CliList,
            args: &["queues"],
        },
    ]
}

/// How many queues `cli-list-10k` lists.
const LIST_QUEUES: usize = 10_000;
/// `cli-call` makes this many timed calls per `--runs`.
const CALLS_PER_RUN: usize = 10;

#[derive(Debug, Clone)]
struct Options {
    runs: usize,
    warmup: f64,
    seconds: f64,
    only: Option<Vec<String>>,
    rabbitmq: bool,
}

impl Options {
    fn parse(args: &[String]) -> Result<Option<Options>> {
        let mut o = Options {
            runs: 5,
            warmup: 2.0,
            seconds: 5.0,
            only: None,
            rabbitmq: true,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
            match a.as_str() {
                "--runs" => o.runs = value("--runs")?.parse().context("--runs")?,
                "--warmup" => o.warmup = value("--warmup")?.parse().context("--warmup")?,
                "--seconds" => o.seconds = value("--seconds")?.parse().context("--seconds")?,
                "--only" => {
                    o.only = Some(value("--only")?.split(',').map(str::to_string).collect())
                }
                "--no-rabbitmq" => o.rabbitmq = false,
                "-h" | "--help" => return Ok(None),
                other => bail!("unknown bench option `{other}`\n{USAGE}"),
            }
        }
        ensure!(
            o.runs > 0 && o.seconds > 0.0 && o.warmup >= 0.0,
            "bad --runs/--seconds/--warmup"
        );
        Ok(Some(o))
    }
}

/// Entry point: `cargo xtask bench ARGS`.
pub fn run(args: &[String]) -> Result<bool> {
    let Some(opts) = Options::parse(args)? else {
        print!("{USAGE}");
        return Ok(true);
    };
    let started = Instant::now();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has no parent directory")?
        .to_path_buf();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    println!(
        "==> [bench] cargo build --release -p qpidd -p qpid-perftest -p qpid-config -p qpid-ha"
    );
    let status = Command::new(&cargo)
        .args([
            "build",
            "--release",
            "-p",
            "qpidd",
            "-p",
            "qpid-perftest",
            "-p",
            "qpid-config",
            "-p",
            "qpid-ha",
        ])
        .current_dir(&root)
        .status()
        .context("running cargo build")?;
    ensure!(status.success(), "release build failed: {status}");
    let target_dir = target_dir(&root, &cargo)?;
    let qpidd = target_dir.join("release/qpidd");
    let perftest = target_dir.join("release/qpid-perftest");
    let qpid_config = target_dir.join("release/qpid-config");
    let qpid_ha = target_dir.join("release/qpid-ha");
    let out_dir = root.join("target/bench");
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let runs_dir = out_dir.join(format!("runs-{stamp}"));
    fs::create_dir_all(&runs_dir).with_context(|| format!("creating {}", runs_dir.display()))?;

    let rabbit_server = if opts.rabbitmq { find_rabbitmq() } else { None };
    match &rabbit_server {
        Some(p) => println!("==> [bench] RabbitMQ: {}", p.display()),
        None => println!("==> [bench] rabbitmq-server not installed: our broker only"),
    }
    let rabbit_dir = out_dir.join("rabbitmq");
    let env = BenchEnv {
        qpidd,
        perftest,
        qpid_config,
        runs_dir,
        rabbit_server,
        rabbit_dir,
        opts: opts.clone(),
    };

    let selected: Vec<Scenario> = scenarios()
        .into_iter()
        .filter(|s| {
            opts.only
                .as_ref()
                .is_none_or(|o| o.iter().any(|k| k == s.key))
        })
        .collect();
    let repl_keys = replication::selected(&opts.only);
    let store_keys = store::selected(&opts.only);
    ensure!(
        !selected.is_empty() || !repl_keys.is_empty() || !store_keys.is_empty(),
        "--only matched no scenario\n{USAGE}"
    );
    let machine = machine_info();
    println!("==> [bench] machine: {}", machine.to_text());
    let source = source_version(&root);
    println!("==> [bench] source: {source}");

    let mut results = Vec::new();
    let mut misbehaved = Vec::new();
    let shared: Vec<&Scenario> = selected
        .iter()
        .filter(|s| s.measure != Measure::Memory && !s.measure.is_cli())
        .collect();
    if !shared.is_empty() {
        let mut brokers = env.start_brokers()?;
        for sc in shared {
            let mut res = ScenarioResult::new(sc);
            for run in 0..opts.runs {
                let order: Vec<usize> = if run % 2 == 0 {
                    (0..brokers.len()).collect()
                } else {
                    (0..brokers.len()).rev().collect()
                };
                for i in order {
                    let b = &mut brokers[i];
                    let r = env.run_once(sc, b, run, None)?;
                    r.print();
                    misbehaved.extend(r.misbehaviour());
                    res.runs.push(r);
                    if !b.alive() {
                        let msg = format!(
                            "{} exited during {} run {run}; see {}",
                            b.name(),
                            sc.key,
                            b.log.display()
                        );
                        eprintln!("==> [bench] {msg}");
                        misbehaved.push(msg);
                        let fresh = env.start(b.kind)?;
                        *b = fresh;
                    }
                }
            }
            results.push(res);
        }
        for b in brokers {
            b.stop();
        }
    }
    let cli: Vec<&Scenario> = selected.iter().filter(|s| s.measure.is_cli()).collect();
    if !cli.is_empty() {
        results.extend(env.run_cli(&cli, &mut misbehaved)?);
    }
    if let Some(sc) = selected.iter().find(|s| s.measure == Measure::Memory) {
        let mut res = ScenarioResult::new(sc);
        for run in 0..opts.runs {
            let kinds: Vec<BrokerKind> = env.kinds();
            let order: Vec<BrokerKind> = if run % 2 == 0 {
                kinds
            } else {
                kinds.into_iter().rev().collect()
            };
            for kind in order {
                let b = env.start(kind)?;
                std::thread::sleep(Duration::from_secs(2)); // let the fresh broker settle
                let fresh = b.rss_kib()?;
                let r = env.run_once(sc, &b, run, Some(fresh))?;
                r.print();
                misbehaved.extend(r.misbehaviour());
                res.runs.push(r);
                b.stop();
            }
        }
        results.push(res);
    }

    let repl_env = replication::ReplEnv {
        qpidd: &env.qpidd,
        perftest: &env.perftest,
        qpid_ha: &qpid_ha,
        runs_dir: &env.runs_dir,
        opts: &opts,
    };
    let repl = replication::run(&repl_env, &repl_keys);
    for r in &repl {
        misbehaved.extend(r.problems.iter().map(|p| format!("replication: {p}")));
    }
    // The store's single RabbitMQ node keeps its files in this run's directory.
    let store_rabbit_dir = env.runs_dir.join("rabbitmq-store");
    let store_results = store::run(
        &store::StoreEnv {
            repl: repl_env,
            rabbit_server: env.rabbit_server.as_deref(),
            rabbit_dir: &store_rabbit_dir,
        },
        &store_keys,
    );
    for r in &store_results {
        misbehaved.extend(r.problems.iter().map(|p| format!("store: {p}")));
    }
    let mut table = if results.is_empty() {
        String::new()
    } else {
        render_table(&results, env.rabbit_server.is_some())
    };
    if !repl.is_empty() {
        if !table.is_empty() {
            table.push('\n');
        }
        table.push_str(&replication::render_table(&repl));
    }
    if !store_results.is_empty() {
        if !table.is_empty() {
            table.push('\n');
        }
        table.push_str(&store::render_table(&store_results));
    }
    println!("\n{table}");
    let elapsed = started.elapsed().as_secs_f64();
    let report = Json::Obj(vec![
        ("unix_time".into(), Json::Num(stamp as f64)),
        ("elapsed_s".into(), Json::Num(elapsed)),
        ("machine".into(), machine.to_json()),
        ("source".into(), Json::Str(source)),
        ("runs".into(), Json::Num(opts.runs as f64)),
        ("warmup_s".into(), Json::Num(opts.warmup)),
        ("seconds".into(), Json::Num(opts.seconds)),
        ("rabbitmq".into(), Json::Bool(env.rabbit_server.is_some())),
        (
            "scenarios".into(),
            Json::Arr(results.iter().map(ScenarioResult::to_json).collect()),
        ),
        (
            "misbehaviour".into(),
            Json::Arr(misbehaved.iter().map(|m| Json::Str(m.clone())).collect()),
        ),
        (
            "replication".into(),
            Json::Arr(repl.iter().map(replication::ReplResult::to_json).collect()),
        ),
        (
            "store".into(),
            Json::Arr(
                store_results
                    .iter()
                    .map(store::StoreResult::to_json)
                    .collect(),
            ),
        ),
        ("table".into(), Json::Str(table.clone())),
    ]);
    let file = out_dir.join(format!("bench-{stamp}.json"));
    fs::write(&file, report.to_string())?;
    fs::write(out_dir.join("latest.json"), report.to_string())?;
    println!(
        "==> [bench] wrote {} (and latest.json) in {elapsed:.0} s",
        file.display()
    );
    for m in &misbehaved {
        eprintln!("==> [bench] MISBEHAVIOUR: {m}");
    }
    Ok(misbehaved.is_empty())
}

/// The target directory cargo uses (honours CARGO_TARGET_DIR and config files).
fn target_dir(root: &Path, cargo: &std::ffi::OsStr) -> Result<PathBuf> {
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(root)
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo metadata")?;
    ensure!(out.status.success(), "cargo metadata failed");
    let meta = Json::parse(&String::from_utf8_lossy(&out.stdout))?;
    Ok(PathBuf::from(
        meta.str("target_directory")
            .context("no target_directory")?,
    ))
}

fn find_rabbitmq() -> Option<PathBuf> {
    let out = Command::new("which").arg("rabbitmq-server").output().ok()?;
    if !out.status.success() {
        return None;
    }
    // Debian's /usr/sbin wrapper switches to the rabbitmq user and its fixed directories;
    // the script it wraps takes our environment as it is.
    let direct = PathBuf::from("/usr/lib/rabbitmq/bin/rabbitmq-server");
    if direct.exists() {
        return Some(direct);
    }
    Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

struct BenchEnv {
    qpidd: PathBuf,
    perftest: PathBuf,
    qpid_config: PathBuf,
    runs_dir: PathBuf,
    rabbit_server: Option<PathBuf>,
    rabbit_dir: PathBuf,
    opts: Options,
}

impl BenchEnv {
    fn kinds(&self) -> Vec<BrokerKind> {
        let mut k = vec![BrokerKind::Qpidd];
        if self.rabbit_server.is_some() {
            k.push(BrokerKind::RabbitMq);
        }
        k
    }

    fn start(&self, kind: BrokerKind) -> Result<Broker> {
        match kind {
            BrokerKind::Qpidd => Broker::start_qpidd(
                &self.qpidd,
                &self.runs_dir,
                &["--port", "0", "--no-data-dir", "--auth", "no"],
            ),
            BrokerKind::RabbitMq => Broker::start_rabbitmq(
                self.rabbit_server
                    .as_deref()
                    .context("no rabbitmq-server")?,
                &self.rabbit_dir,
            ),
        }
    }

    fn start_brokers(&self) -> Result<Vec<Broker>> {
        self.kinds().into_iter().map(|k| self.start(k)).collect()
    }

    /// One perftest run against `broker`; `fresh_rss` is the memory scenario's baseline.
    fn run_once(
        &self,
        sc: &Scenario,
        broker: &Broker,
        run: usize,
        fresh_rss: Option<u64>,
    ) -> Result<RunResult> {
        let mut args = broker.perftest_target();
        args.extend(sc.args.iter().map(|s| s.to_string()));
        if sc.measure != Measure::Memory {
            args.extend([
                "--warmup-seconds".into(),
                self.opts.warmup.to_string(),
                "--seconds".into(),
                self.opts.seconds.to_string(),
            ]);
        }
        let base = self
            .runs_dir
            .join(format!("{}-{}-{run}", sc.key, broker.kind.key()));
        let out_path = base.with_extension("json");
        let err_path = base.with_extension("err");
        let cmdline = format!("{} {}", self.perftest.display(), args.join(" "));
        let mut child = Command::new(&self.perftest)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out_path)?)
            .stderr(fs::File::create(&err_path)?)
            .spawn()
            .context("starting qpid-perftest")?;
        let limit = Duration::from_secs_f64(self.opts.warmup + self.opts.seconds + 120.0);
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break Some(s);
            }
            if t0.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let stdout = fs::read_to_string(&out_path).unwrap_or_default();
        let stderr = fs::read_to_string(&err_path).unwrap_or_default();
        let mut problems = Vec::new();
        let report = match status {
            None => {
                problems.push(format!(
                    "qpid-perftest hung for {} s and was killed",
                    limit.as_secs()
                ));
                None
            }
            Some(s) if !s.success() => {
                problems.push(format!("qpid-perftest failed ({s}): {}", stderr.trim()));
                None
            }
            Some(_) => Some(Json::parse(&stdout).context("parsing qpid-perftest JSON")?),
        };
        if let Some(r) = &report {
            if let Some(Json::Arr(ps)) = r.get("problems") {
                problems.extend(ps.iter().filter_map(|p| p.as_str().map(str::to_string)));
            }
            if let Some(Json::Arr(es)) = r.get("errors") {
                problems.extend(
                    es.iter()
                        .filter_map(|p| p.as_str().map(|e| format!("error: {e}"))),
                );
            }
        }
        let metric = |path: &str| report.as_ref().and_then(|r| r.num(path));
        let bytes_per_msg = match (
            fresh_rss,
            metric("broker_rss_kib.end"),
            metric("messages.sent"),
        ) {
            (Some(fresh), Some(end), Some(sent)) if sent > 0.0 => {
                Some((end - fresh as f64) * 1024.0 / sent)
            }
            _ => None,
        };
        Ok(RunResult {
            broker: broker.kind,
            run,
            cmdline,
            valid: report.is_some() && problems.is_empty(),
            problems,
            consume_rate: metric("consume_rate"),
            publish_rate: metric("publish_rate"),
            broker_us: metric("cpu.broker_us_per_msg"),
            tool_us: metric("cpu.tool_us_per_msg"),
            p99_us: metric("latency_us.p99"),
            other_cores: match (metric("cpu.other_s"), metric("window_s")) {
                (Some(o), Some(w)) if w > 0.0 => Some(o / w),
                _ => None,
            },
            bytes_per_msg,
            lost: metric("messages.lost").unwrap_or(0.0),
            duplicates: metric("messages.duplicates").unwrap_or(0.0),
            report,
        })
    }

    /// Issue 3's `qpid-config` scenarios, against one fresh `qpidd --auth yes` with a data
    /// directory of its own: `cli-call` first (one queue on the broker), then `cli-list-10k`
    /// (10,000 more queues, declared over one channel by [`RawAmqp`]).
    fn run_cli(
        &self,
        selected: &[&Scenario],
        misbehaved: &mut Vec<String>,
    ) -> Result<Vec<ScenarioResult>> {
        let data = self.runs_dir.join(format!("qpidd-auth-data-{}", unique()));
        fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
        let data_arg = data.to_str().context("non-UTF-8 data directory")?;
        let args = ["--port", "0", "--data-dir", data_arg, "--auth", "yes"];
        println!("==> [bench] qpidd {}", args.join(" "));
        let mut broker = Broker::start_qpidd(&self.qpidd, &self.runs_dir, &args)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], broker.port));
        let address = format!("guest/guest@127.0.0.1:{}", broker.port);
        let mut results = Vec::new();
        if let Some(sc) = selected.iter().find(|s| s.measure == Measure::CliCall) {
            let mut amqp = RawAmqp::connect(addr, "guest", "guest")?;
            amqp.declare_queues(&["bench-cli-q".to_string()])?;
            amqp.close()?;
            let n = self.opts.runs * CALLS_PER_RUN;
            let mut res = ScenarioResult::new(sc);
            res.cli.push(self.time_cli(
                "process start + exit (`--version`), ms",
                &["--version"],
                n,
                None,
                None,
            ));
            res.cli.push(time_handshake(addr, n));
            res.cli.push(self.time_cli(
                "`queues` (1 queue), ms",
                &["-b", &address, "queues"],
                n,
                Some(Target {
                    limit_ms: 50.0,
                    on_p90: true,
                }),
                Some(("bench-cli-q", 1)),
            ));
            results.push(res);
        }
        if let Some(sc) = selected.iter().find(|s| s.measure == Measure::CliList) {
            let names: Vec<String> = (0..LIST_QUEUES)
                .map(|i| format!("bench-q-{i:05}"))
                .collect();
            let mut amqp = RawAmqp::connect(addr, "guest", "guest")?;
            let t0 = Instant::now();
            amqp.declare_queues(&names)?;
            let declare_ms = t0.elapsed().as_secs_f64() * 1e3;
            amqp.close()?;
            println!("    declared {LIST_QUEUES} queues over one channel in {declare_ms:.0} ms");
            let n = self.opts.runs;
            let target = Some(Target {
                limit_ms: 1000.0,
                on_p90: false,
            });
            let mut res = ScenarioResult::new(sc);
            res.cli.push(CliSeries {
                label: "declare 10,000 queues (raw client, 1 channel), ms",
                command: format!("{LIST_QUEUES} x queue.declare, batches of 1,000"),
                samples_ms: vec![declare_ms],
                target: None,
                problems: Vec::new(),
                stdout_bytes: None,
            });
            res.cli.push(self.time_cli(
                "`queues`, ms",
                &["-b", &address, "queues"],
                n,
                target,
                Some(("bench-q-", LIST_QUEUES)),
            ));
            res.cli.push(self.time_cli(
                "`queues --json`, ms",
                &["-b", &address, "queues", "--json"],
                n,
                target,
                Some(("bench-q-", LIST_QUEUES)),
            ));
            res.cli.push(self.time_cli(
                "`queues bench-q-00001` (10,000 fetched, 1 printed), ms",
                &["-b", &address, "queues", "bench-q-00001"],
                n,
                None,
                Some(("bench-q-", 1)),
            ));
            results.push(res);
        }
        for r in &results {
            for s in &r.cli {
                misbehaved.extend(s.problems.iter().map(|p| format!("{}: {p}", r.sc.key)));
            }
        }
        if !broker.alive() {
            misbehaved.push(format!(
                "qpidd --auth yes exited during the qpid-config scenarios; see {}",
                broker.log.display()
            ));
        }
        broker.stop();
        Ok(results)
    }

    /// `n` timed runs of `qpid-config ARGS` (after one untimed warm-up), each from spawn to
    /// exit with stdout and stderr read through pipes. `expect` is (a substring, how many
    /// times stdout must contain it).
    fn time_cli(
        &self,
        label: &'static str,
        args: &[&str],
        n: usize,
        target: Option<Target>,
        expect: Option<(&str, usize)>,
    ) -> CliSeries {
        let command = format!("{} {}", self.qpid_config.display(), args.join(" "));
        let mut s = CliSeries {
            label,
            command,
            samples_ms: Vec::new(),
            target,
            problems: Vec::new(),
            stdout_bytes: None,
        };
        for i in 0..=n {
            let t0 = Instant::now();
            let out = Command::new(&self.qpid_config)
                .args(args)
                .stdin(Stdio::null())
                .output();
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            let problem = match &out {
                Err(e) => Some(format!("cannot run qpid-config: {e}")),
                Ok(o) if !o.status.success() => Some(format!(
                    "`{}` failed ({}): {}",
                    s.command,
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                )),
                Ok(o) => expect.and_then(|(needle, count)| {
                    let seen = String::from_utf8_lossy(&o.stdout).matches(needle).count();
                    (seen != count).then(|| {
                        format!(
                            "`{}` printed {needle:?} {seen} times, not {count}",
                            s.command
                        )
                    })
                }),
            };
            if let Some(p) = problem {
                s.problems.push(p);
                continue;
            }
            if let Ok(o) = &out {
                s.stdout_bytes = Some(o.stdout.len());
            }
            if i > 0 {
                s.samples_ms.push(ms);
            }
        }
        s.print();
        s
    }
}

/// `n` raw connections to `addr`: TCP connect, the AMQP handshake with PLAIN login as
/// guest/guest, up to connection.open-ok (the close is not timed).
fn time_handshake(addr: SocketAddr, n: usize) -> CliSeries {
    let mut s = CliSeries {
        label: "TCP + AMQP handshake + PLAIN login (raw), ms",
        command: format!("raw AMQP client to {addr}, to connection.open-ok"),
        samples_ms: Vec::new(),
        target: None,
        problems: Vec::new(),
        stdout_bytes: None,
    };
    for _ in 0..n {
        let t0 = Instant::now();
        match RawAmqp::connect(addr, "guest", "guest") {
            Ok(c) => {
                s.samples_ms.push(t0.elapsed().as_secs_f64() * 1e3);
                if let Err(e) = c.close() {
                    s.problems.push(format!("closing a raw connection: {e:#}"));
                }
            }
            Err(e) => s.problems.push(format!("raw AMQP connect: {e:#}")),
        }
    }
    s.print();
    s
}

/// A wall-time target of issue 3, judged on the p90 or on the median.
#[derive(Debug, Clone, Copy)]
struct Target {
    limit_ms: f64,
    on_p90: bool,
}

/// One timed series of the `qpid-config` scenarios, in milliseconds.
struct CliSeries {
    label: &'static str,
    command: String,
    samples_ms: Vec<f64>,
    target: Option<Target>,
    problems: Vec<String>,
    stdout_bytes: Option<usize>,
}

impl CliSeries {
    fn stat(&self) -> Option<Stat> {
        stat(&self.samples_ms)
    }

    fn p90(&self) -> Option<f64> {
        percentile(&self.samples_ms, 0.9)
    }

    /// The figure the target is judged on, and whether it is met.
    fn met(&self) -> Option<bool> {
        let t = self.target?;
        let v = if t.on_p90 {
            self.p90()?
        } else {
            self.stat()?.median
        };
        Some(v < t.limit_ms)
    }

    fn print(&self) {
        let f = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
        println!(
            "    {}: n {}, median {} ms, p90 {} ms, min {} ms, max {} ms{}{}",
            self.label,
            self.samples_ms.len(),
            f(self.stat().map(|s| s.median)),
            f(self.p90()),
            f(self.stat().map(|s| s.min)),
            f(self.stat().map(|s| s.max)),
            self.stdout_bytes
                .map_or(String::new(), |b| format!(", stdout {b} B")),
            if self.problems.is_empty() {
                String::new()
            } else {
                format!(" PROBLEMS: {}", self.problems.join("; "))
            }
        );
    }

    fn to_json(&self) -> Json {
        let n = |v: Option<f64>| v.map_or(Json::Null, Json::Num);
        let st = self.stat();
        Json::Obj(vec![
            ("label".into(), Json::Str(self.label.into())),
            ("command".into(), Json::Str(self.command.clone())),
            (
                "samples_ms".into(),
                Json::Arr(self.samples_ms.iter().map(|&v| Json::Num(v)).collect()),
            ),
            ("median_ms".into(), n(st.map(|s| s.median))),
            ("p90_ms".into(), n(self.p90())),
            ("min_ms".into(), n(st.map(|s| s.min))),
            ("max_ms".into(), n(st.map(|s| s.max))),
            ("target_ms".into(), n(self.target.map(|t| t.limit_ms))),
            (
                "judged_on".into(),
                self.target.map_or(Json::Null, |t| {
                    Json::Str(if t.on_p90 { "p90" } else { "median" }.into())
                }),
            ),
            ("met".into(), self.met().map_or(Json::Null, Json::Bool)),
            (
                "stdout_bytes".into(),
                self.stdout_bytes
                    .map_or(Json::Null, |b| Json::Num(b as f64)),
            ),
            (
                "problems".into(),
                Json::Arr(self.problems.iter().map(|p| Json::Str(p.clone())).collect()),
            ),
        ])
    }
}

/// Nearest-rank percentile (`q` in 0..=1).
fn percentile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

/// A minimal AMQP 0-9-1 client: PLAIN login, one channel, pipelined queue.declare. Enough to
/// create the 10,000 queues of `cli-list-10k` quickly and to time the handshake.
struct RawAmqp {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    channel_open: bool,
}

impl RawAmqp {
    fn connect(addr: SocketAddr, user: &str, password: &str) -> Result<RawAmqp> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let reader = BufReader::new(stream.try_clone()?);
        let mut c = RawAmqp {
            stream,
            reader,
            channel_open: false,
        };
        c.stream.write_all(b"AMQP\x00\x00\x09\x01")?;
        c.expect(0, 10, 10)?; // connection.start
        let mut a = Vec::new();
        a.extend_from_slice(&0u32.to_be_bytes()); // client-properties: empty table
        short_str(&mut a, "PLAIN");
        let response = format!("\0{user}\0{password}");
        a.extend_from_slice(&(response.len() as u32).to_be_bytes());
        a.extend_from_slice(response.as_bytes());
        short_str(&mut a, "en_US");
        c.send(0, 10, 11, &a)?; // start-ok
        let tune = c.expect(0, 10, 30)?;
        ensure!(tune.len() >= 8, "short connection.tune");
        let mut a = tune[..6].to_vec(); // the broker's channel-max and frame-max
        a.extend_from_slice(&0u16.to_be_bytes()); // no heartbeats
        c.send(0, 10, 31, &a)?; // tune-ok
        let mut a = Vec::new();
        short_str(&mut a, "/");
        short_str(&mut a, "");
        a.push(0);
        c.send(0, 10, 40, &a)?; // connection.open
        c.expect(0, 10, 41)?;
        Ok(c)
    }

    fn send(&mut self, channel: u16, class: u16, method: u16, args: &[u8]) -> Result<()> {
        let mut buf = Vec::with_capacity(12 + args.len());
        method_frame(&mut buf, channel, class, method, args);
        self.stream.write_all(&buf)?;
        Ok(())
    }

    /// The arguments of the next method frame, which must be `class.method` on `channel`.
    fn expect(&mut self, channel: u16, class: u16, method: u16) -> Result<Vec<u8>> {
        loop {
            let mut head = [0u8; 7];
            self.reader
                .read_exact(&mut head)
                .context("reading a frame header")?;
            let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
            let mut payload = vec![0u8; size + 1];
            self.reader.read_exact(&mut payload)?;
            ensure!(payload[size] == 0xCE, "bad frame end");
            payload.truncate(size);
            if head[0] == 8 {
                continue; // heartbeat
            }
            ensure!(
                head[0] == 1 && size >= 4,
                "unexpected frame type {}",
                head[0]
            );
            let ch = u16::from_be_bytes([head[1], head[2]]);
            let c = u16::from_be_bytes([payload[0], payload[1]]);
            let m = u16::from_be_bytes([payload[2], payload[3]]);
            if (ch, c, m) == (channel, class, method) {
                return Ok(payload.split_off(4));
            }
            if (c, m) == (10, 50) || (c, m) == (20, 40) {
                let code = payload
                    .get(4..6)
                    .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
                let len = payload.get(6).copied().unwrap_or(0) as usize;
                let text = payload
                    .get(7..7 + len)
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default();
                bail!("the broker closed the connection or channel: {code} {text}");
            }
            bail!("got method {c}.{m} on channel {ch}, expected {class}.{method} on {channel}");
        }
    }

    /// Declares `names` (transient, not exclusive, not auto-delete) on channel 1, 1,000 at a
    /// time without waiting between them, then waits for their declare-oks.
    fn declare_queues(&mut self, names: &[String]) -> Result<()> {
        if !self.channel_open {
            self.send(1, 20, 10, &[0])?; // channel.open, empty reserved short string
            self.expect(1, 20, 11)?;
            self.channel_open = true;
        }
        for chunk in names.chunks(1000) {
            let mut buf = Vec::new();
            for name in chunk {
                let mut a = vec![0, 0]; // reserved ticket
                short_str(&mut a, name);
                a.push(0); // passive, durable, exclusive, auto-delete, no-wait: all off
                a.extend_from_slice(&0u32.to_be_bytes()); // arguments: empty table
                method_frame(&mut buf, 1, 50, 10, &a);
            }
            self.stream.write_all(&buf)?;
            for _ in chunk {
                self.expect(1, 50, 11)?;
            }
        }
        Ok(())
    }

    fn close(mut self) -> Result<()> {
        let mut a = 200u16.to_be_bytes().to_vec();
        short_str(&mut a, "");
        a.extend_from_slice(&[0, 0, 0, 0]);
        self.send(0, 10, 50, &a)?;
        self.expect(0, 10, 51)?;
        Ok(())
    }
}

fn short_str(buf: &mut Vec<u8>, s: &str) {
    debug_assert!(s.len() <= 255);
    buf.push(s.len() as u8);
    buf.extend_from_slice(s.as_bytes());
}

fn method_frame(buf: &mut Vec<u8>, channel: u16, class: u16, method: u16, args: &[u8]) {
    buf.push(1);
    buf.extend_from_slice(&channel.to_be_bytes());
    buf.extend_from_slice(&(4 + args.len() as u32).to_be_bytes());
    buf.extend_from_slice(&class.to_be_bytes());
    buf.extend_from_slice(&method.to_be_bytes());
    buf.extend_from_slice(args);
    buf.push(0xCE);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BrokerKind {
    Qpidd,
    RabbitMq,
}

impl BrokerKind {
    fn key(self) -> &'static str {
        match self {
            BrokerKind::Qpidd => "qpidd",
            BrokerKind::RabbitMq => "rabbitmq",
        }
    }
}

/// A broker process this bench started.
struct Broker {
    kind: BrokerKind,
    child: Child,
    /// The process whose CPU and RSS count (qpidd itself, or RabbitMQ's beam.smp).
    pid: u32,
    port: u16,
    log: PathBuf,
    /// epmd processes that existed before this RabbitMQ started (those are not ours).
    epmd_before: Vec<u32>,
    _stdout: Option<BufReader<ChildStdout>>,
    stopped: bool,
}

impl Broker {
    /// `args` must include `--port 0`: qpidd then prints the port it bound.
    fn start_qpidd(bin: &Path, dir: &Path, args: &[&str]) -> Result<Broker> {
        let log = dir.join(format!("qpidd-{}.log", unique()));
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut stdout = BufReader::new(child.stdout.take().context("no stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let port: u16 = line.trim().parse().with_context(|| {
            format!(
                "qpidd printed {line:?} instead of its port; see {}",
                log.display()
            )
        })?;
        let pid = child.id();
        Ok(Broker {
            kind: BrokerKind::Qpidd,
            child,
            pid,
            port,
            log,
            epmd_before: Vec::new(),
            _stdout: Some(stdout),
            stopped: false,
        })
    }

    fn start_rabbitmq(server: &Path, dir: &Path) -> Result<Broker> {
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir.join("home"))?;
        let name = format!("qpidbench{}@localhost", std::process::id());
        Broker::start_rabbit_node(
            server,
            dir,
            &name,
            &dir.join("home"),
            Duration::from_secs(90),
        )
    }

    /// One RabbitMQ node named `name` with its files under `dir` and `HOME` = `home` (where
    /// its Erlang cookie is), on free loopback ports, given `limit` to open its port.
    pub(super) fn start_rabbit_node(
        server: &Path,
        dir: &Path,
        name: &str,
        home: &Path,
        limit: Duration,
    ) -> Result<Broker> {
        for sub in ["mnesia", "log"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        fs::write(dir.join("enabled_plugins"), "[].\n")?;
        let port = free_port()?;
        let dist_port = free_port()?;
        let log = dir.join("log/startup.log");
        let epmd_before = pids_named("epmd");
        let mut child = Command::new(server)
            .env("HOME", home)
            .env("RABBITMQ_NODENAME", name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq"))
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log)?)
            .stderr(Stdio::from(fs::File::options().append(true).open(&log)?))
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", server.display()))?;
        let deadline = Instant::now() + limit;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        loop {
            if let Some(s) = child.try_wait()? {
                bail!(
                    "rabbitmq-server {name} exited during start-up ({s}); see {}",
                    log.display()
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                signal("-KILL", &format!("-{}", child.id()));
                bail!(
                    "RabbitMQ {name} did not open port {port} within {} s; see {}",
                    limit.as_secs(),
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        let pid = children(child.id())
            .into_iter()
            .find(|&p| comm(p).as_deref() == Some("beam.smp"))
            .unwrap_or(child.id());
        Ok(Broker {
            kind: BrokerKind::RabbitMq,
            child,
            pid,
            port,
            log,
            epmd_before,
            _stdout: None,
            stopped: false,
        })
    }

    fn name(&self) -> &'static str {
        match self.kind {
            BrokerKind::Qpidd => "qpidd",
            BrokerKind::RabbitMq => "RabbitMQ",
        }
    }

    fn uri(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// perftest's arguments naming this broker: its URI, JSON output, its pid (for its CPU).
    fn perftest_target(&self) -> Vec<String> {
        vec![
            "--uri".into(),
            self.uri(),
            "--json".into(),
            "--broker-pid".into(),
            self.pid.to_string(),
        ]
    }

    /// perftest's arguments for the replication and store benches' load on this broker: one
    /// producer, one consumer, 1 KiB messages, a confirm window of 1,000, then `extra`.
    fn perftest_one_to_one(&self, extra: &[&str]) -> Vec<String> {
        let mut args = self.perftest_target();
        args.extend(
            [
                "--producers",
                "1",
                "--consumers",
                "1",
                "--size",
                "1024",
                "--confirm",
                "1000",
            ]
            .into_iter()
            .chain(extra.iter().copied())
            .map(String::from),
        );
        args
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn rss_kib(&self) -> Result<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .context("no VmRSS")?;
        Ok(line
            .split_whitespace()
            .nth(1)
            .context("no VmRSS value")?
            .parse()?)
    }

    fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        signal("-TERM", &self.pid.to_string());
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(100));
        }
        if self.kind == BrokerKind::RabbitMq {
            // The whole process group (script, beam, helpers), then the epmd it started.
            signal("-KILL", &format!("-{}", self.child.id()));
            for p in pids_named("epmd") {
                if !self.epmd_before.contains(&p) {
                    signal("-TERM", &p.to_string());
                }
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// `kill SIGNAL -- TARGET` (a pid, or `-pgid` for a process group this bench started).
fn signal(sig: &str, target: &str) {
    let _ = Command::new("kill")
        .args([sig, "--", target])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn unique() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The command name of a process.
fn comm(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// All process ids on the machine.
fn all_pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn pids_named(name: &str) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|&p| comm(p).as_deref() == Some(name))
        .collect()
}

/// Direct children of `parent` (from the ppid field of /proc/<pid>/stat).
fn children(parent: u32) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|&p| {
            fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = &s[s.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

/// The commit the binaries were built from, and how many files differed from it.
fn source_version(root: &Path) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(root)
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = git(&["status", "--porcelain"]).map_or(0, |s| s.lines().count());
    format!(
        "commit {} ({dirty} files changed or untracked)",
        commit.trim()
    )
}

/// The machine, for the report.
struct Machine {
    cpus: usize,
    model: String,
    mem_gib: f64,
    kernel: String,
    loadavg: String,
}

fn machine_info() -> Machine {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_default();
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: f64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0.0);
    Machine {
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        model,
        mem_gib: mem_kib / 1024.0 / 1024.0,
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .into(),
        loadavg: fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .into(),
    }
}

impl Machine {
    fn to_text(&self) -> String {
        format!(
            "{} CPUs ({}), {:.1} GiB, Linux {}, loadavg {}",
            self.cpus, self.model, self.mem_gib, self.kernel, self.loadavg
        )
    }

    fn to_json(&self) -> Json {
        Json::Obj(vec![
            ("cpus".into(), Json::Num(self.cpus as f64)),
            ("model".into(), Json::Str(self.model.clone())),
            ("mem_gib".into(), Json::Num(self.mem_gib)),
            ("kernel".into(), Json::Str(self.kernel.clone())),
            ("loadavg_at_start".into(), Json::Str(self.loadavg.clone())),
        ])
    }
}

/// One perftest run's figures.
struct RunResult {
    broker: BrokerKind,
    run: usize,
    cmdline: String,
    valid: bool,
    problems: Vec<String>,
    consume_rate: Option<f64>,
    publish_rate: Option<f64>,
    broker_us: Option<f64>,
    tool_us: Option<f64>,
    p99_us: Option<f64>,
    other_cores: Option<f64>,
    bytes_per_msg: Option<f64>,
    lost: f64,
    duplicates: f64,
    report: Option<Json>,
}

impl RunResult {
    fn print(&self) {
        let f = |v: Option<f64>, d: usize| v.map_or("-".into(), |v| format!("{v:.d$}"));
        println!(
            "    {:<8} run {}: consumed {} msg/s, published {} msg/s, broker {} µs/msg, tool {} µs/msg, \
             p99 {} µs, {} B/msg, other {} cores{}",
            self.broker.key(),
            self.run,
            f(self.consume_rate, 0),
            f(self.publish_rate, 0),
            f(self.broker_us, 2),
            f(self.tool_us, 2),
            f(self.p99_us, 0),
            f(self.bytes_per_msg, 0),
            f(self.other_cores, 2),
            if self.valid {
                String::new()
            } else {
                format!(" INVALID: {}", self.problems.join("; "))
            }
        );
    }

    /// What counts as the broker misbehaving (not merely being slow).
    fn misbehaviour(&self) -> Option<String> {
        let bad = self.lost > 0.0
            || self.duplicates > 0.0
            || self.report.is_none()
            || self.problems.iter().any(|p| p.starts_with("error"));
        bad.then(|| {
            format!(
                "{} run {}: {} (reproduce: {})",
                self.broker.key(),
                self.run,
                self.problems.join("; "),
                self.cmdline
            )
        })
    }

    fn to_json(&self) -> Json {
        let n = |v: Option<f64>| v.map_or(Json::Null, Json::Num);
        Json::Obj(vec![
            ("broker".into(), Json::Str(self.broker.key().into())),
            ("run".into(), Json::Num(self.run as f64)),
            ("command".into(), Json::Str(self.cmdline.clone())),
            ("valid".into(), Json::Bool(self.valid)),
            (
                "problems".into(),
                Json::Arr(self.problems.iter().map(|p| Json::Str(p.clone())).collect()),
            ),
            ("bytes_per_msg".into(), n(self.bytes_per_msg)),
            ("other_cores".into(), n(self.other_cores)),
            ("report".into(), self.report.clone().unwrap_or(Json::Null)),
        ])
    }
}

struct ScenarioResult {
    sc: Scenario,
    runs: Vec<RunResult>,
    /// The timed series of the `qpid-config` scenarios.
    cli: Vec<CliSeries>,
}

/// median [min–max] over the valid runs.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Stat {
    median: f64,
    min: f64,
    max: f64,
    n: usize,
}

fn stat(values: &[f64]) -> Option<Stat> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Stat {
        median,
        min: v[0],
        max: v[n - 1],
        n,
    })
}

impl ScenarioResult {
    fn new(sc: &Scenario) -> Self {
        ScenarioResult {
            sc: sc.clone(),
            runs: Vec::new(),
            cli: Vec::new(),
        }
    }

    fn stat(&self, broker: BrokerKind, f: impl Fn(&RunResult) -> Option<f64>) -> Option<Stat> {
        let v: Vec<f64> = self
            .runs
            .iter()
            .filter(|r| r.broker == broker && r.valid)
            .filter_map(f)
            .collect();
        stat(&v)
    }

    fn invalid(&self, broker: BrokerKind) -> usize {
        self.runs
            .iter()
            .filter(|r| r.broker == broker && !r.valid)
            .count()
    }

    fn to_json(&self) -> Json {
        Json::Obj(vec![
            ("key".into(), Json::Str(self.sc.key.into())),
            ("title".into(), Json::Str(self.sc.title.into())),
            (
                "args".into(),
                Json::Arr(
                    self.sc
                        .args
                        .iter()
                        .map(|a| Json::Str(a.to_string()))
                        .collect(),
                ),
            ),
            (
                "runs".into(),
                Json::Arr(self.runs.iter().map(RunResult::to_json).collect()),
            ),
            (
                "cli".into(),
                Json::Arr(self.cli.iter().map(CliSeries::to_json).collect()),
            ),
        ])
    }
}

/// One row of the table: a metric of a scenario for both brokers and the target.
struct Row<'a> {
    scenario: &'a str,
    metric: &'a str,
    ours: Option<Stat>,
    theirs: Option<Stat>,
    digits: usize,
    /// (the target's text, whether the figures meet it)
    target: Option<(String, Option<bool>)>,
    ratio: bool,
    /// Shown after the qpidd figures (the p90 of the `qpid-config` series).
    p90: Option<f64>,
    /// Has no RabbitMQ counterpart.
    ours_only: bool,
}

fn render_table(results: &[ScenarioResult], rabbit: bool) -> String {
    let mut rows = Vec::new();
    for r in results {
        let q = BrokerKind::Qpidd;
        let rb = BrokerKind::RabbitMq;
        let ratio_of =
            |a: Option<Stat>, b: Option<Stat>| a.zip(b).map(|(a, b)| a.median / b.median);
        let title = r.sc.title;
        match r.sc.measure {
            Measure::Throughput { cpu_target } => {
                let (o, t) = (
                    r.stat(q, |x| x.consume_rate),
                    r.stat(rb, |x| x.consume_rate),
                );
                let met = ratio_of(o, t).map(|x| x >= 2.5);
                rows.push(Row {
                    scenario: title,
                    metric: "msgs/s consumed",
                    ours: o,
                    theirs: t,
                    digits: 0,
                    target: Some(("≥ 2.5×".into(), met)),
                    ratio: true,
                    p90: None,
                    ours_only: false,
                });
                let (o, t) = (r.stat(q, |x| x.broker_us), r.stat(rb, |x| x.broker_us));
                let target =
                    cpu_target.then(|| ("≤ 0.25×".to_string(), ratio_of(o, t).map(|x| x <= 0.25)));
                rows.push(Row {
                    scenario: "",
                    metric: "broker CPU µs/msg",
                    ours: o,
                    theirs: t,
                    digits: 2,
                    target,
                    ratio: true,
                    p90: None,
                    ours_only: false,
                });
                let (o, t) = (r.stat(q, |x| x.tool_us), r.stat(rb, |x| x.tool_us));
                rows.push(Row {
                    scenario: "",
                    metric: "tool CPU µs/msg",
                    ours: o,
                    theirs: t,
                    digits: 2,
                    target: None,
                    ratio: false,
                    p90: None,
                    ours_only: false,
                });
            }
            Measure::Latency => {
                let (o, t) = (r.stat(q, |x| x.p99_us), r.stat(rb, |x| x.p99_us));
                let met = ratio_of(o, t).map(|x| x <= 0.5);
                rows.push(Row {
                    scenario: title,
                    metric: "p99 latency µs",
                    ours: o,
                    theirs: t,
                    digits: 0,
                    target: Some(("≤ 0.5×".into(), met)),
                    ratio: true,
                    p90: None,
                    ours_only: false,
                });
                let (o, t) = (r.stat(q, |x| x.broker_us), r.stat(rb, |x| x.broker_us));
                rows.push(Row {
                    scenario: "",
                    metric: "broker CPU µs/msg",
                    ours: o,
                    theirs: t,
                    digits: 2,
                    target: None,
                    ratio: true,
                    p90: None,
                    ours_only: false,
                });
            }
            Measure::Memory => {
                let (o, t) = (
                    r.stat(q, |x| x.bytes_per_msg),
                    r.stat(rb, |x| x.bytes_per_msg),
                );
                let met = o.map(|s| s.median <= 200.0);
                rows.push(Row {
                    scenario: title,
                    metric: "RSS bytes/queued msg",
                    ours: o,
                    theirs: t,
                    digits: 0,
                    target: Some(("≤ 200 B".into(), met)),
                    ratio: true,
                    p90: None,
                    ours_only: false,
                });
            }
            Measure::CliCall | Measure::CliList => {
                for (i, c) in r.cli.iter().enumerate() {
                    rows.push(Row {
                        scenario: if i == 0 { title } else { "" },
                        metric: c.label,
                        ours: c.stat(),
                        theirs: None,
                        digits: 1,
                        target: c.target.map(|t| {
                            let on = if t.on_p90 { "p90" } else { "median" };
                            (format!("< {} ms ({on})", group(t.limit_ms, 0)), c.met())
                        }),
                        ratio: false,
                        p90: (c.samples_ms.len() >= 10).then(|| c.p90()).flatten(),
                        ours_only: true,
                    });
                }
                let problems: usize = r.cli.iter().map(|c| c.problems.len()).sum();
                if problems > 0 {
                    rows.push(Row {
                        scenario: "",
                        metric: "",
                        ours: None,
                        theirs: None,
                        digits: 0,
                        target: Some((format!("{problems} failed call(s)"), None)),
                        ratio: false,
                        p90: None,
                        ours_only: true,
                    });
                }
                continue;
            }
            Measure::Lapin => {
                let (o, t) = (
                    r.stat(q, |x| x.consume_rate),
                    r.stat(rb, |x| x.consume_rate),
                );
                rows.push(Row {
                    scenario: title,
                    metric: "msgs/s consumed",
                    ours: o,
                    theirs: t,
                    digits: 0,
                    target: None,
                    ratio: true,
                    p90: None,
                    ours_only: false,
                });
                let (o, t) = (r.stat(q, |x| x.tool_us), r.stat(rb, |x| x.tool_us));
                rows.push(Row {
                    scenario: "",
                    metric: "tool CPU µs/msg",
                    ours: o,
                    theirs: t,
                    digits: 2,
                    target: None,
                    ratio: false,
                    p90: None,
                    ours_only: false,
                });
            }
        }
        let bad: Vec<String> = [q, rb]
            .iter()
            .filter(|&&k| r.invalid(k) > 0)
            .map(|&k| format!("{} invalid run(s) of {}", r.invalid(k), k.key()))
            .collect();
        if !bad.is_empty() {
            rows.push(Row {
                scenario: "",
                metric: "",
                ours: None,
                theirs: None,
                digits: 0,
                target: Some((bad.join(", "), None)),
                ratio: false,
                p90: None,
                ours_only: false,
            });
        }
    }
    let fmt_stat = |s: Option<Stat>, d: usize| {
        s.map_or("-".to_string(), |s| {
            format!(
                "{} [{}–{}]",
                group(s.median, d),
                group(s.min, d),
                group(s.max, d)
            )
        })
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| scenario | metric | qpidd median [min–max] | RabbitMQ median [min–max] | ours/RabbitMQ | target | verdict |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---|---|");
    for row in rows {
        let ratio = if row.ratio && rabbit {
            row.ours
                .zip(row.theirs)
                .map_or("-".into(), |(a, b)| format!("{:.2}×", a.median / b.median))
        } else {
            "".into()
        };
        let (target, verdict) = match &row.target {
            Some((t, Some(true))) => (t.clone(), "met".to_string()),
            Some((t, Some(false))) => (t.clone(), "**MISSED**".to_string()),
            Some((t, None)) => (
                t.clone(),
                if row.metric.is_empty() {
                    String::new()
                } else {
                    "n/a".into()
                },
            ),
            None => (String::new(), String::new()),
        };
        let mut ours = fmt_stat(row.ours, row.digits);
        if let Some(p) = row.p90 {
            let _ = write!(ours, ", p90 {}", group(p, row.digits));
        }
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            row.scenario,
            row.metric,
            ours,
            if row.ours_only {
                "n/a".into()
            } else if rabbit {
                fmt_stat(row.theirs, row.digits)
            } else {
                "not installed".into()
            },
            ratio,
            target,
            verdict
        );
    }
    out
}

/// A number with thousands separators (`1,234,567`) or fixed decimals.
fn group(v: f64, digits: usize) -> String {
    if digits > 0 {
        return format!("{v:.digits$}");
    }
    let s = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0.0 { format!("-{out}") } else { out }
}

/// A minimal JSON value: enough to read qpid-perftest's reports and write ours.
#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn parse(text: &str) -> Result<Json> {
        let mut p = Parser {
            b: text.as_bytes(),
            i: 0,
        };
        let v = p.value()?;
        p.ws();
        ensure!(
            p.i == p.b.len(),
            "trailing characters after JSON at byte {}",
            p.i
        );
        Ok(v)
    }

    /// The value at a dotted path of object keys.
    fn get(&self, path: &str) -> Option<&Json> {
        path.split('.').try_fold(self, |v, key| match v {
            Json::Obj(fields) => fields.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        })
    }

    fn num(&self, path: &str) -> Option<f64> {
        match self.get(path)? {
            Json::Num(n) => Some(*n),
            _ => None,
        }
    }

    fn str(&self, path: &str) -> Option<&str> {
        self.get(path)?.as_str()
    }

    fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    fn write(&self, out: &mut String) {
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Num(n) if n.is_finite() => {
                let _ = write!(out, "{n}");
            }
            Json::Num(_) => out.push_str("null"),
            Json::Str(s) => write_str(out, s),
            Json::Arr(a) => {
                out.push('[');
                for (i, v) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    v.write(out);
                }
                out.push(']');
            }
            Json::Obj(fields) => {
                out.push('{');
                for (i, (k, v)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_str(out, k);
                    out.push(':');
                    v.write(out);
                }
                out.push('}');
            }
        }
    }
}

impl std::fmt::Display for Json {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = String::new();
        self.write(&mut s);
        f.write_str(&s)
    }
}

fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.b.len() && self.b[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn eat(&mut self, lit: &str) -> Result<()> {
        ensure!(
            self.b[self.i..].starts_with(lit.as_bytes()),
            "expected `{lit}` at byte {}",
            self.i
        );
        self.i += lit.len();
        Ok(())
    }

    fn value(&mut self) -> Result<Json> {
        self.ws();
        match self.b.get(self.i).copied() {
            Some(b'n') => self.eat("null").map(|_| Json::Null),
            Some(b't') => self.eat("true").map(|_| Json::Bool(true)),
            Some(b'f') => self.eat("false").map(|_| Json::Bool(false)),
            Some(b'"') => self.string().map(Json::Str),
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.b.get(self.i) == Some(&b']') {
                    self.i += 1;
                    return Ok(Json::Arr(items));
                }
                loop {
                    items.push(self.value()?);
                    self.ws();
                    match self.b.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Json::Arr(items));
                        }
                        _ => bail!("expected , or ] at byte {}", self.i),
                    }
                }
            }
            Some(b'{') => {
                self.i += 1;
                let mut fields = Vec::new();
                self.ws();
                if self.b.get(self.i) == Some(&b'}') {
                    self.i += 1;
                    return Ok(Json::Obj(fields));
                }
                loop {
                    self.ws();
                    let k = self.string()?;
                    self.ws();
                    self.eat(":")?;
                    fields.push((k, self.value()?));
                    self.ws();
                    match self.b.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(Json::Obj(fields));
                        }
                        _ => bail!("expected , or }} at byte {}", self.i),
                    }
                }
            }
            Some(c) if c == b'-' || c.is_ascii_digit() => {
                let start = self.i;
                while self.i < self.b.len()
                    && matches!(
                        self.b[self.i],
                        b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'
                    )
                {
                    self.i += 1;
                }
                let s = std::str::from_utf8(&self.b[start..self.i])?;
                Ok(Json::Num(
                    s.parse().with_context(|| format!("bad number {s}"))?,
                ))
            }
            _ => bail!("unexpected input at byte {}", self.i),
        }
    }

    fn string(&mut self) -> Result<String> {
        self.eat("\"")?;
        let mut out = Vec::new();
        loop {
            let c = *self.b.get(self.i).context("unterminated string")?;
            self.i += 1;
            match c {
                b'"' => return Ok(String::from_utf8(out)?),
                b'\\' => {
                    let e = *self.b.get(self.i).context("unterminated escape")?;
                    self.i += 1;
                    let ch = match e {
                        b'n' => '\n',
                        b't' => '\t',
                        b'r' => '\r',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'u' => {
                            let hex = std::str::from_utf8(
                                self.b.get(self.i..self.i + 4).context("bad \\u")?,
                            )?;
                            self.i += 4;
                            char::from_u32(u32::from_str_radix(hex, 16)?).unwrap_or('\u{fffd}')
                        }
                        other => other as char,
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                }
                c => out.push(c),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_and_paths() {
        let text = r#"{"a":{"b":[1,2.5,-3e2],"s":"x\"y\\n\u00e9"},"t":true,"n":null,"e":{}}"#;
        let v = Json::parse(text).unwrap();
        assert_eq!(
            v.get("a.b"),
            Some(&Json::Arr(vec![
                Json::Num(1.0),
                Json::Num(2.5),
                Json::Num(-300.0)
            ]))
        );
        assert_eq!(v.str("a.s"), Some("x\"y\\né"));
        assert_eq!(v.num("a.b"), None);
        assert_eq!(v.get("t"), Some(&Json::Bool(true)));
        assert_eq!(Json::parse(&v.to_string()).unwrap(), v);
        assert!(Json::parse("{\"a\":1,}").is_err());
        assert!(Json::parse("[1] x").is_err());
    }

    #[test]
    fn stats_are_median_min_max() {
        assert_eq!(
            stat(&[3.0, 1.0, 2.0]),
            Some(Stat {
                median: 2.0,
                min: 1.0,
                max: 3.0,
                n: 3
            })
        );
        assert_eq!(stat(&[4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
        assert_eq!(stat(&[]), None);
        assert_eq!(group(1234567.4, 0), "1,234,567");
        assert_eq!(group(999.0, 0), "999");
        assert_eq!(group(0.456, 2), "0.46");
        let v: Vec<f64> = (1..=50).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.9), Some(45.0));
        assert_eq!(percentile(&[7.0], 0.9), Some(7.0));
        assert_eq!(percentile(&[], 0.9), None);
    }

    #[test]
    fn options_and_scenarios() {
        let o = Options::parse(&[
            "--runs".into(),
            "3".into(),
            "--only".into(),
            "latency,memory".into(),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(o.runs, 3);
        assert_eq!(
            o.only.as_deref(),
            Some(&["latency".to_string(), "memory".to_string()][..])
        );
        assert!(Options::parse(&["--bogus".into()]).is_err());
        let keys: Vec<&str> = scenarios().iter().map(|s| s.key).collect();
        assert_eq!(
            keys,
            [
                "auto-ack",
                "manual-ack",
                "4x4",
                "latency",
                "lapin",
                "memory",
                "cli-call",
                "cli-list-10k"
            ]
        );
        // Every perftest scenario uses confirms with a window of 1,000.
        assert!(
            scenarios()
                .iter()
                .filter(|s| !s.measure.is_cli())
                .all(|s| s.args.windows(2).any(|w| w == ["--confirm", "1000"]))
        );
    }
}
