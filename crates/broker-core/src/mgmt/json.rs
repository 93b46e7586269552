//! JSON on the management wire: AMQP field values to JSON and back, and typed access to the
//! fields of a request body (every wrong type is an `MgmtError` naming the field).

use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use serde_json::{Map, Value};

use super::error::MgmtError;

/// An AMQP field value as JSON (section 6 of the protocol document).
pub fn from_amqp(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(x) => (*x).into(),
        AMQPValue::ShortShortUInt(x) => (*x).into(),
        AMQPValue::ShortInt(x) => (*x).into(),
        AMQPValue::ShortUInt(x) => (*x).into(),
        AMQPValue::LongInt(x) => (*x).into(),
        AMQPValue::LongUInt(x) => (*x).into(),
        AMQPValue::LongLongInt(x) => (*x).into(),
        AMQPValue::Timestamp(x) => (*x).into(),
        AMQPValue::Float(x) => {
            serde_json::Number::from_f64(f64::from(*x)).map_or(Value::Null, Value::Number)
        }
        AMQPValue::Double(x) => serde_json::Number::from_f64(*x).map_or(Value::Null, Value::Number),
        AMQPValue::DecimalValue(d) => Value::String(format!("{}e-{}", d.value, d.scale)),
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_string()),
        AMQPValue::LongString(s) => {
            Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(from_amqp).collect()),
        AMQPValue::FieldTable(t) => from_table(t),
        AMQPValue::ByteArray(_) | AMQPValue::Void => Value::Null,
    }
}

/// A field table as a JSON object.
pub fn from_table(t: &FieldTable) -> Value {
    Value::Object(
        t.inner()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), from_amqp(v)))
            .collect(),
    )
}

/// A JSON value as an AMQP field value.
pub fn to_amqp(v: &Value) -> Result<AMQPValue, MgmtError> {
    Ok(match v {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AMQPValue::LongLongInt(i),
            None => AMQPValue::Double(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
        Value::Array(a) => {
            let items: Result<Vec<_>, _> = a.iter().map(to_amqp).collect();
            AMQPValue::FieldArray(FieldArray::from(items?))
        }
        Value::Object(m) => AMQPValue::FieldTable(to_table(m)?),
    })
}

/// A JSON object as a field table. Keys longer than 255 bytes are refused.
pub fn to_table(m: &Map<String, Value>) -> Result<FieldTable, MgmtError> {
    let mut t = FieldTable::default();
    for (k, v) in m {
        let key = ShortString::try_new(k.as_str()).map_err(|_| {
            MgmtError::invalid(format!(
                "argument name longer than 255 bytes: '{}…'",
                cut(k)
            ))
        })?;
        t.insert(key, to_amqp(v)?);
    }
    Ok(t)
}

fn cut(s: &str) -> &str {
    let mut end = s.len().min(32);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Typed access to a JSON object's fields.
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    what: &'a str,
    map: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    /// `v` must be an object; `what` names it in errors.
    pub fn of(what: &'a str, v: &'a Value) -> Result<Fields<'a>, MgmtError> {
        match v {
            Value::Object(map) => Ok(Fields { what, map }),
            _ => Err(MgmtError::invalid(format!("{what} must be a JSON object"))),
        }
    }

    /// The raw field.
    pub fn get(&self, name: &str) -> Option<&'a Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    /// A required string.
    pub fn str(&self, name: &str) -> Result<&'a str, MgmtError> {
        self.opt_str(name)?
            .ok_or_else(|| MgmtError::invalid(format!("{} is missing '{name}'", self.what)))
    }

    /// An optional string.
    pub fn opt_str(&self, name: &str) -> Result<Option<&'a str>, MgmtError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.wrong_type(name, "a string")),
        }
    }

    /// An optional boolean (0 and 1 accepted, as Qpid's tools send them).
    pub fn opt_bool(&self, name: &str) -> Result<Option<bool>, MgmtError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(Value::Number(n)) if n.as_u64() == Some(0) => Ok(Some(false)),
            Some(Value::Number(n)) if n.as_u64() == Some(1) => Ok(Some(true)),
            Some(_) => Err(self.wrong_type(name, "a boolean")),
        }
    }

    /// An optional object.
    pub fn opt_object(&self, name: &str) -> Result<Option<Fields<'a>>, MgmtError> {
        match self.get(name) {
            None => Ok(None),
            Some(v @ Value::Object(_)) => Fields::of(self.what, v).map(Some),
            Some(_) => Err(self.wrong_type(name, "an object")),
        }
    }

    /// The underlying map.
    pub fn map(&self) -> &'a Map<String, Value> {
        self.map
    }

    fn wrong_type(&self, name: &str, expected: &str) -> MgmtError {
        MgmtError::invalid(format!("{}: '{name}' must be {expected}", self.what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip() {
        let v: Value = serde_json::json!({"a": 1, "b": "x", "c": [true, null], "d": {"e": 2.5}});
        let Value::Object(m) = &v else { unreachable!() };
        let t = to_table(m).unwrap();
        assert_eq!(from_table(&t), v);
    }

    #[test]
    fn long_keys_and_wrong_types_are_errors_not_panics() {
        let mut m = Map::new();
        m.insert("k".repeat(300), Value::Null);
        assert!(to_table(&m).is_err());
        let v = serde_json::json!({"name": 3});
        let f = Fields::of("request", &v).unwrap();
        assert!(f.str("name").unwrap_err().text.contains("must be a string"));
        assert!(f.str("other").unwrap_err().text.contains("missing"));
    }
}
