//! Command-line flags (PerfTest-style) and their checks.

use clap::{Parser, ValueEnum};

/// Which client drives the hot publish and consume paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Client {
    /// Pre-encoded frames written and read directly on the sockets (the default).
    Raw,
    /// The lapin client library, for comparison.
    Lapin,
}

/// A PerfTest-style AMQP 0-9-1 load generator that measures throughput, end-to-end latency,
/// loss, duplicates and CPU per message.
#[derive(Debug, Clone, Parser)]
#[command(name = "qpid-perftest", version, about, long_about = None)]
pub struct Args {
    /// Broker URI.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub uri: String,
    /// Publishing connections.
    #[arg(long, short = 'x', default_value_t = 1)]
    pub producers: u16,
    /// Consuming connections.
    #[arg(long, short = 'y', default_value_t = 1)]
    pub consumers: u16,
    /// Body size in bytes (at least 16: the send time and sequence stamp).
    #[arg(long, short = 's', default_value_t = 16)]
    pub size: usize,
    /// Total messages to publish (split evenly between producers); the run ends when they
    /// are consumed. Exclusive with --seconds.
    #[arg(long, short = 'C', conflicts_with = "seconds")]
    pub count: Option<u64>,
    /// Measured duration in seconds, after the warm-up (default 10 when --count is absent).
    #[arg(long, short = 'z')]
    pub seconds: Option<f64>,
    /// Warm-up seconds before the measurement window (time-based runs only).
    #[arg(long, default_value_t = 0.0)]
    pub warmup_seconds: f64,
    /// Publisher confirms with at most WINDOW unconfirmed messages per producer (0 = off).
    #[arg(long, short = 'c', default_value_t = 0)]
    pub confirm: u32,
    /// Publish with delivery-mode 2 (and declare the queue durable).
    #[arg(long)]
    pub persistent: bool,
    /// basic.qos prefetch count per consumer (0 = unlimited).
    #[arg(long, short = 'q', default_value_t = 1000)]
    pub prefetch: u16,
    /// Consume with no-ack (automatic acknowledgement).
    #[arg(long, short = 'a')]
    pub auto_ack: bool,
    /// Total publish rate in messages per second, open loop: sends follow a fixed schedule
    /// and latency counts from the scheduled time. 0 = as fast as possible.
    #[arg(long, short = 'r', default_value_t = 0.0)]
    pub rate: f64,
    /// Queue name (default: a fresh `perftest-<random>`, deleted at the end).
    #[arg(long, short = 'u')]
    pub queue: Option<String>,
    /// The queue exists already: check it (passive declare) instead of declaring it.
    #[arg(long)]
    pub predeclared: bool,
    /// Publish only, to fill the queue; the queue is left in place.
    #[arg(long)]
    pub no_consume: bool,
    /// Pause producers while (published - consumed) exceeds N messages (0 = never). Lets a
    /// closed-loop run find the end-to-end rate of a broker that has no flow control.
    #[arg(long, default_value_t = 0)]
    pub max_backlog: u64,
    /// Bytes of publish frames gathered into one socket write.
    #[arg(long, default_value_t = 64 * 1024)]
    pub batch_bytes: usize,
    /// Seconds to wait for the last messages after publishing stops.
    #[arg(long, default_value_t = 30.0)]
    pub drain_timeout: f64,
    /// The broker's process id: report its CPU per message and its resident memory.
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// Client for the hot paths.
    #[arg(long, value_enum, default_value_t = Client::Raw)]
    pub client: Client,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

impl Args {
    /// Rejects combinations that cannot run.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.size < crate::frames::STAMP_LEN {
            anyhow::bail!("--size must be at least {} bytes", crate::frames::STAMP_LEN);
        }
        if self.producers == 0 && self.no_consume {
            anyhow::bail!("nothing to do: no producers and --no-consume");
        }
        if self.producers == 0 && self.count.is_some() {
            anyhow::bail!("--count needs producers");
        }
        if !(self.rate >= 0.0 && self.rate.is_finite()) {
            anyhow::bail!("--rate must be a non-negative number");
        }
        if let Some(s) = self.seconds
            && !(s > 0.0 && s.is_finite())
        {
            anyhow::bail!("--seconds must be positive");
        }
        if self.predeclared && self.queue.is_none() {
            anyhow::bail!("--predeclared needs --queue");
        }
        Ok(())
    }

    /// Measured seconds for a time-based run.
    pub fn measure_seconds(&self) -> Option<f64> {
        match (self.count, self.seconds) {
            (Some(_), _) => None,
            (None, Some(s)) => Some(s),
            (None, None) => Some(10.0),
        }
    }

    /// Consumers that will actually run.
    pub fn consumer_count(&self) -> u16 {
        if self.no_consume { 0 } else { self.consumers }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_perftest_flags() {
        let a = Args::try_parse_from([
            "qpid-perftest",
            "--producers",
            "4",
            "--consumers",
            "2",
            "--size",
            "1024",
            "--seconds",
            "5",
            "--warmup-seconds",
            "3",
            "--confirm",
            "1000",
            "--rate",
            "5000",
            "--broker-pid",
            "42",
            "--json",
        ])
        .unwrap();
        assert_eq!(
            (a.producers, a.consumers, a.size, a.confirm),
            (4, 2, 1024, 1000)
        );
        assert_eq!(a.measure_seconds(), Some(5.0));
        assert_eq!(a.broker_pid, Some(42));
        a.validate().unwrap();
        assert!(Args::try_parse_from(["x", "--count", "5", "--seconds", "3"]).is_err());
        let small = Args::try_parse_from(["x", "--size", "8"]).unwrap();
        assert!(small.validate().is_err());
    }
}
