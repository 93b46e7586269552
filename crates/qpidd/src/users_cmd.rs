//! The user management commands `--user-add NAME [--user-tags TAGS]`, `--user-del NAME` and
//! `--user-list`: they act on the users file in the data dir, then `qpidd` exits.
//!
//! This module does the daemon's share (which file, which user, the password from stdin); the
//! file itself belongs to `broker_core::store::users_file`.

use std::io::{self, BufRead};
use std::path::PathBuf;

use anyhow::{Context, bail};
use broker_core::auth::{AuthError, Tag};
use broker_core::store::users_file::{self, UsersFileError};

use crate::options::Options;

/// The users file: `<data-dir>/users`.
pub fn users_file(options: &Options) -> anyhow::Result<PathBuf> {
    match &options.data_dir {
        Some(dir) => Ok(dir.join("users")),
        None => bail!("user management needs a data directory (--no-data-dir was given)"),
    }
}

/// The password: the first line of `input`, without its line ending. Empty is refused.
pub fn read_password(mut input: impl BufRead) -> anyhow::Result<String> {
    let mut line = String::new();
    input
        .read_line(&mut line)
        .context("cannot read the password from stdin")?;
    let password = line.trim_end_matches(['\n', '\r']).to_string();
    if password.is_empty() {
        bail!("no password on stdin (give it as the first line)");
    }
    Ok(password)
}

fn user_name(options: &Options) -> anyhow::Result<&str> {
    options.user_name.as_deref().context("no user name given")
}

/// `--user-add NAME [--user-tags TAGS]`: adds the user, or replaces the password and tags of
/// an existing one (so provisioning scripts can run it again), with the password read from the
/// first line of stdin.
pub fn user_add(options: &Options) -> anyhow::Result<()> {
    let path = users_file(options)?;
    let name = user_name(options)?;
    let tags = Tag::parse_all(&options.user_tags)?;
    let password = read_password(io::stdin().lock())?;
    match users_file::add_user(&path, name, &password, &tags) {
        Err(UsersFileError::User(AuthError::UserExists(_))) => {
            users_file::set_password(&path, name, &password)?;
            users_file::set_tags(&path, name, &tags)?;
            eprintln!("user '{name}' updated in {}", path.display());
        }
        Err(e) => return Err(e.into()),
        Ok(()) => eprintln!("user '{name}' added to {}", path.display()),
    }
    Ok(())
}

/// `--user-del NAME`: deletes the user.
pub fn user_del(options: &Options) -> anyhow::Result<()> {
    let path = users_file(options)?;
    let name = user_name(options)?;
    users_file::delete_user(&path, name)?;
    eprintln!("user '{name}' deleted from {}", path.display());
    Ok(())
}

/// `--user-list`: prints one user a line: the name, a tab, the tags separated by commas.
pub fn user_list(options: &Options) -> anyhow::Result<()> {
    let path = users_file(options)?;
    for (name, tags) in users_file::list_users(&path)? {
        println!("{name}\t{}", tags.join(","));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_is_the_first_line() {
        assert_eq!(
            read_password("s3cret\nrest\n".as_bytes()).unwrap(),
            "s3cret"
        );
        assert_eq!(read_password("pw\r\n".as_bytes()).unwrap(), "pw");
        assert_eq!(
            read_password("no newline".as_bytes()).unwrap(),
            "no newline"
        );
        assert!(read_password("".as_bytes()).is_err());
        assert!(read_password("\n".as_bytes()).is_err());
    }
}
