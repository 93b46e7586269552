//! The HA object, Qpid's `org.apache.qpid.ha:habroker:ha-broker` (class `habroker`). It exists
//! only when the broker runs with `ha-queue-replication` or `ha-cluster` (as in Qpid, where the
//! HA module creates it); otherwise queries find nothing and methods find no object.
//!
//! `status` is the broker's HA status (`standalone` with queue replication only); `promote` is
//! carried out by the HA module on a cluster member and refused on any other broker.
//! `replicate` and `detach` are carried out by the HA module (crate `ha-replication`); the
//! object's `replicas` and `subscriptions` list the replica queues of this broker and the
//! replicating subscriptions it serves as an original.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::broker::Broker;
use crate::replication::HaModule;

use super::error::{ErrorCode, MgmtError};
use super::json::Fields;
use super::reply::ReplyTo;

/// The HA package.
pub const HA_PACKAGE: &str = "org.apache.qpid.ha";
/// The HA class.
pub const HA_CLASS: &str = "habroker";
/// The HA object's name.
pub const HA_NAME: &str = "ha-broker";
/// The HA object's id.
pub const HA_OBJECT_ID: &str = "org.apache.qpid.ha:habroker:ha-broker";

/// True if the broker has an HA object.
pub fn enabled(broker: &Broker) -> bool {
    broker.config.ha.enabled()
}

/// The broker's HA status (reference section 4.3).
pub fn status(broker: &Broker) -> &'static str {
    broker.ha_status().as_str()
}

/// The HA object's properties.
pub fn values(broker: &Broker) -> Value {
    let ha = &broker.config.ha;
    json!({
        "name": HA_NAME,
        "status": status(broker),
        "brokersUrl": ha.brokers_url,
        "publicUrl": ha.public_url,
        "replicateDefault": ha.replicate.as_str(),
        "systemId": broker.system_id().to_string(),
        "epoch": broker.epoch(),
        "store": broker.store().map_or_else(Vec::new, |s| s.rows(broker)),
        "replicas": broker.ha_module().map_or_else(Vec::new, |m| m.replica_rows()),
        "subscriptions": broker.subscriptions().iter().map(|s| s.row()).collect::<Vec<_>>(),
        "members": match (broker.config.ha.cluster, broker.ha_module()) {
            (true, Some(m)) => m.members(broker),
            _ => Value::Array(Vec::new()),
        },
    })
}

/// Carries out a method on the HA object (which the caller has checked exists). `Ok(None)`:
/// the answer is sent later to `reply` (replicate waits for its first attempt).
pub fn call(
    broker: &Arc<Broker>,
    method: &str,
    args: Fields<'_>,
    reply: &ReplyTo,
    sequence: u64,
) -> Result<Option<Value>, MgmtError> {
    match method {
        "promote" => {
            if broker.config.ha.cluster {
                let (b, reply) = (broker.clone(), reply.clone());
                let force = args.get("force").and_then(Value::as_bool).unwrap_or(false);
                module(broker)?.promote(
                    broker,
                    force,
                    Box::new(move |result| match result {
                        Ok(_) => {
                            let mut body = b.mgmt.envelope(sequence);
                            body["_arguments"] = json!({});
                            reply.send(&b, "_method_response", &body, false);
                        }
                        Err(e) => reply.exception(&b, sequence, &e),
                    }),
                );
                Ok(None)
            } else {
                Err(MgmtError::new(
                    ErrorCode::PreconditionFailed,
                    "not a cluster member: promote needs a broker started with ha-cluster=yes; nothing was changed",
                ))
            }
        }
        "replicate" => {
            let remote = args.str("broker")?;
            let queue = args.str("queue")?;
            if remote.trim().is_empty() {
                return Err(MgmtError::invalid(
                    "'broker' must name the original's broker",
                ));
            }
            let timeout = match args.get("timeout") {
                None => DEFAULT_REPLICATE_TIMEOUT,
                Some(v) => v
                    .as_f64()
                    .filter(|t| t.is_finite() && *t >= 0.0)
                    .map(|t| Duration::from_secs_f64(t.min(3600.0)))
                    .ok_or_else(|| MgmtError::invalid("'timeout' must be a number of seconds"))?,
            };
            let module = module(broker)?;
            let (b, reply) = (broker.clone(), reply.clone());
            module.replicate(
                broker,
                queue,
                remote,
                timeout,
                Box::new(move |result| match result {
                    Ok(warning) => {
                        let mut body = b.mgmt.envelope(sequence);
                        body["_arguments"] = match warning {
                            Some(w) => json!({ "warning": w }),
                            None => json!({}),
                        };
                        reply.send(&b, "_method_response", &body, false);
                    }
                    Err(e) => reply.exception(&b, sequence, &e),
                }),
            );
            Ok(None)
        }
        "detach" => {
            let queue = args.str("queue")?;
            module(broker)?.detach(broker, queue)?;
            Ok(Some(json!({})))
        }
        "setBrokersUrl" | "setPublicUrl" => Err(MgmtError::new(
            ErrorCode::NotImplemented,
            format!("method '{method}' is not implemented: set it in qpidd.conf"),
        )),
        other => Err(MgmtError::invalid(format!(
            "unknown method '{other}' on the habroker object"
        ))),
    }
}

/// How long `replicate` tries the original when the request gives no `timeout`.
pub const DEFAULT_REPLICATE_TIMEOUT: Duration = Duration::from_secs(5);

fn module(broker: &Broker) -> Result<&Arc<dyn HaModule>, MgmtError> {
    broker.ha_module().ok_or_else(|| {
        MgmtError::new(
            ErrorCode::NotImplemented,
            "the HA module is not loaded in this broker",
        )
    })
}
