//! Helpers over amq-protocol's field tables: reading integers and strings whatever integer or
//! string type a client chose, decoding a raw headers table, and comparing values loosely.

use amq_protocol::types::{AMQPValue, FieldTable};

/// The value as a signed integer, if it is any integer type (clients differ: pika sends `l`,
/// lapin `I` or `l`, Java `I`).
pub fn as_i64(v: &AMQPValue) -> Option<i64> {
    Some(match v {
        AMQPValue::ShortShortInt(x) => i64::from(*x),
        AMQPValue::ShortShortUInt(x) => i64::from(*x),
        AMQPValue::ShortInt(x) => i64::from(*x),
        AMQPValue::ShortUInt(x) => i64::from(*x),
        AMQPValue::LongInt(x) => i64::from(*x),
        AMQPValue::LongUInt(x) => i64::from(*x),
        AMQPValue::LongLongInt(x) => *x,
        AMQPValue::Timestamp(x) => i64::try_from(*x).ok()?,
        _ => return None,
    })
}

/// The value as text, if it is a short or long string (long strings that are not UTF-8 are
/// not text).
pub fn as_str(v: &AMQPValue) -> Option<&str> {
    match v {
        AMQPValue::ShortString(s) => Some(s.as_str()),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        _ => None,
    }
}

/// The value as a boolean, accepting integers 0/1 too.
pub fn as_bool(v: &AMQPValue) -> Option<bool> {
    match v {
        AMQPValue::Boolean(b) => Some(*b),
        other => as_i64(other).and_then(|i| match i {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }),
    }
}

/// Looks a key up.
pub fn get<'a>(t: &'a FieldTable, key: &str) -> Option<&'a AMQPValue> {
    t.inner().get(key)
}

/// Decodes a field table given without its 4-byte length prefix (as `PropertySummary::headers`
/// holds it). Malformed tables yield `None`.
pub fn decode_table(raw: &[u8]) -> Option<FieldTable> {
    let mut buf = Vec::with_capacity(raw.len() + 4);
    buf.extend_from_slice(&(raw.len() as u32).to_be_bytes());
    buf.extend_from_slice(raw);
    match amq_protocol::types::parsing::parse_field_table(&buf[..]) {
        Ok((rest, _)) if !rest.is_empty() => None,
        Ok((_, t)) => Some(t),
        Err(_) => None,
    }
}

/// Equality for header matching: integers compare by value and strings by text, whatever
/// wire types were used; other values must be equal.
pub fn values_match(a: &AMQPValue, b: &AMQPValue) -> bool {
    if let (Some(x), Some(y)) = (as_i64(a), as_i64(b)) {
        return x == y;
    }
    if let (Some(x), Some(y)) = (as_str(a), as_str(b)) {
        return x == y;
    }
    a == b
}

/// Equality for redeclare checks: loose on integer and string types, so a client that sends
/// `x-max-length` as `I` one time and `l` the next is not refused.
pub fn tables_equivalent(a: &FieldTable, b: &FieldTable) -> bool {
    a.inner().len() == b.inner().len()
        && a.inner()
            .iter()
            .all(|(k, v)| b.inner().get(k).is_some_and(|w| values_match(v, w)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_and_strings_match_across_types() {
        assert!(values_match(
            &AMQPValue::LongInt(5),
            &AMQPValue::LongLongInt(5)
        ));
        assert!(values_match(
            &AMQPValue::ShortString("a".into()),
            &AMQPValue::LongString("a".into())
        ));
        assert!(!values_match(
            &AMQPValue::LongInt(5),
            &AMQPValue::LongString("5".into())
        ));
    }

    #[test]
    fn malformed_raw_table_is_none() {
        assert!(decode_table(&[3, b'k', b'e']).is_none());
        assert!(decode_table(&[]).is_some());
    }
}
