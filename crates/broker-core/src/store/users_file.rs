//! The users file: the on-disk form of [`UserDb`], and the edits behind qpidd's user commands.
//!
//! All file I/O for users lives here: [`load`] (which creates a file holding the default
//! `guest` when there is none), [`save`] (atomic: temporary file, fsync, rename, mode 0600) and
//! the read-modify-write helpers that `qpidd --user-add`, `--user-del` and `--user-list` call.
//! The format is specified byte by byte in `docs/design/users-file.md`.
//!
//! It is not the user database itself (that is `auth::UserDb`, which hashes and verifies) and
//! it does not reload a running broker: a file edited by the shell commands is read at the next
//! start (or by whoever calls [`load`] and `UserDb::replace_all`). Two edits run at the same
//! moment are not serialised: the last rename wins.

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::auth::{
    AuthError, DERIVED_KEY_LEN, PBKDF2_ITERATIONS_MAX, PBKDF2_ITERATIONS_MIN, PasswordHash,
    SALT_LEN, Tag, UserDb, UserRecord,
};

/// The first line of every users file; the number is the format version.
pub const HEADER: &str = "# qpidd users v1";
/// What every version header starts with, to tell "another version" from "not a users file".
const HEADER_PREFIX: &str = "# qpidd users v";
/// The comment written after the header, for whoever opens the file.
const EXPLANATION: &str = "# name:tags:pbkdf2-sha256$iterations$salt-hex$key-hex \
                           (docs/design/users-file.md); edit with qpidd --user-add/--user-del";
/// The password hash algorithm's name in the file.
const ALGORITHM: &str = "pbkdf2-sha256";

/// Why the users file could not be read, parsed or written, or an edit was refused.
#[derive(Debug, thiserror::Error)]
pub enum UsersFileError {
    /// Reading failed (other than the file being absent, which [`load`] handles).
    #[error("cannot read users file {}: {source}", .path.display())]
    Read {
        /// The users file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// Writing the temporary file, syncing or renaming it failed; the old file is untouched.
    #[error("cannot write users file {}: {source}", .path.display())]
    Write {
        /// The users file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The file does not follow the format.
    #[error("users file {}, line {line}: {reason}", .path.display())]
    Malformed {
        /// The users file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with the line.
        reason: String,
    },
    /// The edit itself was refused (user exists, no such user, invalid name, empty password).
    #[error(transparent)]
    User(#[from] AuthError),
}

/// Reads the users file at `path`. A missing file is created holding only the default `guest`
/// (password `guest`, tags `admin` and `ha`), so a fresh data directory gets a users file.
pub fn load(path: &Path) -> Result<UserDb, UsersFileError> {
    if let Some(db) = read(path)? {
        return Ok(db);
    }
    let db = UserDb::with_default_guest();
    save(path, &db)?;
    tracing::info!(path = %path.display(), "created users file with the default user guest");
    Ok(db)
}

/// Writes `db` to `path` atomically: a temporary file in the same directory, fsync, rename
/// over `path`, fsync of the directory. The file is created with mode 0600 on Unix.
pub fn save(path: &Path, db: &UserDb) -> Result<(), UsersFileError> {
    write_atomically(path, render(db).as_bytes()).map_err(|source| UsersFileError::Write {
        path: path.to_owned(),
        source,
    })
}

/// `qpidd --user-add NAME [--user-tags admin,ha]`: adds a user; an existing name is an error.
pub fn add_user(
    path: &Path,
    name: &str,
    password: &str,
    tags: &[Tag],
) -> Result<(), UsersFileError> {
    edit(path, |db| db.add_user(name, password, tags))
}

/// Gives an existing user a new password (a new salt, the current cost).
pub fn set_password(path: &Path, name: &str, password: &str) -> Result<(), UsersFileError> {
    edit(path, |db| db.set_password(name, password))
}

/// Replaces an existing user's tags.
pub fn set_tags(path: &Path, name: &str, tags: &[Tag]) -> Result<(), UsersFileError> {
    edit(path, |db| db.set_tags(name, tags))
}

/// `qpidd --user-del NAME`: removes a user.
pub fn delete_user(path: &Path, name: &str) -> Result<(), UsersFileError> {
    edit(path, |db| db.delete_user(name))
}

/// `qpidd --user-list`: every user with its tags, sorted by name. A missing file lists what
/// [`load`] would create, without creating it.
pub fn list_users(path: &Path) -> Result<Vec<(String, Vec<String>)>, UsersFileError> {
    let db = read(path)?.unwrap_or_else(UserDb::with_default_guest);
    Ok(db.list())
}

fn edit(
    path: &Path,
    change: impl FnOnce(&UserDb) -> Result<(), AuthError>,
) -> Result<(), UsersFileError> {
    let db = load(path)?;
    change(&db)?;
    save(path, &db)
}

/// The users in the file, or `None` when there is no file.
fn read(path: &Path) -> Result<Option<UserDb>, UsersFileError> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(UsersFileError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    warn_if_readable_by_others(path);
    parse(path, &text).map(Some)
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(metadata) = fs::metadata(path) {
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{mode:o}"),
                "users file is accessible to other users; chmod 600 it"
            );
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &Path) {}

fn parse(path: &Path, text: &str) -> Result<UserDb, UsersFileError> {
    let malformed = |line: usize, reason: String| UsersFileError::Malformed {
        path: path.to_owned(),
        line,
        reason,
    };
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(index, line)| (index + 1, line));
    match lines.next().map(|(_, line)| line.trim()) {
        Some(HEADER) => {}
        Some(other) if other.starts_with(HEADER_PREFIX) => {
            return Err(malformed(
                1,
                format!("unsupported version {other:?}; this broker reads {HEADER:?}"),
            ));
        }
        _ => {
            return Err(malformed(
                1,
                format!(
                    "expected the header {HEADER:?} (delete the file to start afresh with guest/guest)"
                ),
            ));
        }
    }
    let db = UserDb::new();
    for (number, line) in lines {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, record) = parse_user_line(line).map_err(|reason| malformed(number, reason))?;
        db.insert_record(name, record)
            .map_err(|error| malformed(number, error.to_string()))?;
    }
    if db.list().is_empty() {
        tracing::warn!(path = %path.display(), "users file holds no users: nobody can log in");
    }
    Ok(db)
}

/// `name:tags:pbkdf2-sha256$iterations$salt$key`.
fn parse_user_line(line: &str) -> Result<(String, UserRecord), String> {
    let mut fields = line.splitn(3, ':');
    let (Some(name), Some(tags), Some(hash)) = (fields.next(), fields.next(), fields.next()) else {
        return Err("expected name:tags:hash".to_owned());
    };
    let hash = parse_hash(hash)?;
    let mut record = UserRecord {
        hash,
        admin: false,
        ha: false,
    };
    record.set_tags(&parse_tags(tags)?);
    Ok((name.to_owned(), record))
}

fn parse_tags(field: &str) -> Result<Vec<Tag>, String> {
    let mut tags = Vec::new();
    if field.is_empty() {
        return Ok(tags);
    }
    for name in field.split(',') {
        let tag = name.parse::<Tag>().map_err(|error| error.to_string())?;
        if tags.contains(&tag) {
            return Err(format!("tag '{tag}' given twice"));
        }
        tags.push(tag);
    }
    Ok(tags)
}

fn parse_hash(field: &str) -> Result<PasswordHash, String> {
    let parts: Vec<&str> = field.split('$').collect();
    let [algorithm, iterations, salt, key] = parts[..] else {
        return Err("expected pbkdf2-sha256$iterations$salt$key as the hash".to_owned());
    };
    if algorithm != ALGORITHM {
        return Err(format!(
            "unknown hash algorithm {algorithm:?}; expected {ALGORITHM:?}"
        ));
    }
    let iterations = parse_iterations(iterations)?;
    let salt = decode_hex::<SALT_LEN>(salt)
        .ok_or_else(|| format!("the salt must be {} hex digits", SALT_LEN * 2))?;
    let derived_key = decode_hex::<DERIVED_KEY_LEN>(key)
        .ok_or_else(|| format!("the key must be {} hex digits", DERIVED_KEY_LEN * 2))?;
    Ok(PasswordHash {
        iterations,
        salt,
        derived_key,
    })
}

fn parse_iterations(text: &str) -> Result<u32, String> {
    let range = PBKDF2_ITERATIONS_MIN..=PBKDF2_ITERATIONS_MAX;
    let out_of_range = || {
        format!(
            "iterations must be a decimal number from {} to {}",
            range.start(),
            range.end()
        )
    };
    if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(out_of_range());
    }
    let iterations = text.parse::<u32>().map_err(|_| out_of_range())?;
    if !range.contains(&iterations) {
        return Err(out_of_range());
    }
    Ok(iterations)
}

fn decode_hex<const LEN: usize>(text: &str) -> Option<[u8; LEN]> {
    let digits = text.as_bytes();
    if digits.len() != LEN * 2 {
        return None;
    }
    let mut bytes = [0u8; LEN];
    for (byte, pair) in bytes.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = (hex_value(pair[0])? << 4) | hex_value(pair[1])?;
    }
    Some(bytes)
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

fn render(db: &UserDb) -> String {
    let mut text = format!("{HEADER}\n{EXPLANATION}\n");
    for (name, record) in db.records() {
        let tags: Vec<&str> = record.tags().into_iter().map(Tag::as_str).collect();
        let hash = &record.hash;
        // Writing to a String cannot fail.
        let _ = writeln!(
            text,
            "{name}:{}:{ALGORITHM}${}${}${}",
            tags.join(","),
            hash.iterations,
            encode_hex(&hash.salt),
            encode_hex(&hash.derived_key),
        );
    }
    text
}

fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    text
}

/// Makes temporary names unique within the process as well as across processes.
static TEMPORARY_FILE_COUNTER: AtomicU64 = AtomicU64::new(0);

fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    fs::create_dir_all(directory)?;
    let file_name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the users file path has no file name",
        )
    })?;
    let temporary = directory.join(format!(
        ".{}.tmp-{}-{}",
        file_name.to_string_lossy(),
        std::process::id(),
        TEMPORARY_FILE_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = write_and_rename(&temporary, path, directory, bytes);
    if result.is_err() {
        // Best effort: the temporary file may not exist, or already be renamed.
        let _ = fs::remove_file(&temporary);
    }
    result
}

fn write_and_rename(
    temporary: &Path,
    path: &Path,
    directory: &Path,
    bytes: &[u8],
) -> io::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(temporary, path)?;
    sync_directory(directory)
}

/// Makes the rename itself durable.
#[cfg(unix)]
fn sync_directory(directory: &Path) -> io::Result<()> {
    File::open(directory)?.sync_all()
}

#[cfg(not(unix))]
fn sync_directory(_directory: &Path) -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{PBKDF2_ITERATIONS, Principal};

    /// A directory under the system temporary directory, removed when dropped.
    struct TemporaryDirectory(PathBuf);

    impl TemporaryDirectory {
        fn new(label: &str) -> TemporaryDirectory {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let path = std::env::temp_dir().join(format!(
                "qpidd-users-file-test-{label}-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            TemporaryDirectory(path)
        }

        fn users_file(&self) -> PathBuf {
            self.0.join("users")
        }

        fn entries(&self) -> Vec<String> {
            let mut names: Vec<String> = fs::read_dir(&self.0)
                .unwrap()
                .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        }
    }

    impl Drop for TemporaryDirectory {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// A valid line for `name` with a cheap hash of `password`.
    fn line_for(name: &str, tags: &str, password: &str) -> String {
        let db = UserDb::with_iterations(PBKDF2_ITERATIONS_MIN);
        db.add_user("x", password, &[]).unwrap();
        let rendered = render(&db);
        let hash = rendered
            .lines()
            .last()
            .unwrap()
            .splitn(3, ':')
            .nth(2)
            .unwrap();
        format!("{name}:{tags}:{hash}")
    }

    fn malformed_line(text: &str) -> (usize, String) {
        let path = Path::new("/etc/qpidd/users");
        match parse(path, text) {
            Err(error @ UsersFileError::Malformed { line, .. }) => {
                let message = error.to_string();
                assert!(message.contains("/etc/qpidd/users"), "{message}");
                assert!(message.contains(&format!("line {line}")), "{message}");
                (line, message)
            }
            Err(other) => panic!("{text:?}: {other}"),
            Ok(_) => panic!("{text:?} was accepted"),
        }
    }

    #[test]
    fn a_missing_file_is_created_with_guest_and_mode_0600() {
        let directory = TemporaryDirectory::new("missing");
        let path = directory.0.join("fresh").join("users");
        assert_eq!(
            list_users(&path).unwrap(),
            vec![(
                "guest".to_owned(),
                vec!["admin".to_owned(), "ha".to_owned()]
            )]
        );
        assert!(!path.exists(), "listing must not create the file");

        let db = load(&path).unwrap();
        assert_eq!(db.list(), list_users(&path).unwrap());
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# qpidd users v1\n# "), "{text}");
        assert!(
            text.lines().nth(2).unwrap().starts_with(&format!(
                "guest:admin,ha:pbkdf2-sha256${PBKDF2_ITERATIONS}$"
            )),
            "{text}"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        // Loading again reads what was written.
        assert_eq!(load(&path).unwrap().list(), db.list());
    }

    #[test]
    fn save_then_load_round_trips_users_tags_and_hashes() {
        let directory = TemporaryDirectory::new("round-trip");
        let path = directory.users_file();
        let db = UserDb::with_iterations(PBKDF2_ITERATIONS_MIN);
        db.add_user("alice", "secret", &[Tag::Admin]).unwrap();
        db.add_user("bob", "hunter2", &[]).unwrap();
        db.add_user("replicator", "pw", &[Tag::Ha, Tag::Admin])
            .unwrap();
        save(&path, &db).unwrap();

        let loaded = load(&path).unwrap();
        assert_eq!(loaded.records(), db.records());
        assert_eq!(
            loaded.verify("replicator", "pw"),
            Some(Principal::trusted("replicator"))
        );
        assert_eq!(loaded.verify("bob", "wrong"), None);
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("\nbob::pbkdf2-sha256$1000$"), "{text}");
        assert!(text.contains("\nreplicator:admin,ha:"), "{text}");
        assert!(!text.contains("secret") && !text.contains("hunter2"));
        // Saving again replaces the file and leaves no temporary file behind.
        save(&path, &loaded).unwrap();
        assert_eq!(directory.entries(), ["users"]);
    }

    #[test]
    fn lines_made_by_the_documented_python_recipe_verify() {
        // The password-reset recipe of docs/design/users-file.md, run with Python 3 for the
        // passwords "guest" (this is the default guest's line) and "s3cret".
        let text = "# qpidd users v1\n\
                    guest:admin,ha:pbkdf2-sha256$60000$fa9694bb4af1d5f841a4bba05c4cfd56$\
                    fd99dadeb234cb0dcc1cfa9af01a01be214fb48d77567260bfec8cfd4f71ebdd\n\
                    alice:admin:pbkdf2-sha256$60000$15383d7bde06023fc82da0f76670a3e2$\
                    44cef1e2a0527899e7e260ae6620cae1e85b797ccab9c7bfadb4552731eda3db\n";
        let db = parse(Path::new("users"), text).unwrap();
        let guest = UserDb::with_default_guest().records().remove(0);
        assert_eq!(db.records()[1], guest);
        let alice = db.verify("alice", "s3cret").unwrap();
        assert!(alice.admin && !alice.ha);
    }

    #[test]
    fn comments_blank_lines_crlf_and_upper_case_hex_are_accepted() {
        let line = line_for("alice", "ha,admin", "pw");
        let (before_salt, hex) = line
            .rsplit_once('$')
            .map(|(rest, key)| {
                let (before_salt, salt) = rest.rsplit_once('$').unwrap();
                (
                    before_salt.to_owned(),
                    format!("{}${}", salt.to_uppercase(), key.to_uppercase()),
                )
            })
            .unwrap();
        let text = format!("# qpidd users v1\r\n\r\n# a comment\r\n  {before_salt}${hex}  \r\n\n");
        let db = parse(Path::new("users"), &text).unwrap();
        assert_eq!(db.verify("alice", "pw"), Some(Principal::trusted("alice")));
    }

    #[test]
    fn malformed_files_name_the_file_and_line() {
        let good = line_for("alice", "admin", "pw");
        let hash = good.splitn(3, ':').nth(2).unwrap().to_owned();
        let (salt, key) = {
            let parts: Vec<&str> = hash.split('$').collect();
            (parts[2].to_owned(), parts[3].to_owned())
        };
        let cases: Vec<(String, usize, &str)> = vec![
            (String::new(), 1, "expected the header"),
            ("alice:admin:x\n".into(), 1, "expected the header"),
            ("# qpidd users v2\n".into(), 1, "unsupported version"),
            (format!("{HEADER}\nalice\n"), 2, "expected name:tags:hash"),
            (
                format!("{HEADER}\nalice:admin\n"),
                2,
                "expected name:tags:hash",
            ),
            (format!("{HEADER}\n{good}\n\n{good}\n"), 4, "already exists"),
            (format!("{HEADER}\n# c\n:admin:{hash}\n"), 3, "it is empty"),
            (
                format!("{HEADER}\nal\u{1}ce:admin:{hash}\n"),
                2,
                "control character",
            ),
            (
                format!("{HEADER}\nalice:root:{hash}\n"),
                2,
                "valid tags are: admin, ha",
            ),
            (
                format!("{HEADER}\nalice:admin,admin:{hash}\n"),
                2,
                "given twice",
            ),
            (
                format!("{HEADER}\nalice:admin:\n"),
                2,
                "expected pbkdf2-sha256$",
            ),
            (
                format!("{HEADER}\nalice:admin:{hash}$x\n"),
                2,
                "expected pbkdf2-sha256$",
            ),
            (
                format!(
                    "{HEADER}\nalice:admin:{}\n",
                    hash.replace("pbkdf2-sha256", "md5")
                ),
                2,
                "unknown hash algorithm",
            ),
            (
                format!("{HEADER}\nalice:admin:pbkdf2-sha256$999${salt}${key}\n"),
                2,
                "from 1000 to 1000000",
            ),
            (
                format!("{HEADER}\nalice:admin:pbkdf2-sha256$1000001${salt}${key}\n"),
                2,
                "from 1000 to 1000000",
            ),
            (
                format!("{HEADER}\nalice:admin:pbkdf2-sha256$+5000${salt}${key}\n"),
                2,
                "decimal number",
            ),
            (
                format!("{HEADER}\nalice:admin:pbkdf2-sha256$99999999999${salt}${key}\n"),
                2,
                "decimal number",
            ),
            (
                format!(
                    "{HEADER}\nalice:admin:pbkdf2-sha256$5000${}${key}\n",
                    &salt[2..]
                ),
                2,
                "salt must be 32 hex",
            ),
            (
                format!(
                    "{HEADER}\nalice:admin:pbkdf2-sha256$5000$+f{}${key}\n",
                    &salt[2..]
                ),
                2,
                "salt must be 32 hex",
            ),
            (
                format!("{HEADER}\nalice:admin:pbkdf2-sha256$5000${salt}${key}00\n"),
                2,
                "key must be 64 hex",
            ),
            (
                format!(
                    "{HEADER}\nalice:admin:pbkdf2-sha256$5000${salt}${}\u{e9}\n",
                    &key[1..]
                ),
                2,
                "key must be 64 hex",
            ),
        ];
        for (text, line, reason) in cases {
            let (got_line, message) = malformed_line(&text);
            assert_eq!(got_line, line, "{text:?}: {message}");
            assert!(message.contains(reason), "{text:?}: {message}");
        }
    }

    #[test]
    fn a_header_only_file_has_no_users() {
        let db = parse(Path::new("users"), "# qpidd users v1\n").unwrap();
        assert!(db.list().is_empty());
    }

    #[test]
    fn unreadable_and_unwritable_paths_are_errors() {
        let directory = TemporaryDirectory::new("io-errors");
        // A directory where the file should be: reading fails, and so does the rename.
        let path = directory.users_file();
        fs::create_dir(&path).unwrap();
        assert!(matches!(load(&path), Err(UsersFileError::Read { .. })));
        let error = save(&path, &UserDb::new()).unwrap_err();
        assert!(matches!(error, UsersFileError::Write { .. }), "{error}");
        assert!(error.to_string().contains(&path.display().to_string()));
        assert_eq!(
            directory.entries(),
            ["users"],
            "no temporary file left behind"
        );
    }

    #[test]
    fn shell_commands_edit_the_file() {
        let directory = TemporaryDirectory::new("commands");
        let path = directory.users_file();
        // Start from a cheap file so the commands' own hashes are the only slow part.
        let db = UserDb::with_iterations(PBKDF2_ITERATIONS_MIN);
        db.add_user("guest", "guest", &Tag::ALL).unwrap();
        save(&path, &db).unwrap();

        add_user(&path, "alice", "secret", &Tag::parse_list("admin").unwrap()).unwrap();
        let listed = list_users(&path).unwrap();
        assert_eq!(
            listed,
            vec![
                ("alice".to_owned(), vec!["admin".to_owned()]),
                (
                    "guest".to_owned(),
                    vec!["admin".to_owned(), "ha".to_owned()]
                ),
            ]
        );
        assert!(matches!(
            add_user(&path, "alice", "other", &[]),
            Err(UsersFileError::User(AuthError::UserExists(_)))
        ));
        for bad_name in ["", "a:b", "a b"] {
            let error = add_user(&path, bad_name, "pw", &[]).unwrap_err();
            assert!(matches!(
                error,
                UsersFileError::User(AuthError::InvalidUserName { .. })
            ));
        }
        assert!(matches!(
            add_user(&path, "carol", "", &[]),
            Err(UsersFileError::User(AuthError::EmptyPassword))
        ));

        set_tags(&path, "alice", &[Tag::Ha]).unwrap();
        delete_user(&path, "guest").unwrap();
        assert!(matches!(
            delete_user(&path, "guest"),
            Err(UsersFileError::User(AuthError::NoSuchUser(_)))
        ));
        let loaded = load(&path).unwrap();
        assert_eq!(
            loaded.list(),
            vec![("alice".to_owned(), vec!["ha".to_owned()])]
        );
        let alice = loaded.verify("alice", "secret").unwrap();
        assert!(alice.ha && !alice.admin);
        assert_eq!(directory.entries(), ["users"]);
    }

    #[test]
    fn set_password_resets_a_password() {
        let directory = TemporaryDirectory::new("reset");
        let path = directory.users_file();
        let db = UserDb::with_iterations(PBKDF2_ITERATIONS_MIN);
        db.add_user("alice", "forgotten", &[Tag::Admin]).unwrap();
        save(&path, &db).unwrap();

        set_password(&path, "alice", "remembered").unwrap();
        let loaded = load(&path).unwrap();
        assert_eq!(loaded.verify("alice", "forgotten"), None);
        assert!(loaded.verify("alice", "remembered").unwrap().admin);
        assert!(matches!(
            set_password(&path, "nobody", "x"),
            Err(UsersFileError::User(AuthError::NoSuchUser(_)))
        ));
    }

    #[test]
    fn hex_helpers() {
        assert_eq!(encode_hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(decode_hex::<4>("000fa5ff"), Some([0x00, 0x0f, 0xa5, 0xff]));
        assert_eq!(decode_hex::<2>("A5fF"), Some([0xa5, 0xff]));
        assert_eq!(decode_hex::<2>("a5f"), None);
        assert_eq!(decode_hex::<2>("a5fg"), None);
        assert_eq!(decode_hex::<1>("\u{e9}"), None);
    }
}
