//! The run's report: rates over the measurement window, merged-histogram latency percentiles,
//! the loss/duplicate balance, the backlog trend that decides whether the run is valid, CPU
//! per message (tool and broker) and the broker's memory; as JSON or as text.

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::tracking::Accounting;

/// Latency percentiles in microseconds, from one merged histogram.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    /// Messages measured.
    pub count: u64,
    /// Smallest.
    pub min: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

impl Latency {
    /// Percentiles of a nanosecond histogram (None if it is empty).
    pub fn from_histogram(h: &Histogram<u64>) -> Option<Latency> {
        if h.is_empty() {
            return None;
        }
        let us = |ns: u64| ns as f64 / 1_000.0;
        Some(Latency {
            count: h.len(),
            min: us(h.min()),
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p95: us(h.value_at_quantile(0.95)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
        })
    }
}

/// How the backlog (published - consumed) moved over the measurement window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Backlog {
    /// At the start of the window.
    pub start: f64,
    /// At the end.
    pub end: f64,
    /// Largest sample.
    pub max: f64,
    /// Least-squares slope, messages per second.
    pub slope: f64,
    /// Slope times the window: how much it grew over the window.
    pub growth: f64,
}

impl Backlog {
    /// Fits `(seconds, backlog)` samples.
    pub fn from_samples(samples: &[(f64, f64)]) -> Backlog {
        let Some((&(t_first, first), &(t_last, last))) = samples.first().zip(samples.last()) else {
            return Backlog::default();
        };
        let n = samples.len() as f64;
        let mean_t = samples.iter().map(|s| s.0).sum::<f64>() / n;
        let mean_b = samples.iter().map(|s| s.1).sum::<f64>() / n;
        let var: f64 = samples.iter().map(|s| (s.0 - mean_t).powi(2)).sum();
        let cov: f64 = samples
            .iter()
            .map(|s| (s.0 - mean_t) * (s.1 - mean_b))
            .sum();
        let slope = if var > 0.0 { cov / var } else { 0.0 };
        Backlog {
            start: first,
            end: last,
            max: samples.iter().map(|s| s.1).fold(f64::MIN, f64::max),
            slope,
            growth: slope * (t_last - t_first),
        }
    }

    /// Whether the backlog kept growing: by more than 2% of what was consumed in the window
    /// and by more than 1,000 messages (batching and the confirm window make it wobble).
    pub fn keeps_growing(&self, consumed_in_window: u64) -> bool {
        self.growth > (0.02 * consumed_in_window as f64).max(1_000.0)
    }
}

/// Everything a run measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// "raw" or "lapin".
    pub client: &'static str,
    /// The flags, echoed.
    pub config: Value,
    /// Problems that make the figures untrustworthy (empty = valid).
    pub problems: Vec<String>,
    /// Measurement window, seconds.
    pub window_s: f64,
    /// Messages published in the window.
    pub published: u64,
    /// Messages consumed in the window.
    pub consumed: u64,
    /// Seconds the publishing part of the window lasted (count mode: until the last publish).
    pub publish_window_s: f64,
    /// Seconds the consuming part lasted (count mode: until the last delivery).
    pub consume_window_s: f64,
    /// The loss/duplicate balance of the whole run.
    pub accounting: Accounting,
    /// Deliveries flagged redelivered.
    pub redelivered: u64,
    /// Messages not stamped by this run.
    pub foreign: u64,
    /// Merged end-to-end latency.
    pub latency: Option<Latency>,
    /// Merged publish-to-confirm latency (raw client with confirms), publishes sent in the
    /// measurement window.
    pub confirm_latency: Option<Latency>,
    /// Backlog trend.
    pub backlog: Backlog,
    /// CPU seconds of this tool in the window.
    pub tool_cpu_s: f64,
    /// CPU seconds of the broker in the window.
    pub broker_cpu_s: Option<f64>,
    /// CPU seconds used by everything else on the machine in the window.
    pub other_cpu_s: f64,
    /// Bytes written to the machine's whole disks in the window (every process, not only the
    /// broker); `None` when not measured.
    pub disk_written_bytes: Option<u64>,
    /// Broker resident memory before and after, KiB.
    pub broker_rss_kib: Option<(u64, u64)>,
    /// Errors reported by producers and consumers.
    pub errors: Vec<String>,
}

impl Report {
    /// Published messages per second.
    pub fn publish_rate(&self) -> f64 {
        rate(self.published, self.publish_window_s)
    }

    /// Consumed messages per second.
    pub fn consume_rate(&self) -> f64 {
        rate(self.consumed, self.consume_window_s)
    }

    /// Messages the CPU figures are divided by: consumed, or published when nothing consumes.
    pub fn messages_for_cpu(&self) -> u64 {
        if self.consumed > 0 {
            self.consumed
        } else {
            self.published
        }
    }

    /// Tool CPU per message, µs.
    pub fn tool_us_per_msg(&self) -> Option<f64> {
        per_msg(self.tool_cpu_s, self.messages_for_cpu())
    }

    /// Broker CPU per message, µs.
    pub fn broker_us_per_msg(&self) -> Option<f64> {
        self.broker_cpu_s
            .and_then(|s| per_msg(s, self.messages_for_cpu()))
    }

    /// Disk writes of the whole machine over the CPU window, MB/s (10^6 bytes).
    pub fn disk_write_mb_s(&self) -> Option<f64> {
        self.disk_written_bytes
            .filter(|_| self.window_s > 0.0)
            .map(|b| b as f64 / 1e6 / self.window_s)
    }

    /// True when nothing makes the figures untrustworthy.
    pub fn valid(&self) -> bool {
        self.problems.is_empty()
    }

    /// The JSON form.
    pub fn to_json(&self) -> Value {
        let a = &self.accounting;
        json!({
            "tool": "qpid-perftest",
            "client": self.client,
            "config": self.config,
            "valid": self.valid(),
            "problems": self.problems,
            "window_s": self.window_s,
            "published": self.published,
            "consumed": self.consumed,
            "publish_rate": self.publish_rate(),
            "consume_rate": self.consume_rate(),
            "messages": {
                "sent": a.sent,
                "received_unique": a.received_unique,
                "duplicates": a.duplicates,
                "lost": a.lost,
                "unconfirmed_missing": a.unconfirmed_missing,
                "nacked": a.nacked,
                "redelivered": self.redelivered,
                "foreign": self.foreign,
            },
            "latency_us": self.latency.map(|l| json!({
                "count": l.count, "min": l.min, "p50": l.p50, "p90": l.p90, "p95": l.p95,
                "p99": l.p99, "p99_9": l.p999, "max": l.max,
            })),
            "confirm_latency_us": self.confirm_latency.map(|l| json!({
                "count": l.count, "min": l.min, "p50": l.p50, "p90": l.p90, "p95": l.p95,
                "p99": l.p99, "p99_9": l.p999, "max": l.max,
            })),
            "backlog": {
                "start": self.backlog.start, "end": self.backlog.end, "max": self.backlog.max,
                "slope_per_s": self.backlog.slope, "growth": self.backlog.growth,
            },
            "cpu": {
                "tool_s": self.tool_cpu_s,
                "broker_s": self.broker_cpu_s,
                "other_s": self.other_cpu_s,
                "tool_us_per_msg": self.tool_us_per_msg(),
                "broker_us_per_msg": self.broker_us_per_msg(),
            },
            "disk": {
                "written_bytes": self.disk_written_bytes,
                "write_mb_s": self.disk_write_mb_s(),
            },
            "broker_rss_kib": self.broker_rss_kib.map(|(s, e)| json!({"start": s, "end": e})),
            "errors": self.errors,
        })
    }

    /// The text form.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let a = &self.accounting;
        let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.2}"));
        s += &format!("qpid-perftest ({}) {}\n", self.client, self.config);
        s += &format!(
            "window {:.2} s: published {:.0} msg/s, consumed {:.0} msg/s\n",
            self.window_s,
            self.publish_rate(),
            self.consume_rate()
        );
        if let Some(l) = self.latency {
            s += &format!(
                "latency µs ({} msgs): min {:.1} p50 {:.1} p90 {:.1} p95 {:.1} p99 {:.1} \
                 p99.9 {:.1} max {:.1}\n",
                l.count, l.min, l.p50, l.p90, l.p95, l.p99, l.p999, l.max
            );
        }
        if let Some(l) = self.confirm_latency {
            s += &format!(
                "publish-to-confirm µs ({} msgs): min {:.1} p50 {:.1} p90 {:.1} p95 {:.1} \
                 p99 {:.1} p99.9 {:.1} max {:.1}\n",
                l.count, l.min, l.p50, l.p90, l.p95, l.p99, l.p999, l.max
            );
        }
        s += &format!(
            "messages: sent {} received {} lost {} duplicates {} unconfirmed-missing {} \
             nacked {} redelivered {} foreign {}\n",
            a.sent,
            a.received_unique,
            a.lost,
            a.duplicates,
            a.unconfirmed_missing,
            a.nacked,
            self.redelivered,
            self.foreign
        );
        s += &format!(
            "backlog: start {:.0} end {:.0} max {:.0} growth {:.0} ({:.0}/s)\n",
            self.backlog.start,
            self.backlog.end,
            self.backlog.max,
            self.backlog.growth,
            self.backlog.slope
        );
        s += &format!(
            "cpu µs/msg: tool {} broker {}; other processes {:.2} cores\n",
            f(self.tool_us_per_msg()),
            f(self.broker_us_per_msg()),
            if self.window_s > 0.0 {
                self.other_cpu_s / self.window_s
            } else {
                0.0
            }
        );
        s += &format!(
            "disk writes: {} (whole machine)\n",
            self.disk_write_mb_s()
                .map_or("-".to_string(), |v| format!("{v:.0} MB/s"))
        );
        if let Some((start, end)) = self.broker_rss_kib {
            s += &format!("broker RSS: {start} KiB before, {end} KiB after\n");
        }
        for e in &self.errors {
            s += &format!("error: {e}\n");
        }
        if self.valid() {
            s += "VALID\n";
        } else {
            s += &format!("INVALID: {}\n", self.problems.join("; "));
        }
        s
    }
}

fn rate(n: u64, secs: f64) -> f64 {
    if secs > 0.0 { n as f64 / secs } else { 0.0 }
}

fn per_msg(cpu_s: f64, msgs: u64) -> Option<f64> {
    (msgs > 0).then(|| cpu_s * 1e6 / msgs as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backlog_trend() {
        let flat: Vec<(f64, f64)> = (0..50)
            .map(|i| {
                (
                    i as f64 * 0.1,
                    1000.0 + if i % 2 == 0 { 500.0 } else { 0.0 },
                )
            })
            .collect();
        let b = Backlog::from_samples(&flat);
        assert!(b.growth.abs() < 200.0);
        assert!(!b.keeps_growing(1_000_000));
        let growing: Vec<(f64, f64)> = (0..50)
            .map(|i| (i as f64 * 0.1, i as f64 * 10_000.0))
            .collect();
        let b = Backlog::from_samples(&growing);
        assert!((b.slope - 100_000.0).abs() < 1.0);
        assert!((b.growth - 490_000.0).abs() < 10.0);
        assert!(b.keeps_growing(1_000_000));
        assert_eq!(b.max, 490_000.0);
    }

    #[test]
    fn latency_from_merged_histogram() {
        let mut h = crate::consumer::new_histogram();
        for v in 1..=1000u64 {
            h.record(v * 1_000).unwrap();
        }
        let l = Latency::from_histogram(&h).unwrap();
        assert_eq!(l.count, 1000);
        assert!((l.p50 - 500.0).abs() < 1.0);
        assert!((l.p99 - 990.0).abs() < 1.0);
        assert!((l.max - 1000.0).abs() < 1.0);
        assert!(Latency::from_histogram(&crate::consumer::new_histogram()).is_none());
    }
}
