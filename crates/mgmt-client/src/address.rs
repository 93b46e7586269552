//! Broker addresses as operators type them: Qpid's `[user[/password]@]host[:port]` and
//! `amqp://user:pass@host:port/vhost` URLs. Not a general URL parser: only what a management
//! connection needs.

use crate::Error;

/// The port a broker listens on when an address names none.
pub const DEFAULT_PORT: u16 = 5672;

/// Where and as whom to connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerAddress {
    pub user: String,
    pub password: String,
    pub host: String,
    pub port: u16,
    pub vhost: String,
}

impl Default for BrokerAddress {
    fn default() -> Self {
        BrokerAddress {
            user: "guest".into(),
            password: "guest".into(),
            host: "localhost".into(),
            port: DEFAULT_PORT,
            vhost: "/".into(),
        }
    }
}

impl BrokerAddress {
    /// Parses either form; an empty string is the default address (`guest/guest@localhost:5672`).
    pub fn parse(text: &str) -> Result<BrokerAddress, Error> {
        let text = text.trim();
        if let Some(rest) = text.strip_prefix("amqp://") {
            return parse_url(rest);
        }
        if text.contains("://") {
            return Err(Error::InvalidAddress(format!(
                "unsupported scheme in '{text}' (use amqp:// or host:port)"
            )));
        }
        let mut address = BrokerAddress::default();
        let host_port = match text.rsplit_once('@') {
            Some((credentials, host_port)) => {
                match credentials.split_once('/') {
                    Some((user, password)) => {
                        address.user = user.into();
                        address.password = password.into();
                    }
                    None => address.user = credentials.into(),
                }
                host_port
            }
            None => text,
        };
        parse_host_port(host_port, &mut address, text)?;
        Ok(address)
    }

    /// `amqp://user:password@host:port/vhost`, percent-encoded where needed.
    pub fn to_url(&self) -> String {
        format!(
            "amqp://{}:{}@{}:{}/{}",
            percent_encode(&self.user),
            percent_encode(&self.password),
            self.host,
            self.port,
            percent_encode(&self.vhost)
        )
    }
}

fn parse_url(rest: &str) -> Result<BrokerAddress, Error> {
    let mut address = BrokerAddress::default();
    let (authority, vhost) = match rest.split_once('/') {
        Some((authority, vhost)) => (authority, Some(vhost)),
        None => (rest, None),
    };
    if let Some(vhost) = vhost.filter(|v| !v.is_empty()) {
        address.vhost = percent_decode(vhost)?;
    }
    let host_port = match authority.rsplit_once('@') {
        Some((credentials, host_port)) => {
            match credentials.split_once(':') {
                Some((user, password)) => {
                    address.user = percent_decode(user)?;
                    address.password = percent_decode(password)?;
                }
                None => address.user = percent_decode(credentials)?,
            }
            host_port
        }
        None => authority,
    };
    parse_host_port(host_port, &mut address, rest)?;
    Ok(address)
}

fn parse_host_port(text: &str, address: &mut BrokerAddress, whole: &str) -> Result<(), Error> {
    let invalid = |why: &str| Error::InvalidAddress(format!("'{whole}': {why}"));
    // An IPv6 literal is bracketed: [::1]:5672.
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| invalid("unclosed '['"))?;
        (host, after.strip_prefix(':'))
    } else {
        match text.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        }
    };
    if !host.is_empty() {
        address.host = host.into();
    }
    if let Some(port) = port {
        address.port = port
            .parse()
            .map_err(|_| invalid(&format!("bad port '{port}'")))?;
    }
    Ok(())
}

fn percent_decode(text: &str) -> Result<String, Error> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| Error::InvalidAddress(format!("bad escape in '{text}'")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| Error::InvalidAddress(format!("not UTF-8: '{text}'")))
}

fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(user: &str, password: &str, host: &str, port: u16, vhost: &str) -> BrokerAddress {
        BrokerAddress {
            user: user.into(),
            password: password.into(),
            host: host.into(),
            port,
            vhost: vhost.into(),
        }
    }

    #[test]
    fn qpid_form_with_and_without_credentials() {
        assert_eq!(BrokerAddress::parse("").unwrap(), BrokerAddress::default());
        assert_eq!(
            BrokerAddress::parse("10.1.1.7:10000").unwrap(),
            address("guest", "guest", "10.1.1.7", 10000, "/")
        );
        assert_eq!(
            BrokerAddress::parse("bob/secret@broker-host").unwrap(),
            address("bob", "secret", "broker-host", 5672, "/")
        );
        assert_eq!(
            BrokerAddress::parse("bob@h:1").unwrap(),
            address("bob", "guest", "h", 1, "/")
        );
        assert_eq!(
            BrokerAddress::parse("[::1]:7").unwrap(),
            address("guest", "guest", "::1", 7, "/")
        );
        assert!(BrokerAddress::parse("h:notaport").is_err());
    }

    #[test]
    fn amqp_urls() {
        assert_eq!(
            BrokerAddress::parse("amqp://u:p%40ss@127.0.0.1:5673/%2f").unwrap(),
            address("u", "p@ss", "127.0.0.1", 5673, "/")
        );
        assert_eq!(
            BrokerAddress::parse("amqp://host").unwrap(),
            address("guest", "guest", "host", 5672, "/")
        );
        assert!(BrokerAddress::parse("http://host").is_err());
        assert_eq!(
            address("u", "p@ss", "h", 1, "/").to_url(),
            "amqp://u:p%40ss@h:1/%2F"
        );
    }
}
