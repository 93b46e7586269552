//! The durable store's speed measures (issue 6), part of `cargo xtask bench` (keys
//! `store-confirm`, `store-latency`, `store-replica`, `store-cluster`, `store-recovery`,
//! `store-disk`, or `store` for all six).
//!
//! Every qpidd here is a release `qpidd --auth no --data-dir DIR` with a fresh DIR under the
//! bench's run directory; the load is `qpid-perftest` with 1 producer, 1 consumer with manual
//! acks (prefetch 1,000), 1 KiB persistent messages (`--persistent`: delivery mode 2, durable
//! queue) and confirms with a window of 1,000.
//!
//! * `store-confirm`: closed loop (backlog capped at 50,000), qpidd vs a private RabbitMQ node
//!   (as the issue-2 bench starts it), interleaved; ratio of the median consumed rates (≥ 3×).
//! * `store-latency`: the same at a fixed 5,000 msg/s; p99 publish-to-confirm latency from
//!   qpid-perftest's `confirm_latency_us` (≤ 2 ms, ours). After each qpidd run, the bare disk
//!   at the same rate: a loop appending 1,100-byte records to a file in the bench's run
//!   directory on a fixed schedule, each round writing what is due and calling `fdatasync`
//!   (group commit without a broker); its p99 from scheduled time to sync done shows what the
//!   disk alone allows in that part of the run.
//! * `store-replica`: two qpidd with `--ha-queue-replication yes`, each with its own data dir;
//!   a durable queue with a ready replica (`qpid-ha replicate`) vs a durable queue without one
//!   on the same original, interleaved (ratio ≥ 0.6).
//! * `store-cluster`: three qpidd `--ha-cluster yes --ha-replicate all` (one promoted, two
//!   `ready` backups) vs a RabbitMQ quorum queue on three local RabbitMQ nodes clustered with
//!   `rabbitmqctl join_cluster`, interleaved (ratio ≥ 2.5×).
//! * `store-recovery`: 1,000,000 persistent 1 KiB messages on one durable queue, SIGTERM, start
//!   again on the same data dir: process start → depth 1,000,000 (passive queue.declare) and →
//!   first message (basic.get) (≤ 5 s).
//! * `store-disk`: then consume and ack all of them, sample the size of `DIR/store` every 5 s
//!   for 60 s, and report the last size (≤ 64 MiB + 1 MiB per durable queue).

use super::replication::{
    Amqp, Mgmt, ReplEnv, ReplResult, find_row, keys_selected, run_limited, run_perftest,
};
use super::{
    Broker, Json, free_port, group, percentile, pids_named, short_str, signal, stat, unique,
};
use anyhow::{Context, Result, bail, ensure};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The keys `--only` accepts for these measures (`store` selects all).
pub(super) const KEYS: [&str; 6] = [
    "store-confirm",
    "store-latency",
    "store-replica",
    "store-cluster",
    "store-recovery",
    "store-disk",
];

/// The store keys `--only` selects (all six without `--only`).
pub(super) fn selected(only: &Option<Vec<String>>) -> Vec<&'static str> {
    keys_selected(&KEYS, "store", only)
}

/// Messages of `store-recovery`.
const RECOVERY_MESSAGES: u64 = 1_000_000;
/// Fixed rate of `store-latency`.
const LATENCY_RATE: u32 = 5_000;
/// `store-disk` samples the store's size this long after the last ack...
const DISK_WAIT_S: u64 = 60;
/// ...every this many seconds.
const DISK_EVERY_S: u64 = 5;

/// Paths and options the measures need: the replication measures' (reached through
/// `Deref`), and RabbitMQ's.
pub(super) struct StoreEnv<'a> {
    pub repl: ReplEnv<'a>,
    /// `rabbitmq-server` (the script `find_rabbitmq` chose), when RabbitMQ is compared.
    pub rabbit_server: Option<&'a Path>,
    /// Where the single RabbitMQ node keeps its files (the issue-2 bench's directory).
    pub rabbit_dir: &'a Path,
}

impl<'a> std::ops::Deref for StoreEnv<'a> {
    type Target = ReplEnv<'a>;
    fn deref(&self) -> &ReplEnv<'a> {
        &self.repl
    }
}

/// A measure's outcome: the replication bench's type (rows, details, problems).
pub(super) type StoreResult = ReplResult;

/// The store table, in the style of the replication one.
pub(super) fn render_table(results: &[StoreResult]) -> String {
    super::replication::render_table_headed(
        results,
        "| store measure (issue 6) | metric | measured | target | verdict |",
    )
}

/// Runs the selected measures; an error in one is recorded as its problem and the others go on.
pub(super) fn run(env: &StoreEnv<'_>, keys: &[&str]) -> Vec<StoreResult> {
    let mut results = Vec::new();
    let has = |k: &str| keys.contains(&k);
    if has("store-confirm") || has("store-latency") {
        println!("==> [bench] store: store-confirm / store-latency");
        let mut confirm = StoreResult::new(
            "store-confirm",
            "1→1, 1 KiB persistent, durable queue, confirms 1,000, manual acks",
        );
        let mut latency = StoreResult::new(
            "store-latency",
            "the same at a fixed 5,000 msg/s: publish-to-confirm latency",
        );
        if let Err(e) = env.confirm_and_latency(
            has("store-confirm").then_some(&mut confirm),
            has("store-latency").then_some(&mut latency),
        ) {
            eprintln!("==> [bench] store-confirm/latency failed: {e:#}");
            let r = if has("store-confirm") {
                &mut confirm
            } else {
                &mut latency
            };
            r.problems.push(format!("{e:#}"));
        }
        if has("store-confirm") {
            results.push(confirm);
        }
        if has("store-latency") {
            results.push(latency);
        }
    }
    if has("store-replica") {
        println!("==> [bench] store: store-replica");
        let mut r = StoreResult::new(
            "store-replica",
            "same load, durable queue with a ready replica vs none",
        );
        if let Err(e) = env.replica(&mut r) {
            eprintln!("==> [bench] store-replica failed: {e:#}");
            r.problems.push(format!("{e:#}"));
        }
        results.push(r);
    }
    if has("store-cluster") {
        println!("==> [bench] store: store-cluster");
        let mut r = StoreResult::new(
            "store-cluster",
            "same load, primary + 2 ready backups vs RabbitMQ 3-node quorum queue",
        );
        if let Err(e) = env.cluster(&mut r) {
            eprintln!("==> [bench] store-cluster failed: {e:#}");
            r.problems.push(format!("{e:#}"));
        }
        results.push(r);
    }
    if has("store-recovery") || has("store-disk") {
        println!("==> [bench] store: store-recovery / store-disk");
        let mut rec = StoreResult::new(
            "store-recovery",
            "restart with 1,000,000 persistent 1 KiB messages on one durable queue",
        );
        let mut disk = StoreResult::new(
            "store-disk",
            "disk used after all 1,000,000 are consumed and acked, + 60 s",
        );
        let want_disk = has("store-disk");
        if let Err(e) = env.recovery_and_disk(&mut rec, want_disk.then_some(&mut disk)) {
            eprintln!("==> [bench] store-recovery/disk failed: {e:#}");
            if has("store-recovery") {
                rec.problems.push(format!("{e:#}"));
            } else {
                disk.problems.push(format!("{e:#}"));
            }
        }
        if has("store-recovery") {
            results.push(rec);
        } else {
            disk.problems.extend(rec.problems);
        }
        if want_disk {
            results.push(disk);
        }
    }
    results
}

/// The figures of one perftest run.
#[derive(Clone, Copy, Default)]
struct Figures {
    consumed: Option<f64>,
    published: Option<f64>,
    confirm_p50_us: Option<f64>,
    confirm_p99_us: Option<f64>,
    e2e_p99_us: Option<f64>,
    broker_us: Option<f64>,
    /// CPU of every other process on the machine during the window, in cores.
    other_cores: Option<f64>,
    /// Bytes the whole machine wrote to its disks during the window, MB/s (10^6 bytes).
    disk_mb_s: Option<f64>,
}

impl Figures {
    fn of(report: &Json) -> Figures {
        Figures {
            consumed: report.num("consume_rate"),
            published: report.num("publish_rate"),
            confirm_p50_us: report.num("confirm_latency_us.p50"),
            confirm_p99_us: report.num("confirm_latency_us.p99"),
            e2e_p99_us: report.num("latency_us.p99"),
            broker_us: report.num("cpu.broker_us_per_msg"),
            other_cores: report
                .num("cpu.other_s")
                .zip(report.num("window_s"))
                .filter(|(_, w)| *w > 0.0)
                .map(|(o, w)| o / w),
            disk_mb_s: report.num("disk.write_mb_s"),
        }
    }

    /// Disk bytes the machine wrote per message consumed (both brokers' journals, with a
    /// replica on the same disk).
    fn disk_bytes_per_msg(&self) -> Option<f64> {
        self.disk_mb_s
            .zip(self.consumed)
            .filter(|(_, c)| *c > 0.0)
            .map(|(d, c)| d * 1e6 / c)
    }

    fn text(&self) -> String {
        let f = |v: Option<f64>| v.map_or("-".into(), |v| group(v, 0));
        format!(
            "consumed {} msg/s, published {} msg/s, confirm p50 {} µs p99 {} µs, end-to-end p99 {} µs, broker {} µs/msg, other processes {} cores, disk writes {} MB/s",
            f(self.consumed),
            f(self.published),
            f(self.confirm_p50_us),
            f(self.confirm_p99_us),
            f(self.e2e_p99_us),
            self.broker_us.map_or("-".into(), |v| format!("{v:.1}")),
            self.other_cores.map_or("-".into(), |v| format!("{v:.2}")),
            f(self.disk_mb_s)
        )
    }
}

/// Picks one figure of a run.
type Pick = fn(&Figures) -> Option<f64>;

/// The row every throughput measure shows about the machine's other load.
const OTHER_CPU_ROW: &str =
    "other processes' CPU during the runs (cores of 2), qpidd / RabbitMQ runs";

/// The valid runs' figures of each target of a measure, in the order of its targets.
struct Runs(Vec<Vec<Figures>>);

impl Runs {
    /// Figure `f` of every valid run of target `i` (none if there is no such target).
    fn of(&self, i: usize, f: Pick) -> Vec<f64> {
        self.0
            .get(i)
            .map(|v| v.iter().filter_map(f).collect())
            .unwrap_or_default()
    }

    /// `first / second` target's `median [min–max] (n)` of figure `f`, with `d` decimals.
    fn pair(&self, f: Pick, d: usize) -> String {
        format!(
            "{} / {}",
            fmt_stat(&self.of(0, f), d),
            fmt_stat(&self.of(1, f), d)
        )
    }
}

/// The row of a ratio target: median of `ours` over median of `theirs`, at least `target`
/// (`missing` is shown when either has no valid run).
fn ratio_row(
    res: &mut StoreResult,
    label: &str,
    ours: &[f64],
    theirs: &[f64],
    target: f64,
    missing: &str,
) {
    let ratio = median(ours).zip(median(theirs)).map(|(a, b)| a / b);
    res.row(
        label,
        ratio.map_or(missing.into(), |r| format!("{r:.2}×")),
        &format!("≥ {target}×"),
        ratio.map(|r| r >= target),
    );
}

/// `median [min–max]` of `v` with `d` decimals.
fn fmt_stat(v: &[f64], d: usize) -> String {
    stat(v).map_or("-".into(), |s| {
        format!(
            "{} [{}–{}] (n {})",
            group(s.median, d),
            group(s.min, d),
            group(s.max, d),
            s.n
        )
    })
}

/// `median [min–max] (n)` of `us` (microseconds) in milliseconds.
fn fmt_ms(us: &[f64]) -> String {
    stat(us).map_or("-".into(), |s| {
        format!(
            "{:.2} ms [{:.2}–{:.2}] (n {})",
            s.median / 1e3,
            s.min / 1e3,
            s.max / 1e3,
            s.n
        )
    })
}

fn median(v: &[f64]) -> Option<f64> {
    stat(v).map(|s| s.median)
}

/// The bare disk's figures in one run of `disk_loop`, in µs.
#[derive(Clone, Copy)]
struct DiskLoop {
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    records: usize,
    syncs: u64,
}

/// What the disk alone allows at `rate` records a second: appends 1,100-byte records (the size
/// of a 1 KiB message's enqueue record) to files of at most 16 MiB under `dir` on a fixed
/// schedule, each round writing every record due and calling `fdatasync` once, and measures each
/// record's time from its scheduled time to the end of its sync, after `warmup`.
fn disk_loop(dir: &Path, rate: u32, warmup: Duration, measure: Duration) -> Result<DiskLoop> {
    use std::io::Write;
    const RECORD: usize = 1_100;
    const FILE_MAX: u64 = 16 << 20;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let open = |n: u32| {
        let path = dir.join(format!("loop-{n}.dat"));
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))
    };
    let (mut file, mut files, mut len) = (open(0)?, 1u32, 0u64);
    let record = [0x5au8; RECORD];
    let mut buf = Vec::new();
    let mut lat = Vec::new();
    let (mut sent, mut syncs) = (0u64, 0u64);
    let start = Instant::now();
    loop {
        let now = start.elapsed();
        if now >= warmup + measure {
            break;
        }
        let due = (now.as_secs_f64() * f64::from(rate)) as u64;
        if due <= sent {
            std::thread::sleep(Duration::from_micros(50));
            continue;
        }
        if len >= FILE_MAX {
            file = open(files)?;
            files += 1;
            len = 0;
        }
        buf.clear();
        for _ in sent..due {
            buf.extend_from_slice(&record);
        }
        file.write_all(&buf)
            .and_then(|_| file.sync_data())
            .context("bare disk loop")?;
        len += buf.len() as u64;
        let done = start.elapsed().as_secs_f64();
        if done >= warmup.as_secs_f64() {
            syncs += 1;
        }
        for i in sent..due {
            let scheduled = i as f64 / f64::from(rate);
            if scheduled >= warmup.as_secs_f64() {
                lat.push((done - scheduled) * 1e6);
            }
        }
        sent = due;
    }
    drop(file);
    let _ = fs::remove_dir_all(dir);
    let pct = |q| percentile(&lat, q).unwrap_or(f64::NAN);
    Ok(DiskLoop {
        p50_us: pct(0.5),
        p99_us: pct(0.99),
        max_us: pct(1.0),
        records: lat.len(),
        syncs,
    })
}

/// How long a run waits at most for the disk to be quiet before it starts.
const SETTLE_LIMIT: Duration = Duration::from_secs(15);
/// Quiet: the whole machine wrote less than this in the last `SETTLE_WINDOW`.
const SETTLE_BYTES: u64 = 1_000_000;
const SETTLE_WINDOW: Duration = Duration::from_millis(500);

/// Bytes written to whole disks since boot (`/proc/diskstats` field 10 × 512, for the devices
/// listed in `/sys/block`, so partitions are not counted twice).
fn disk_written_bytes() -> Option<u64> {
    let disks: Vec<String> = fs::read_dir("/sys/block")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    let text = fs::read_to_string("/proc/diskstats").ok()?;
    let sectors = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let name = *f.get(2)?;
            disks
                .iter()
                .any(|d| d == name)
                .then(|| f.get(9)?.parse::<u64>().ok())?
        })
        .sum::<u64>();
    Some(sectors * 512)
}

/// Waits until the machine writes less than `SETTLE_BYTES` per `SETTLE_WINDOW`, at most
/// `limit`; how long it waited (`None`: no `/proc/diskstats`, or still busy at the limit).
fn settle_disk(limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut before = disk_written_bytes()?;
    while start.elapsed() < limit {
        std::thread::sleep(SETTLE_WINDOW);
        let now = disk_written_bytes()?;
        if now.saturating_sub(before) < SETTLE_BYTES {
            return Some(start.elapsed());
        }
        before = now;
    }
    None
}

/// Total size of the regular files under `dir` (recursively), and how many there are.
fn dir_size(dir: &Path) -> (u64, usize) {
    let mut total = (0, 0);
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => {
                    let (b, n) = dir_size(&e.path());
                    total.0 += b;
                    total.1 += n;
                }
                Ok(m) if m.is_file() => {
                    total.0 += m.len();
                    total.1 += 1;
                }
                _ => {}
            }
        }
    }
    total
}

/// `du -sk DIR` in KiB.
fn du_kib(dir: &Path) -> Option<u64> {
    let out = Command::new("du").arg("-sk").arg(dir).output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / 1024.0 / 1024.0)
}

impl StoreEnv<'_> {
    fn data_dir(&self, label: &str) -> Result<PathBuf> {
        let d = self.runs_dir.join(format!("store-{label}-{}", unique()));
        fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        Ok(d)
    }

    /// A release qpidd with a fresh data dir (or `dir`), plus `extra` arguments.
    fn qpidd(&self, dir: &Path, extra: &[&str]) -> Result<Broker> {
        let d = dir.to_str().context("non-UTF-8 data directory")?;
        let mut args = vec!["--data-dir", d, "--auth", "no"];
        if !extra.contains(&"--port") {
            args.extend(["--port", "0"]);
        }
        args.extend(extra);
        let b = Broker::start_qpidd(self.qpidd, self.runs_dir, &args)?;
        println!(
            "    qpidd {} → 127.0.0.1:{} (log {})",
            args.join(" "),
            b.port,
            b.log.display()
        );
        Ok(b)
    }

    /// One `qpid-perftest` run; its JSON report and problems.
    fn perftest(
        &self,
        label: &str,
        args: &[String],
        limit: Duration,
    ) -> Result<(Json, Vec<String>)> {
        run_perftest(
            self.perftest,
            self.runs_dir,
            label,
            args,
            limit,
            &["messages.lost", "messages.duplicates", "messages.nacked"],
        )
    }

    /// The load of every measure: 1→1, 1 KiB persistent, confirms 1,000, manual acks.
    /// `queue`: a predeclared queue (else perftest declares a fresh durable one).
    fn load_args(&self, b: &Broker, queue: Option<&str>, rate: Option<u32>) -> Vec<String> {
        let mut args = b.perftest_one_to_one(&["--persistent", "--prefetch", "1000"]);
        match rate {
            Some(r) => args.extend(["--rate".into(), r.to_string()]),
            None => args.extend(["--max-backlog".into(), "50000".into()]),
        }
        if let Some(q) = queue {
            args.extend(["--queue".into(), q.into(), "--predeclared".into()]);
        }
        args.extend([
            "--warmup-seconds".into(),
            self.opts.warmup.to_string(),
            "--seconds".into(),
            self.opts.seconds.to_string(),
        ]);
        args
    }

    fn perftest_limit(&self) -> Duration {
        Duration::from_secs_f64(self.opts.warmup + self.opts.seconds + 90.0)
    }

    /// Runs `targets` (label, broker, queue) `--runs` times each, alternating the order, with
    /// `rate`; the figures of each valid run by target, and every run's record. `after_each`
    /// runs after each run with its label and number (a check, or a measure of its own such as
    /// the bare disk) and may return a problem that makes the run invalid.
    fn interleaved(
        &self,
        key: &str,
        targets: &[(&str, &Broker, Option<&str>)],
        rate: Option<u32>,
        res: &mut StoreResult,
        mut after_each: impl FnMut(&str, usize) -> Result<Option<String>>,
    ) -> Result<Runs> {
        let mut figs = vec![Vec::new(); targets.len()];
        let mut records = Vec::new();
        for run in 0..self.opts.runs {
            let order: Vec<usize> = if run % 2 == 0 {
                (0..targets.len()).collect()
            } else {
                (0..targets.len()).rev().collect()
            };
            for i in order {
                let (label, broker, queue) = targets[i];
                let args = self.load_args(broker, queue, rate);
                // The previous run's writes (the other broker's flushes and file deletions
                // too) must not land in this one: start on a quiet disk.
                let settled = settle_disk(SETTLE_LIMIT);
                let (report, mut problems) = self.perftest(
                    &format!("{key}-{}-{run}", label.replace(' ', "-")),
                    &args,
                    self.perftest_limit(),
                )?;
                if let Some(p) = after_each(label, run)? {
                    problems.push(p);
                }
                let f = Figures::of(&report);
                println!(
                    "    run {run} {label:<16} {}{}{}",
                    f.text(),
                    match settled {
                        Some(d) if d > Duration::from_secs(1) => {
                            format!(
                                " (started after {:.1} s of waiting for a quiet disk)",
                                d.as_secs_f64()
                            )
                        }
                        Some(_) => String::new(),
                        None => " (the disk was still busy when it started)".into(),
                    },
                    if problems.is_empty() {
                        String::new()
                    } else {
                        format!(" INVALID: {}", problems.join("; "))
                    }
                );
                if problems.is_empty() {
                    figs[i].push(f);
                } else {
                    res.problems.extend(
                        problems
                            .iter()
                            .map(|p| format!("{label} run {run}: {p} ({})", args.join(" "))),
                    );
                }
                records.push(Json::Obj(vec![
                    ("target".into(), Json::Str(label.into())),
                    ("run".into(), Json::Num(run as f64)),
                    (
                        "disk_settle_s".into(),
                        settled.map_or(Json::Null, |d| Json::Num(d.as_secs_f64())),
                    ),
                    ("command".into(), Json::Str(args.join(" "))),
                    (
                        "problems".into(),
                        Json::Arr(problems.iter().map(|p| Json::Str(p.clone())).collect()),
                    ),
                    ("report".into(), report),
                ]));
            }
        }
        res.detail.push(("runs".into(), Json::Arr(records)));
        Ok(Runs(figs))
    }

    /// `store-confirm` and `store-latency` on one qpidd (fresh data dir) and one RabbitMQ.
    fn confirm_and_latency(
        &self,
        confirm: Option<&mut StoreResult>,
        latency: Option<&mut StoreResult>,
    ) -> Result<()> {
        let dir = self.data_dir("confirm")?;
        let mut ours = self.qpidd(&dir, &[])?;
        let mut theirs = match self.rabbit_server {
            Some(s) => {
                let b = Broker::start_rabbitmq(s, self.rabbit_dir)?;
                println!(
                    "    RabbitMQ on 127.0.0.1:{} (log {})",
                    b.port,
                    b.log.display()
                );
                Some(b)
            }
            None => None,
        };
        let mut targets: Vec<(&str, &Broker, Option<&str>)> = vec![("qpidd", &ours, None)];
        if let Some(t) = &theirs {
            targets.push(("rabbitmq", t, None));
        }
        if let Some(res) = confirm {
            let runs = self.interleaved("store-confirm", &targets, None, res, |_, _| Ok(None))?;
            let (oc, tc) = (runs.of(0, |f| f.consumed), runs.of(1, |f| f.consumed));
            res.row("qpidd msgs/s consumed", fmt_stat(&oc, 0), "", None);
            res.row("RabbitMQ msgs/s consumed", fmt_stat(&tc, 0), "", None);
            ratio_row(
                res,
                "ours / RabbitMQ (medians)",
                &oc,
                &tc,
                3.0,
                "- (no RabbitMQ)",
            );
            for (label, f, d) in [
                (
                    "msgs/s published (confirmed), qpidd / RabbitMQ",
                    (|f| f.published) as Pick,
                    0,
                ),
                (
                    "publish-to-confirm p99 µs (window 1,000), qpidd / RabbitMQ",
                    |f| f.confirm_p99_us,
                    0,
                ),
                ("broker CPU µs/msg, qpidd / RabbitMQ", |f| f.broker_us, 1),
                (OTHER_CPU_ROW, |f| f.other_cores, 2),
                (
                    "disk writes MB/s (whole machine), qpidd / RabbitMQ runs",
                    |f| f.disk_mb_s,
                    0,
                ),
            ] {
                res.row(label, runs.pair(f, d), "", None);
            }
        }
        if let Some(res) = latency {
            // After each qpidd run, the bare disk at the same rate, on a quiet disk too.
            let mut bare: Vec<DiskLoop> = Vec::new();
            let runs = self.interleaved(
                "store-latency",
                &targets,
                Some(LATENCY_RATE),
                res,
                |label, run| {
                    if label != "qpidd" {
                        return Ok(None);
                    }
                    settle_disk(SETTLE_LIMIT);
                    let d = disk_loop(
                        &self.runs_dir.join(format!("disk-loop-{}", unique())),
                        LATENCY_RATE,
                        Duration::from_secs_f64(self.opts.warmup),
                        Duration::from_secs_f64(self.opts.seconds),
                    )?;
                    println!(
                        "    run {run} bare disk        {} records at {LATENCY_RATE}/s, {} syncs: p50 {} µs p99 {} µs max {} µs",
                        group(d.records as f64, 0),
                        group(d.syncs as f64, 0),
                        group(d.p50_us, 0),
                        group(d.p99_us, 0),
                        group(d.max_us, 0)
                    );
                    bare.push(d);
                    Ok(None)
                },
            )?;
            let o99 = runs.of(0, |f| f.confirm_p99_us);
            let ms = |i: usize, f: Pick| fmt_ms(&runs.of(i, f));
            res.row(
                "qpidd p99 publish-to-confirm (median of runs)",
                ms(0, |f| f.confirm_p99_us),
                "≤ 2 ms",
                median(&o99).map(|m| m <= 2000.0),
            );
            res.row(
                "qpidd p50 publish-to-confirm",
                ms(0, |f| f.confirm_p50_us),
                "",
                None,
            );
            res.row(
                "RabbitMQ p99 / p50 publish-to-confirm",
                format!(
                    "{} / {}",
                    ms(1, |f| f.confirm_p99_us),
                    ms(1, |f| f.confirm_p50_us)
                ),
                "",
                None,
            );
            res.row(
                "end-to-end p99, qpidd / RabbitMQ",
                format!("{} / {}", ms(0, |f| f.e2e_p99_us), ms(1, |f| f.e2e_p99_us)),
                "",
                None,
            );
            res.row(OTHER_CPU_ROW, runs.pair(|f| f.other_cores, 2), "", None);
            let bare_ms = |f: fn(&DiskLoop) -> f64| fmt_ms(&bare.iter().map(f).collect::<Vec<_>>());
            res.row(
                "bare disk at the same rate (write + fdatasync loop after each qpidd run): p99",
                bare_ms(|d| d.p99_us),
                "",
                None,
            );
            res.row(
                "bare disk p50 / max",
                format!("{} / {}", bare_ms(|d| d.p50_us), bare_ms(|d| d.max_us)),
                "",
                None,
            );
            res.detail.push((
                "bare_disk".into(),
                Json::Arr(
                    bare.iter()
                        .map(|d| {
                            Json::Obj(vec![
                                ("p50_us".into(), Json::Num(d.p50_us)),
                                ("p99_us".into(), Json::Num(d.p99_us)),
                                ("max_us".into(), Json::Num(d.max_us)),
                                ("records".into(), Json::Num(d.records as f64)),
                                ("syncs".into(), Json::Num(d.syncs as f64)),
                            ])
                        })
                        .collect(),
                ),
            ));
        }
        let mut problems = Vec::new();
        if !ours.alive() {
            problems.push(format!("qpidd exited; see {}", ours.log.display()));
        }
        if let Some(t) = &mut theirs
            && !t.alive()
        {
            problems.push(format!("RabbitMQ exited; see {}", t.log.display()));
        }
        ours.stop();
        if let Some(t) = theirs {
            t.stop();
        }
        ensure!(problems.is_empty(), "{}", problems.join("; "));
        Ok(())
    }

    /// `store-replica`: original + replica broker, a durable replicated queue and a durable
    /// plain queue on the same original.
    fn replica(&self, res: &mut StoreResult) -> Result<()> {
        let (repl_q, plain_q) = ("bench-store-repl", "bench-store-plain");
        let ha = ["--ha-queue-replication", "yes"];
        let original = self.qpidd(&self.data_dir("original")?, &ha)?;
        let replica = self.qpidd(&self.data_dir("replica")?, &ha)?;
        for (port, queues) in [
            (original.port, &[repl_q, plain_q][..]),
            (replica.port, &[repl_q][..]),
        ] {
            let mut a = Amqp::connect(port)?;
            for q in queues {
                a.declare_with(q, DURABLE, &[])?;
            }
            a.close()?;
        }
        let b = format!("127.0.0.1:{}", replica.port);
        let orig = format!("127.0.0.1:{}", original.port);
        let args = ["replicate", "-b", &b, &orig, repl_q];
        let out = run_limited(self.qpid_ha, &args, Duration::from_secs(30))?;
        ensure!(
            out.0.success() && !out.2.contains("keeps trying"),
            "`qpid-ha {}` failed ({}): {} {}",
            args.join(" "),
            out.0,
            out.1.trim(),
            out.2.trim()
        );
        let mut mgmt = Mgmt::connect(replica.port)?;
        let state = |m: &mut Mgmt| -> Result<String> {
            let v = m.ha()?;
            Ok(find_row(&v, "replicas", repl_q)
                .and_then(|r| r.str("state").map(str::to_string))
                .unwrap_or_else(|| "no replica row".into()))
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = state(&mut mgmt)?;
            if s == "ready" {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "replica of {repl_q} not ready after 30 s: {s}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        println!("    replica of {repl_q} ready");
        let targets = [
            ("ready replica", &original, Some(repl_q)),
            ("no replica", &original, Some(plain_q)),
        ];
        let runs = self.interleaved("store-replica", &targets, None, res, |label, _| {
            if label != "ready replica" {
                return Ok(None);
            }
            let s = state(&mut mgmt)?;
            Ok((s != "ready").then(|| format!("the replica is {s} after the run")))
        })?;
        let (w, p) = (runs.of(0, |f| f.consumed), runs.of(1, |f| f.consumed));
        res.row("msgs/s consumed, ready replica", fmt_stat(&w, 0), "", None);
        res.row("msgs/s consumed, no replica", fmt_stat(&p, 0), "", None);
        ratio_row(res, "ratio of medians", &w, &p, 0.6, "-");
        for (label, f) in [
            (
                "publish-to-confirm p99 µs, replica / none",
                (|f| f.confirm_p99_us) as Pick,
            ),
            (
                "disk writes MB/s (whole machine), ready replica / none",
                |f| f.disk_mb_s,
            ),
            (
                "disk bytes written per message consumed, ready replica / none",
                Figures::disk_bytes_per_msg,
            ),
        ] {
            res.row(label, runs.pair(f, 0), "", None);
        }
        for (name, mut b) in [("original", original), ("replica", replica)] {
            if !b.alive() {
                res.problems
                    .push(format!("the {name} broker exited; see {}", b.log.display()));
            }
            b.stop();
        }
        Ok(())
    }

    /// `qpid-ha ARGS` with a deadline: success and stdout.
    fn qpid_ha(&self, args: &[&str]) -> Result<(bool, String)> {
        let out = run_limited(self.qpid_ha, args, Duration::from_secs(20))?;
        Ok((out.0.success(), format!("{}{}", out.1, out.2)))
    }

    /// `store-cluster`: our three-member cluster vs a RabbitMQ three-node quorum queue.
    fn cluster(&self, res: &mut StoreResult) -> Result<()> {
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect::<Result<_>>()?;
        let url: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let url = url.join(",");
        let mut members = Vec::new();
        for p in &ports {
            let port = p.to_string();
            members.push(self.qpidd(
                &self.data_dir("member")?,
                &[
                    "--port",
                    &port,
                    "--ha-cluster",
                    "yes",
                    "--ha-brokers-url",
                    &url,
                    "--ha-replicate",
                    "all",
                    "--link-maintenance-interval",
                    "0.1s",
                ],
            )?);
        }
        let addr = |i: usize| format!("127.0.0.1:{}", ports[i]);
        let (ok, out) = self.qpid_ha(&["promote", "--cluster-manager", "-b", &addr(0)])?;
        ensure!(ok, "qpid-ha promote failed: {}", out.trim());
        let q = "bench-store-cluster";
        let mut a = Amqp::connect(ports[0])?;
        a.declare_with(q, DURABLE, &[])?;
        a.close()?;
        let wait_ready = |limit: Duration| -> Result<Vec<String>> {
            let deadline = Instant::now() + limit;
            loop {
                let mut statuses = Vec::new();
                for i in 0..3 {
                    statuses.push(
                        self.qpid_ha(&["status", "-b", &addr(i)])?
                            .1
                            .trim()
                            .to_string(),
                    );
                }
                if statuses[0] == "active" && statuses[1..].iter().all(|s| s == "ready") {
                    return Ok(statuses);
                }
                ensure!(
                    Instant::now() < deadline,
                    "cluster not primary active + 2 ready backups within {limit:?}: {statuses:?}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        };
        let t0 = Instant::now();
        let st = wait_ready(Duration::from_secs(60))?;
        println!(
            "    qpidd cluster: {st:?} {:.1} s after promote + declare",
            t0.elapsed().as_secs_f64()
        );

        // RabbitMQ: three nodes, clustered, a quorum queue with three members.
        let rabbit = match self.rabbit_server {
            None => {
                res.problems
                    .push("rabbitmq-server not installed: ours alone".into());
                None
            }
            Some(server) => match RabbitCluster::start(server, &self.runs_dir.join("rabbit3")) {
                Ok(c) => Some(c),
                Err(e) => {
                    let msg = format!("RabbitMQ 3-node cluster failed: {e:#}");
                    eprintln!("==> [bench] {msg}");
                    res.problems.push(msg);
                    None
                }
            },
        };
        let rq = "bench-store-quorum";
        if let Some(c) = &rabbit {
            let mut a = Amqp::connect(c.nodes[0].port)?;
            let mut table = Vec::new();
            short_str(&mut table, "x-queue-type");
            table.push(b'S');
            table.extend_from_slice(&6u32.to_be_bytes());
            table.extend_from_slice(b"quorum");
            a.declare_with(rq, DURABLE, &table)?;
            a.close()?;
            let info = c.ctl(0, &["list_queues", "name", "type", "leader", "members"])?;
            println!("    RabbitMQ queues: {}", info.trim().replace('\n', " | "));
            res.detail
                .push(("rabbitmq_queues".into(), Json::Str(info.trim().into())));
        }
        let mut targets: Vec<(&str, &Broker, Option<&str>)> =
            vec![("qpidd cluster", &members[0], Some(q))];
        if let Some(c) = &rabbit {
            targets.push(("rabbitmq quorum", &c.nodes[0], Some(rq)));
        }
        let runs = self.interleaved("store-cluster", &targets, None, res, |label, _| {
            if label != "qpidd cluster" {
                return Ok(None);
            }
            let mut st = Vec::new();
            for i in 1..3 {
                st.push(
                    self.qpid_ha(&["status", "-b", &addr(i)])?
                        .1
                        .trim()
                        .to_string(),
                );
            }
            Ok(st
                .iter()
                .any(|s| s != "ready")
                .then(|| format!("backups after the run: {st:?}")))
        })?;
        let (o, t) = (runs.of(0, |f| f.consumed), runs.of(1, |f| f.consumed));
        res.row(
            "qpidd primary + 2 ready backups, msgs/s consumed",
            fmt_stat(&o, 0),
            "",
            None,
        );
        res.row(
            "RabbitMQ quorum queue (3 nodes), msgs/s consumed",
            fmt_stat(&t, 0),
            "",
            None,
        );
        ratio_row(
            res,
            "ours / RabbitMQ (medians)",
            &o,
            &t,
            2.5,
            "- (no RabbitMQ figure)",
        );
        for (label, f) in [
            (
                "publish-to-confirm p99 µs, qpidd / RabbitMQ",
                (|f| f.confirm_p99_us) as Pick,
            ),
            (
                "disk writes MB/s (whole machine), qpidd cluster / RabbitMQ quorum runs",
                |f| f.disk_mb_s,
            ),
        ] {
            res.row(label, runs.pair(f, 0), "", None);
        }
        for (i, mut b) in members.into_iter().enumerate() {
            if !b.alive() {
                res.problems
                    .push(format!("qpidd member {i} exited; see {}", b.log.display()));
            }
            b.stop();
        }
        if let Some(c) = rabbit {
            c.stop();
        }
        Ok(())
    }

    /// `store-recovery` and `store-disk` on one broker and data dir.
    fn recovery_and_disk(
        &self,
        rec: &mut StoreResult,
        disk: Option<&mut StoreResult>,
    ) -> Result<()> {
        let q = "bench-store-recovery";
        let dir = self.data_dir("recovery")?;
        let store = dir.join("store");
        let broker = self.qpidd(&dir, &[])?;
        let count = RECOVERY_MESSAGES.to_string();
        let args: Vec<String> = [
            "--uri",
            &broker.uri(),
            "--json",
            "--producers",
            "1",
            "--size",
            "1024",
            "--count",
            &count,
            "--no-consume",
            "--persistent",
            "--confirm",
            "1000",
            "--queue",
            q,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let t_fill = Instant::now();
        let (report, problems) =
            self.perftest("store-recovery-fill", &args, Duration::from_secs(300))?;
        let fill_s = t_fill.elapsed().as_secs_f64();
        ensure!(problems.is_empty(), "filling {q}: {}", problems.join("; "));
        let mut a = Amqp::connect(broker.port)?;
        let depth = a.declare_with(q, PASSIVE, &[])?;
        a.close()?;
        ensure!(
            u64::from(depth) == RECOVERY_MESSAGES,
            "{q} holds {depth} messages after the fill, not {RECOVERY_MESSAGES}"
        );
        let (full_bytes, full_files) = dir_size(&store);
        rec.row(
            "fill: 1,000,000 x 1 KiB persistent, confirms 1,000 (perftest wall time; publish rate)",
            format!(
                "{fill_s:.1} s; {} msg/s",
                report
                    .num("publish_rate")
                    .map_or("-".into(), |r| group(r, 0))
            ),
            "",
            None,
        );
        rec.row(
            "store size with 1,000,000 queued",
            format!("{} in {full_files} files", mib(full_bytes as f64)),
            "",
            None,
        );
        rec.detail
            .push(("fill_command".into(), Json::Str(args.join(" "))));
        let t_stop = Instant::now();
        let mut old = broker;
        signal("-TERM", &old.pid.to_string());
        let deadline = Instant::now() + Duration::from_secs(60);
        while old.alive() {
            ensure!(
                Instant::now() < deadline,
                "qpidd did not exit within 60 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let stop_s = t_stop.elapsed().as_secs_f64();
        old.stop(); // reaps; already exited
        rec.row("SIGTERM → exit", format!("{stop_s:.2} s"), "", None);

        // Restart on the same data dir: times from process start.
        let t0 = Instant::now();
        let mut broker = self.qpidd(&dir, &[])?;
        let listen_s = t0.elapsed().as_secs_f64();
        let mut a = Amqp::connect(broker.port)?;
        let limit = Instant::now() + Duration::from_secs(120);
        let mut last;
        let depth_s = loop {
            last = a.declare_with(q, PASSIVE, &[])?;
            if u64::from(last) == RECOVERY_MESSAGES {
                break t0.elapsed().as_secs_f64();
            }
            ensure!(
                Instant::now() < limit,
                "{q} shows {last} of {RECOVERY_MESSAGES} messages 120 s after the restart"
            );
            std::thread::sleep(Duration::from_millis(2));
        };
        let (first, redelivered) = loop {
            if let Some(r) = a.get_unacked(q)? {
                break r;
            }
            ensure!(
                Instant::now() < limit,
                "no message from {q} 120 s after the restart"
            );
            std::thread::sleep(Duration::from_millis(2));
        };
        let first_s = t0.elapsed().as_secs_f64();
        a.close()?; // the got message goes back to the queue
        ensure!(
            first.len() == 1024,
            "first message has {} bytes",
            first.len()
        );
        rec.row(
            "start → port printed (listening)",
            format!("{listen_s:.2} s"),
            "",
            None,
        );
        rec.row(
            "start → depth 1,000,000 (passive declare)",
            format!("{depth_s:.2} s"),
            "≤ 5 s",
            Some(depth_s <= 5.0),
        );
        rec.row(
            "start → first recovered message (basic.get, after the depth check)",
            format!(
                "{first_s:.2} s (redelivered flag {})",
                if redelivered { "set" } else { "NOT set" }
            ),
            "≤ 5 s",
            Some(first_s <= 5.0),
        );
        if !redelivered {
            rec.problems
                .push("the first recovered message is not flagged redelivered".into());
        }
        let rss = fs::read_to_string(format!("/proc/{}/status", broker.pid))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            });
        rec.row(
            "qpidd RSS after recovery",
            rss.map_or("-".into(), |k| mib(k * 1024.0)),
            "",
            None,
        );

        if let Some(disk) = disk {
            let t = Instant::now();
            let consumed = consume_all(broker.port, q, RECOVERY_MESSAGES)?;
            let consume_s = t.elapsed().as_secs_f64();
            let mut a = Amqp::connect(broker.port)?;
            let left = a.declare_with(q, PASSIVE, &[])?;
            a.close()?;
            disk.row(
                "consume + ack 1,000,000 (raw client, prefetch 2,000, acks every 500)",
                format!(
                    "{consumed} in {consume_s:.1} s ({} msg/s); {left} left on the queue",
                    group(consumed as f64 / consume_s, 0)
                ),
                "",
                None,
            );
            if left != 0 {
                disk.problems.push(format!("{left} messages left on {q}"));
            }
            let t_acked = Instant::now();
            let mut samples = Vec::new();
            for i in 0..=DISK_WAIT_S / DISK_EVERY_S {
                let at = t_acked + Duration::from_secs(i * DISK_EVERY_S);
                if let Some(d) = at.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
                let (bytes, files) = dir_size(&store);
                samples.push((t_acked.elapsed().as_secs_f64(), bytes, files));
            }
            let curve: Vec<String> = samples
                .iter()
                .map(|(t, b, n)| format!("{t:.0} s {:.1} MiB/{n}", *b as f64 / 1048576.0))
                .collect();
            disk.row(
                "DIR/store size after the last ack (every 5 s: size/files)",
                curve.join(", "),
                "",
                None,
            );
            let (bytes, files) = samples.last().map_or((0, 0), |s| (s.1, s.2));
            let du = du_kib(&store);
            let limit = 65.0 * 1024.0 * 1024.0;
            disk.row(
                "DIR/store at 60 s: sum of file sizes (du -sk)",
                format!(
                    "{} in {files} files (du {})",
                    mib(bytes as f64),
                    du.map_or("-".into(), |k| mib(k as f64 * 1024.0))
                ),
                "≤ 64 MiB + 1 MiB × 1 durable queue = 65 MiB",
                Some(bytes as f64 <= limit && du.is_none_or(|k| k as f64 * 1024.0 <= limit)),
            );
            let listing: Vec<Json> = fs::read_dir(&store)
                .map(|rd| {
                    rd.flatten()
                        .map(|e| {
                            Json::Str(format!(
                                "{} {}",
                                e.file_name().to_string_lossy(),
                                e.metadata().map(|m| m.len()).unwrap_or(0)
                            ))
                        })
                        .collect()
                })
                .unwrap_or_default();
            disk.detail
                .push(("store_files_at_end".into(), Json::Arr(listing)));
            disk.detail.push((
                "samples".into(),
                Json::Arr(
                    samples
                        .iter()
                        .map(|s| {
                            Json::Arr(vec![
                                Json::Num(s.0),
                                Json::Num(s.1 as f64),
                                Json::Num(s.2 as f64),
                            ])
                        })
                        .collect(),
                ),
            ));
        }
        if !broker.alive() {
            rec.problems
                .push(format!("qpidd exited; see {}", broker.log.display()));
        }
        broker.stop();
        Ok(())
    }
}

const PASSIVE: u8 = 1;
const DURABLE: u8 = 2;

/// Consumes `n` messages of `queue` with manual acks (prefetch 2,000, basic.ack multiple every
/// 500); returns how many arrived (stops when 15 s pass without one).
fn consume_all(port: u16, queue: &str, n: u64) -> Result<u64> {
    let mut a = Amqp::connect(port)?;
    let mut qos = 0u32.to_be_bytes().to_vec();
    qos.extend_from_slice(&2000u16.to_be_bytes());
    qos.push(0);
    a.c.send(1, 60, 10, &qos)?;
    a.c.expect(1, 60, 11)?;
    let mut c = vec![0, 0];
    short_str(&mut c, queue);
    short_str(&mut c, "bench-store-drain");
    c.push(0); // no-local, no-ack, exclusive, no-wait: off
    c.extend_from_slice(&0u32.to_be_bytes());
    a.c.send(1, 60, 20, &c)?;
    a.c.expect(1, 60, 21)?;
    let mut got = 0u64;
    let mut unacked = 0;
    let deadline = Instant::now() + Duration::from_secs(600);
    while got < n {
        ensure!(Instant::now() < deadline, "consumed {got} of {n} in 600 s");
        let (kind, args) = a.method()?;
        if kind != (60, 60) {
            continue;
        }
        let tag_at = 1 + *args.first().context("short deliver")? as usize;
        let tag = args.get(tag_at..tag_at + 8).context("short deliver")?;
        let last_tag = u64::from_be_bytes(tag.try_into()?);
        a.content()?;
        got += 1;
        unacked += 1;
        if unacked >= 500 || got == n {
            let mut ack = last_tag.to_be_bytes().to_vec();
            ack.push(1); // multiple
            a.c.send(1, 60, 80, &ack)?;
            unacked = 0;
        }
    }
    // connection.close waits for close-ok: every ack is in before the caller looks again.
    a.close()?;
    Ok(got)
}

/// A RabbitMQ cluster of three local nodes sharing one Erlang cookie.
struct RabbitCluster {
    dir: PathBuf,
    nodes: Vec<Broker>,
    names: Vec<String>,
    home: PathBuf,
    ctl: PathBuf,
    epmd_before: Vec<u32>,
}

impl RabbitCluster {
    fn start(server: &Path, dir: &Path) -> Result<RabbitCluster> {
        let _ = fs::remove_dir_all(dir);
        let home = dir.join("home");
        fs::create_dir_all(&home)?;
        let cookie = home.join(".erlang.cookie");
        fs::write(
            &cookie,
            format!("QPIDBENCHSTORE{}", unique() % 1_000_000_007),
        )?;
        let ctl = server.with_file_name("rabbitmqctl");
        ensure!(ctl.exists(), "no {}", ctl.display());
        let _ = Command::new("chmod").arg("400").arg(&cookie).status();
        let epmd_before = pids_named("epmd");
        let mut c = RabbitCluster {
            dir: dir.to_path_buf(),
            nodes: Vec::new(),
            names: Vec::new(),
            home,
            ctl,
            epmd_before,
        };
        for i in 0..3 {
            let name = format!("qsb{i}x{}@localhost", std::process::id());
            let t0 = Instant::now();
            let b = Broker::start_rabbit_node(
                server,
                &dir.join(format!("n{i}")),
                &name,
                &c.home,
                Duration::from_secs(120),
            )?;
            println!(
                "    RabbitMQ node {name} on 127.0.0.1:{} in {:.1} s (log {})",
                b.port,
                t0.elapsed().as_secs_f64(),
                b.log.display()
            );
            c.nodes.push(b);
            c.names.push(name);
        }
        let first = c.names[0].clone();
        for i in 1..3 {
            c.ctl(i, &["stop_app"])?;
            c.ctl(i, &["join_cluster", &first])?;
            c.ctl(i, &["start_app"])?;
        }
        let status = c.ctl(0, &["cluster_status"])?;
        let running = c
            .names
            .iter()
            .filter(|n| status.contains(n.as_str()))
            .count();
        ensure!(
            running == 3,
            "cluster_status does not name all three nodes: {status}"
        );
        println!("    RabbitMQ cluster of 3 nodes formed");
        Ok(c)
    }

    /// `rabbitmqctl -n NODE ARGS` with the shared cookie; stdout (fails on a non-zero exit).
    fn ctl(&self, node: usize, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.names[node].as_str()];
        full.extend_from_slice(args);
        let base = std::env::temp_dir().join(format!("xtask-bench-store-{}", unique()));
        let (o, e) = (base.with_extension("out"), base.with_extension("err"));
        let mut child = Command::new(&self.ctl)
            .args(&full)
            .env("HOME", &self.home)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&o)?)
            .stderr(fs::File::create(&e)?)
            .spawn()
            .with_context(|| format!("starting {}", self.ctl.display()))?;
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if t0.elapsed() > Duration::from_secs(120) {
                let _ = child.kill();
                let _ = child.wait();
                bail!("rabbitmqctl {} did not exit within 120 s", full.join(" "));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = fs::read_to_string(&o).unwrap_or_default();
        let err = fs::read_to_string(&e).unwrap_or_default();
        let _ = fs::remove_file(&o);
        let _ = fs::remove_file(&e);
        ensure!(
            status.success(),
            "rabbitmqctl {} failed ({status}): {} {}",
            full.join(" "),
            out.trim(),
            err.trim()
        );
        Ok(out)
    }

    /// Stops the nodes and removes their data (the quorum queue's log grows by ~1 GiB a run);
    /// the logs stay.
    fn stop(mut self) {
        while let Some(b) = self.nodes.pop() {
            b.stop();
        }
        for i in 0..self.names.len() {
            let _ = fs::remove_dir_all(self.dir.join(format!("n{i}/mnesia")));
        }
        for p in pids_named("epmd") {
            if !self.epmd_before.contains(&p) {
                signal("-TERM", &p.to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bare_disk_loop_times_every_record_after_the_warmup_and_cleans_up() {
        let dir = std::env::temp_dir().join(format!("xtask-disk-loop-{}", unique()));
        let d = disk_loop(
            &dir,
            2_000,
            Duration::from_millis(100),
            Duration::from_millis(300),
        )
        .expect("disk loop");
        // 300 ms at 2,000 records a second after the warm-up: about 600 records timed.
        assert!((500..=610).contains(&d.records), "{} records", d.records);
        assert!(d.syncs >= 1 && d.syncs <= 800, "{} syncs", d.syncs);
        assert!(d.p50_us > 0.0 && d.p50_us <= d.p99_us && d.p99_us <= d.max_us);
        assert!(!dir.exists(), "{} left behind", dir.display());
    }

    #[test]
    fn figures_read_disk_writes() {
        let with = Json::parse(
            r#"{"window_s": 4.0, "cpu": {"other_s": 0.4}, "disk": {"written_bytes": 1660000000, "write_mb_s": 415.0}}"#,
        )
        .unwrap();
        let f = Figures::of(&with);
        assert_eq!(f.disk_mb_s, Some(415.0));
        assert_eq!(f.other_cores, Some(0.1));
        assert!(f.text().ends_with("disk writes 415 MB/s"), "{}", f.text());
        let without = Json::parse(
            r#"{"window_s": 4.0, "disk": {"written_bytes": null, "write_mb_s": null}}"#,
        )
        .unwrap();
        assert_eq!(Figures::of(&without).disk_mb_s, None);
        assert!(Figures::of(&without).text().ends_with("disk writes - MB/s"));
    }

    #[test]
    fn only_selects_store_keys() {
        assert_eq!(selected(&None), KEYS.to_vec());
        assert_eq!(selected(&Some(vec!["store".into()])), KEYS.to_vec());
        assert_eq!(
            selected(&Some(vec!["latency".into(), "store-disk".into()])),
            ["store-disk"]
        );
        assert!(selected(&Some(vec!["replication".into()])).is_empty());
    }

    #[test]
    fn sizes_of_a_directory_tree() {
        let d = std::env::temp_dir().join(format!("xtask-store-size-{}", unique()));
        fs::create_dir_all(d.join("sub")).unwrap();
        fs::write(d.join("a"), [0u8; 100]).unwrap();
        fs::write(d.join("sub/b"), [0u8; 28]).unwrap();
        assert_eq!(dir_size(&d), (128, 2));
        let _ = fs::remove_dir_all(&d);
        assert_eq!(dir_size(&d), (0, 0));
    }
}
