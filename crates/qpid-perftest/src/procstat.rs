//! CPU time and memory from `/proc`: this process's and the broker's CPU (utime + stime from
//! `/proc/<pid>/stat`, all threads), the broker's resident set (`VmRSS` in `/proc/<pid>/status`)
//! and the whole machine's busy time (`/proc/stat`), so a report can say how much CPU other
//! processes took during the run.

use std::fs;

use anyhow::{Context, bail};

/// Linux reports process times in USER_HZ ticks, which the kernel ABI fixes at 100 per second.
pub const TICKS_PER_SEC: f64 = 100.0;

/// Whose `/proc` entry to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pid {
    /// This process.
    Myself,
    /// Another process.
    Other(u32),
}

impl Pid {
    fn dir(self) -> String {
        match self {
            Pid::Myself => "/proc/self".into(),
            Pid::Other(p) => format!("/proc/{p}"),
        }
    }
}

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: Pid) -> anyhow::Result<f64> {
    let path = format!("{}/stat", pid.dir());
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    Ok(parse_stat_cpu_ticks(&text)? as f64 / TICKS_PER_SEC)
}

/// utime + stime (fields 14 and 15) from a `/proc/<pid>/stat` line.
pub fn parse_stat_cpu_ticks(stat: &str) -> anyhow::Result<u64> {
    // The command name (field 2) is in parentheses and may hold spaces: skip past the last ')'.
    let rest = &stat[stat.rfind(')').context("no ')' in stat line")? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    if fields.len() < 13 {
        bail!("stat line too short");
    }
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

/// Resident set size of a process in KiB.
pub fn rss_kib(pid: Pid) -> anyhow::Result<u64> {
    let path = format!("{}/status", pid.dir());
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_vmrss_kib(&text)
}

/// `VmRSS:` from a `/proc/<pid>/status` text.
pub fn parse_vmrss_kib(status: &str) -> anyhow::Result<u64> {
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS line")?;
    let kib = line
        .split_whitespace()
        .nth(1)
        .context("VmRSS without a value")?;
    Ok(kib.parse()?)
}

/// Busy and total CPU seconds of the whole machine (all cores) since boot, from `/proc/stat`.
pub fn machine_cpu_seconds() -> anyhow::Result<(f64, f64)> {
    let text = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = text.lines().next().context("empty /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal guest guest_nice
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Ok((
        (total - idle) as f64 / TICKS_PER_SEC,
        total as f64 / TICKS_PER_SEC,
    ))
}

/// One reading of every CPU counter the report uses.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSnapshot {
    /// This process, seconds.
    pub tool: f64,
    /// The broker, seconds (0 without a broker pid).
    pub broker: f64,
    /// All cores busy, seconds.
    pub machine_busy: f64,
}

impl CpuSnapshot {
    /// Reads the counters now.
    pub fn take(broker: Option<u32>) -> anyhow::Result<Self> {
        let (machine_busy, _) = machine_cpu_seconds()?;
        Ok(CpuSnapshot {
            tool: cpu_seconds(Pid::Myself)?,
            broker: match broker {
                Some(p) => cpu_seconds(Pid::Other(p))?,
                None => 0.0,
            },
            machine_busy,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_spaces_in_name() {
        let line = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 31 0 0 20 0 \
                    3 0 100 1000 50 18446744073709551615";
        assert_eq!(parse_stat_cpu_ticks(line).unwrap(), 281);
    }

    #[test]
    fn parses_vmrss() {
        let s = "Name:\tqpidd\nVmPeak:\t  1000 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(parse_vmrss_kib(s).unwrap(), 12345);
    }

    #[test]
    fn reads_own_process() {
        assert!(cpu_seconds(Pid::Myself).unwrap() >= 0.0);
        assert!(rss_kib(Pid::Myself).unwrap() > 0);
        let (busy, total) = machine_cpu_seconds().unwrap();
        assert!(total >= busy && total > 0.0);
    }
}
