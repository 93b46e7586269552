//! The users file: see docs/user-guide.md.
