//! Users, password hashing and SASL.

/// The users known to the broker.
#[derive(Debug, Default, Clone)]
pub struct UserDb {}
