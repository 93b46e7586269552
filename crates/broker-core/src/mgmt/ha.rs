//! The HA object, Qpid's `org.apache.qpid.ha:habroker:ha-broker` (class `habroker`). It exists
//! only when the broker runs with `ha-queue-replication` or `ha-cluster` (as in Qpid, where the
//! HA module creates it); otherwise queries find nothing and methods find no object.
//!
//! Queue replication and clusters are not implemented yet: `status` is `standalone` with queue
//! replication only and `joining` with `ha-cluster` (clusters come with issue 5), `promote`
//! refuses on a broker that is not a cluster member, and `replicate` checks its arguments and
//! the local queue, then answers "not implemented" (issue 4).

use serde_json::{Value, json};

use crate::broker::Broker;

use super::error::{ErrorCode, MgmtError};
use super::json::Fields;

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
    if broker.config.ha.cluster {
        "joining"
    } else {
        "standalone"
    }
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
    })
}

/// Carries out a method on the HA object (which the caller has checked exists).
pub fn call(broker: &Broker, method: &str, args: Fields<'_>) -> Result<Value, MgmtError> {
    match method {
        "promote" => {
            if broker.config.ha.cluster {
                Err(MgmtError::new(
                    ErrorCode::NotImplemented,
                    "promote is not implemented yet: clusters come with issue 5; nothing was changed",
                ))
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
            if broker.queue(queue).is_none() {
                return Err(MgmtError::not_found(format!("no queue '{queue}'")));
            }
            Err(MgmtError::new(
                ErrorCode::NotImplemented,
                "queue replication is not implemented yet (issue 4)",
            ))
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
