//! Object ids (`org.apache.qpid.broker:<class>:<name>`) and the escaping of binding and
//! subscription names (`EXCHANGE/QUEUE/KEY`, where `\` and `/` in the first parts are escaped).

use super::error::MgmtError;

/// The package of every broker class.
pub const PACKAGE: &str = "org.apache.qpid.broker";
/// The broker object's name.
pub const BROKER_NAME: &str = "amqp-broker";

/// The object id of `class` object `name`.
pub fn object_id(class: &str, name: &str) -> String {
    format!("{PACKAGE}:{class}:{name}")
}

/// The id as the `{"_object_name": ...}` map QMF uses for references.
pub fn object_ref(class: &str, name: &str) -> serde_json::Value {
    serde_json::json!({ "_object_name": object_id(class, name) })
}

/// Splits an object id into class and name.
pub fn parse_object_id(id: &str) -> Result<(&str, &str), MgmtError> {
    let rest = id
        .strip_prefix(PACKAGE)
        .and_then(|r| r.strip_prefix(':'))
        .ok_or_else(|| MgmtError::not_found(format!("no object '{id}'")))?;
    rest.split_once(':')
        .ok_or_else(|| MgmtError::not_found(format!("no object '{id}'")))
}

/// Escapes `\` and `/`.
pub fn escape(part: &str) -> String {
    let mut s = String::with_capacity(part.len());
    for c in part.chars() {
        if c == '\\' || c == '/' {
            s.push('\\');
        }
        s.push(c);
    }
    s
}

/// A binding's name: `EXCHANGE/QUEUE/KEY`.
pub fn binding_name(exchange: &str, queue: &str, key: &str) -> String {
    format!("{}/{}/{key}", escape(exchange), escape(queue))
}

/// Splits a binding name into exchange, queue and key.
pub fn parse_binding_name(name: &str) -> Result<(String, String, String), MgmtError> {
    let (exchange, rest) = unescape_part(name).ok_or_else(|| bad_binding(name))?;
    let rest = rest.ok_or_else(|| bad_binding(name))?;
    let (queue, key) = unescape_part(rest).ok_or_else(|| bad_binding(name))?;
    Ok((exchange, queue, key.unwrap_or("").to_string()))
}

fn bad_binding(name: &str) -> MgmtError {
    MgmtError::invalid(format!(
        "binding name '{name}' is not of the form EXCHANGE/QUEUE[/KEY]"
    ))
}

/// Reads an escaped part up to the first unescaped `/`; returns it and what follows the `/`
/// (`None` if there is no `/`). `None` overall for a dangling `\`.
fn unescape_part(s: &str) -> Option<(String, Option<&str>)> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?.1),
            '/' => return Some((out, Some(&s[i + 1..]))),
            _ => out.push(c),
        }
    }
    Some((out, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binding_names_round_trip_with_slashes() {
        let n = binding_name("a/b", "q\\", "x/y");
        assert_eq!(n, "a\\/b/q\\\\/x/y");
        let (e, q, k) = parse_binding_name(&n).unwrap();
        assert_eq!((e.as_str(), q.as_str(), k.as_str()), ("a/b", "q\\", "x/y"));
        let (e, q, k) = parse_binding_name("ex/q").unwrap();
        assert_eq!((e.as_str(), q.as_str(), k.as_str()), ("ex", "q", ""));
        assert!(parse_binding_name("ex\\").is_err());
        assert!(parse_binding_name("ex").is_err());
    }

    #[test]
    fn object_ids_keep_colons_in_names() {
        assert_eq!(
            parse_object_id("org.apache.qpid.broker:queue:a:b").unwrap(),
            ("queue", "a:b")
        );
        assert!(parse_object_id("other:queue:x").is_err());
    }
}
