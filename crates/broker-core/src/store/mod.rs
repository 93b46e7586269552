//! Everything the broker keeps on disk. Today: the users file.

pub mod users_file;
