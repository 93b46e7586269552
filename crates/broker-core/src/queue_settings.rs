//! What a queue's declare arguments mean: RabbitMQ's `x-` arguments and Qpid's `qpid.` ones,
//! validated once at declare time. Invalid values, both forms of one limit, and features the
//! broker recognises but does not implement are refused with 406; unknown arguments are kept
//! and ignored, as RabbitMQ does.

use amq_protocol::types::{AMQPValue, FieldTable};

use crate::error::AmqpError;
use crate::fields;

/// What happens when a length or size limit is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Discard (or dead-letter) the oldest messages: RabbitMQ's default, Qpid's `ring`.
    DropHead,
    /// Refuse the new message (nack in confirm mode): Qpid's `reject`.
    RejectPublish,
    /// As `RejectPublish`, and dead-letter the refused message.
    RejectPublishDlx,
}

/// Parsed queue arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSettings {
    /// `x-message-ttl`: per-queue message TTL.
    pub message_ttl_ms: Option<u64>,
    /// `x-expires`: delete the queue after this long unused.
    pub expires_ms: Option<u64>,
    /// `x-max-length` / `qpid.max_count`.
    pub max_length: Option<u64>,
    /// `x-max-length-bytes` / `qpid.max_size` / `--default-queue-limit`.
    pub max_length_bytes: Option<u64>,
    /// `x-overflow` / `qpid.policy_type`.
    pub overflow: Overflow,
    /// `x-dead-letter-exchange`.
    pub dead_letter_exchange: Option<String>,
    /// `x-dead-letter-routing-key`.
    pub dead_letter_routing_key: Option<String>,
    /// `x-max-priority` / `qpid.priorities` - 1: the highest priority level.
    pub max_priority: Option<u8>,
    /// `qpid.last_value_queue_key`: the header whose value identifies a message's "key".
    pub last_value_key: Option<String>,
}

impl QueueSettings {
    /// What a replica must share with its original (priority levels, last-value key, limits),
    /// as sent in the replication `init` event and compared by the replica.
    pub fn replication_signature(&self) -> serde_json::Value {
        serde_json::json!({
            "max_priority": self.max_priority,
            "last_value_key": self.last_value_key,
            "max_length": self.max_length,
            "max_length_bytes": self.max_length_bytes,
            "overflow": format!("{:?}", self.overflow),
        })
    }
}

/// Arguments that name features this broker recognises but does not implement.
const NOT_IMPLEMENTED: &[&str] = &[
    "qpid.group_header_key",
    "qpid.shared_msg_group",
    "qpid.flow_stop_size",
    "qpid.flow_resume_size",
    "qpid.flow_stop_count",
    "qpid.flow_resume_count",
    "qpid.last_value_queue",
    "qpid.LVQ_key",
    "x-single-active-consumer",
];

impl QueueSettings {
    /// Validates and interprets `args`. `default_limit_bytes` is `--default-queue-limit`.
    pub fn parse(args: &FieldTable, default_limit_bytes: u64) -> Result<QueueSettings, AmqpError> {
        for name in NOT_IMPLEMENTED {
            if args.contains_key(name) {
                return Err(AmqpError::precondition_failed(format!(
                    "queue argument '{name}' names a feature this broker does not implement"
                )));
            }
        }
        if let Some(v) = fields::get(args, "x-queue-type")
            && fields::as_str(v) != Some("classic")
        {
            return Err(AmqpError::precondition_failed(
                "x-queue-type: only 'classic' queues are implemented",
            ));
        }
        if let Some(v) = fields::get(args, "qpid.replicate")
            && fields::as_str(v)
                .and_then(crate::replication::cluster::parse_level)
                .is_none()
        {
            return Err(AmqpError::precondition_failed(format!(
                "Invalid replication value: {}: expected none, configuration or all",
                fields::as_str(v).unwrap_or("(not a string)")
            )));
        }
        both_forms(args, "x-max-length", "qpid.max_count")?;
        both_forms(args, "x-max-length-bytes", "qpid.max_size")?;
        both_forms(args, "x-overflow", "qpid.policy_type")?;
        both_forms(args, "x-max-priority", "qpid.priorities")?;

        let overflow = match (
            fields::get(args, "x-overflow"),
            fields::get(args, "qpid.policy_type"),
        ) {
            (Some(v), _) => match fields::as_str(v) {
                Some("drop-head") => Overflow::DropHead,
                Some("reject-publish") => Overflow::RejectPublish,
                Some("reject-publish-dlx") => Overflow::RejectPublishDlx,
                _ => {
                    return Err(invalid(
                        "x-overflow",
                        "drop-head, reject-publish or reject-publish-dlx",
                    ));
                }
            },
            (None, Some(v)) => match fields::as_str(v) {
                Some("ring") => Overflow::DropHead,
                Some("reject") => Overflow::RejectPublish,
                Some("ring_strict" | "flow_to_disk") => {
                    return Err(AmqpError::precondition_failed(
                        "qpid.policy_type: only 'reject' and 'ring' are implemented",
                    ));
                }
                _ => return Err(invalid("qpid.policy_type", "reject or ring")),
            },
            // Qpid's default policy for its own limits is reject; RabbitMQ's is drop-head.
            (None, None)
                if args.contains_key("qpid.max_count") || args.contains_key("qpid.max_size") =>
            {
                Overflow::RejectPublish
            }
            (None, None) => Overflow::DropHead,
        };
        let max_length =
            non_negative(args, "x-max-length")?.or(non_negative(args, "qpid.max_count")?);
        let mut max_length_bytes =
            non_negative(args, "x-max-length-bytes")?.or(non_negative(args, "qpid.max_size")?);
        let mut overflow = overflow;
        if max_length_bytes.is_none() && default_limit_bytes > 0 {
            max_length_bytes = Some(default_limit_bytes);
            if !args.contains_key("x-overflow") && !args.contains_key("qpid.policy_type") {
                overflow = Overflow::RejectPublish;
            }
        }
        let max_priority = match (
            non_negative(args, "x-max-priority")?,
            non_negative(args, "qpid.priorities")?,
        ) {
            (Some(p), _) if p <= 255 => Some(p as u8),
            (Some(_), _) => return Err(invalid("x-max-priority", "an integer from 0 to 255")),
            (None, Some(n)) if (1..=10).contains(&n) => Some((n - 1) as u8),
            (None, Some(_)) => return Err(invalid("qpid.priorities", "an integer from 1 to 10")),
            (None, None) => None,
        };
        let expires_ms = non_negative(args, "x-expires")?;
        if expires_ms == Some(0) {
            return Err(invalid("x-expires", "a positive integer"));
        }
        let dead_letter_exchange = short_string(args, "x-dead-letter-exchange")?;
        let dead_letter_routing_key = short_string(args, "x-dead-letter-routing-key")?;
        if dead_letter_routing_key.is_some() && dead_letter_exchange.is_none() {
            return Err(AmqpError::precondition_failed(
                "x-dead-letter-routing-key given without x-dead-letter-exchange",
            ));
        }
        Ok(QueueSettings {
            message_ttl_ms: non_negative(args, "x-message-ttl")?,
            expires_ms,
            max_length,
            max_length_bytes,
            overflow,
            dead_letter_exchange,
            dead_letter_routing_key,
            max_priority,
            last_value_key: string(args, "qpid.last_value_queue_key")?,
        })
    }
}

fn both_forms(args: &FieldTable, x: &str, qpid: &str) -> Result<(), AmqpError> {
    if args.contains_key(x) && args.contains_key(qpid) {
        return Err(AmqpError::precondition_failed(format!(
            "both '{x}' and '{qpid}' given: use one form of the limit"
        )));
    }
    Ok(())
}

fn invalid(name: &str, expected: &str) -> AmqpError {
    AmqpError::precondition_failed(format!(
        "invalid value for queue argument '{name}': expected {expected}"
    ))
}

fn non_negative(args: &FieldTable, name: &str) -> Result<Option<u64>, AmqpError> {
    match fields::get(args, name) {
        None => Ok(None),
        // qpid-config sends numbers given with --argument as strings when int() fails; Qpid
        // accepts numeric strings for its own arguments, and so do we.
        Some(AMQPValue::LongString(_) | AMQPValue::ShortString(_)) if name.starts_with("qpid.") => {
            let s = fields::get(args, name)
                .and_then(fields::as_str)
                .unwrap_or("");
            s.parse::<u64>()
                .map(Some)
                .map_err(|_| invalid(name, "a non-negative integer"))
        }
        Some(v) => match fields::as_i64(v) {
            Some(i) if i >= 0 => Ok(Some(i as u64)),
            _ => Err(invalid(name, "a non-negative integer")),
        },
    }
}

/// A string that will be used as an exchange name or routing key: at most 255 bytes.
fn short_string(args: &FieldTable, name: &str) -> Result<Option<String>, AmqpError> {
    match string(args, name)? {
        Some(s) if s.len() > 255 => Err(invalid(name, "a string of at most 255 bytes")),
        other => Ok(other),
    }
}

fn string(args: &FieldTable, name: &str) -> Result<Option<String>, AmqpError> {
    match fields::get(args, name) {
        None => Ok(None),
        Some(v) => match fields::as_str(v) {
            Some(s) => Ok(Some(s.to_string())),
            None => Err(invalid(name, "a string")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert((*k).into(), v.clone());
        }
        t
    }

    #[test]
    fn both_forms_of_a_limit_are_refused() {
        let a = args(&[
            ("x-max-length", AMQPValue::LongInt(1)),
            ("qpid.max_count", AMQPValue::LongInt(1)),
        ]);
        assert_eq!(QueueSettings::parse(&a, 0).unwrap_err().code, 406);
    }

    #[test]
    fn qpid_limits_default_to_reject_and_ring_is_drop_head() {
        let a = args(&[("qpid.max_count", AMQPValue::LongInt(5))]);
        let s = QueueSettings::parse(&a, 0).unwrap();
        assert_eq!(
            (s.max_length, s.overflow),
            (Some(5), Overflow::RejectPublish)
        );
        let a = args(&[
            ("qpid.max_count", AMQPValue::LongInt(5)),
            ("qpid.policy_type", AMQPValue::LongString("ring".into())),
        ]);
        assert_eq!(
            QueueSettings::parse(&a, 0).unwrap().overflow,
            Overflow::DropHead
        );
    }

    #[test]
    fn unimplemented_and_invalid_values_are_406() {
        for a in [
            args(&[("qpid.group_header_key", AMQPValue::LongString("g".into()))]),
            args(&[("x-queue-type", AMQPValue::LongString("quorum".into()))]),
            args(&[("x-message-ttl", AMQPValue::LongInt(-1))]),
            args(&[("x-overflow", AMQPValue::LongString("sideways".into()))]),
            args(&[("x-max-priority", AMQPValue::LongInt(256))]),
            args(&[("x-expires", AMQPValue::LongInt(0))]),
            args(&[(
                "x-dead-letter-exchange",
                AMQPValue::LongString("x".repeat(256).into()),
            )]),
        ] {
            assert_eq!(QueueSettings::parse(&a, 0).unwrap_err().code, 406, "{a:?}");
        }
    }

    #[test]
    fn unknown_arguments_are_kept_and_ignored() {
        let a = args(&[("x-custom", AMQPValue::LongInt(1))]);
        assert!(QueueSettings::parse(&a, 0).is_ok());
    }

    #[test]
    fn default_queue_limit_applies_with_reject() {
        let s = QueueSettings::parse(&FieldTable::default(), 1000).unwrap();
        assert_eq!(
            (s.max_length_bytes, s.overflow),
            (Some(1000), Overflow::RejectPublish)
        );
    }
}
