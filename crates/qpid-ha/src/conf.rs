//! `--config qpidd.conf`: connection defaults from the broker's config file, as Qpid's
//! `parse_qpidd_conf` reads them (QPID-5711): `#` starts a comment, each `name=value` line is
//! a setting, and `QPID_<NAME>` environment variables override the file (`QPID_HA_USERNAME`
//! is `ha-username`). Command-line values win over both. Defaults taken: `ha-username`,
//! `ha-password`, `port`, `ha-mechanism`, and the timeout from `ha-heartbeat-interval` or
//! `link-heartbeat-interval`.

use std::collections::HashMap;
use std::path::Path;

use mgmt_client::BrokerAddress;

/// Reads the file and overlays the environment.
pub fn read(path: &Path) -> Result<HashMap<String, String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
    let mut settings = parse(&text);
    for (name, value) in std::env::vars() {
        if let Some(rest) = name.strip_prefix("QPID_") {
            settings.insert(rest.to_ascii_lowercase().replace('_', "-"), value);
        }
    }
    Ok(settings)
}

fn parse(text: &str) -> HashMap<String, String> {
    text.lines()
        .map(|line| line.split('#').next().unwrap_or_default().trim())
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// The timeout Qpid's tool takes from the file when `--timeout` is absent:
/// `ha-heartbeat-interval`, else `link-heartbeat-interval`, in seconds (`5`, `5s`, `500ms`).
pub fn timeout(settings: &HashMap<String, String>) -> Result<Option<f64>, String> {
    let Some((name, text)) = ["ha-heartbeat-interval", "link-heartbeat-interval"]
        .iter()
        .find_map(|k| settings.get(*k).filter(|v| !v.is_empty()).map(|v| (*k, v)))
    else {
        return Ok(None);
    };
    let t = text.trim();
    let seconds = if let Some(ms) = t.strip_suffix("ms") {
        ms.trim().parse::<f64>().map(|v| v / 1000.0)
    } else {
        t.strip_suffix('s').unwrap_or(t).trim().parse::<f64>()
    };
    match seconds {
        Ok(v) if v >= 0.0 && v.is_finite() => Ok(Some(v)),
        _ => Err(format!("invalid {name} '{text}' in the config file")),
    }
}

/// True if the address as typed names a port.
fn has_port(text: &str) -> bool {
    let rest = text.trim();
    let rest = rest.strip_prefix("amqp://").unwrap_or(rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let rest = rest.split('/').next().unwrap_or_default();
    match rest.strip_prefix('[') {
        Some(v6) => v6.contains("]:"),
        None => rest.contains(':'),
    }
}

/// Fills what the command line left out: user and password (`ha-username`, `ha-password`)
/// unless the address has credentials, the port (`port`) unless the address has one, and the
/// SASL mechanism (`ha-mechanism`) unless `--sasl-mechanism` was given.
pub fn apply(
    settings: &HashMap<String, String>,
    typed: &str,
    address: &mut BrokerAddress,
    mechanism: &mut Option<String>,
) -> Result<(), String> {
    let get = |k: &str| settings.get(k).filter(|v| !v.is_empty());
    if !typed.contains('@') {
        if let Some(user) = get("ha-username") {
            address.user = user.clone();
        }
        if let Some(password) = get("ha-password") {
            address.password = password.clone();
        }
    }
    if !has_port(typed)
        && let Some(port) = get("port")
    {
        address.port = port
            .parse()
            .map_err(|_| format!("invalid port '{port}' in the config file"))?;
    }
    if mechanism.is_none()
        && let Some(m) = get("ha-mechanism")
    {
        *mechanism = Some(m.clone());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_qpidd_conf_lines() {
        let s = parse("# c\nha-username = u # user\nha-password=p\n\nport=5999\nauth\n");
        assert_eq!(s["ha-username"], "u");
        assert_eq!(s["ha-password"], "p");
        assert_eq!(s["port"], "5999");
        assert!(!s.contains_key("auth"));
    }

    #[test]
    fn command_line_values_win() {
        let s = parse("ha-username=u\nha-password=p\nport=5999\nha-mechanism=PLAIN\n");
        let mut a = BrokerAddress::parse("x/y@h:1").unwrap();
        let mut m = Some("AMQPLAIN".to_string());
        apply(&s, "x/y@h:1", &mut a, &mut m).unwrap();
        assert_eq!(
            (a.user.as_str(), a.port, m.as_deref()),
            ("x", 1, Some("AMQPLAIN"))
        );
        let mut a = BrokerAddress::parse("h").unwrap();
        let mut m = None;
        apply(&s, "h", &mut a, &mut m).unwrap();
        assert_eq!(
            (a.user.as_str(), a.password.as_str(), a.port),
            ("u", "p", 5999)
        );
        assert_eq!(m.as_deref(), Some("PLAIN"));
        assert_eq!(
            timeout(&parse("link-heartbeat-interval=500ms\n")),
            Ok(Some(0.5))
        );
        assert_eq!(
            timeout(&parse(
                "ha-heartbeat-interval=2\nlink-heartbeat-interval=5s\n"
            )),
            Ok(Some(2.0))
        );
        assert_eq!(timeout(&parse("port=1\n")), Ok(None));
        assert!(timeout(&parse("link-heartbeat-interval=soon\n")).is_err());
        assert!(has_port("[::1]:5") && !has_port("[::1]") && has_port("amqp://u:p@h:5/v"));
    }
}
