//! CPU time and memory from `/proc`: this process's and the broker's CPU (utime + stime from
//! `/proc/<pid>/stat`, all threads), the broker's resident set (`VmRSS` in `/proc/<pid>/status`)
//! and the whole machine's busy time (`/proc/stat`), so a report can say how much CPU other
//! processes took during the run. It also reads the bytes the whole machine wrote to its disks
//! (`/proc/diskstats`), so a report can say how much disk bandwidth the run used.

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

/// Bytes per sector in `/proc/diskstats`: the kernel counts 512-byte units whatever the
/// device's real sector size.
pub const DISKSTATS_SECTOR_BYTES: u64 = 512;

/// Device name prefixes that are never counted as disks: virtual or stacked devices whose writes
/// either touch no disk or are counted again on the disks beneath them.
const NOT_DISKS: [&str; 5] = ["loop", "ram", "zram", "dm-", "md"];

/// Names of the whole disks of this machine: entries of `/sys/block` other than loop, ram,
/// zram, device-mapper and md devices. Partitions have no `/sys/block` entry.
pub fn whole_disks() -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir("/sys/block").context("reading /sys/block")? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if !NOT_DISKS.iter().any(|p| name.starts_with(p)) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Bytes written since boot to the whole disks of this machine, from `/proc/diskstats`.
pub fn machine_disk_written_bytes() -> anyhow::Result<u64> {
    let text = fs::read_to_string("/proc/diskstats").context("reading /proc/diskstats")?;
    parse_diskstats_written_bytes(&text, &whole_disks()?)
}

/// Bytes written (field 10, sectors written, × 512) summed over the lines of a
/// `/proc/diskstats` text whose device name (field 3) is in `disks`.
pub fn parse_diskstats_written_bytes(text: &str, disks: &[String]) -> anyhow::Result<u64> {
    let mut total = 0u64;
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(name) = fields.get(2) else {
            continue;
        };
        if !disks.iter().any(|d| d == name) {
            continue;
        }
        let sectors: u64 = fields
            .get(9)
            .with_context(|| format!("diskstats line for {name} too short"))?
            .parse()
            .with_context(|| format!("sectors written of {name}"))?;
        total += sectors * DISKSTATS_SECTOR_BYTES;
    }
    Ok(total)
}

/// One reading of every CPU counter the report uses, and the machine's disk writes.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSnapshot {
    /// This process, seconds.
    pub tool: f64,
    /// The broker, seconds (0 without a broker pid).
    pub broker: f64,
    /// All cores busy, seconds.
    pub machine_busy: f64,
    /// Bytes written to the whole disks since boot; `None` where `/proc/diskstats` or
    /// `/sys/block` cannot be read.
    pub disk_written: Option<u64>,
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
            disk_written: machine_disk_written_bytes().ok(),
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

    const DISKSTATS: &str = "\
   7       0 loop0 1043 0 8264 112 0 0 0 0 0 208 112 0 0 0 0 0 0
   7       1 loop1 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
 254       0 vda 4023327 110047 116423538 13927874 14794229 2164385 940492216 3214314 0 1498056 17764054 806867 88 753493344 204955 4628367 416910
 254       1 vda1 4020000 110000 116400000 13920000 14790000 2164000 940490000 3214000 0 1497000 17763000 806000 80 753493000 0 0 0
 253       0 zram0 40 0 320 0 80 0 640 0 0 4 4 0 0 0 0 0 0
 259       0 nvme0n1 100 0 800 10 25 5 1000 20 0 30 30 0 0 0 0 0 0
 259       1 nvme0n1p1 100 0 800 10 25 5 1000 20 0 30 30 0 0 0 0 0 0
";

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn sums_sectors_written_of_whole_disks_only() {
        // vda and nvme0n1 are whole disks; vda1 and nvme0n1p1 are their partitions, loop and
        // zram devices are virtual.
        let bytes = parse_diskstats_written_bytes(DISKSTATS, &names(&["vda", "nvme0n1"])).unwrap();
        assert_eq!(bytes, (940_492_216 + 1000) * 512);
        let bytes = parse_diskstats_written_bytes(DISKSTATS, &names(&["vda"])).unwrap();
        assert_eq!(bytes, 940_492_216 * 512);
    }

    #[test]
    fn no_disks_or_empty_text_is_zero() {
        assert_eq!(parse_diskstats_written_bytes(DISKSTATS, &[]).unwrap(), 0);
        assert_eq!(
            parse_diskstats_written_bytes("", &names(&["vda"])).unwrap(),
            0
        );
    }

    #[test]
    fn short_line_for_a_counted_disk_is_an_error() {
        assert!(parse_diskstats_written_bytes(" 254 0 vda 1 2 3\n", &names(&["vda"])).is_err());
    }

    #[test]
    fn reads_machine_disk_writes() {
        // Linux machines without /proc/diskstats or /sys/block (some containers) have nothing
        // to read; elsewhere the counter is readable and no virtual device is a whole disk.
        if std::path::Path::new("/proc/diskstats").exists()
            && std::path::Path::new("/sys/block").exists()
        {
            machine_disk_written_bytes().unwrap();
            let disks = whole_disks().unwrap();
            assert!(
                disks
                    .iter()
                    .all(|d| !NOT_DISKS.iter().any(|p| d.starts_with(p)))
            );
        }
    }

    #[test]
    fn reads_own_process() {
        assert!(cpu_seconds(Pid::Myself).unwrap() >= 0.0);
        assert!(rss_kib(Pid::Myself).unwrap() > 0);
        let (busy, total) = machine_cpu_seconds().unwrap();
        assert!(total >= busy && total > 0.0);
    }
}
