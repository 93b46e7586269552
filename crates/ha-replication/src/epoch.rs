//! The cluster epoch on disk (fencing, `docs/design/clusters.md` section 8): the number of the
//! latest promotion this broker knows of, with its system id, in `<data-dir>/ha-epoch`,
//! written to a temporary file, fsynced, renamed over the old one, and the directory fsynced.
//!
//! Format (text, one line): `qpidd-ha-epoch 1 <epoch> <system id>`.

use std::fs;
use std::path::Path;

/// The file's name under the data directory.
pub const FILE: &str = "ha-epoch";
const MAGIC: &str = "qpidd-ha-epoch";
const VERSION: &str = "1";

/// Reads the stored epoch (0 when there is no file yet).
pub fn load(dir: &Path) -> Result<u64, String> {
    let path = dir.join(FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let mut words = text.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some(MAGIC), Some(VERSION), Some(n)) => n
            .parse()
            .map_err(|_| format!("{}: the epoch '{n}' is not a number", path.display())),
        (Some(MAGIC), Some(v), _) => Err(format!(
            "{}: format version {v} is not supported (this broker reads {VERSION})",
            path.display()
        )),
        _ => Err(format!("{}: not an epoch file", path.display())),
    }
}

/// Stores `epoch` durably.
pub fn store(dir: &Path, epoch: u64, system_id: &str) -> Result<(), String> {
    let path = dir.join(FILE);
    broker_core::store::write_durably(
        dir,
        FILE,
        format!("{MAGIC} {VERSION} {epoch} {system_id}\n"),
    )
    .map_err(|e| format!("cannot store the epoch in {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_and_loads_and_refuses_what_it_does_not_know() {
        let dir = std::env::temp_dir().join(format!("ha-epoch-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        assert_eq!(load(&dir), Ok(0));
        store(&dir, 7, "abc").unwrap();
        assert_eq!(load(&dir), Ok(7));
        fs::write(dir.join(FILE), "qpidd-ha-epoch 9 1 x\n").unwrap();
        assert!(load(&dir).unwrap_err().contains("format version 9"));
        fs::write(dir.join(FILE), "garbage\n").unwrap();
        assert!(load(&dir).unwrap_err().contains("not an epoch file"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
