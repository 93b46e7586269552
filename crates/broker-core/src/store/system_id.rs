//! The broker's system id on disk: `<data-dir>/system-id`, made at the first start and kept,
//! as Qpid keeps its own in the data directory. Members of a cluster and replicas recognise a
//! broker by it, so a restarted backup is the same backup (the one a recovering primary
//! waits for). Without a data directory each run has a new id.
//!
//! Format (text, one line): `qpidd-system-id 1 <uuid>`.

use std::path::Path;

/// The file's name under the data directory.
pub const FILE: &str = "system-id";
const MAGIC: &str = "qpidd-system-id";
const VERSION: &str = "1";

/// The id stored under `dir`, or a new one, stored durably first.
pub fn load_or_create(dir: &Path) -> Result<uuid::Uuid, String> {
    let path = dir.join(FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let mut words = text.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some(MAGIC), Some(VERSION), Some(id)) => uuid::Uuid::parse_str(id)
                    .map_err(|_| format!("{}: '{id}' is not a uuid", path.display())),
                (Some(MAGIC), Some(v), _) => Err(format!(
                    "{}: format version {v} is not supported (this broker reads {VERSION})",
                    path.display()
                )),
                _ => Err(format!("{}: not a system id file", path.display())),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = uuid::Uuid::new_v4();
            super::write_durably(dir, FILE, format!("{MAGIC} {VERSION} {id}\n"))
                .map_err(|e| format!("cannot store the system id in {}: {e}", path.display()))?;
            Ok(id)
        }
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_once_then_kept_and_damage_is_refused() {
        let dir = std::env::temp_dir().join(format!("sysid-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = load_or_create(&dir).unwrap();
        assert_eq!(load_or_create(&dir).unwrap(), first);
        std::fs::write(dir.join(FILE), "qpidd-system-id 9 x\n").unwrap();
        let e = load_or_create(&dir).unwrap_err();
        assert!(e.contains("format version 9"), "{e}");
        std::fs::write(dir.join(FILE), "hello\n").unwrap();
        assert!(
            load_or_create(&dir)
                .unwrap_err()
                .contains("not a system id file")
        );
        std::fs::write(dir.join(FILE), "qpidd-system-id 1 nope\n").unwrap();
        assert!(load_or_create(&dir).unwrap_err().contains("not a uuid"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
