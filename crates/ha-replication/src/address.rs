//! The original's address, as `replicate` and `--start-replica` take it: one address or a
//! list, in Qpid's forms (`host[:port]`, `user/pass@host:port`, `amqp:tcp:h1:p1,tcp:h2:p2`)
//! or as `amqp://user:pass@host:port` URLs, separated by commas.

/// The port when an address names none.
pub const DEFAULT_PORT: u16 = 5672;

/// One address of the original.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// Host name or IP address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Credentials given in the address, if any.
    pub credentials: Option<(String, String)>,
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Parses a comma-separated list of addresses (at least one).
pub fn parse_list(text: &str) -> Result<Vec<Address>, String> {
    let text = text.trim();
    let text = text
        .strip_prefix("amqp:")
        .filter(|r| !r.starts_with("//"))
        .unwrap_or(text);
    let mut out = Vec::new();
    for part in text.split(',') {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        out.push(parse_one(part)?);
    }
    if out.is_empty() {
        return Err("no address given for the original broker".into());
    }
    Ok(out)
}

fn parse_one(text: &str) -> Result<Address, String> {
    let bad = |why: &str| format!("invalid address '{text}': {why}");
    let (rest, url) = match text.strip_prefix("amqp://") {
        Some(r) => (r.trim_end_matches('/'), true),
        None => (text.strip_prefix("tcp:").unwrap_or(text), false),
    };
    let rest = if url {
        rest.split('/').next().unwrap_or(rest)
    } else {
        rest
    };
    let (credentials, hostport) = match rest.rsplit_once('@') {
        Some((creds, hp)) => {
            let sep = if url { ':' } else { '/' };
            let (u, p) = creds.split_once(sep).unwrap_or((creds, ""));
            if u.is_empty() {
                return Err(bad("empty user name"));
            }
            (Some((u.to_string(), p.to_string())), hp)
        }
        None => (None, rest),
    };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad("bad port"))?,
            None if after.is_empty() => DEFAULT_PORT,
            None => return Err(bad("text after ']'")),
        };
        (h.to_string(), port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad("bad port"))?),
            None => (hostport.to_string(), DEFAULT_PORT),
        }
    };
    if host.is_empty() {
        return Err(bad("empty host"));
    }
    Ok(Address {
        host,
        port,
        credentials,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hp(list: &str) -> Vec<String> {
        parse_list(list)
            .unwrap()
            .iter()
            .map(|a| a.to_string())
            .collect()
    }

    #[test]
    fn qpid_forms_and_lists() {
        assert_eq!(hp("node1"), ["node1:5672"]);
        assert_eq!(hp("node1a,node1b:6000"), ["node1a:5672", "node1b:6000"]);
        assert_eq!(hp("amqp:tcp:h1:1001,tcp:h2:1002"), ["h1:1001", "h2:1002"]);
        assert_eq!(hp("[::1]:7000"), ["[::1]:7000"]);
        let a = &parse_list("bob/secret@h:1").unwrap()[0];
        assert_eq!(a.credentials, Some(("bob".into(), "secret".into())));
        let u = &parse_list("amqp://bob:pw@h:2/%2f").unwrap()[0];
        assert_eq!((u.host.as_str(), u.port), ("h", 2));
        assert_eq!(u.credentials, Some(("bob".into(), "pw".into())));
    }

    #[test]
    fn bad_addresses_are_errors() {
        assert!(parse_list("").is_err());
        assert!(parse_list(" , ").is_err());
        assert!(parse_list("h:notaport").is_err());
        assert!(parse_list(":5672").is_err());
        assert!(parse_list("@h").is_err());
    }
}
