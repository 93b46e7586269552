//! Everything the broker keeps on disk: the users file, the system id, and the durable store
//! (`docs/design/store.md`).

pub mod engine;
pub mod journal;
pub mod system_id;
pub mod users_file;

pub use engine::{Store, StoreOptions};

use std::io::Write;
use std::path::Path;

/// Replaces `dir/name` with `contents` so that a crash leaves the old or the new file, never a
/// mix: written to `name.tmp`, fsynced, renamed over, then the directory fsynced.
pub fn write_durably(dir: &Path, name: &str, contents: impl AsRef<[u8]>) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(contents.as_ref())?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}
