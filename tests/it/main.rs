//! Integration tests: real brokers, real clients.
mod smoke;
