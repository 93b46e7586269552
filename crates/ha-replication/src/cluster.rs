//! A cluster member's backup side (`docs/design/clusters.md`): find the primary among the
//! `--ha-brokers-url` members, follow its replicated queues through a configuration
//! subscription, replicate the queues at level `all`, report `catchup` then `ready`; and the
//! promotion to primary.

use std::sync::{Arc, Weak};
use std::time::Duration;

use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use broker_core::broker::{Broker, ExchangeDeclare, QueueDeclare, REPLICATION_CONNECTION};
use broker_core::config::ReplicateLevel;
use broker_core::mgmt::{ErrorCode, MgmtError};
use broker_core::replication::cluster::{self as cl, HaStatus, config_event};
use broker_core::replication::{self as rep, Answer};
use serde_json::Value;
use tokio::sync::watch;

use crate::HaReplication;
use crate::address::Address;
use crate::link::{Incoming, Link, LinkError, LinkSettings};

/// How long a promotion's status check waits for each member.
const STATUS_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The backup side of one cluster member.
#[derive(Debug)]
pub struct Backup {
    addresses: Vec<Address>,
    stop: watch::Sender<bool>,
}

/// Why a configuration session ended.
enum Ended {
    Stopped,
    /// Not the primary (a backup, itself, or unreachable): try the next member.
    NotPrimary(String),
    /// The link to the primary failed.
    Failed(String),
}

impl Backup {
    /// Starts following the primary among `addresses`.
    pub fn start(
        module: &Arc<HaReplication>,
        broker: &Arc<Broker>,
        addresses: Vec<Address>,
    ) -> Arc<Backup> {
        let (stop, _) = watch::channel(false);
        let backup = Arc::new(Backup { addresses, stop });
        let task = backup
            .clone()
            .run(Arc::downgrade(module), Arc::downgrade(broker));
        module.runtime.spawn(task);
        backup
    }

    /// Stops following (promotion, shutdown).
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    async fn run(self: Arc<Self>, module: Weak<HaReplication>, broker: Weak<Broker>) {
        // Find this member's own address in the list (it refuses itself) before joining, so
        // that the primary's membership shows it; all members at once, at most 2 s.
        if let (Some(m), Some(b)) = (module.upgrade(), broker.upgrade()) {
            let mut probes = Vec::new();
            for addr in self.addresses.clone() {
                let (m, b) = (m.clone(), b.clone());
                probes.push(m.clone().runtime.spawn(async move {
                    if let Some((s, _)) = status_of(&b, &addr).await
                        && s == "self"
                    {
                        m.note_own_address(&addr);
                    }
                }));
            }
            for p in probes {
                let _ = p.await;
            }
        }
        let mut stop = self.stop.subscribe();
        let mut last_refusal: Option<String> = None;
        let retry = match broker.upgrade() {
            Some(b) => b.config.ha.link_maintenance_interval,
            None => return,
        };
        loop {
            if *stop.borrow() {
                return;
            }
            for addr in &self.addresses {
                let (Some(m), Some(b)) = (module.upgrade(), broker.upgrade()) else {
                    return;
                };
                if m.is_own_address(addr) {
                    continue;
                }
                if b.ha_status().is_primary() {
                    return;
                }
                let ended = tokio::select! {
                    e = session(&m, &b, addr) => e,
                    _ = stop.wait_for(|s| *s) => Ended::Stopped,
                };
                match ended {
                    Ended::Stopped => return,
                    Ended::NotPrimary(why) => {
                        if why.contains("this broker's own") {
                            m.note_own_address(addr);
                        } else if why.contains("403") || why.contains("ACCESS_REFUSED") {
                            // Refused for its credentials or tags: say so once per text.
                            if last_refusal.as_deref() != Some(why.as_str()) {
                                tracing::warn!(target: "HA", "backup: {addr} refused this member's link: {why} (check --ha-username and the user's 'ha' tag)");
                                last_refusal = Some(why);
                            }
                        } else {
                            tracing::debug!(target: "HA", "backup: {addr} is not the primary: {why}");
                        }
                    }
                    Ended::Failed(why) => {
                        b.set_primary_address(None);
                        tracing::warn!(target: "HA", "backup: link to the primary {addr} failed: {why}; failing over to the other members");
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(retry) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }
}

fn link_settings(broker: &Broker, addr: &Address, admin: bool) -> LinkSettings {
    HaReplication::settings(broker).link_settings(addr, "qpidd-rs ha backup link", admin)
}

fn config_arguments(broker: &Broker, own: Option<String>) -> FieldTable {
    let mut info = FieldTable::default();
    info.insert(
        "system-id".into(),
        AMQPValue::LongString(LongString::from(broker.system_id().to_string())),
    );
    // This member's own address in --ha-brokers-url, once known (the membership shows it).
    let own = if broker.config.ha.public_url.is_empty() {
        own
    } else {
        Some(broker.config.ha.public_url.clone())
    };
    if let Some(a) = own {
        info.insert("address".into(), AMQPValue::LongString(LongString::from(a)));
    }
    let mut args = FieldTable::default();
    args.insert(
        rep::ARG_REPSUB.into(),
        AMQPValue::LongString(LongString::from(cl::REPSUB_CONFIG)),
    );
    args.insert(
        rep::ARG_VERSION.into(),
        AMQPValue::LongInt(rep::PROTOCOL_VERSION as i32),
    );
    args.insert(rep::ARG_INFO.into(), AMQPValue::FieldTable(info));
    args
}

/// Opens the configuration subscription on `addr`; `Ok` if it is the primary.
async fn subscribe(
    broker: &Broker,
    addr: &Address,
    admin: bool,
    own: Option<String>,
) -> Result<Link, Ended> {
    let mut link = Link::connect(&link_settings(broker, addr, admin))
        .await
        .map_err(|e| match e {
            LinkError::ConnectionClosed { code: 530, text } => Ended::NotPrimary(text),
            other => Ended::NotPrimary(other.to_string()),
        })?;
    link.qos(0)
        .await
        .map_err(|e| Ended::NotPrimary(e.to_string()))?;
    let tag = format!("qpid.ha-config:{}", broker.system_id());
    link.consume("", &tag, config_arguments(broker, own))
        .await
        .map_err(|e| Ended::NotPrimary(e.to_string()))?;
    Ok(link)
}

async fn session(module: &Arc<HaReplication>, broker: &Arc<Broker>, addr: &Address) -> Ended {
    let mut link = match subscribe(broker, addr, false, module.own_address()).await {
        Ok(l) => l,
        Err(e) => return e,
    };
    broker.set_primary_address(Some(addr.to_string()));
    tracing::info!(target: "HA", notice = true, "backup: following the primary at {addr}");
    let mut failure: Option<String> = None;
    loop {
        if broker.ha_status().is_primary() {
            link.close().await;
            return Ended::Stopped;
        }
        let mut last_tag = 0;
        let r = link
            .next_batch(|incoming| {
                if let Incoming::Deliver {
                    delivery_tag,
                    exchange,
                    routing_key,
                    body,
                    ..
                } = incoming
                {
                    last_tag = delivery_tag;
                    if exchange == rep::EVENT_EXCHANGE
                        && let Err(e) = apply(module, broker, routing_key, body)
                    {
                        failure = Some(e);
                    }
                }
            })
            .await;
        if let Some(f) = failure.take() {
            link.close().await;
            return Ended::Failed(f);
        }
        if let Err(e) = r {
            return Ended::Failed(e.to_string());
        }
        if last_tag != 0 {
            link.ack(last_tag, true);
            if let Err(e) = link.flush().await {
                return Ended::Failed(e.to_string());
            }
        }
    }
}

fn apply(
    module: &Arc<HaReplication>,
    broker: &Arc<Broker>,
    event: &str,
    body: &[u8],
) -> Result<(), String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("malformed {event} event: {e}"))?;
    match event {
        config_event::INIT => {
            // Fencing: never follow a primary of an older epoch than one this broker knows.
            let their_epoch = v.get("epoch").and_then(Value::as_u64).unwrap_or(0);
            if their_epoch < broker.epoch() {
                return Err(format!(
                    "stale primary: its epoch {their_epoch} is older than epoch {} known here",
                    broker.epoch()
                ));
            }
            module.record_epoch(broker, their_epoch)?;
            let theirs = v.get("replicate").and_then(Value::as_str).unwrap_or("");
            let ours = broker.config.ha.replicate.as_str();
            if theirs != ours {
                // As Qpid: the cluster is misconfigured, and this member must not serve.
                let why = format!(
                    "Replicate default on backup ({ours}) does not match primary ({theirs})"
                );
                tracing::error!(target: "HA", critical = true, "Shutting down: {why}");
                broker.mgmt.request_shutdown();
                return Err(why);
            }
            Ok(())
        }
        config_event::QUEUES => {
            let list = v.as_array().cloned().unwrap_or_default();
            let names: Vec<String> = list
                .iter()
                .filter_map(|q| q.get("name").and_then(Value::as_str).map(str::to_string))
                .collect();
            // Replicated queues the primary no longer has go.
            for r in module.cluster_replicas() {
                if !names.contains(&r.queue.name) {
                    delete_local(module, broker, &r.queue.name);
                }
            }
            // So do durable queues this broker's store recovered that the primary does not
            // have (clients cannot make durable queues on a backup).
            for q in broker.queues() {
                if q.durable && !q.exclusive && !names.contains(&q.name) {
                    delete_local(module, broker, &q.name);
                }
            }
            for q in &list {
                declare_local(module, broker, q)?;
            }
            if broker.ha_status() == HaStatus::Joining {
                broker.set_ha_status(HaStatus::CatchUp);
            }
            Ok(())
        }
        config_event::QUEUE_DECLARE => declare_local(module, broker, &v),
        config_event::MEMBERS => {
            // The primary decides a backup's status (reference 4.3).
            let me = broker.system_id().to_string();
            let mine = v.as_array().and_then(|all| {
                all.iter()
                    .find(|m| m.get("system-id").and_then(Value::as_str) == Some(me.as_str()))
                    .and_then(|m| m.get("status").and_then(Value::as_str))
                    .map(str::to_string)
            });
            *module.membership.lock() = v;
            match mine.as_deref() {
                Some("ready") if broker.ha_status() != HaStatus::Ready => {
                    broker.set_ha_status(HaStatus::Ready);
                    tracing::info!(target: "HA", notice = true, "Backup is ready");
                }
                Some("catchup") if broker.ha_status() == HaStatus::Ready => {
                    broker.set_ha_status(HaStatus::CatchUp);
                }
                _ => {}
            }
            Ok(())
        }
        config_event::EXCHANGES => {
            let list = v.as_array().cloned().unwrap_or_default();
            let names: Vec<&str> = list
                .iter()
                .filter_map(|e| e.get("name").and_then(Value::as_str))
                .collect();
            let stale: Vec<String> = module
                .cluster_exchanges
                .lock()
                .iter()
                .filter(|n| !names.contains(&n.as_str()))
                .cloned()
                .collect();
            for name in stale {
                delete_exchange_local(module, broker, &name);
            }
            // Durable exchanges recovered from this broker's store that the primary lacks.
            for e in broker.exchanges() {
                if e.durable
                    && !broker_core::broker::is_predeclared_exchange(&e.name)
                    && !names.contains(&e.name.as_str())
                {
                    delete_exchange_local(module, broker, &e.name);
                }
            }
            for e in &list {
                declare_exchange_local(module, broker, e)?;
            }
            Ok(())
        }
        config_event::EXCHANGE_DECLARE => declare_exchange_local(module, broker, &v),
        config_event::EXCHANGE_DELETE => {
            if let Some(name) = v.get("name").and_then(Value::as_str) {
                delete_exchange_local(module, broker, name);
            }
            Ok(())
        }
        config_event::BINDINGS => {
            let list = v.as_array().cloned().unwrap_or_default();
            let wanted: Vec<Binding> = list.iter().filter_map(binding_of).collect();
            // Bindings of replicated queues that the primary no longer has go.
            let replicated: Vec<String> = module.cluster_queue_names(broker);
            for e in broker.exchanges() {
                for b in e.bindings() {
                    if !replicated.contains(&b.queue.name) {
                        continue;
                    }
                    let here = Binding {
                        exchange: e.name.clone(),
                        queue: b.queue.name.clone(),
                        key: b.key.clone(),
                        arguments: b.arguments.clone(),
                    };
                    if !wanted.contains(&here) {
                        let _ = broker.unbind(
                            REPLICATION_CONNECTION,
                            &here.queue,
                            &here.exchange,
                            &here.key,
                            &here.arguments,
                        );
                    }
                }
            }
            for b in &wanted {
                bind_local(broker, b)?;
            }
            Ok(())
        }
        config_event::BIND => match binding_of(&v) {
            Some(b) => bind_local(broker, &b),
            None => Err("malformed bind event".into()),
        },
        config_event::UNBIND => {
            if let Some(b) = binding_of(&v) {
                let _ = broker.unbind(
                    REPLICATION_CONNECTION,
                    &b.queue,
                    &b.exchange,
                    &b.key,
                    &b.arguments,
                );
            }
            Ok(())
        }
        config_event::QUEUE_DELETE => {
            if let Some(name) = v.get("name").and_then(Value::as_str) {
                delete_local(module, broker, name);
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Makes the local copy of a replicated queue, and its replica link at level `all`.
fn declare_local(
    module: &Arc<HaReplication>,
    broker: &Arc<Broker>,
    q: &Value,
) -> Result<(), String> {
    let name = q
        .get("name")
        .and_then(Value::as_str)
        .ok_or("queue without a name")?;
    let level = q
        .get("level")
        .and_then(Value::as_str)
        .and_then(cl::parse_level)
        .unwrap_or(ReplicateLevel::None);
    let incarnation = q
        .get("incarnation")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if q.get("subscribed").and_then(Value::as_bool) == Some(true) {
        module.subscribed.lock().insert(name.to_string());
    }
    match q.get("replica-of") {
        Some(d) if d.is_object() => {
            module
                .definitions
                .lock()
                .insert(name.to_string(), d.clone());
        }
        _ => {
            module.definitions.lock().remove(name);
        }
    }
    if let Some(existing) = module.replica(name)
        && existing.settings_cluster()
        && existing.incarnation().as_deref() == Some(incarnation.as_str())
    {
        return Ok(()); // the same queue, already followed
    }
    // A copy this broker's store recovered from the same incarnation of the primary's queue:
    // kept with its messages, and the replica re-subscribes with their ids (reference 4.13).
    if module.replica(name).is_none()
        && broker.queue(name).is_some()
        && broker
            .store()
            .and_then(|s| s.recovered_queue(name))
            .and_then(|r| r.get("origin").and_then(Value::as_str).map(str::to_string))
            .is_some_and(|origin| origin == incarnation)
    {
        tracing::info!(target: "HA", "backup: keeping the stored copy of queue '{name}' (same incarnation {incarnation})");
        if level == ReplicateLevel::All {
            module.start_cluster_replica(broker, name);
        }
        return Ok(());
    }
    let arguments = match q.get("arguments") {
        Some(Value::Object(m)) => broker_core::mgmt::json::to_table(m).map_err(|e| e.text)?,
        _ => FieldTable::default(),
    };
    // Another queue of that name (an older incarnation, or a local one): replaced.
    if broker.queue(name).is_some() {
        delete_local(module, broker, name);
    }
    let d = QueueDeclare {
        name: name.to_string(),
        passive: false,
        durable: q.get("durable").and_then(Value::as_bool).unwrap_or(false),
        // Exclusive as on the primary, but owned by nobody (reference 4.5): after a failover,
        // the first connection that declares it exclusive adopts it.
        exclusive: q.get("exclusive").and_then(Value::as_bool).unwrap_or(false),
        auto_delete: q
            .get("auto_delete")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        arguments,
    };
    broker
        .declare_queue(REPLICATION_CONNECTION, &d)
        .map_err(|e| format!("cannot create the replica of queue '{name}': {}", e.text))?;
    if level == ReplicateLevel::All {
        module.start_cluster_replica(broker, name);
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq)]
struct Binding {
    exchange: String,
    queue: String,
    key: String,
    arguments: FieldTable,
}

fn table_of(v: Option<&Value>) -> FieldTable {
    match v {
        Some(Value::Object(m)) => broker_core::mgmt::json::to_table(m).unwrap_or_default(),
        _ => FieldTable::default(),
    }
}

fn binding_of(v: &Value) -> Option<Binding> {
    Some(Binding {
        exchange: v.get("exchange")?.as_str()?.to_string(),
        queue: v.get("queue")?.as_str()?.to_string(),
        key: v.get("key")?.as_str()?.to_string(),
        arguments: table_of(v.get("arguments")),
    })
}

fn bind_local(broker: &Broker, b: &Binding) -> Result<(), String> {
    if broker.exchange(&b.exchange).is_none() || broker.queue(&b.queue).is_none() {
        // Applied only when both ends are here (reference 4.5).
        return Ok(());
    }
    broker
        .bind(
            REPLICATION_CONNECTION,
            &b.queue,
            &b.exchange,
            &b.key,
            &b.arguments,
        )
        .map(|_| ())
        .map_err(|e| {
            format!(
                "cannot replicate the binding of '{}' to '{}': {}",
                b.queue, b.exchange, e.text
            )
        })
}

fn declare_exchange_local(
    module: &HaReplication,
    broker: &Arc<Broker>,
    e: &Value,
) -> Result<(), String> {
    let name = e
        .get("name")
        .and_then(Value::as_str)
        .ok_or("exchange without a name")?;
    let kind = e.get("type").and_then(Value::as_str).unwrap_or("direct");
    if let Some(existing) = broker.exchange(name) {
        if existing.kind.name() == kind {
            module.cluster_exchanges.lock().insert(name.to_string());
            return Ok(());
        }
        delete_exchange_local(module, broker, name);
    }
    let d = ExchangeDeclare {
        name: name.to_string(),
        kind: kind.to_string(),
        passive: false,
        durable: e.get("durable").and_then(Value::as_bool).unwrap_or(false),
        auto_delete: e
            .get("auto_delete")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        internal: e.get("internal").and_then(Value::as_bool).unwrap_or(false),
        arguments: table_of(e.get("arguments")),
    };
    broker.declare_exchange(&d).map_err(|err| {
        format!(
            "cannot create the replica of exchange '{name}': {}",
            err.text
        )
    })?;
    module.cluster_exchanges.lock().insert(name.to_string());
    Ok(())
}

fn delete_exchange_local(module: &HaReplication, broker: &Broker, name: &str) {
    module.cluster_exchanges.lock().remove(name);
    let _ = broker.delete_exchange(name, false);
}

fn delete_local(module: &HaReplication, broker: &Arc<Broker>, name: &str) {
    module.definitions.lock().remove(name);
    module.stop_replica(name);
    if let Some(q) = broker.queue(name) {
        q.set_replica_of(None);
        broker.remove_queue(&q);
    }
}

/// Promotion (`qpid-ha promote --cluster-manager`), with Qpid's checks (reference 4.8, 4.9).
pub fn promote(module: &Arc<HaReplication>, broker: &Arc<Broker>, force: bool, answer: Answer) {
    match broker.ha_status() {
        HaStatus::Recovering | HaStatus::Active => {
            tracing::info!(target: "HA", "Ignoring promotion, already primary");
            answer(Ok(None));
        }
        HaStatus::Standalone => answer(Ok(None)),
        HaStatus::CatchUp => answer(Err(MgmtError::new(
            ErrorCode::PreconditionFailed,
            "Still catching up, cannot be promoted.",
        ))),
        HaStatus::Ready => match promote_now(module, broker) {
            Ok(()) => answer(Ok(None)),
            Err(e) => answer(Err(MgmtError::new(ErrorCode::Internal, e))),
        },
        HaStatus::Joining => {
            let (m, b) = (module.clone(), broker.clone());
            let addresses = module.cluster_addresses();
            module.runtime.spawn(async move {
                let mut established = None;
                let mut newer: Option<(String, u64)> = None;
                let own_epoch = b.epoch();
                for addr in &addresses {
                    if let Some((s, e)) = status_of(&b, addr).await {
                        if s == "self" {
                            m.note_own_address(addr);
                            continue;
                        }
                        if s != "joining" {
                            let _ = m.record_epoch(&b, e);
                            established = Some((addr.to_string(), s));
                        } else if e > own_epoch && newer.as_ref().is_none_or(|n| e > n.1) {
                            // After a total failure: a member that knew a later primary may
                            // hold data this one lacks; the most recent store should win.
                            newer = Some((addr.to_string(), e));
                        }
                    }
                }
                if established.is_none()
                    && let Some((addr, e)) = newer
                {
                    if !force {
                        tracing::warn!(target: "HA", "promotion refused: {addr} has epoch {e}, newer than this broker's {own_epoch}");
                        return answer(Err(MgmtError::new(
                            ErrorCode::PreconditionFailed,
                            format!("{addr} has a newer epoch ({e}) than this broker ({own_epoch}): its data may be more recent; promote it instead, or use --force"),
                        )));
                    }
                    tracing::warn!(target: "HA", "promotion forced although {addr} has epoch {e}, newer than this broker's {own_epoch}");
                    let _ = m.record_epoch(&b, e);
                }
                match established {
                    Some((addr, s)) => {
                        tracing::warn!(target: "HA", "promotion refused: {addr} is {s}");
                        answer(Err(MgmtError::new(
                            ErrorCode::PreconditionFailed,
                            "Joining active cluster, cannot be promoted.",
                        )));
                    }
                    None if b.ha_status() == HaStatus::Joining => match promote_now(&m, &b) {
                        Ok(()) => answer(Ok(None)),
                        Err(e) => answer(Err(MgmtError::new(ErrorCode::Internal, e))),
                    },
                    None => {
                        // It found a primary meanwhile: decide again on the new status.
                        promote(&m, &b, force, answer);
                    }
                }
            });
        }
    }
}

/// The HA status and epoch another member reports, if it answers (Qpid's StatusCheck).
async fn status_of(broker: &Broker, addr: &Address) -> Option<(String, u64)> {
    let probe = async {
        match subscribe(broker, addr, true, None).await {
            Ok(mut link) => {
                // A primary: its `init` event says its status and epoch.
                let mut init: Option<Value> = None;
                for _ in 0..3 {
                    let _ = link
                        .next_batch(|i| {
                            if let Incoming::Deliver {
                                routing_key, body, ..
                            } = i
                                && routing_key == config_event::INIT
                            {
                                init = serde_json::from_slice(body).ok();
                            }
                        })
                        .await;
                    if init.is_some() {
                        break;
                    }
                }
                link.close().await;
                let v = init?;
                Some((
                    v.get("status")
                        .and_then(Value::as_str)
                        .unwrap_or("active")
                        .to_string(),
                    v.get("epoch").and_then(Value::as_u64).unwrap_or(0),
                ))
            }
            Err(Ended::NotPrimary(text)) if text.contains("this broker's own") => {
                Some(("self".to_string(), 0))
            }
            Err(Ended::NotPrimary(text)) => {
                let rest = text.split("this broker's status is ").nth(1)?;
                let status = rest.split([',', ' ']).next().unwrap_or("").to_string();
                let epoch = rest
                    .split("epoch ")
                    .nth(1)
                    .and_then(|e| e.split_whitespace().next())
                    .and_then(|e| e.parse().ok())
                    .unwrap_or(0);
                Some((status, epoch))
            }
            Err(_) => None,
        }
    };
    tokio::time::timeout(STATUS_CHECK_TIMEOUT, probe)
        .await
        .ok()
        .flatten()
}

fn promote_now(module: &Arc<HaReplication>, broker: &Arc<Broker>) -> Result<(), String> {
    // A new epoch, on disk before anything else changes (fencing, section 8 of the design).
    let epoch = broker.epoch() + 1;
    module.record_epoch(broker, epoch)?;
    module.stop_backup();
    // The backups that were ready under the old primary are expected to come back.
    let me = broker.system_id().to_string();
    let expected: Vec<String> = module
        .membership
        .lock()
        .as_array()
        .map(|all| {
            all.iter()
                .filter(|m| m.get("status").and_then(Value::as_str) == Some("ready"))
                .filter_map(|m| m.get("system-id").and_then(Value::as_str))
                .filter(|id| *id != me)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    for r in module.cluster_replicas() {
        module.stop_replica(&r.queue.name);
        let incarnation = r.incarnation().and_then(|i| i.parse().ok());
        r.queue.take_over(incarnation);
    }
    // Auto-delete queues that had consumers on the old primary are deleted now (they are
    // unused here); those never subscribed stay (reference 4.10).
    for name in std::mem::take(&mut *module.subscribed.lock()) {
        if let Some(q) = broker.queue(&name)
            && q.auto_delete
            && q.lock().consumer_count() == 0
        {
            tracing::info!(target: "HA", "auto-delete queue '{name}' had consumers on the old primary: deleted at promotion");
            broker.remove_queue(&q);
        }
    }
    // Queues that replicated another broker's queue on the old primary go on doing so from
    // here, with the ids their copies hold (the seed's case 2, no script needed).
    let definitions = std::mem::take(&mut *module.definitions.lock());
    for (queue, d) in definitions {
        let (Some(original), incarnation) = (
            d.get("original").and_then(Value::as_str),
            d.get("incarnation")
                .and_then(Value::as_str)
                .map(str::to_string),
        ) else {
            continue;
        };
        if let Err(e) = module.start_standalone(broker, &queue, original, incarnation) {
            tracing::warn!(target: "HA", "queue '{queue}': cannot resume replication from {original}: {e}");
        }
    }
    broker.set_primary_address(None);
    broker.set_ha_status(HaStatus::Recovering);
    tracing::info!(target: "HA", notice = true, "Promoted to primary (epoch {epoch})");
    watch_for_newer_primary(module, broker);
    if expected.is_empty() {
        broker.set_ha_status(HaStatus::Active);
        return Ok(());
    }
    // Clients are served from now on; publishes to replicated queues wait for the expected
    // backups, until they are ready or --ha-backup-timeout expires.
    broker.install_expected_guards(&expected);
    tracing::info!(target: "HA", "recovering: waiting for {} expected backup(s): {}", expected.len(), expected.join(", "));
    let b = broker.clone();
    module.runtime.spawn(async move {
        let deadline = tokio::time::Instant::now() + b.config.ha.backup_timeout;
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let members = cl::membership(&b);
            let ready = |id: &String| {
                members.as_array().is_some_and(|all| {
                    all.iter().any(|m| {
                        m.get("system-id").and_then(Value::as_str) == Some(id.as_str())
                            && m.get("status").and_then(Value::as_str) == Some("ready")
                    })
                })
            };
            if expected.iter().all(ready) {
                b.release_expected_guards();
                tracing::info!(target: "HA", notice = true, "All backups recovered.");
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                let late: Vec<&String> = expected.iter().filter(|id| !ready(id)).collect();
                b.release_expected_guards();
                tracing::warn!(target: "HA", "expected backups not ready within --ha-backup-timeout ({:?}): {late:?}; no longer waiting for them", b.config.ha.backup_timeout);
                break;
            }
        }
        if b.ha_status() == HaStatus::Recovering {
            b.set_ha_status(HaStatus::Active);
        }
    });
    Ok(())
}

/// A primary asks the other members for their status every `--link-maintenance-interval`; on
/// finding a primary of a newer epoch it demotes itself (fencing): it stops serving clients
/// and rejoins as a backup.
fn watch_for_newer_primary(module: &Arc<HaReplication>, broker: &Arc<Broker>) {
    let (m, b) = (Arc::downgrade(module), Arc::downgrade(broker));
    module.runtime.spawn(async move {
        loop {
            let (Some(module), Some(broker)) = (m.upgrade(), b.upgrade()) else {
                return;
            };
            if !broker.ha_status().is_primary() {
                return;
            }
            let interval = broker.config.ha.link_maintenance_interval;
            for addr in module.cluster_addresses() {
                if module.is_own_address(&addr) {
                    continue;
                }
                let Some((status, epoch)) = status_of(&broker, &addr).await else {
                    continue;
                };
                if status == "self" {
                    module.note_own_address(&addr);
                    continue;
                }
                if matches!(status.as_str(), "active" | "recovering") && epoch > broker.epoch() {
                    demote(&module, &broker, &addr, epoch);
                    return;
                }
            }
            drop((module, broker));
            tokio::time::sleep(interval).await;
        }
    });
}

fn demote(module: &Arc<HaReplication>, broker: &Arc<Broker>, primary: &Address, epoch: u64) {
    tracing::warn!(target: "HA", notice = true, "Demoted: {primary} is the primary of epoch {epoch}, newer than this broker's epoch {}; no longer serving clients, rejoining as a backup", broker.epoch());
    if let Err(e) = module.record_epoch(broker, epoch) {
        tracing::error!(target: "HA", "{e}");
    }
    broker.release_expected_guards();
    broker.set_ha_status(HaStatus::Joining);
    broker.set_primary_address(Some(primary.to_string()));
    broker.evict_clients();
    module.start_backup(broker);
}
