//! Users, password hashing and SASL: who may log in, and with which tags.
//!
//! This module holds the broker's user database ([`UserDb`]: names, salted PBKDF2 password
//! hashes and the two permission tags of DESIGN decision 7), decodes the SASL responses a
//! client sends in connection.start-ok (PLAIN, AMQPLAIN, ANONYMOUS) and makes the login
//! decision ([`authenticate`]) that turns a response into a [`Principal`].
//!
//! It is not the users file (`store::users_file` reads and writes that; this module does no
//! file or socket I/O), not the connection handshake (the connection sends connection.start
//! with [`mechanisms`] and closes with 403 on an [`AuthError`]), and not the permission checks:
//! what `admin` and `ha` allow is decided where those operations are carried out.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use parking_lot::RwLock;
use sha2::Sha256;

/// PBKDF2-HMAC-SHA256 iterations for newly set passwords. One verification costs about 7 ms
/// of one core in a release build on the development machine (see
/// `docs/design/users-file.md`): cheap enough that a storm of reconnecting clients does not
/// stall the broker, dear enough to slow down guessing from a stolen users file. Existing
/// hashes keep the count they were made with, which the users file records per user.
pub const PBKDF2_ITERATIONS: u32 = 60_000;
/// The lowest iteration count accepted from a users file.
pub const PBKDF2_ITERATIONS_MIN: u32 = 1_000;
/// The highest iteration count accepted from a users file: about 0.12 s per login here. A
/// higher count would let one bad line turn every login into a denial of service.
pub const PBKDF2_ITERATIONS_MAX: u32 = 1_000_000;
/// Bytes of random salt per password hash.
pub const SALT_LEN: usize = 16;
/// Bytes of derived key (the stored hash) per password.
pub const DERIVED_KEY_LEN: usize = 32;
/// The longest user name, in bytes (it must fit an AMQP short string).
pub const USER_NAME_MAX_BYTES: usize = 255;
/// The user created in a fresh users file, with password `guest` and both tags. As in
/// RabbitMQ, it may log in only from a loopback address while authentication is on.
pub const GUEST_USER: &str = "guest";
/// The user name given to ANONYMOUS logins (and empty user names) when authentication is off.
pub const ANONYMOUS_USER: &str = "anonymous";

/// The salt of the default guest's hash (see [`UserDb::with_default_guest`]).
const DEFAULT_GUEST_SALT: [u8; SALT_LEN] = [
    0xfa, 0x96, 0x94, 0xbb, 0x4a, 0xf1, 0xd5, 0xf8, 0x41, 0xa4, 0xbb, 0xa0, 0x5c, 0x4c, 0xfd, 0x56,
];
/// PBKDF2-HMAC-SHA256("guest", [`DEFAULT_GUEST_SALT`], [`PBKDF2_ITERATIONS`]), made with
/// Python's `hashlib.pbkdf2_hmac` and checked by a test.
const DEFAULT_GUEST_KEY: [u8; DERIVED_KEY_LEN] = [
    0xfd, 0x99, 0xda, 0xde, 0xb2, 0x34, 0xcb, 0x0d, 0xcc, 0x1c, 0xfa, 0x9a, 0xf0, 0x1a, 0x01, 0xbe,
    0x21, 0x4f, 0xb4, 0x8d, 0x77, 0x56, 0x72, 0x60, 0xbf, 0xec, 0x8c, 0xfd, 0x4f, 0x71, 0xeb, 0xdd,
];

/// Peer-supplied strings are cut to this many bytes before they are echoed in an error, so
/// that every [`AuthError`] text fits an AMQP reply-text (a short string, 255 bytes).
const ECHO_MAX_BYTES: usize = 64;

/// Who a connection is, once logged in, and what its tags let it do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The user name (or [`ANONYMOUS_USER`] when authentication is off).
    pub user: String,
    /// Tag `admin`: management requests and the `qpid.ha-admin` client property.
    pub admin: bool,
    /// Tag `ha`: replication links and replicating subscriptions.
    pub ha: bool,
}

impl Principal {
    /// A principal with both tags, as every connection gets with `--auth no`.
    pub fn trusted(user: impl Into<String>) -> Principal {
        Principal {
            user: user.into(),
            admin: true,
            ha: true,
        }
    }
}

/// A permission tag (DESIGN decision 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tag {
    /// Management, and the `qpid.ha-admin` client property.
    Admin,
    /// Replication links and replicating subscriptions.
    Ha,
}

impl Tag {
    /// Every tag, in the order they are listed and written.
    pub const ALL: [Tag; 2] = [Tag::Admin, Tag::Ha];

    /// The tag's name as written on the command line and in the users file.
    pub fn as_str(self) -> &'static str {
        match self {
            Tag::Admin => "admin",
            Tag::Ha => "ha",
        }
    }

    /// Parses a comma-separated list such as `admin,ha` (spaces around names are ignored; an
    /// empty string is no tags). An unknown name is an error that lists the valid ones.
    pub fn parse_list(list: &str) -> Result<Vec<Tag>, AuthError> {
        Tag::parse_all(list.split(','))
    }

    /// Parses tag names one by one, as `--user-tags` arrives already split (spaces around
    /// names and empty names are ignored, repeats are kept once).
    pub fn parse_all<I>(names: I) -> Result<Vec<Tag>, AuthError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let mut tags = Vec::new();
        for name in names {
            let name = name.as_ref().trim();
            if name.is_empty() {
                continue;
            }
            let tag = name.parse::<Tag>()?;
            if !tags.contains(&tag) {
                tags.push(tag);
            }
        }
        Ok(tags)
    }
}

impl FromStr for Tag {
    type Err = AuthError;

    fn from_str(name: &str) -> Result<Tag, AuthError> {
        Tag::ALL
            .into_iter()
            .find(|tag| tag.as_str() == name)
            .ok_or_else(|| AuthError::UnknownTag { tag: echo(name) })
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a login or a change to the user database was refused. The texts reach clients as the
/// reply text of connection.close (403) and the broker log, so they are short (at most 255
/// bytes), say what to do where that helps, and never reveal whether a user exists.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The client chose a mechanism the broker does not offer.
    #[error("SASL mechanism '{mechanism}' is not supported; this broker offers {offered}")]
    UnsupportedMechanism {
        /// The mechanism the client asked for (cut to 64 bytes).
        mechanism: String,
        /// What connection.start offered.
        offered: &'static str,
    },
    /// ANONYMOUS while authentication is on.
    #[error("ANONYMOUS login refused: this broker requires a user name and password")]
    AnonymousRefused,
    /// The SASL response does not follow its mechanism's format.
    #[error("malformed {mechanism} SASL response: {reason}")]
    MalformedResponse {
        /// PLAIN or AMQPLAIN.
        mechanism: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Unknown user or wrong password: one error, so a client cannot tell which.
    #[error("login refused for user '{user}': unknown user or wrong password")]
    LoginRefused {
        /// The user name the client sent (cut to 64 bytes).
        user: String,
    },
    /// `guest` from a remote address while authentication is on.
    #[error(
        "user 'guest' may only connect from a loopback address, not from {peer}; \
         create another user with qpidd --user-add"
    )]
    GuestNotLoopback {
        /// The client's address.
        peer: IpAddr,
    },
    /// A PLAIN authorization identity other than the user itself.
    #[error(
        "PLAIN authorization identity '{authzid}' refused: acting as another user is not supported"
    )]
    AuthzidRefused {
        /// The identity the client asked to act as (cut to 64 bytes).
        authzid: String,
    },
    /// `add_user` for a name that is taken.
    #[error("user '{0}' already exists")]
    UserExists(String),
    /// A change to a user that does not exist.
    #[error("no such user '{0}'")]
    NoSuchUser(String),
    /// A user name the users file or the protocol cannot carry.
    #[error("invalid user name '{name}': {reason}")]
    InvalidUserName {
        /// The name (cut to 64 bytes).
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An empty password.
    #[error("empty password refused")]
    EmptyPassword,
    /// A tag other than `admin` and `ha`.
    #[error("unknown tag '{tag}'; valid tags are: admin, ha")]
    UnknownTag {
        /// The tag (cut to 64 bytes).
        tag: String,
    },
}

/// A SASL mechanism the broker understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// RFC 4616: `authzid NUL user NUL password`.
    Plain,
    /// RabbitMQ's AMQPLAIN: a field table with LOGIN and PASSWORD.
    Amqplain,
    /// RFC 4505: no credentials.
    Anonymous,
}

impl Mechanism {
    /// The mechanism with this exact (upper-case) name.
    pub fn from_name(name: &str) -> Option<Mechanism> {
        match name {
            "PLAIN" => Some(Mechanism::Plain),
            "AMQPLAIN" => Some(Mechanism::Amqplain),
            "ANONYMOUS" => Some(Mechanism::Anonymous),
            _ => None,
        }
    }

    /// The mechanism's name as it appears in connection.start.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::Amqplain => "AMQPLAIN",
            Mechanism::Anonymous => "ANONYMOUS",
        }
    }
}

/// The mechanisms to offer in connection.start: ANONYMOUS only while authentication is off.
pub fn mechanisms(auth_enabled: bool) -> &'static str {
    if auth_enabled {
        "PLAIN AMQPLAIN"
    } else {
        "PLAIN AMQPLAIN ANONYMOUS"
    }
}

/// What a client presented in its SASL response. `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// PLAIN or AMQPLAIN.
    Password {
        /// PLAIN's authorization identity, when the client sent a non-empty one.
        authzid: Option<String>,
        /// The user name (may be empty: the login decision refuses it when auth is on).
        user: String,
        /// The password, in clear, never stored.
        password: String,
    },
    /// ANONYMOUS (its optional trace text is ignored).
    Anonymous,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Password { authzid, user, .. } => f
                .debug_struct("Password")
                .field("authzid", authzid)
                .field("user", user)
                .field("password", &"<redacted>")
                .finish(),
            Credentials::Anonymous => f.write_str("Anonymous"),
        }
    }
}

/// Decodes the `response` of connection.start-ok for `mechanism`. Never panics: a response
/// that does not follow the mechanism's format (or is not UTF-8) is
/// [`AuthError::MalformedResponse`], an unknown mechanism [`AuthError::UnsupportedMechanism`].
pub fn parse_sasl_response(mechanism: &str, response: &[u8]) -> Result<Credentials, AuthError> {
    match Mechanism::from_name(mechanism) {
        Some(Mechanism::Plain) => parse_plain(response),
        Some(Mechanism::Amqplain) => parse_amqplain(response),
        Some(Mechanism::Anonymous) => Ok(Credentials::Anonymous),
        None => Err(AuthError::UnsupportedMechanism {
            mechanism: echo(mechanism),
            offered: mechanisms(false),
        }),
    }
}

/// The login decision for one connection.start-ok from `peer`.
///
/// With `auth_enabled == false` any well-formed PLAIN, AMQPLAIN or ANONYMOUS response is
/// accepted and the principal has both tags. With it on, ANONYMOUS is refused, the password
/// must match the user's (one error for unknown user and wrong password), a PLAIN authzid must
/// be empty or the user itself, and `guest` may log in only from a loopback address.
pub fn authenticate(
    db: &UserDb,
    auth_enabled: bool,
    mechanism: &str,
    response: &[u8],
    peer: SocketAddr,
) -> Result<Principal, AuthError> {
    let Some(known) = Mechanism::from_name(mechanism) else {
        return Err(AuthError::UnsupportedMechanism {
            mechanism: echo(mechanism),
            offered: mechanisms(auth_enabled),
        });
    };
    if auth_enabled && known == Mechanism::Anonymous {
        return Err(AuthError::AnonymousRefused);
    }
    let credentials = parse_sasl_response(mechanism, response)?;
    if !auth_enabled {
        return Ok(trusted_principal(credentials));
    }
    let Credentials::Password {
        authzid,
        user,
        password,
    } = credentials
    else {
        return Err(AuthError::AnonymousRefused);
    };
    if let Some(authzid) = authzid.filter(|authzid| *authzid != user) {
        return Err(AuthError::AuthzidRefused {
            authzid: echo(&authzid),
        });
    }
    // Checked before the password, so it costs no hashing and says nothing about it.
    if user == GUEST_USER && !peer.ip().to_canonical().is_loopback() {
        return Err(AuthError::GuestNotLoopback { peer: peer.ip() });
    }
    db.verify(&user, &password)
        .ok_or_else(|| AuthError::LoginRefused { user: echo(&user) })
}

fn trusted_principal(credentials: Credentials) -> Principal {
    match credentials {
        Credentials::Password { user, .. } if !user.is_empty() => Principal::trusted(user),
        _ => Principal::trusted(ANONYMOUS_USER),
    }
}

fn parse_plain(response: &[u8]) -> Result<Credentials, AuthError> {
    let malformed = |reason| AuthError::MalformedResponse {
        mechanism: "PLAIN",
        reason,
    };
    let mut fields = response.split(|&byte| byte == 0);
    let (Some(authzid), Some(user), Some(password), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(malformed(
            "expected authzid, user and password separated by two NUL bytes",
        ));
    };
    let text = |bytes| std::str::from_utf8(bytes).map(str::to_owned);
    let authzid = text(authzid).map_err(|_| malformed("authzid is not UTF-8"))?;
    Ok(Credentials::Password {
        authzid: Some(authzid).filter(|authzid| !authzid.is_empty()),
        user: text(user).map_err(|_| malformed("user is not UTF-8"))?,
        password: text(password).map_err(|_| malformed("password is not UTF-8"))?,
    })
}

/// AMQPLAIN's response is the body of an AMQP field table, without its 4-byte length. It is
/// decoded by hand so that no nesting a client sends is ever parsed recursively: entries other
/// than LOGIN and PASSWORD are skipped by their length. LOGIN and PASSWORD may be long strings
/// (`S`) or, as some older clients send them, 0-9-1 short strings (`s`); anywhere else `s` is
/// RabbitMQ's (and amq-protocol's) 16-bit integer.
fn parse_amqplain(response: &[u8]) -> Result<Credentials, AuthError> {
    let malformed = |reason| AuthError::MalformedResponse {
        mechanism: "AMQPLAIN",
        reason,
    };
    let mut reader = Reader { rest: response };
    let mut login = None;
    let mut password = None;
    while !reader.rest.is_empty() {
        let key_len = reader.u8().ok_or(malformed("truncated field name"))?;
        let key = reader
            .take(usize::from(key_len))
            .ok_or(malformed("truncated field name"))?;
        let kind = reader.u8().ok_or(malformed("truncated field value"))?;
        let slot = match key {
            b"LOGIN" => &mut login,
            b"PASSWORD" => &mut password,
            _ => {
                reader.skip_value(kind).map_err(malformed)?;
                continue;
            }
        };
        let value = match kind {
            b'S' => reader.long_bytes(),
            b's' => reader.short_bytes(),
            _ => return Err(malformed("LOGIN and PASSWORD must be strings")),
        }
        .ok_or(malformed("truncated field value"))?;
        if slot.replace(value).is_some() {
            return Err(malformed("LOGIN or PASSWORD given twice"));
        }
    }
    let (Some(login), Some(password)) = (login, password) else {
        return Err(malformed("LOGIN and PASSWORD are both required"));
    };
    let text = |bytes| std::str::from_utf8(bytes).map(str::to_owned);
    Ok(Credentials::Password {
        authzid: None,
        user: text(login).map_err(|_| malformed("LOGIN is not UTF-8"))?,
        password: text(password).map_err(|_| malformed("PASSWORD is not UTF-8"))?,
    })
}

/// A cursor over peer bytes: every read checks what is left and returns `None` when short.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        if len > self.rest.len() {
            return None;
        }
        let (taken, rest) = self.rest.split_at(len);
        self.rest = rest;
        Some(taken)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|bytes| bytes[0])
    }

    fn u32(&mut self) -> Option<u32> {
        let bytes = self.take(4)?;
        Some(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    fn short_bytes(&mut self) -> Option<&'a [u8]> {
        let len = self.u8()?;
        self.take(usize::from(len))
    }

    fn long_bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.u32()?).ok()?;
        self.take(len)
    }

    /// Skips one field value of type `kind` (RabbitMQ's type letters, as amq-protocol reads
    /// them). Nested tables and arrays are skipped whole by their length prefix.
    fn skip_value(&mut self, kind: u8) -> Result<(), &'static str> {
        let fixed_len = match kind {
            b'V' => 0,
            b't' | b'b' | b'B' => 1,
            b's' | b'u' | b'U' => 2,
            b'I' | b'i' | b'f' => 4,
            b'D' => 5,
            b'l' | b'L' | b'd' | b'T' => 8,
            b'S' | b'x' | b'A' | b'F' => {
                return self.long_bytes().map(drop).ok_or("truncated field value");
            }
            _ => return Err("unknown field value type"),
        };
        self.take(fixed_len)
            .map(drop)
            .ok_or("truncated field value")
    }
}

/// Cuts a peer-supplied string to [`ECHO_MAX_BYTES`] on a character boundary and replaces
/// control characters, so it can be echoed in a reply text and a log line safely.
fn echo(text: &str) -> String {
    let mut end = text.len().min(ECHO_MAX_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut echoed: String = text[..end]
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if end < text.len() {
        echoed.push_str("...");
    }
    echoed
}

/// Checks that `name` can be a user: non-empty, at most [`USER_NAME_MAX_BYTES`] bytes, no
/// `:`, whitespace or control characters (the users file's separators), not starting with `#`
/// (the users file's comments).
pub fn validate_user_name(name: &str) -> Result<(), AuthError> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name.len() > USER_NAME_MAX_BYTES {
        "it is longer than 255 bytes"
    } else if name.contains(':') {
        "it contains ':'"
    } else if name.chars().any(char::is_whitespace) {
        "it contains whitespace"
    } else if name.chars().any(char::is_control) {
        "it contains a control character"
    } else if name.starts_with('#') {
        "it starts with '#'"
    } else {
        return Ok(());
    };
    Err(AuthError::InvalidUserName {
        name: echo(name),
        reason,
    })
}

/// A salted PBKDF2-HMAC-SHA256 password hash. `Debug` shows only the iteration count.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct PasswordHash {
    pub(crate) iterations: u32,
    pub(crate) salt: [u8; SALT_LEN],
    pub(crate) derived_key: [u8; DERIVED_KEY_LEN],
}

impl PasswordHash {
    /// Hashes `password` with a fresh random salt.
    fn new(password: &str, iterations: u32) -> PasswordHash {
        // `rand::random` draws from the thread-local ChaCha generator seeded by the OS.
        let salt: [u8; SALT_LEN] = rand::random();
        PasswordHash {
            iterations,
            salt,
            derived_key: derive_key(password, &salt, iterations),
        }
    }

    /// Compares in constant time, so the time taken says nothing about where keys differ.
    fn matches(&self, password: &str) -> bool {
        let candidate = derive_key(password, &self.salt, self.iterations);
        let difference = candidate
            .iter()
            .zip(&self.derived_key)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(difference) == 0
    }
}

impl fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PasswordHash")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

fn derive_key(password: &str, salt: &[u8], iterations: u32) -> [u8; DERIVED_KEY_LEN] {
    let mut key = [0u8; DERIVED_KEY_LEN];
    pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), salt, iterations, &mut key);
    key
}

/// One user's stored state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UserRecord {
    pub(crate) hash: PasswordHash,
    pub(crate) admin: bool,
    pub(crate) ha: bool,
}

impl UserRecord {
    pub(crate) fn tags(&self) -> Vec<Tag> {
        let held = [self.admin, self.ha];
        Tag::ALL
            .into_iter()
            .zip(held)
            .filter_map(|(tag, held)| held.then_some(tag))
            .collect()
    }

    pub(crate) fn set_tags(&mut self, tags: &[Tag]) {
        self.admin = tags.contains(&Tag::Admin);
        self.ha = tags.contains(&Tag::Ha);
    }
}

/// The iteration count a [`UserDb`] uses for new hashes.
#[derive(Debug, Clone, Copy)]
struct Iterations(u32);

impl Default for Iterations {
    fn default() -> Self {
        Iterations(PBKDF2_ITERATIONS)
    }
}

/// The users known to the broker: names, password hashes and tags.
///
/// Clones share one set of users (an `Arc` inside), so the copy held by the broker sees every
/// change made through another clone, at run time. Hashing happens outside the lock: a login
/// never holds up changes, nor a change logins. `UserDb::default()` has no users.
#[derive(Debug, Default, Clone)]
pub struct UserDb {
    users: Arc<RwLock<BTreeMap<String, UserRecord>>>,
    iterations: Iterations,
}

impl UserDb {
    /// A database with no users.
    pub fn new() -> UserDb {
        UserDb::default()
    }

    /// A database holding only `guest` (password `guest`, tags `admin` and `ha`).
    ///
    /// Its hash is computed once and for all (at [`PBKDF2_ITERATIONS`], with a fixed salt),
    /// so a fresh broker starts without hashing, which matters in unoptimised builds where
    /// one hash takes half a second. A fixed salt hides nothing less: the password is public.
    pub fn with_default_guest() -> UserDb {
        let record = UserRecord {
            hash: PasswordHash {
                iterations: PBKDF2_ITERATIONS,
                salt: DEFAULT_GUEST_SALT,
                derived_key: DEFAULT_GUEST_KEY,
            },
            admin: true,
            ha: true,
        };
        let db = UserDb::new();
        db.insert_record(GUEST_USER.to_owned(), record)
            .expect("the default guest is a valid user of an empty database");
        db
    }

    /// A database that hashes new passwords with `iterations` (tests use a low count, since
    /// PBKDF2 is slow without optimisation).
    #[cfg(test)]
    pub(crate) fn with_iterations(iterations: u32) -> UserDb {
        UserDb {
            users: Arc::default(),
            iterations: Iterations(iterations),
        }
    }

    /// Adds a user; an existing name is [`AuthError::UserExists`] (see [`UserDb::set_password`]).
    pub fn add_user(&self, name: &str, password: &str, tags: &[Tag]) -> Result<(), AuthError> {
        validate_user_name(name)?;
        let hash = self.hash_new_password(password)?;
        let mut record = UserRecord {
            hash,
            admin: false,
            ha: false,
        };
        record.set_tags(tags);
        self.insert_record(name.to_owned(), record)
    }

    /// Gives an existing user a new password (with a new salt and the current cost).
    pub fn set_password(&self, name: &str, password: &str) -> Result<(), AuthError> {
        let hash = self.hash_new_password(password)?;
        self.update(name, |record| record.hash = hash)
    }

    /// Replaces an existing user's tags.
    pub fn set_tags(&self, name: &str, tags: &[Tag]) -> Result<(), AuthError> {
        self.update(name, |record| record.set_tags(tags))
    }

    /// Removes a user. Connections it has open stay open.
    pub fn delete_user(&self, name: &str) -> Result<(), AuthError> {
        match self.users.write().remove(name) {
            Some(_) => Ok(()),
            None => Err(AuthError::NoSuchUser(echo(name))),
        }
    }

    /// Every user with its tag names, sorted by user name.
    pub fn list(&self) -> Vec<(String, Vec<String>)> {
        self.users
            .read()
            .iter()
            .map(|(name, record)| {
                let tags = record.tags().iter().map(|tag| tag.to_string()).collect();
                (name.clone(), tags)
            })
            .collect()
    }

    /// The principal for `name` if `password` is its password. An unknown user costs the
    /// same hashing as a known one, so response times do not reveal which users exist.
    pub fn verify(&self, name: &str, password: &str) -> Option<Principal> {
        let found = self.users.read().get(name).cloned();
        let Some(record) = found else {
            let burned = derive_key(password, &[0u8; SALT_LEN], self.iterations.0);
            std::hint::black_box(burned);
            return None;
        };
        record.hash.matches(password).then(|| Principal {
            user: name.to_owned(),
            admin: record.admin,
            ha: record.ha,
        })
    }

    /// Replaces every user with those of `other` at once (for reloading the users file while
    /// the broker runs). Open connections keep the principal they logged in with.
    pub fn replace_all(&self, other: &UserDb) {
        let fresh = other.users.read().clone();
        *self.users.write() = fresh;
    }

    /// Every user's stored state, sorted by name (for the users file).
    pub(crate) fn records(&self) -> Vec<(String, UserRecord)> {
        let users = self.users.read();
        users
            .iter()
            .map(|(name, record)| (name.clone(), record.clone()))
            .collect()
    }

    /// Adds a user from stored state (for the users file).
    pub(crate) fn insert_record(&self, name: String, record: UserRecord) -> Result<(), AuthError> {
        validate_user_name(&name)?;
        let mut users = self.users.write();
        if users.contains_key(&name) {
            return Err(AuthError::UserExists(echo(&name)));
        }
        users.insert(name, record);
        Ok(())
    }

    fn hash_new_password(&self, password: &str) -> Result<PasswordHash, AuthError> {
        if password.is_empty() {
            return Err(AuthError::EmptyPassword);
        }
        Ok(PasswordHash::new(password, self.iterations.0))
    }

    fn update(&self, name: &str, change: impl FnOnce(&mut UserRecord)) -> Result<(), AuthError> {
        match self.users.write().get_mut(name) {
            Some(record) => {
                change(record);
                Ok(())
            }
            None => Err(AuthError::NoSuchUser(echo(name))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Low enough to keep unoptimised tests fast; the cost itself is measured separately.
    const TEST_ITERATIONS: u32 = PBKDF2_ITERATIONS_MIN;

    fn loopback() -> SocketAddr {
        "127.0.0.1:5672".parse().unwrap()
    }

    fn remote() -> SocketAddr {
        "192.0.2.7:40000".parse().unwrap()
    }

    fn plain(user: &str, password: &str) -> Vec<u8> {
        format!("\0{user}\0{password}").into_bytes()
    }

    fn long_string_entry(key: &str, kind: u8, value: &[u8]) -> Vec<u8> {
        let mut entry = vec![key.len() as u8];
        entry.extend_from_slice(key.as_bytes());
        entry.push(kind);
        if kind == b's' {
            entry.push(value.len() as u8);
        } else {
            entry.extend_from_slice(&(value.len() as u32).to_be_bytes());
        }
        entry.extend_from_slice(value);
        entry
    }

    fn amqplain(user: &str, password: &str) -> Vec<u8> {
        let mut table = long_string_entry("LOGIN", b'S', user.as_bytes());
        table.extend(long_string_entry("PASSWORD", b'S', password.as_bytes()));
        table
    }

    /// A database with guest/guest (both tags), alice/secret (admin) and bob/hunter2 (none).
    fn test_db() -> UserDb {
        let db = UserDb::with_iterations(TEST_ITERATIONS);
        db.add_user(GUEST_USER, "guest", &Tag::ALL).unwrap();
        db.add_user("alice", "secret", &[Tag::Admin]).unwrap();
        db.add_user("bob", "hunter2", &[]).unwrap();
        db
    }

    #[test]
    fn pbkdf2_matches_the_published_sha256_test_vectors() {
        let hex = |key: [u8; 32]| key.iter().map(|b| format!("{b:02x}")).collect::<String>();
        assert_eq!(
            hex(derive_key("password", b"salt", 1)),
            "120fb6cffcf8b32c43e7225256c4f837a86548c92ccc35480805987cb70be17b"
        );
        assert_eq!(
            hex(derive_key("password", b"salt", 4096)),
            "c5e478d59288c841aa530db6845c4c8d962893a001ce4e11a4963873aa98134a"
        );
    }

    #[test]
    fn hashes_are_salted_and_verified_in_constant_shape() {
        let first = PasswordHash::new("secret", TEST_ITERATIONS);
        let second = PasswordHash::new("secret", TEST_ITERATIONS);
        assert_ne!(first.salt, second.salt);
        assert_ne!(first.derived_key, second.derived_key);
        assert!(first.matches("secret"));
        assert!(!first.matches("secreT"));
        assert!(!first.matches(""));
        // Debug shows the cost only: neither the salt nor the key, in any form.
        assert_eq!(
            format!("{first:?}"),
            format!("PasswordHash {{ iterations: {TEST_ITERATIONS}, .. }}")
        );
    }

    #[test]
    fn default_guest_has_both_tags_and_the_default_cost() {
        // Verifying at the full cost takes about half a second unoptimised; once is enough.
        let db = UserDb::with_default_guest();
        let guest = &db.records()[0].1.hash;
        assert_eq!(
            guest.derived_key,
            derive_key("guest", &guest.salt, guest.iterations)
        );
        assert_eq!(
            db.list(),
            vec![(
                "guest".to_owned(),
                vec!["admin".to_owned(), "ha".to_owned()]
            )]
        );
        assert_eq!(db.records()[0].1.hash.iterations, PBKDF2_ITERATIONS);
        assert_eq!(
            db.verify("guest", "guest"),
            Some(Principal::trusted("guest"))
        );
    }

    #[test]
    fn user_management() {
        let db = test_db();
        assert_eq!(
            db.add_user("alice", "other", &[]),
            Err(AuthError::UserExists("alice".into()))
        );
        assert_eq!(db.add_user("carol", "", &[]), Err(AuthError::EmptyPassword));
        assert_eq!(
            db.verify("alice", "secret"),
            Some(Principal {
                user: "alice".into(),
                admin: true,
                ha: false
            })
        );
        db.set_password("alice", "new secret").unwrap();
        assert_eq!(db.verify("alice", "secret"), None);
        assert!(db.verify("alice", "new secret").is_some());
        db.set_tags("bob", &[Tag::Ha]).unwrap();
        assert_eq!(
            db.verify("bob", "hunter2").map(|p| (p.admin, p.ha)),
            Some((false, true))
        );
        db.delete_user("bob").unwrap();
        assert_eq!(db.verify("bob", "hunter2"), None);
        assert_eq!(
            db.delete_user("bob"),
            Err(AuthError::NoSuchUser("bob".into()))
        );
        assert_eq!(
            db.set_password("bob", "x"),
            Err(AuthError::NoSuchUser("bob".into()))
        );
        assert_eq!(
            db.set_tags("bob", &[]),
            Err(AuthError::NoSuchUser("bob".into()))
        );
        let names: Vec<String> = db.list().into_iter().map(|(name, _)| name).collect();
        assert_eq!(names, ["alice", "guest"]);
    }

    #[test]
    fn clones_share_users_and_replace_all_swaps_them() {
        let db = test_db();
        let held_by_broker = db.clone();
        db.delete_user("bob").unwrap();
        assert_eq!(held_by_broker.verify("bob", "hunter2"), None);

        let reloaded = UserDb::with_iterations(TEST_ITERATIONS);
        reloaded.add_user("dave", "pw", &[Tag::Ha]).unwrap();
        held_by_broker.replace_all(&reloaded);
        assert!(db.verify("dave", "pw").is_some());
        assert_eq!(db.verify("alice", "secret"), None);
    }

    #[test]
    fn user_names_are_validated() {
        let db = UserDb::with_iterations(TEST_ITERATIONS);
        for (name, reason) in [
            ("", "it is empty"),
            ("a:b", "it contains ':'"),
            ("a b", "it contains whitespace"),
            ("a\tb", "it contains whitespace"),
            ("a\u{0}b", "it contains a control character"),
            ("#root", "it starts with '#'"),
        ] {
            match db.add_user(name, "pw", &[]) {
                Err(AuthError::InvalidUserName { reason: got, .. }) => assert_eq!(got, reason),
                other => panic!("{name:?}: {other:?}"),
            }
        }
        let long = "x".repeat(USER_NAME_MAX_BYTES + 1);
        assert!(db.add_user(&long, "pw", &[]).is_err());
        db.add_user(&long[1..], "pw", &[]).unwrap();
        db.add_user("josé@example.com", "pw", &[]).unwrap();
        assert!(db.verify("josé@example.com", "pw").is_some());
    }

    #[test]
    fn tags_parse_and_unknown_tags_list_the_valid_ones() {
        assert_eq!(Tag::parse_list("admin,ha"), Ok(vec![Tag::Admin, Tag::Ha]));
        assert_eq!(
            Tag::parse_list(" ha , admin,ha"),
            Ok(vec![Tag::Ha, Tag::Admin])
        );
        assert_eq!(Tag::parse_list(""), Ok(vec![]));
        let from_options = vec!["ha".to_owned(), "admin".to_owned()];
        assert_eq!(Tag::parse_all(&from_options), Ok(vec![Tag::Ha, Tag::Admin]));
        assert!(Tag::parse_all(["admin", "root"]).is_err());
        let error = Tag::parse_list("admin,root").unwrap_err();
        assert_eq!(
            error.to_string(),
            "unknown tag 'root'; valid tags are: admin, ha"
        );
        let listed: Vec<&str> = Tag::ALL.iter().map(|tag| tag.as_str()).collect();
        assert!(error.to_string().ends_with(&listed.join(", ")));
    }

    #[test]
    fn plain_responses() {
        assert_eq!(
            parse_sasl_response("PLAIN", b"\0guest\0guest"),
            Ok(Credentials::Password {
                authzid: None,
                user: "guest".into(),
                password: "guest".into()
            })
        );
        assert_eq!(
            parse_sasl_response("PLAIN", b"admin\0bob\0pw"),
            Ok(Credentials::Password {
                authzid: Some("admin".into()),
                user: "bob".into(),
                password: "pw".into()
            })
        );
        assert_eq!(
            parse_sasl_response("PLAIN", b"\0\0"),
            Ok(Credentials::Password {
                authzid: None,
                user: String::new(),
                password: String::new()
            })
        );
    }

    #[test]
    fn malformed_plain_responses_are_errors() {
        for response in [
            &b""[..],
            b"guest",
            b"guest\0guest",
            b"\0a\0b\0c",
            b"\0\xff\xfe\0pw",
            b"\0user\0\xc3",
            b"\xff\0user\0pw",
        ] {
            match parse_sasl_response("PLAIN", response) {
                Err(AuthError::MalformedResponse { mechanism, .. }) => {
                    assert_eq!(mechanism, "PLAIN")
                }
                other => panic!("{response:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn amqplain_responses() {
        let expected = Ok(Credentials::Password {
            authzid: None,
            user: "guest".into(),
            password: "pa\0ss".into(),
        });
        assert_eq!(
            parse_sasl_response("AMQPLAIN", &amqplain("guest", "pa\0ss")),
            expected
        );

        // Short strings, the other order, and unrelated entries (a nested table, an int).
        let mut table = long_string_entry("PASSWORD", b's', b"pa\0ss");
        table.extend(long_string_entry("extra", b'F', &[1, b'k', b'V']));
        table.extend([1, b'n', b's', 0, 7]);
        table.extend(long_string_entry("LOGIN", b's', b"guest"));
        assert_eq!(parse_sasl_response("AMQPLAIN", &table), expected);
    }

    #[test]
    fn responses_from_the_amq_protocol_client_encoder_parse() {
        // lapin builds its responses with these; they are the oracle for what clients send.
        use amq_protocol::auth::{Credentials as ClientCredentials, SASLMechanism};
        let client = ClientCredentials::new("alice".into(), "s3cr\u{e9}t".into());
        let expected = Ok(Credentials::Password {
            authzid: None,
            user: "alice".into(),
            password: "s3cr\u{e9}t".into(),
        });
        for (mechanism, name) in [
            (SASLMechanism::Plain, "PLAIN"),
            (SASLMechanism::AMQPlain, "AMQPLAIN"),
        ] {
            let response = client.sasl_auth_string(mechanism);
            assert_eq!(parse_sasl_response(name, response.as_bytes()), expected);
        }
        let anonymous = client.sasl_auth_string(SASLMechanism::Anonymous);
        assert_eq!(
            parse_sasl_response("ANONYMOUS", anonymous.as_bytes()),
            Ok(Credentials::Anonymous)
        );
    }

    #[test]
    fn malformed_amqplain_responses_are_errors() {
        let full = amqplain("guest", "guest");
        let mut cases: Vec<Vec<u8>> = (0..full.len()).map(|len| full[..len].to_vec()).collect();
        cases.push(long_string_entry("LOGIN", b'S', b"guest"));
        cases.push(long_string_entry("PASSWORD", b'S', b"guest"));
        let mut twice = full.clone();
        twice.extend(long_string_entry("LOGIN", b'S', b"other"));
        cases.push(twice);
        let mut not_utf8 = long_string_entry("LOGIN", b'S', b"\xff");
        not_utf8.extend(long_string_entry("PASSWORD", b'S', b"x"));
        cases.push(not_utf8);
        let mut integer_login = vec![5, b'L', b'O', b'G', b'I', b'N', b'I', 0, 0, 0, 1];
        integer_login.extend(long_string_entry("PASSWORD", b'S', b"x"));
        cases.push(integer_login);
        let mut unknown_type = full.clone();
        unknown_type.extend([1, b'k', b'?', 0]);
        cases.push(unknown_type);
        let mut huge_length = vec![
            5, b'L', b'O', b'G', b'I', b'N', b'S', 0xff, 0xff, 0xff, 0xff,
        ];
        huge_length.extend_from_slice(b"guest");
        cases.push(huge_length);
        let mut huge_skip = full.clone();
        huge_skip.extend([1, b'k', b'F', 0xff, 0xff, 0xff, 0xff, 0]);
        cases.push(huge_skip);
        for response in cases {
            match parse_sasl_response("AMQPLAIN", &response) {
                Err(AuthError::MalformedResponse { mechanism, .. }) => {
                    assert_eq!(mechanism, "AMQPLAIN")
                }
                other => panic!("{response:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn deeply_nested_tables_in_amqplain_are_skipped_without_recursion() {
        // A table nested 20,000 deep would overflow a recursive parser's stack.
        let mut nested: Vec<u8> = Vec::new();
        for _ in 0..20_000 {
            let mut outer = vec![1, b'n', b'F'];
            outer.extend_from_slice(&(nested.len() as u32).to_be_bytes());
            outer.extend(nested);
            nested = outer;
        }
        nested.extend(amqplain("guest", "guest"));
        assert!(parse_sasl_response("AMQPLAIN", &nested).is_ok());
    }

    #[test]
    fn anonymous_ignores_its_trace_text() {
        assert_eq!(
            parse_sasl_response("ANONYMOUS", b""),
            Ok(Credentials::Anonymous)
        );
        assert_eq!(
            parse_sasl_response("ANONYMOUS", b"\xff\0trace"),
            Ok(Credentials::Anonymous)
        );
    }

    #[test]
    fn credentials_debug_hides_the_password() {
        let credentials = parse_sasl_response("PLAIN", b"\0alice\0hunter2").unwrap();
        let shown = format!("{credentials:?}");
        assert!(
            shown.contains("alice") && !shown.contains("hunter2"),
            "{shown}"
        );
    }

    #[test]
    fn mechanisms_offered() {
        assert_eq!(mechanisms(true), "PLAIN AMQPLAIN");
        assert_eq!(mechanisms(false), "PLAIN AMQPLAIN ANONYMOUS");
        for name in mechanisms(false).split(' ') {
            assert_eq!(Mechanism::from_name(name).map(Mechanism::name), Some(name));
        }
        assert_eq!(Mechanism::from_name("plain"), None);
    }

    #[test]
    fn with_auth_off_everyone_is_trusted() {
        let db = UserDb::new();
        let cases: [(&str, Vec<u8>, &str); 5] = [
            ("PLAIN", plain("nobody", "wrong"), "nobody"),
            ("PLAIN", plain("", ""), ANONYMOUS_USER),
            ("AMQPLAIN", amqplain("someone", "x"), "someone"),
            ("ANONYMOUS", Vec::new(), ANONYMOUS_USER),
            ("PLAIN", plain("guest", "not guest"), "guest"),
        ];
        for (mechanism, response, user) in cases {
            assert_eq!(
                authenticate(&db, false, mechanism, &response, remote()),
                Ok(Principal::trusted(user))
            );
        }
        assert!(matches!(
            authenticate(&db, false, "CRAM-MD5", b"", loopback()),
            Err(AuthError::UnsupportedMechanism {
                offered: "PLAIN AMQPLAIN ANONYMOUS",
                ..
            })
        ));
        assert!(matches!(
            authenticate(&db, false, "PLAIN", b"no nul", loopback()),
            Err(AuthError::MalformedResponse { .. })
        ));
    }

    #[test]
    fn with_auth_on_passwords_and_tags_decide() {
        let db = test_db();
        assert_eq!(
            authenticate(&db, true, "PLAIN", &plain("alice", "secret"), remote()),
            Ok(Principal {
                user: "alice".into(),
                admin: true,
                ha: false
            })
        );
        assert_eq!(
            authenticate(&db, true, "AMQPLAIN", &amqplain("bob", "hunter2"), remote()),
            Ok(Principal {
                user: "bob".into(),
                admin: false,
                ha: false
            })
        );
        assert_eq!(
            authenticate(&db, true, "PLAIN", b"alice\0alice\0secret", remote())
                .map(|principal| principal.user),
            Ok("alice".into())
        );
    }

    #[test]
    fn with_auth_on_refusals() {
        let db = test_db();
        let wrong_password = authenticate(&db, true, "PLAIN", &plain("alice", "nope"), remote());
        let unknown_user = authenticate(&db, true, "PLAIN", &plain("mallory", "nope"), remote());
        assert_eq!(
            wrong_password,
            Err(AuthError::LoginRefused {
                user: "alice".into()
            })
        );
        assert_eq!(
            unknown_user,
            Err(AuthError::LoginRefused {
                user: "mallory".into()
            })
        );
        let text = |result: Result<Principal, AuthError>| result.unwrap_err().to_string();
        assert_eq!(
            text(wrong_password).replace("alice", "X"),
            text(unknown_user).replace("mallory", "X")
        );
        assert_eq!(
            authenticate(&db, true, "PLAIN", &plain("", ""), remote()),
            Err(AuthError::LoginRefused {
                user: String::new()
            })
        );
        assert_eq!(
            authenticate(&db, true, "ANONYMOUS", b"", loopback()),
            Err(AuthError::AnonymousRefused)
        );
        assert_eq!(
            authenticate(&db, true, "EXTERNAL", b"", loopback()),
            Err(AuthError::UnsupportedMechanism {
                mechanism: "EXTERNAL".into(),
                offered: "PLAIN AMQPLAIN"
            })
        );
        assert_eq!(
            authenticate(&db, true, "PLAIN", b"bob\0alice\0secret", loopback()),
            Err(AuthError::AuthzidRefused {
                authzid: "bob".into()
            })
        );
        assert!(matches!(
            authenticate(&db, true, "AMQPLAIN", b"\x05LOG", loopback()),
            Err(AuthError::MalformedResponse { .. })
        ));
    }

    #[test]
    fn guest_only_from_loopback_with_auth_on() {
        let db = test_db();
        for peer in [
            "127.0.0.1:1",
            "127.9.9.9:1",
            "[::1]:1",
            "[::ffff:127.0.0.1]:1",
        ] {
            let peer: SocketAddr = peer.parse().unwrap();
            assert_eq!(
                authenticate(&db, true, "PLAIN", &plain("guest", "guest"), peer),
                Ok(Principal::trusted("guest")),
                "{peer}"
            );
        }
        for peer in ["192.0.2.7:1", "[2001:db8::1]:1", "[::ffff:192.0.2.7]:1"] {
            let peer: SocketAddr = peer.parse().unwrap();
            let refused = authenticate(&db, true, "AMQPLAIN", &amqplain("guest", "guest"), peer);
            let error = refused.unwrap_err();
            assert_eq!(error, AuthError::GuestNotLoopback { peer: peer.ip() });
            assert!(error.to_string().contains("loopback"), "{error}");
        }
        // The loopback rule says nothing about the password: it is refused either way.
        assert_eq!(
            authenticate(&db, true, "PLAIN", &plain("guest", "wrong"), remote()),
            Err(AuthError::GuestNotLoopback {
                peer: remote().ip()
            })
        );
    }

    #[test]
    fn error_texts_fit_a_reply_text_and_escape_control_characters() {
        let db = test_db();
        let huge = "\u{1F600}\n".repeat(500);
        let responses: [(&str, Vec<u8>); 4] = [
            (huge.as_str(), Vec::new()),
            ("PLAIN", plain(&huge, "x")),
            ("PLAIN", format!("{huge}\0alice\0secret").into_bytes()),
            ("AMQPLAIN", b"\x05LOGIN?".to_vec()),
        ];
        for (mechanism, response) in responses {
            let text = authenticate(&db, true, mechanism, &response, remote())
                .unwrap_err()
                .to_string();
            assert!(text.len() <= 255, "{} bytes: {text}", text.len());
            assert!(!text.contains('\n'), "{text}");
        }
        let ipv6: SocketAddr = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:1"
            .parse()
            .unwrap();
        let error = authenticate(&db, true, "PLAIN", &plain("guest", "guest"), ipv6).unwrap_err();
        assert!(error.to_string().len() <= 255);
        for name in ["", ":", &huge] {
            let error = db.add_user(name, "pw", &[]).unwrap_err().to_string();
            assert!(error.len() <= 255, "{error}");
        }
    }

    /// Run with `cargo test --release -p broker-core measure_pbkdf2_cost -- --ignored
    /// --nocapture` to see what one verification costs at [`PBKDF2_ITERATIONS`].
    #[test]
    #[ignore = "a measurement, meaningful only in a release build"]
    fn measure_pbkdf2_cost() {
        let db = UserDb::with_default_guest();
        let rounds = 50;
        let started = std::time::Instant::now();
        for _ in 0..rounds {
            assert!(db.verify("guest", "guest").is_some());
        }
        let per_verify = started.elapsed() / rounds;
        println!("{PBKDF2_ITERATIONS} iterations: {per_verify:?} per verification");
    }
}
