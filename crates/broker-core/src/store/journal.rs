//! The journal files' framing (`docs/design/store.md` section 2): a 24-byte header, then
//! records `[len u32][type u8][payload][crc32 u32]`, little-endian, the CRC covering length,
//! type and payload.

use std::path::{Path, PathBuf};

/// The size of a file header.
pub const HEADER_LEN: usize = 24;
/// The format version this broker writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Magic of the configuration journal.
pub const CONFIG_MAGIC: &[u8; 8] = b"QPIDDCFG";
/// Magic of a message segment.
pub const MESSAGE_MAGIC: &[u8; 8] = b"QPIDDMSG";
/// The framing around a record's type and payload: length and CRC.
pub const RECORD_OVERHEAD: usize = 8;

/// A file header.
pub fn header(magic: &[u8; 8], segment: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(magic);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&segment.to_le_bytes());
    h
}

/// Appends one record to `out`; `payload` writes the payload.
pub fn append_record(out: &mut Vec<u8>, kind: u8, payload: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, kind]);
    payload(out);
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Why a file cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The file.
    pub file: PathBuf,
    /// Where the damage starts.
    pub offset: u64,
    /// What is wrong.
    pub what: String,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} at offset {}: {}",
            self.file.display(),
            self.offset,
            self.what
        )
    }
}

/// Checks a file's header; returns its segment number.
pub fn check_header(file: &Path, bytes: &[u8], magic: &[u8; 8]) -> Result<u64, Damage> {
    let damage = |what: String| Damage {
        file: file.to_path_buf(),
        offset: 0,
        what,
    };
    if bytes.len() < HEADER_LEN {
        return Err(damage(format!(
            "the file is shorter ({} bytes) than its header",
            bytes.len()
        )));
    }
    if &bytes[..8] != magic {
        return Err(damage(format!(
            "not a qpidd store file of this kind (magic {:?})",
            String::from_utf8_lossy(&bytes[..8])
        )));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap_or_default());
    if version > FORMAT_VERSION {
        return Err(damage(format!(
            "store format version {version} is newer than this broker's ({FORMAT_VERSION}): use a newer qpidd"
        )));
    }
    if version == 0 {
        return Err(damage("store format version 0 is not a version".into()));
    }
    Ok(u64::from_le_bytes(
        bytes[16..24].try_into().unwrap_or_default(),
    ))
}

/// One record read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// Its offset in the file.
    pub offset: u64,
    /// Its type.
    pub kind: u8,
    /// Its payload.
    pub payload: &'a [u8],
}

/// How a scan ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// At the end of the file.
    Clean,
    /// At a torn last record (what a crash mid-write leaves), from this offset.
    Torn {
        /// Where the torn record starts (the file's good length).
        offset: u64,
        /// Why it is torn.
        what: String,
    },
    /// At damage in the middle.
    Damaged(Damage),
}

/// A bad record at `at`: a torn write when `torn`, else damage in `file`.
fn torn_or_damaged(torn: bool, file: &Path, at: usize, what: String) -> End {
    let offset = at as u64;
    if torn {
        End::Torn { offset, what }
    } else {
        End::Damaged(Damage {
            file: file.to_path_buf(),
            offset,
            what,
        })
    }
}

/// Reads the records of `bytes` (a whole file, header checked already), calling `each` for
/// every good one, and says how the scan ended. `max_len` bounds a record's length.
pub fn scan<'a>(
    file: &Path,
    bytes: &'a [u8],
    max_len: usize,
    mut each: impl FnMut(Record<'a>) -> Result<(), String>,
) -> End {
    let mut at = HEADER_LEN;
    while at < bytes.len() {
        let left = bytes.len() - at;
        if left < RECORD_OVERHEAD + 1 {
            return End::Torn {
                offset: at as u64,
                what: format!("{left} bytes left, less than a record"),
            };
        }
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or_default()) as usize;
        if len == 0 || len > max_len {
            // A length no writer makes. Only a tail of zeros (a file extended by a crash
            // before its data reached the disk) is a torn write; anything else is damage.
            let torn = bytes[at..].iter().all(|&b| b == 0);
            return torn_or_damaged(torn, file, at, format!("impossible record length {len}"));
        }
        let end = at + 4 + len + 4;
        if end > bytes.len() {
            return End::Torn {
                offset: at as u64,
                what: format!(
                    "a record of {} bytes with {left} bytes left in the file",
                    len + 8
                ),
            };
        }
        let crc = u32::from_le_bytes(bytes[end - 4..end].try_into().unwrap_or_default());
        if crc32fast::hash(&bytes[at..end - 4]) != crc {
            let torn = end == bytes.len();
            return torn_or_damaged(torn, file, at, "checksum mismatch".into());
        }
        let record = Record {
            offset: at as u64,
            kind: bytes[at + 4],
            payload: &bytes[at + 5..end - 4],
        };
        if let Err(what) = each(record) {
            return End::Damaged(Damage {
                file: file.to_path_buf(),
                offset: at as u64,
                what,
            });
        }
        at = end;
    }
    End::Clean
}

/// A little-endian reader over a payload.
#[derive(Debug)]
pub struct Reader<'a>(pub &'a [u8]);

impl<'a> Reader<'a> {
    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!(
                "payload too short: {n} bytes wanted, {} left",
                self.0.len()
            ));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    /// A u64.
    pub fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().unwrap_or_default(),
        ))
    }
    /// A u32.
    pub fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or_default(),
        ))
    }
    /// A u8.
    pub fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(records: &[(u8, &[u8])]) -> Vec<u8> {
        let mut f = header(MESSAGE_MAGIC, 7).to_vec();
        for (k, p) in records {
            append_record(&mut f, *k, |o| o.extend_from_slice(p));
        }
        f
    }

    fn read(bytes: &[u8]) -> (Vec<(u64, u8, Vec<u8>)>, End) {
        let mut got = Vec::new();
        let end = scan(Path::new("f"), bytes, 1 << 20, |r| {
            got.push((r.offset, r.kind, r.payload.to_vec()));
            Ok(())
        });
        (got, end)
    }

    #[test]
    fn records_round_trip_and_the_header_names_its_segment() {
        let f = file(&[(1, b"hello"), (2, b""), (1, &[7; 300])]);
        assert_eq!(check_header(Path::new("f"), &f, MESSAGE_MAGIC), Ok(7));
        let (got, end) = read(&f);
        assert_eq!(end, End::Clean);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], (24, 1, b"hello".to_vec()));
        assert_eq!(got[1].1, 2);
        assert_eq!(got[2].2, vec![7; 300]);
        assert!(check_header(Path::new("f"), &f, CONFIG_MAGIC).is_err());
    }

    #[test]
    fn a_cut_or_bad_last_record_is_torn_and_damage_before_the_end_is_not() {
        let f = file(&[(1, b"one"), (1, b"two")]);
        let second = 24 + 8 + 4;
        for cut in second + 1..f.len() {
            let (got, end) = read(&f[..cut]);
            assert_eq!(got.len(), 1, "cut at {cut}");
            assert!(
                matches!(end, End::Torn { offset, .. } if offset == second as u64),
                "cut at {cut}: {end:?}"
            );
        }
        // The last record complete but its CRC wrong: torn.
        let mut bad = f.clone();
        let n = bad.len();
        bad[n - 6] ^= 1;
        assert!(matches!(read(&bad).1, End::Torn { .. }));
        // The first record's payload flipped: damage, named with its offset.
        let mut bad = f.clone();
        bad[24 + 5] ^= 1;
        match read(&bad).1 {
            End::Damaged(d) => {
                assert_eq!(d.offset, 24);
                assert!(d.to_string().contains("f at offset 24: checksum mismatch"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn impossible_lengths_are_damage_unless_the_tail_is_all_zeros() {
        let f = file(&[(1, b"one"), (1, b"two")]);
        let mut huge = f.clone();
        huge[24..28].copy_from_slice(&0x7fff_fff0u32.to_le_bytes());
        assert!(matches!(read(&huge).1, End::Damaged(d) if d.offset == 24));
        let mut zero = f.clone();
        zero[24..28].copy_from_slice(&[0; 4]);
        assert!(matches!(read(&zero).1, End::Damaged(_)));
        let mut zeros_tail = f.clone();
        zeros_tail.extend_from_slice(&[0; 4096]);
        let (got, end) = read(&zeros_tail);
        assert_eq!(got.len(), 2);
        assert!(matches!(end, End::Torn { offset, .. } if offset == f.len() as u64));
    }

    /// Whatever a disk holds, the scan neither panics nor invents a record: for 3,000 damaged
    /// copies of a journal (bytes flipped, cut anywhere, ranges overwritten with noise or
    /// zeros), what it returns is a prefix of the records written, and the offset it stops at
    /// lies inside the file.
    #[test]
    fn damaged_files_yield_a_prefix_of_their_records_and_never_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let written: Vec<(u8, Vec<u8>)> = (0..60)
            .map(|i| {
                let len = (next() % 700) as usize;
                (1 + (i % 3) as u8, (0..len).map(|_| next() as u8).collect())
            })
            .collect();
        let records: Vec<(u8, &[u8])> = written.iter().map(|(k, p)| (*k, &p[..])).collect();
        let good = file(&records);
        for round in 0..3_000 {
            let mut f = good.clone();
            let at = (next() as usize) % f.len();
            match round % 4 {
                0 => f[at] ^= 1 << (next() % 8),
                1 => f.truncate(at),
                2 => {
                    let end = (at + 1 + (next() as usize) % 64).min(f.len());
                    for b in &mut f[at..end] {
                        *b = next() as u8;
                    }
                }
                _ => {
                    let end = (at + 1 + (next() as usize) % 4096).min(f.len());
                    f[at..end].fill(0);
                }
            }
            let _ = check_header(Path::new("f"), &f, MESSAGE_MAGIC);
            if f.len() < HEADER_LEN {
                continue;
            }
            let (got, end) = read(&f);
            for (i, (_, kind, payload)) in got.iter().enumerate() {
                assert_eq!(
                    (*kind, &payload[..]),
                    (written[i].0, &written[i].1[..]),
                    "round {round}: record {i} is not the one written"
                );
            }
            match end {
                End::Clean => {}
                End::Torn { offset, .. } => assert!(offset as usize <= f.len(), "round {round}"),
                End::Damaged(d) => assert!(d.offset as usize <= f.len(), "round {round}"),
            }
        }
    }

    #[test]
    fn newer_versions_and_foreign_files_are_refused() {
        let mut f = file(&[]);
        f[8] = 2;
        let e = check_header(Path::new("seg"), &f, MESSAGE_MAGIC).unwrap_err();
        assert!(
            e.what.contains("version 2 is newer than this broker's (1)"),
            "{e}"
        );
        assert!(check_header(Path::new("seg"), b"short", MESSAGE_MAGIC).is_err());
    }
}
