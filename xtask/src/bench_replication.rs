//! The replication speed measures of issue 4, part of `cargo xtask bench` (keys `repl-confirm`,
//! `repl-lag`, `repl-reconnect`, `repl-catchup`, or `replication` for all four).
//!
//! Two release brokers `qpidd --port 0 --no-data-dir --auth no --ha-queue-replication yes` on
//! loopback: the original and the replica broker. Queues are declared on both with the raw
//! client, replication is set up with the release `qpid-ha replicate`, and every state, depth
//! and lag is read from the HA management object (`org.apache.qpid.ha:habroker:ha-broker`,
//! rows `replicas` on the replica broker and `subscriptions` on the original) through the
//! management protocol over [`Amqp`], a small extension of the bench's raw client, so no
//! process is spawned per sample.
//!
//! * `repl-confirm`: `qpid-perftest` with confirms (window 1,000), 1 KiB, 1 producer and 1
//!   auto-ack consumer, on a queue with a ready replica and on a queue of the same original
//!   without one, interleaved; the ratio of the median publish rates (target ≥ 0.7).
//! * `repl-lag`: `qpid-perftest` at a steady 10,000 msg/s on the replicated queue while the
//!   subscription's `lag.oldestUnackedMs` is sampled on the original every 100 ms (p99 ≤ 10 ms).
//! * `repl-reconnect`: the replica reaches the original through a TCP proxy run here; the proxy
//!   cuts every connection and refuses new ones until the replica shows it is not ready, then
//!   accepts again; the time from the restore to `ready` (polled every 10 ms; target ≤ 1 s).
//! * `repl-catchup`: 1,000,000 messages of 1 KiB on the original, then `qpid-ha replicate`;
//!   the time until the replica holds them all and is ready (target ≤ 10 s), while a raw client
//!   publishes and gets 1 KiB messages on another queue of the original in a loop.

use super::{
    Broker, Json, Options, RawAmqp, group, method_frame, percentile, short_str, stat, unique,
};
use anyhow::{Context, Result, bail, ensure};
use std::fmt::Write as _;
use std::fs;
use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The keys `--only` accepts for these measures (`replication` selects all).
pub(super) const KEYS: [&str; 4] = ["repl-confirm", "repl-lag", "repl-reconnect", "repl-catchup"];

/// The replication keys `--only` selects (all four without `--only`).
pub(super) fn selected(only: &Option<Vec<String>>) -> Vec<&'static str> {
    keys_selected(&KEYS, "replication", only)
}

/// The `keys` that `--only` names, by key or by their `group` name (all without `--only`).
pub(super) fn keys_selected(
    keys: &[&'static str],
    group: &str,
    only: &Option<Vec<String>>,
) -> Vec<&'static str> {
    keys.iter()
        .copied()
        .filter(|k| {
            only.as_ref()
                .is_none_or(|o| o.iter().any(|x| x == k || x == group))
        })
        .collect()
}

/// Messages in the catch-up queue.
const CATCHUP_MESSAGES: u64 = 1_000_000;
/// Publish rate of `repl-lag`.
const LAG_RATE: u32 = 10_000;
/// `repl-reconnect`: cuts restored as soon as the replica shows it is not ready...
const SHORT_CUTS: usize = 3;
/// ...and cuts held this long (the replica's retry backoff doubles from 0.5 s while refused).
const LONG_CUTS: usize = 2;
const LONG_CUT_MS: u64 = 5000;

/// Paths and options the measures need.
pub(super) struct ReplEnv<'a> {
    pub qpidd: &'a Path,
    pub perftest: &'a Path,
    pub qpid_ha: &'a Path,
    pub runs_dir: &'a Path,
    pub opts: &'a Options,
}

/// One measure's outcome: table rows, details for the JSON report, problems.
pub(super) struct ReplResult {
    pub(super) key: &'static str,
    pub(super) title: &'static str,
    rows: Vec<ReplRow>,
    pub(super) detail: Vec<(String, Json)>,
    pub problems: Vec<String>,
}

pub(super) struct ReplRow {
    metric: String,
    value: String,
    target: String,
    met: Option<bool>,
}

impl ReplResult {
    pub(super) fn new(key: &'static str, title: &'static str) -> Self {
        ReplResult {
            key,
            title,
            rows: Vec::new(),
            detail: Vec::new(),
            problems: Vec::new(),
        }
    }

    pub(super) fn row(&mut self, metric: &str, value: String, target: &str, met: Option<bool>) {
        println!("    {metric}: {value}");
        self.rows.push(ReplRow {
            metric: metric.into(),
            value,
            target: target.into(),
            met,
        });
    }

    pub(super) fn to_json(&self) -> Json {
        let mut fields = vec![
            ("key".into(), Json::Str(self.key.into())),
            ("title".into(), Json::Str(self.title.into())),
            (
                "rows".into(),
                Json::Arr(
                    self.rows
                        .iter()
                        .map(|r| {
                            Json::Obj(vec![
                                ("metric".into(), Json::Str(r.metric.clone())),
                                ("value".into(), Json::Str(r.value.clone())),
                                ("target".into(), Json::Str(r.target.clone())),
                                ("met".into(), r.met.map_or(Json::Null, Json::Bool)),
                            ])
                        })
                        .collect(),
                ),
            ),
            (
                "problems".into(),
                Json::Arr(self.problems.iter().map(|p| Json::Str(p.clone())).collect()),
            ),
        ];
        fields.extend(self.detail.iter().cloned());
        Json::Obj(fields)
    }
}

/// The replication table, in the style of the main one.
pub(super) fn render_table(results: &[ReplResult]) -> String {
    render_table_headed(
        results,
        "| replication measure (issue 4) | metric | measured | target | verdict |",
    )
}

/// A table of measures under `header` (a measure without rows names itself on its problem row).
pub(super) fn render_table_headed(results: &[ReplResult], header: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{header}");
    let _ = writeln!(out, "|---|---|---:|---|---|");
    for r in results {
        for (i, row) in r.rows.iter().enumerate() {
            let verdict = match row.met {
                Some(true) => "met",
                Some(false) => "**MISSED**",
                None if row.target.is_empty() => "",
                None => "n/a",
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} |",
                if i == 0 { r.title } else { "" },
                row.metric,
                row.value,
                row.target,
                verdict
            );
        }
        if !r.problems.is_empty() {
            let _ = writeln!(
                out,
                "| {} | | | {} problem(s): {} | |",
                if r.rows.is_empty() { r.title } else { "" },
                r.problems.len(),
                r.problems.join("; ").replace('|', "/")
            );
        }
    }
    out
}

/// Runs the selected measures; an error in one is recorded as its problem and the others go on.
pub(super) fn run(env: &ReplEnv<'_>, keys: &[&str]) -> Vec<ReplResult> {
    let mut results = Vec::new();
    for &key in KEYS.iter().filter(|k| keys.contains(k)) {
        println!("==> [bench] replication: {key}");
        let title = match key {
            "repl-confirm" => "publish with confirms (window 1,000), 1 KiB, ready replica vs none",
            "repl-lag" => "replica lag at a steady 10,000 msg/s, on the original",
            "repl-reconnect" => "replica reconnect after a cut link is restored",
            _ => "catch-up of 1,000,000 queued 1 KiB messages",
        };
        let mut res = ReplResult::new(key, title);
        let outcome = match key {
            "repl-confirm" => env.confirm(&mut res),
            "repl-lag" => env.lag(&mut res),
            "repl-reconnect" => env.reconnect(&mut res),
            _ => env.catchup(&mut res),
        };
        if let Err(e) = outcome {
            eprintln!("==> [bench] {key} failed: {e:#}");
            res.problems.push(format!("{e:#}"));
        }
        results.push(res);
    }
    results
}

/// An original broker and a replica broker.
struct Pair {
    original: Broker,
    replica: Broker,
}

impl ReplEnv<'_> {
    fn broker(&self) -> Result<Broker> {
        Broker::start_qpidd(
            self.qpidd,
            self.runs_dir,
            &[
                "--port",
                "0",
                "--no-data-dir",
                "--auth",
                "no",
                "--ha-queue-replication",
                "yes",
            ],
        )
    }

    fn pair(&self) -> Result<Pair> {
        let pair = Pair {
            original: self.broker()?,
            replica: self.broker()?,
        };
        println!(
            "    original 127.0.0.1:{} (log {}), replica broker 127.0.0.1:{} (log {})",
            pair.original.port,
            pair.original.log.display(),
            pair.replica.port,
            pair.replica.log.display()
        );
        Ok(pair)
    }

    /// `qpid-ha replicate -b 127.0.0.1:REPLICA ORIGINAL QUEUE`, which exits once subscribed.
    fn replicate(&self, replica: u16, original: &str, queue: &str) -> Result<Duration> {
        let b = format!("127.0.0.1:{replica}");
        let args = ["replicate", "-b", &b, original, queue];
        let t0 = Instant::now();
        let out = run_limited(self.qpid_ha, &args, Duration::from_secs(30))?;
        ensure!(
            out.0.success() && !out.2.contains("keeps trying"),
            "`qpid-ha {}` failed ({}): {} {}",
            args.join(" "),
            out.0,
            out.1.trim(),
            out.2.trim()
        );
        Ok(t0.elapsed())
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
            &["messages.lost", "messages.duplicates"],
        )
    }

    /// Ready replicas of `queue` on a fresh pair (the queue declared on both first).
    fn replicated_pair(&self, queues: &[&str]) -> Result<(Pair, Mgmt)> {
        let pair = self.pair()?;
        for port in [pair.original.port, pair.replica.port] {
            let mut a = Amqp::connect(port)?;
            for q in queues {
                a.declare(q, 0)?;
            }
            a.close()?;
        }
        let mut mgmt = Mgmt::connect(pair.replica.port)?;
        let original = format!("127.0.0.1:{}", pair.original.port);
        for q in queues {
            self.replicate(pair.replica.port, &original, q)?;
            wait_replica(
                &mut mgmt,
                q,
                Duration::from_secs(20),
                Duration::from_millis(20),
                |r| r.str("state") == Some("ready"),
            )?;
        }
        Ok((pair, mgmt))
    }

    fn perftest_args(&self, pair: &Pair, queue: &str, extra: &[&str]) -> Vec<String> {
        let mut args =
            pair.original
                .perftest_one_to_one(&["--auto-ack", "--queue", queue, "--predeclared"]);
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// `repl-confirm`: same original, a replicated queue and a plain one, runs interleaved.
    fn confirm(&self, res: &mut ReplResult) -> Result<()> {
        let (repl_q, plain_q) = ("bench-repl-confirm", "bench-plain-confirm");
        let (pair, mut mgmt) = self.replicated_pair(&[repl_q])?;
        let mut a = Amqp::connect(pair.original.port)?;
        a.declare(plain_q, 0)?;
        a.close()?;
        let mut orig_mgmt = Mgmt::connect(pair.original.port)?;
        let runs = self.opts.runs.min(3);
        let seconds = self.opts.seconds.min(4.0).to_string();
        let warmup = self.opts.warmup.min(1.0).to_string();
        let extra = [
            "--max-backlog",
            "50000",
            "--warmup-seconds",
            &warmup,
            "--seconds",
            &seconds,
        ];
        let (mut with, mut without, mut pairs_ratio) = (Vec::new(), Vec::new(), Vec::new());
        let (mut us_with, mut us_without, mut replica_cores) = (Vec::new(), Vec::new(), Vec::new());
        let mut reports = Vec::new();
        for run in 0..runs {
            let order = if run % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            let mut this = [None, None];
            for replicated in order {
                let q = if replicated { repl_q } else { plain_q };
                let args = self.perftest_args(&pair, q, &extra);
                let stalls_before = sub_row(&mut orig_mgmt, repl_q)?.num("stalls");
                let (cpu0, t0) = (cpu_seconds(pair.replica.pid), Instant::now());
                let (report, problems) =
                    self.perftest("repl-confirm", &args, Duration::from_secs(90))?;
                let replica_share = cpu_seconds(pair.replica.pid)
                    .zip(cpu0)
                    .map(|(b, a)| (b - a) / t0.elapsed().as_secs_f64());
                let rate = report.num("publish_rate");
                let mut note = String::new();
                if replicated {
                    let row = wait_replica(
                        &mut mgmt,
                        repl_q,
                        Duration::from_secs(10),
                        Duration::from_millis(50),
                        |_| true,
                    )?;
                    let stalls = sub_row(&mut orig_mgmt, repl_q)?.num("stalls");
                    if row.str("state") != Some("ready") || stalls != stalls_before {
                        let msg = format!(
                            "run {run}: the replica left `ready` (now {:?}, stalls {stalls_before:?} -> {stalls:?})",
                            row.str("state")
                        );
                        res.problems.push(msg.clone());
                        note = format!(" ({msg})");
                    }
                }
                println!(
                    "    run {run} {}: published {} msg/s, consumed {} msg/s, p99 {} µs{note}{}",
                    if replicated {
                        "replicated"
                    } else {
                        "plain     "
                    },
                    rate.map_or("-".into(), |r| group(r, 0)),
                    report
                        .num("consume_rate")
                        .map_or("-".into(), |r| group(r, 0)),
                    report
                        .num("latency_us.p99")
                        .map_or("-".into(), |r| group(r, 0)),
                    if problems.is_empty() {
                        String::new()
                    } else {
                        format!(" PROBLEMS: {}", problems.join("; "))
                    }
                );
                res.problems
                    .extend(problems.iter().map(|p| format!("run {run}: {p}")));
                if problems.is_empty() && note.is_empty() {
                    this[usize::from(!replicated)] = rate;
                    let us = report.num("cpu.broker_us_per_msg");
                    if replicated {
                        with.extend(rate);
                        us_with.extend(us);
                        replica_cores.extend(replica_share);
                    } else {
                        without.extend(rate);
                        us_without.extend(us);
                    }
                }
                reports.push(Json::Obj(vec![
                    ("replicated".into(), Json::Bool(replicated)),
                    ("run".into(), Json::Num(run as f64)),
                    ("command".into(), Json::Str(args.join(" "))),
                    ("report".into(), report),
                ]));
            }
            if let [Some(w), Some(p)] = this {
                pairs_ratio.push(w / p);
            }
        }
        let fmt = |v: &[f64]| {
            stat(v).map_or("-".into(), |s| {
                format!(
                    "{} [{}–{}]",
                    group(s.median, 0),
                    group(s.min, 0),
                    group(s.max, 0)
                )
            })
        };
        res.row("msgs/s published, ready replica", fmt(&with), "", None);
        res.row("msgs/s published, no replica", fmt(&without), "", None);
        let ratio = stat(&with)
            .zip(stat(&without))
            .map(|(w, p)| w.median / p.median);
        res.row(
            "ratio of medians (per-run pairs)",
            ratio.map_or("-".into(), |r| {
                let per: Vec<String> = pairs_ratio.iter().map(|r| format!("{r:.2}")).collect();
                format!("{r:.2}× ({})", per.join(", "))
            }),
            "≥ 0.7×",
            ratio.map(|r| r >= 0.7),
        );
        let med = |v: &[f64], d: usize| stat(v).map_or("-".into(), |s| format!("{:.d$}", s.median));
        res.row(
            "original's CPU µs/msg, replicated / plain (median)",
            format!("{} / {}", med(&us_with, 2), med(&us_without, 2)),
            "",
            None,
        );
        res.row(
            "replica broker's CPU during replicated runs (median)",
            format!(
                "{} cores of {}",
                med(&replica_cores, 2),
                super::machine_info().cpus
            ),
            "",
            None,
        );
        res.detail.push(("runs".into(), Json::Arr(reports)));
        check_alive(res, pair)
    }

    /// `repl-lag`: steady 10,000 msg/s, lag sampled on the original every 100 ms.
    fn lag(&self, res: &mut ReplResult) -> Result<()> {
        let q = "bench-repl-lag";
        let (pair, mut mgmt) = self.replicated_pair(&[q])?;
        let seconds: f64 = 8.0;
        let rate = LAG_RATE.to_string();
        let secs = seconds.to_string();
        let args = self.perftest_args(
            &pair,
            q,
            &["--rate", &rate, "--warmup-seconds", "1", "--seconds", &secs],
        );
        let stop = Arc::new(AtomicBool::new(false));
        let port = pair.original.port;
        let sampler = {
            let stop = stop.clone();
            std::thread::spawn(move || -> Result<Vec<(f64, f64, f64, String)>> {
                let mut m = Mgmt::connect(port)?;
                let mut samples = Vec::new();
                let t0 = Instant::now();
                let mut next = t0;
                while !stop.load(Ordering::Relaxed) {
                    let row = sub_row(&mut m, q)?;
                    samples.push((
                        t0.elapsed().as_secs_f64(),
                        row.num("lag.oldestUnackedMs").unwrap_or(f64::NAN),
                        row.num("lag.messages").unwrap_or(f64::NAN),
                        row.str("state").unwrap_or("?").to_string(),
                    ));
                    next += Duration::from_millis(100);
                    if let Some(d) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(d);
                    }
                }
                Ok(samples)
            })
        };
        let t_start = Instant::now();
        let run = self.perftest("repl-lag", &args, Duration::from_secs(90));
        let elapsed = t_start.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        let samples = sampler
            .join()
            .map_err(|_| anyhow::anyhow!("lag sampler panicked"))??;
        let (report, problems) = run?;
        res.problems.extend(problems);
        // The measurement window: after the 1 s warm-up, until the producer stopped.
        let window: Vec<&(f64, f64, f64, String)> = samples
            .iter()
            .filter(|s| s.0 >= 1.0 && s.0 <= (1.0 + seconds).min(elapsed))
            .collect();
        let ms: Vec<f64> = window
            .iter()
            .map(|s| s.1)
            .filter(|v| v.is_finite())
            .collect();
        let msgs: Vec<f64> = window
            .iter()
            .map(|s| s.2)
            .filter(|v| v.is_finite())
            .collect();
        let not_ready = window.iter().filter(|s| s.3 != "ready").count();
        if not_ready > 0 {
            res.problems.push(format!(
                "{not_ready} sample(s) saw the subscription not ready"
            ));
        }
        let p = |v: &[f64], q: f64| percentile(v, q).map_or("-".into(), |x| format!("{x:.0}"));
        let p99 = percentile(&ms, 0.99);
        res.row(
            "lag.oldestUnackedMs p50 / p99 / max",
            format!(
                "{} / {} / {} ms ({} samples)",
                p(&ms, 0.5),
                p(&ms, 0.99),
                p(&ms, 1.0),
                ms.len()
            ),
            "p99 ≤ 10 ms",
            p99.map(|x| x <= 10.0),
        );
        res.row(
            "lag.messages p50 / p99 / max",
            format!("{} / {} / {}", p(&msgs, 0.5), p(&msgs, 0.99), p(&msgs, 1.0)),
            "",
            None,
        );
        res.row(
            "publish rate; end-to-end p99 (perftest)",
            format!(
                "{} msg/s; {} µs",
                report
                    .num("publish_rate")
                    .map_or("-".into(), |r| group(r, 0)),
                report
                    .num("latency_us.p99")
                    .map_or("-".into(), |r| group(r, 0))
            ),
            "",
            None,
        );
        let row = wait_replica(
            &mut mgmt,
            q,
            Duration::from_secs(5),
            Duration::from_millis(20),
            |_| true,
        )?;
        if row.str("state") != Some("ready") {
            res.problems.push(format!(
                "replica state after the run: {:?}",
                row.str("state")
            ));
        }
        res.detail.push((
            "samples".into(),
            Json::Arr(
                samples
                    .iter()
                    .map(|s| {
                        Json::Arr(vec![
                            Json::Num(s.0),
                            Json::Num(s.1),
                            Json::Num(s.2),
                            Json::Str(s.3.clone()),
                        ])
                    })
                    .collect(),
            ),
        ));
        res.detail
            .push(("command".into(), Json::Str(args.join(" "))));
        res.detail.push(("report".into(), report));
        check_alive(res, pair)
    }

    /// `repl-reconnect`: cut the proxied link, wait for not-ready, restore, time to ready.
    fn reconnect(&self, res: &mut ReplResult) -> Result<()> {
        let q = "bench-repl-link";
        let pair = self.pair()?;
        for port in [pair.original.port, pair.replica.port] {
            let mut a = Amqp::connect(port)?;
            a.declare(q, 0)?;
            a.close()?;
        }
        let upstream = SocketAddr::from(([127, 0, 0, 1], pair.original.port));
        let proxy = Proxy::start(upstream)?;
        let mut mgmt = Mgmt::connect(pair.replica.port)?;
        self.replicate(pair.replica.port, &format!("127.0.0.1:{}", proxy.port), q)?;
        wait_replica(
            &mut mgmt,
            q,
            Duration::from_secs(20),
            Duration::from_millis(10),
            |r| r.str("state") == Some("ready"),
        )?;
        let mut publisher = Amqp::connect(pair.original.port)?;
        // (held for, restore → ready ms, cut → not ready ms)
        let mut seen: Vec<(u64, f64, f64)> = Vec::new();
        let mut cuts = Vec::new();
        let plan: Vec<u64> = std::iter::repeat_n(0, SHORT_CUTS)
            .chain(std::iter::repeat_n(LONG_CUT_MS, LONG_CUTS))
            .collect();
        for (i, &hold) in plan.iter().enumerate() {
            let t_cut = Instant::now();
            proxy.cut()?;
            let down = wait_replica(
                &mut mgmt,
                q,
                Duration::from_secs(20),
                Duration::from_millis(10),
                |r| {
                    r.str("state").is_some_and(|s| {
                        s.starts_with("disconnected since") || s.starts_with("connecting")
                    })
                },
            );
            let down_after = t_cut.elapsed().as_secs_f64() * 1e3;
            // Messages the replica misses while cut off.
            for _ in 0..10 {
                publisher.publish("", q, &[], &[b'x'; 1024])?;
            }
            publisher.declare(q, 1)?; // passive: a round trip, so the publishes are in
            let down = down?;
            if let Some(d) =
                (t_cut + Duration::from_millis(hold)).checked_duration_since(Instant::now())
            {
                std::thread::sleep(d);
            }
            let held_for = t_cut.elapsed().as_secs_f64() * 1e3;
            let t_restore = Instant::now();
            proxy.restore()?;
            let up = wait_replica(
                &mut mgmt,
                q,
                Duration::from_secs(20),
                Duration::from_millis(10),
                |r| r.str("state") == Some("ready"),
            );
            let ms = t_restore.elapsed().as_secs_f64() * 1e3;
            let up = up?;
            let held = up.num("messages").unwrap_or(-1.0);
            let expected = (10 * (i + 1)) as f64;
            println!(
                "    cut {i}: not ready after {down_after:.0} ms ({:?}), cut held {held_for:.0} ms, ready {ms:.0} ms after the restore, replica holds {held} of {expected}",
                down.str("state").unwrap_or("?")
            );
            if held != expected {
                res.problems.push(format!(
                    "cut {i}: the replica holds {held} messages, the original {expected}"
                ));
            }
            seen.push((hold, ms, down_after));
            cuts.push(Json::Obj(vec![
                ("not_ready_after_ms".into(), Json::Num(down_after)),
                (
                    "state_seen".into(),
                    Json::Str(down.str("state").unwrap_or("?").into()),
                ),
                ("cut_held_ms".into(), Json::Num(held_for)),
                ("ready_after_restore_ms".into(), Json::Num(ms)),
            ]));
        }
        publisher.close()?;
        proxy.stop();
        for (hold, label) in [
            (
                0,
                "restore → ready, cut restored once not ready: median / max",
            ),
            (LONG_CUT_MS, "restore → ready, cut held 5 s: median / max"),
        ] {
            let v: Vec<f64> = seen.iter().filter(|x| x.0 == hold).map(|x| x.1).collect();
            let s = stat(&v);
            res.row(
                label,
                s.map_or("-".into(), |s| {
                    format!(
                        "{:.0} / {:.0} ms ({} cuts: {})",
                        s.median,
                        s.max,
                        s.n,
                        v.iter()
                            .map(|v| format!("{v:.0}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }),
                "≤ 1 s",
                s.map(|s| s.max <= 1000.0),
            );
        }
        let down_ms: Vec<f64> = seen.iter().map(|x| x.2).collect();
        res.row(
            "cut → replica shows not ready, median",
            stat(&down_ms).map_or("-".into(), |s| format!("{:.0} ms", s.median)),
            "",
            None,
        );
        res.detail.push(("cuts".into(), Json::Arr(cuts)));
        check_alive(res, pair)
    }

    /// `repl-catchup`: fill 1,000,000 x 1 KiB, replicate, time until all are on the replica.
    fn catchup(&self, res: &mut ReplResult) -> Result<()> {
        let (q, side) = ("bench-repl-catchup", "bench-repl-side");
        let pair = self.pair()?;
        for port in [pair.original.port, pair.replica.port] {
            let mut a = Amqp::connect(port)?;
            a.declare(q, 0)?;
            a.close()?;
        }
        let count = CATCHUP_MESSAGES.to_string();
        let args: Vec<String> = [
            "--uri",
            &pair.original.uri(),
            "--json",
            "--producers",
            "1",
            "--size",
            "1024",
            "--count",
            &count,
            "--no-consume",
            "--confirm",
            "1000",
            "--queue",
            q,
            "--predeclared",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let t_fill = Instant::now();
        let (_, problems) = self.perftest("repl-catchup-fill", &args, Duration::from_secs(120))?;
        ensure!(problems.is_empty(), "filling {q}: {}", problems.join("; "));
        let fill_s = t_fill.elapsed().as_secs_f64();
        let mut a = Amqp::connect(pair.original.port)?;
        let depth = a.declare(q, 1)?;
        a.declare(side, 0)?;
        a.close()?;
        ensure!(
            u64::from(depth) == CATCHUP_MESSAGES,
            "{q} holds {depth} messages after the fill, not {CATCHUP_MESSAGES}"
        );
        println!("    filled {q} with {depth} messages of 1 KiB in {fill_s:.1} s");
        let mut mgmt = Mgmt::connect(pair.replica.port)?;

        // The original keeps serving: publish + get round trips on another queue throughout.
        let stop = Arc::new(AtomicBool::new(false));
        let port = pair.original.port;
        let base = Instant::now();
        let client = {
            let stop = stop.clone();
            std::thread::spawn(move || -> Result<Vec<(f64, f64)>> {
                let mut c = Amqp::connect(port)?;
                let body = [b'y'; 1024];
                let mut rtts = Vec::new();
                let t0 = base;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    c.publish("", side, &[], &body)?;
                    let deadline = t + Duration::from_secs(10);
                    while c.get(side)?.is_none() {
                        ensure!(Instant::now() < deadline, "no message back within 10 s");
                    }
                    rtts.push((
                        t.duration_since(t0).as_secs_f64(),
                        t.elapsed().as_secs_f64() * 1e3,
                    ));
                    std::thread::sleep(Duration::from_millis(1));
                }
                c.close()?;
                Ok(rtts)
            })
        };
        std::thread::sleep(Duration::from_millis(300)); // a baseline before the catch-up
        let t0 = Instant::now();
        let start = t0.duration_since(base).as_secs_f64();
        let outcome = (|| -> Result<(f64, f64, f64)> {
            let subscribed = self
                .replicate(
                    pair.replica.port,
                    &format!("127.0.0.1:{}", pair.original.port),
                    q,
                )?
                .as_secs_f64();
            let mut all_at = None;
            let deadline = t0 + Duration::from_secs(90);
            loop {
                let row = replica_row(&mut mgmt, q)?;
                let held = row.num("messages").unwrap_or(0.0);
                if all_at.is_none() && held >= CATCHUP_MESSAGES as f64 {
                    all_at = Some(t0.elapsed().as_secs_f64());
                }
                if let Some(all) = all_at
                    && row.str("state") == Some("ready")
                {
                    return Ok((subscribed, all, t0.elapsed().as_secs_f64()));
                }
                ensure!(
                    Instant::now() < deadline,
                    "the replica holds {held} of {CATCHUP_MESSAGES} messages, state {:?}, after 90 s",
                    row.str("state")
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        })();
        let catchup_end = start + t0.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_millis(300)); // and a little after
        stop.store(true, Ordering::Relaxed);
        let rtts = client
            .join()
            .map_err(|_| anyhow::anyhow!("round-trip client panicked"))??;
        let (subscribed, all, ready) = outcome?;
        res.row(
            "replicate → 1,000,000 on the replica",
            format!("{all:.2} s (qpid-ha exited after {subscribed:.2} s)"),
            "≤ 10 s",
            Some(all <= 10.0),
        );
        res.row(
            "replicate → replica ready",
            format!("{ready:.2} s"),
            "",
            None,
        );
        // Round trips that started during the catch-up (after the 0.3 s baseline).
        let during: Vec<f64> = rtts
            .iter()
            .filter(|r| r.0 >= start && r.0 <= catchup_end)
            .map(|r| r.1)
            .collect();
        let before: Vec<f64> = rtts.iter().filter(|r| r.0 < start).map(|r| r.1).collect();
        let longest = rtts
            .iter()
            .filter(|r| r.0 >= start && r.0 <= catchup_end)
            .max_by(|a, b| a.1.total_cmp(&b.1));
        let p = |v: &[f64], q: f64| percentile(v, q).map_or("-".into(), |x| format!("{x:.1}"));
        let serving = !during.is_empty();
        res.row(
            "original serving: publish+get round trips during catch-up",
            format!(
                "{} round trips ({:.0}/s), p50 {} / p99 {} / max {} ms (before: p50 {} ms)",
                during.len(),
                during.len() as f64 / (catchup_end - start).max(1e-3),
                p(&during, 0.5),
                p(&during, 0.99),
                p(&during, 1.0),
                p(&before, 0.5)
            ),
            "keeps serving",
            Some(serving),
        );
        res.row(
            "longest round trip during catch-up: began, took",
            longest.map_or("-".into(), |r| {
                format!("{:.2} s after replicate, {:.0} ms", r.0 - start, r.1)
            }),
            "",
            None,
        );
        res.detail.push(("fill_seconds".into(), Json::Num(fill_s)));
        res.detail
            .push(("fill_command".into(), Json::Str(args.join(" "))));
        res.detail.push((
            "round_trips_ms".into(),
            Json::Arr(
                rtts.iter()
                    .map(|r| Json::Arr(vec![Json::Num(r.0), Json::Num(r.1)]))
                    .collect(),
            ),
        ));
        check_alive(res, pair)
    }
}

/// User + system CPU seconds of a process so far (clock ticks of 1/100 s).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn check_alive(res: &mut ReplResult, mut pair: Pair) -> Result<()> {
    for (name, b) in [
        ("original", &mut pair.original),
        ("replica", &mut pair.replica),
    ] {
        if !b.alive() {
            res.problems
                .push(format!("the {name} broker exited; see {}", b.log.display()));
        }
    }
    pair.original.stop();
    pair.replica.stop();
    Ok(())
}
/// One `qpid-perftest` run (output kept in `runs_dir` under `label`), killed after `limit`; its
/// JSON report and problems: the report's own, plus each of `counted` (e.g. `messages.lost`)
/// that is not zero.
pub(super) fn run_perftest(
    perftest: &Path,
    runs_dir: &Path,
    label: &str,
    args: &[String],
    limit: Duration,
    counted: &[&str],
) -> Result<(Json, Vec<String>)> {
    let base = runs_dir.join(format!("{label}-{}", unique()));
    let out_path = base.with_extension("json");
    let err_path = base.with_extension("err");
    let mut child = Command::new(perftest)
        .args(args)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path)?)
        .stderr(fs::File::create(&err_path)?)
        .spawn()
        .context("starting qpid-perftest")?;
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!("qpid-perftest {} hung and was killed", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = fs::read_to_string(&err_path).unwrap_or_default();
    ensure!(
        status.success(),
        "qpid-perftest {} failed ({status}): {}",
        args.join(" "),
        stderr.trim()
    );
    let report = Json::parse(&fs::read_to_string(&out_path)?)
        .with_context(|| format!("parsing {}", out_path.display()))?;
    let mut problems = Vec::new();
    for key in ["problems", "errors"] {
        if let Some(Json::Arr(ps)) = report.get(key) {
            problems.extend(ps.iter().filter_map(|p| p.as_str().map(str::to_string)));
        }
    }
    for key in counted {
        if report.num(key).unwrap_or(0.0) > 0.0 {
            problems.push(format!("{key}: {}", report.num(key).unwrap_or(0.0)));
        }
    }
    Ok((report, problems))
}

/// Runs `bin ARGS` with a deadline: (status, stdout, stderr).
pub(super) fn run_limited(
    bin: &Path,
    args: &[&str],
    limit: Duration,
) -> Result<(std::process::ExitStatus, String, String)> {
    let dir = std::env::temp_dir();
    let base: PathBuf = dir.join(format!("xtask-bench-repl-{}", unique()));
    let (o, e) = (base.with_extension("out"), base.with_extension("err"));
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&o)?)
        .stderr(fs::File::create(&e)?)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{} {} did not exit within {limit:?}",
                bin.display(),
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let out = fs::read_to_string(&o).unwrap_or_default();
    let err = fs::read_to_string(&e).unwrap_or_default();
    let _ = fs::remove_file(&o);
    let _ = fs::remove_file(&e);
    Ok((status, out, err))
}

/// The replica row of `queue` on the replica broker `m`, polled every `every` until `done`.
fn wait_replica(
    m: &mut Mgmt,
    queue: &str,
    limit: Duration,
    every: Duration,
    done: impl Fn(&Json) -> bool,
) -> Result<Json> {
    let deadline = Instant::now() + limit;
    loop {
        let row = replica_row(m, queue);
        if let Ok(r) = &row
            && done(r)
        {
            return row;
        }
        if Instant::now() > deadline {
            bail!(
                "replica of {queue}: no awaited state within {limit:?} (last: {})",
                match row {
                    Ok(r) => r.to_string(),
                    Err(e) => format!("{e:#}"),
                }
            );
        }
        std::thread::sleep(every);
    }
}

pub(super) fn find_row(values: &Json, list: &str, queue: &str) -> Option<Json> {
    match values.get(list)? {
        Json::Arr(rows) => rows.iter().find(|r| r.str("queue") == Some(queue)).cloned(),
        _ => None,
    }
}

fn replica_row(m: &mut Mgmt, queue: &str) -> Result<Json> {
    let v = m.ha()?;
    find_row(&v, "replicas", queue).with_context(|| format!("no replica row for {queue}"))
}

fn sub_row(m: &mut Mgmt, queue: &str) -> Result<Json> {
    let v = m.ha()?;
    find_row(&v, "subscriptions", queue)
        .with_context(|| format!("no replicating subscription on {queue}"))
}

/// The bench's raw client with channel 1 open, plus publish, get and deliveries.
pub(super) struct Amqp {
    pub(super) c: RawAmqp,
}

impl Amqp {
    pub(super) fn connect(port: u16) -> Result<Amqp> {
        let mut c = RawAmqp::connect(SocketAddr::from(([127, 0, 0, 1], port)), "guest", "guest")?;
        c.send(1, 20, 10, &[0])?;
        c.expect(1, 20, 11)?;
        c.channel_open = true;
        c.stream.set_read_timeout(Some(Duration::from_secs(15)))?;
        Ok(Amqp { c })
    }

    /// queue.declare with `flags` (1 passive, 2 durable, 4 exclusive, 8 auto-delete); the
    /// queue's message count.
    pub(super) fn declare(&mut self, name: &str, flags: u8) -> Result<u32> {
        self.declare_with(name, flags, &[])
    }

    /// queue.declare with `flags` and `table` (the encoded field-table contents); the queue's
    /// message count.
    pub(super) fn declare_with(&mut self, name: &str, flags: u8, table: &[u8]) -> Result<u32> {
        let mut a = vec![0, 0];
        short_str(&mut a, name);
        a.push(flags);
        a.extend_from_slice(&(table.len() as u32).to_be_bytes());
        a.extend_from_slice(table);
        self.c.send(1, 50, 10, &a)?;
        let (kind, ok) = self.method()?;
        ensure!(kind == (50, 11), "expected queue.declare-ok, got {kind:?}");
        let n = *ok.first().context("short declare-ok")? as usize;
        let count = ok.get(1 + n..5 + n).context("short declare-ok")?;
        Ok(u32::from_be_bytes([count[0], count[1], count[2], count[3]]))
    }

    /// basic.publish with `props` = property flags and properties, already encoded (empty:
    /// none).
    pub(super) fn publish(
        &mut self,
        exchange: &str,
        key: &str,
        props: &[u8],
        body: &[u8],
    ) -> Result<()> {
        let mut buf = Vec::with_capacity(body.len() + 128);
        let mut a = vec![0, 0];
        short_str(&mut a, exchange);
        short_str(&mut a, key);
        a.push(0);
        method_frame(&mut buf, 1, 60, 40, &a);
        let mut h = Vec::new();
        h.extend_from_slice(&60u16.to_be_bytes());
        h.extend_from_slice(&0u16.to_be_bytes());
        h.extend_from_slice(&(body.len() as u64).to_be_bytes());
        if props.is_empty() {
            h.extend_from_slice(&0u16.to_be_bytes());
        } else {
            h.extend_from_slice(props);
        }
        frame(&mut buf, 2, &h);
        for chunk in body.chunks(16 * 1024) {
            frame(&mut buf, 3, chunk);
        }
        self.c.stream.write_all(&buf)?;
        Ok(())
    }

    /// basic.get with no-ack: the body, or None when the queue is empty.
    pub(super) fn get(&mut self, queue: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.get_with(queue, true)?.map(|(body, _)| body))
    }

    /// basic.get without no-ack: (body, redelivered), or None when the queue is empty. The
    /// message stays unacknowledged until the connection closes.
    pub(super) fn get_unacked(&mut self, queue: &str) -> Result<Option<(Vec<u8>, bool)>> {
        self.get_with(queue, false)
    }

    fn get_with(&mut self, queue: &str, no_ack: bool) -> Result<Option<(Vec<u8>, bool)>> {
        let mut a = vec![0, 0];
        short_str(&mut a, queue);
        a.push(u8::from(no_ack));
        self.c.send(1, 60, 70, &a)?;
        let (kind, payload) = self.method()?;
        match kind {
            (60, 71) => {
                let redelivered = payload.get(8).is_some_and(|b| b & 1 != 0);
                Ok(Some((self.content()?, redelivered)))
            }
            (60, 72) => Ok(None),
            other => bail!("unexpected method {other:?} {payload:?} after basic.get"),
        }
    }

    /// The body of the next basic.deliver.
    pub(super) fn delivery(&mut self) -> Result<Vec<u8>> {
        loop {
            let (kind, _) = self.method()?;
            if kind == (60, 60) {
                return self.content();
            }
        }
    }

    /// The next method frame (heartbeats skipped): ((class, method), arguments).
    pub(super) fn method(&mut self) -> Result<((u16, u16), Vec<u8>)> {
        loop {
            let (t, mut p) = read_frame(&mut self.c.reader)?;
            if t == 8 {
                continue;
            }
            ensure!(t == 1 && p.len() >= 4, "unexpected frame type {t}");
            let c = u16::from_be_bytes([p[0], p[1]]);
            let m = u16::from_be_bytes([p[2], p[3]]);
            if (c, m) == (10, 50) || (c, m) == (20, 40) {
                let len = p.get(6).copied().unwrap_or(0) as usize;
                let text = p
                    .get(7..7 + len)
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default();
                bail!("the broker closed the connection or channel: {text}");
            }
            return Ok(((c, m), p.split_off(4)));
        }
    }

    /// A content header and its body frames.
    pub(super) fn content(&mut self) -> Result<Vec<u8>> {
        let (t, h) = read_frame(&mut self.c.reader)?;
        ensure!(
            t == 2 && h.len() >= 14,
            "expected a content header, got frame type {t}"
        );
        let size = u64::from_be_bytes(h[4..12].try_into()?) as usize;
        let mut body = Vec::with_capacity(size);
        while body.len() < size {
            let (t, p) = read_frame(&mut self.c.reader)?;
            ensure!(t == 3, "expected a body frame, got frame type {t}");
            body.extend_from_slice(&p);
        }
        Ok(body)
    }

    pub(super) fn close(self) -> Result<()> {
        self.c.close()
    }
}

fn frame(buf: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    buf.push(kind);
    buf.extend_from_slice(&1u16.to_be_bytes());
    buf.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    buf.extend_from_slice(payload);
    buf.push(0xCE);
}

fn read_frame(r: &mut BufReader<TcpStream>) -> Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 7];
    r.read_exact(&mut head).context("reading a frame header")?;
    let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
    let mut payload = vec![0u8; size + 1];
    r.read_exact(&mut payload)?;
    ensure!(payload[size] == 0xCE, "bad frame end");
    payload.truncate(size);
    Ok((head[0], payload))
}

/// A management client (docs/management-protocol.md) on one broker.
pub(super) struct Mgmt {
    a: Amqp,
    reply: String,
    seq: u64,
}

impl Mgmt {
    pub(super) fn connect(port: u16) -> Result<Mgmt> {
        let mut a = Amqp::connect(port)?;
        let reply = format!("bench-repl-reply-{}", unique());
        a.declare(&reply, 4 | 8)?;
        let mut c = vec![0, 0];
        short_str(&mut c, &reply);
        short_str(&mut c, "");
        c.push(2); // no-ack
        c.extend_from_slice(&0u32.to_be_bytes());
        a.c.send(1, 60, 20, &c)?;
        a.c.expect(1, 60, 21)?;
        Ok(Mgmt { a, reply, seq: 0 })
    }

    /// The `_values` of the HA object.
    pub(super) fn ha(&mut self) -> Result<Json> {
        self.seq += 1;
        let corr = format!("bench-{}", self.seq);
        let mut props = Vec::new();
        // content-type, headers, correlation-id, reply-to
        props.extend_from_slice(&(0x8000u16 | 0x2000 | 0x0400 | 0x0200).to_be_bytes());
        short_str(&mut props, "application/json");
        let mut table = Vec::new();
        short_str(&mut table, "qmf.opcode");
        table.push(b'S');
        let op = b"_query_request";
        table.extend_from_slice(&(op.len() as u32).to_be_bytes());
        table.extend_from_slice(op);
        props.extend_from_slice(&(table.len() as u32).to_be_bytes());
        props.extend_from_slice(&table);
        short_str(&mut props, &corr);
        short_str(&mut props, &self.reply);
        let body = r#"{"version":1,"_what":"OBJECT","_schema_id":{"_package_name":"org.apache.qpid.ha","_class_name":"habroker"}}"#;
        self.a
            .publish("qmf.default.direct", "broker", &props, body.as_bytes())?;
        let text = String::from_utf8(self.a.delivery()?)?;
        let v = Json::parse(&text)?;
        if let Some(e) = v.str("error_text") {
            bail!("management query refused: {e}");
        }
        match v.get("objects") {
            Some(Json::Arr(objs)) => objs
                .first()
                .and_then(|o| o.get("_values"))
                .cloned()
                .context("no HA object: is the broker running with --ha-queue-replication yes?"),
            _ => bail!("unexpected management answer: {text}"),
        }
    }
}

/// A loopback TCP proxy to `upstream` that can cut its link and restore it.
struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<JoinHandle<()>>,
    listening: Arc<AtomicBool>,
}

impl Proxy {
    fn start(upstream: SocketAddr) -> Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let listening = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let (cut, stop, conns, listening) =
                (cut.clone(), stop.clone(), conns.clone(), listening.clone());
            std::thread::spawn(move || {
                let mut listener = Some(listener);
                while !stop.load(Ordering::Relaxed) {
                    if cut.load(Ordering::Relaxed) {
                        listener = None; // new connections are refused
                        listening.store(false, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                    let Some(l) = listener.as_ref() else {
                        match TcpListener::bind(("127.0.0.1", port)) {
                            Ok(l) => {
                                let _ = l.set_nonblocking(true);
                                listener = Some(l);
                                listening.store(true, Ordering::Relaxed);
                            }
                            Err(_) => std::thread::sleep(Duration::from_millis(5)),
                        }
                        continue;
                    };
                    let _ = l.set_nonblocking(true);
                    match l.accept() {
                        Ok((client, _)) => {
                            let _ = client.set_nonblocking(false);
                            if let Ok(server) =
                                TcpStream::connect_timeout(&upstream, Duration::from_secs(2))
                            {
                                let _ = client.set_nodelay(true);
                                let _ = server.set_nodelay(true);
                                pipe(&client, &server, &conns);
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(1)),
                    }
                }
            })
        };
        Ok(Proxy {
            port,
            cut,
            stop,
            conns,
            acceptor: Some(acceptor),
            listening,
        })
    }

    /// Refuses new connections, then shuts every proxied connection down (returns once the
    /// listener is closed, so no connection slips through).
    fn cut(&self) -> Result<()> {
        self.cut.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.listening.load(Ordering::SeqCst) {
            ensure!(
                Instant::now() < deadline,
                "the proxy did not stop listening"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        for s in self
            .conns
            .lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or_default()
        {
            let _ = s.shutdown(Shutdown::Both);
        }
        Ok(())
    }

    /// Accepts again (returns once the port is listening).
    fn restore(&self) -> Result<()> {
        self.cut.store(false, Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.listening.load(Ordering::Relaxed) {
            ensure!(
                Instant::now() < deadline,
                "the proxy could not listen again"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    fn stop(mut self) {
        let _ = self.cut();
        self.stop.store(true, Ordering::Relaxed);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

/// Copies both ways between `a` and `b` on two threads; both sockets are kept in `conns`.
fn pipe(a: &TcpStream, b: &TcpStream, conns: &Arc<Mutex<Vec<TcpStream>>>) {
    let (Ok(a2), Ok(b2), Ok(a3), Ok(b3)) =
        (a.try_clone(), b.try_clone(), a.try_clone(), b.try_clone())
    else {
        return;
    };
    if let Ok(mut c) = conns.lock() {
        c.push(a3);
        c.push(b3);
    }
    for (mut from, mut to) in [(a2, b.try_clone()), (b2, a.try_clone())]
        .into_iter()
        .filter_map(|(f, t)| Some((f, t.ok()?)))
    {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(Shutdown::Both);
            let _ = from.shutdown(Shutdown::Both);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_selects_replication_keys() {
        assert_eq!(selected(&None), KEYS.to_vec());
        assert_eq!(selected(&Some(vec!["replication".into()])), KEYS.to_vec());
        assert_eq!(
            selected(&Some(vec!["latency".into(), "repl-lag".into()])),
            ["repl-lag"]
        );
        assert!(selected(&Some(vec!["latency".into()])).is_empty());
    }

    #[test]
    fn rows_are_found_by_queue() {
        let v =
            Json::parse(r#"{"replicas":[{"queue":"a","state":"ready"},{"queue":"b"}]}"#).unwrap();
        assert_eq!(
            find_row(&v, "replicas", "a").and_then(|r| r.str("state").map(str::to_string)),
            Some("ready".into())
        );
        assert!(find_row(&v, "replicas", "c").is_none());
        assert!(find_row(&v, "subscriptions", "a").is_none());
    }
}
