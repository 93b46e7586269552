//! The HA module: the replica side of queue replication (`docs/design/replication.md`).
//! The original side (replicating subscriptions) lives in `broker_core::replication`.
//!
//! * `address`: the original's address list.
//! * `link`: a minimal AMQP 0-9-1 client on broker-core's codec, for broker-to-broker links.
//! * `replica`: one replica queue: its link task, the stream applied, its state.
//!
//! [`HaReplication`] is installed in the broker (`Broker::set_ha_module`) and carries out the
//! management methods `replicate` and `detach`.

pub mod address;
pub mod cluster;
pub mod epoch;
pub mod link;
pub mod replica;

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use broker_core::broker::Broker;
use broker_core::mgmt::{ErrorCode, MgmtError};
use broker_core::replication::{Answer, HaModule};
use parking_lot::Mutex;

use replica::{Replica, ReplicaSettings, State};

/// The replica queues of one broker.
#[derive(Debug)]
pub struct HaReplication {
    pub(crate) runtime: tokio::runtime::Handle,
    replicas: Mutex<HashMap<String, Arc<Replica>>>,
    me: Weak<HaReplication>,
    /// A cluster member's backup side, while it is a backup.
    backup: Mutex<Option<Arc<cluster::Backup>>>,
    /// `--ha-brokers-url`, parsed.
    members: Mutex<Vec<address::Address>>,
    /// Where the epoch is stored (`None` with `--no-data-dir`: kept in memory only).
    pub(crate) data_dir: Mutex<Option<std::path::PathBuf>>,
    /// The cluster's members as the primary last described them (on a backup).
    pub(crate) membership: Mutex<serde_json::Value>,
    /// On a cluster backup: the replica definitions of the primary's queues (the seed's case 2),
    /// resumed at promotion.
    pub(crate) definitions: Mutex<HashMap<String, serde_json::Value>>,
    /// Members of `--ha-brokers-url` found to be this broker itself.
    own_addresses: Mutex<std::collections::HashSet<String>>,
    /// On a cluster backup: auto-delete queues that had consumers on the primary.
    pub(crate) subscribed: Mutex<std::collections::HashSet<String>>,
    /// Exchanges a cluster backup created from the primary's configuration.
    pub(crate) cluster_exchanges: Mutex<std::collections::HashSet<String>>,
}

impl HaReplication {
    /// The module for `broker`; link tasks run on `runtime`.
    pub fn new(runtime: tokio::runtime::Handle) -> Arc<HaReplication> {
        Arc::new_cyclic(|me| HaReplication {
            runtime,
            replicas: Mutex::new(HashMap::new()),
            me: me.clone(),
            backup: Mutex::new(None),
            members: Mutex::new(Vec::new()),
            cluster_exchanges: Mutex::new(std::collections::HashSet::new()),
            membership: Mutex::new(serde_json::Value::Array(Vec::new())),
            definitions: Mutex::new(HashMap::new()),
            subscribed: Mutex::new(std::collections::HashSet::new()),
            own_addresses: Mutex::new(std::collections::HashSet::new()),
            data_dir: Mutex::new(None),
        })
    }

    /// Starts the cluster member's backup side (with `--ha-cluster`): it looks for the primary
    /// among the `--ha-brokers-url` members. An unusable URL is an error for the daemon.
    pub fn start(
        self: &Arc<Self>,
        broker: &Arc<Broker>,
        data_dir: Option<&std::path::Path>,
    ) -> Result<(), String> {
        if !broker.config.ha.cluster {
            self.resume_stored_replicas(broker);
            return Ok(());
        }
        if let Some(dir) = data_dir {
            let e = epoch::load(dir)?;
            broker.set_epoch(e);
            *self.data_dir.lock() = Some(dir.to_path_buf());
            tracing::info!(target: "HA", "cluster epoch {e} (from {})", dir.join(epoch::FILE).display());
        }
        let url = broker.config.ha.brokers_url.trim();
        if url.is_empty() {
            tracing::warn!(target: "HA", "ha-cluster=yes without ha-brokers-url: this member cannot find a primary; it stays joining until promoted");
            return Ok(());
        }
        let members = address::parse_list(url).map_err(|e| format!("ha-brokers-url: {e}"))?;
        *self.members.lock() = members.clone();
        *self.backup.lock() = Some(cluster::Backup::start(self, broker, members));
        Ok(())
    }

    /// Records a newer epoch, on disk too when there is a data directory.
    pub(crate) fn record_epoch(&self, broker: &Broker, e: u64) -> Result<(), String> {
        if e <= broker.epoch() && e != 0 {
            return Ok(());
        }
        if let Some(dir) = self.data_dir.lock().as_deref() {
            epoch::store(dir, e, &broker.system_id().to_string())?;
        }
        broker.set_epoch(e);
        Ok(())
    }

    pub(crate) fn start_backup(self: &Arc<Self>, broker: &Arc<Broker>) {
        let members = self.cluster_addresses();
        if members.is_empty() {
            return;
        }
        *self.backup.lock() = Some(cluster::Backup::start(self, broker, members));
    }

    /// Remembers that `addr` is this broker itself (it refused a link as its own address), so
    /// that it is not asked again.
    pub(crate) fn note_own_address(&self, addr: &address::Address) {
        self.own_addresses.lock().insert(addr.to_string());
    }

    /// This broker's own address in `--ha-brokers-url`, once found.
    pub(crate) fn own_address(&self) -> Option<String> {
        self.own_addresses.lock().iter().next().cloned()
    }

    pub(crate) fn is_own_address(&self, addr: &address::Address) -> bool {
        self.own_addresses.lock().contains(&addr.to_string())
    }

    pub(crate) fn cluster_addresses(&self) -> Vec<address::Address> {
        self.members.lock().clone()
    }

    pub(crate) fn stop_backup(&self) {
        if let Some(b) = self.backup.lock().take() {
            b.stop();
        }
    }

    /// The replicas this broker runs as a cluster backup.
    pub(crate) fn cluster_replicas(&self) -> Vec<Arc<Replica>> {
        self.replicas
            .lock()
            .values()
            .filter(|r| r.settings_cluster())
            .cloned()
            .collect()
    }

    /// The queues this backup holds from the primary's configuration (replicas at level `all`,
    /// and queues at level `configuration`).
    pub(crate) fn cluster_queue_names(&self, broker: &Broker) -> Vec<String> {
        let mut names: Vec<String> = self
            .cluster_replicas()
            .iter()
            .map(|r| r.queue.name.clone())
            .collect();
        names.extend(
            broker
                .queues()
                .iter()
                .filter(|q| {
                    q.exclusive_owner().is_none()
                        && broker_core::replication::cluster::queue_level(broker, q)
                            != broker_core::config::ReplicateLevel::None
                })
                .map(|q| q.name.clone()),
        );
        names.sort();
        names.dedup();
        names
    }

    /// Stops and forgets the replica of `queue`, if any (the queue stays protected until the
    /// caller decides).
    pub(crate) fn stop_replica(&self, queue: &str) {
        if let Some(r) = self.replicas.lock().remove(queue) {
            r.stop();
        }
    }

    /// Starts a standalone replica of `queue` from `original`, without waiting for its first
    /// attempt (a new cluster primary resuming a replica definition it inherited).
    pub(crate) fn start_standalone(
        &self,
        broker: &Arc<Broker>,
        queue: &str,
        original: &str,
        incarnation: Option<String>,
    ) -> Result<(), String> {
        let q = broker
            .queue(queue)
            .ok_or_else(|| format!("no queue '{queue}'"))?;
        let addresses = address::parse_list(original)?;
        q.set_replica_of(Some(format!("'{queue}' on {original}")));
        let replica = Replica::new(
            q,
            original.to_string(),
            addresses,
            Self::settings(broker),
            incarnation,
        );
        replica.notify(broker);
        if let Some(old) = self
            .replicas
            .lock()
            .insert(queue.to_string(), replica.clone())
        {
            old.stop();
        }
        let (tx, _rx) = tokio::sync::oneshot::channel();
        self.runtime.spawn(replica.run(tx));
        tracing::info!(target: "HA", "queue '{queue}': resuming replication from {original} (inherited with the queue)");
        Ok(())
    }

    /// Starts a cluster backup's replica of `queue`, following the primary among the members.
    pub(crate) fn start_cluster_replica(&self, broker: &Arc<Broker>, queue: &str) {
        let Some(q) = broker.queue(queue) else {
            return;
        };
        let members = self.cluster_addresses();
        let mut settings = Self::settings(broker);
        settings.cluster = true;
        q.set_replica_of(Some(format!("'{queue}' on the cluster primary")));
        let original = broker.config.ha.brokers_url.clone();
        let replica = Replica::new(q, original, members, settings, None);
        replica.notify(broker);
        if let Some(old) = self
            .replicas
            .lock()
            .insert(queue.to_string(), replica.clone())
        {
            old.stop();
        }
        let (tx, _rx) = tokio::sync::oneshot::channel();
        self.runtime.spawn(replica.run(tx));
    }

    /// Makes `q` a replica of `original` and starts its link; the receiver says how the first
    /// attempt went.
    fn follow(
        &self,
        broker: &Arc<Broker>,
        q: &Arc<broker_core::queue::Queue>,
        original: &str,
        addresses: Vec<address::Address>,
        incarnation: Option<String>,
    ) -> (
        Arc<Replica>,
        tokio::sync::oneshot::Receiver<replica::FirstOutcome>,
    ) {
        let queue = q.name.as_str();
        q.set_replica_of(Some(format!("'{queue}' on {original}")));
        let replica = Replica::new(
            q.clone(),
            original.to_string(),
            addresses,
            Self::settings(broker),
            incarnation,
        );
        replica.notify(broker);
        self.replicas
            .lock()
            .insert(queue.to_string(), replica.clone());
        broker.replica_definition_changed(queue);
        tracing::info!(target: "HA", "queue '{queue}': replicating from {original}");
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.runtime.spawn(replica.clone().run(tx));
        (replica, rx)
    }

    /// Resumes the replica queues the store recovered with their definition (a restarted
    /// standalone replica broker goes on replicating by itself, with the ids it holds).
    fn resume_stored_replicas(&self, broker: &Arc<Broker>) {
        let Some(store) = broker.store() else {
            return;
        };
        for (name, definition) in store.recovered_replicas() {
            let Some(q) = broker.queue(&name) else {
                continue;
            };
            let Some(original) = definition.get("original").and_then(|v| v.as_str()) else {
                continue;
            };
            let addresses = match address::parse_list(original) {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(target: "HA", "queue '{name}': stored replica definition has a bad address: {e}");
                    continue;
                }
            };
            let incarnation = definition
                .get("incarnation")
                .and_then(|v| v.as_str())
                .map(str::to_string);
            tracing::info!(target: "HA", "queue '{name}': resuming replication from {original} with the {} messages stored", q.lock().message_count());
            let _ = self.follow(broker, &q, original, addresses, incarnation);
        }
    }

    pub(crate) fn settings(broker: &Broker) -> ReplicaSettings {
        let ha = &broker.config.ha;
        ReplicaSettings {
            username: ha.username.clone(),
            password: ha.password.clone(),
            mechanism: ha.mechanism.clone(),
            heartbeat: ha.link_heartbeat_interval,
            retry: ha.link_maintenance_interval,
            window: ha.flow_messages,
            system_id: broker.system_id().to_string(),
            cluster: false,
        }
    }

    /// The replica of `queue`, if it replicates.
    pub fn replica(&self, queue: &str) -> Option<Arc<Replica>> {
        self.replicas.lock().get(queue).cloned()
    }

    /// Forgets replicas whose queue was deleted (their tasks have stopped).
    fn prune(&self) {
        self.replicas.lock().retain(|_, r| !r.queue.is_deleted());
    }
}

impl HaModule for HaReplication {
    fn replicate(
        &self,
        broker: &Arc<Broker>,
        queue: &str,
        original: &str,
        timeout: Duration,
        answer: Answer,
    ) {
        self.prune();
        let Some(q) = broker.queue(queue) else {
            return answer(Err(MgmtError::not_found(format!("no queue '{queue}'"))));
        };
        let addresses = match address::parse_list(original) {
            Ok(a) => a,
            Err(e) => return answer(Err(MgmtError::invalid(e))),
        };
        // Replicating again: the same incarnation is kept (its messages came from it).
        let previous = self.replicas.lock().remove(queue);
        let incarnation = previous.as_ref().and_then(|p| p.incarnation());
        let was_replica = previous.is_some();
        if let Some(p) = &previous {
            p.stop();
        }
        if incarnation.is_none() {
            let (ready, unacked) = {
                let st = q.lock();
                (st.message_count(), st.unacked_count())
            };
            if ready > 0 || unacked > 0 {
                return answer(Err(MgmtError::new(
                    ErrorCode::PreconditionFailed,
                    format!(
                        "queue '{queue}' holds {} messages not copied from {original}: a replica must start empty",
                        u64::from(ready) + unacked
                    ),
                )));
            }
            if q.lock().consumer_count() > 0 {
                return answer(Err(MgmtError::new(
                    ErrorCode::PreconditionFailed,
                    format!("queue '{queue}' has consumers: a replica takes none"),
                )));
            }
        }
        let (replica, rx) = self.follow(broker, &q, original, addresses, incarnation);
        let name = queue.to_string();
        let original = original.to_string();
        let module = self.me.clone();
        self.runtime.spawn(async move {
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(Ok(()))) => answer(Ok(None)),
                Ok(Ok(Err(e))) if was_replica => {
                    // It stays what it was: a protected replica, now in the failed state.
                    answer(Err(e));
                }
                Ok(Ok(Err(e))) => {
                    // Nothing half-made: the queue is ordinary again, as before.
                    replica.stop();
                    if let Some(m) = module.upgrade() {
                        let mut all = m.replicas.lock();
                        if all.get(&name).is_some_and(|r| Arc::ptr_eq(r, &replica)) {
                            all.remove(&name);
                            replica.queue.set_replica_of(None);
                        }
                    }
                    answer(Err(e));
                }
                Ok(Err(_)) => answer(Ok(None)),
                Err(_) => {
                    answer(Ok(Some(format!(
                        "no answer from {original} within {:.1}s: replication of '{name}' keeps trying (qpid-ha query shows its state)",
                        timeout.as_secs_f64()
                    ))))
                }
            }
        });
    }

    fn replica_origin(&self, queue: &str) -> Option<String> {
        self.replica(queue)?.incarnation()
    }

    fn detach(&self, broker: &Arc<Broker>, queue: &str) -> Result<(), MgmtError> {
        self.prune();
        let Some(q) = broker.queue(queue) else {
            return Err(MgmtError::not_found(format!("no queue '{queue}'")));
        };
        let Some(r) = self.replicas.lock().remove(queue) else {
            return Err(MgmtError::new(
                ErrorCode::PreconditionFailed,
                format!("queue '{queue}' is not a replica"),
            ));
        };
        r.stop();
        q.set_replica_of(None);
        broker.replica_definition_changed(queue);
        tracing::info!(target: "HA", "queue '{queue}' detached from {} ({}): it is an ordinary queue now, with {} messages",
            r.original, match r.state() { State::OriginalLost(_) => "original lost", _ => "original alive" }, q.lock().message_count());
        Ok(())
    }

    fn replica_definition(&self, queue: &str) -> Option<serde_json::Value> {
        let r = self.replica(queue)?;
        if r.settings_cluster() {
            return None;
        }
        Some(serde_json::json!({ "original": r.original, "incarnation": r.incarnation() }))
    }

    fn replica_rows(&self) -> Vec<serde_json::Value> {
        self.prune();
        let mut rows: Vec<_> = self.replicas.lock().values().map(|r| r.row()).collect();
        rows.sort_by(|a, b| a["queue"].as_str().cmp(&b["queue"].as_str()));
        rows
    }

    fn promote(&self, broker: &Arc<Broker>, force: bool, answer: Answer) {
        match self.me.upgrade() {
            Some(me) => cluster::promote(&me, broker, force, answer),
            None => answer(Err(MgmtError::new(
                ErrorCode::Internal,
                "the HA module is shutting down",
            ))),
        }
    }

    fn members(&self, broker: &Broker) -> serde_json::Value {
        if broker.ha_status().is_primary() {
            broker_core::replication::cluster::membership(broker)
        } else {
            self.membership.lock().clone()
        }
    }

    fn shutdown(&self) {
        self.stop_backup();
        for r in self.replicas.lock().values() {
            r.stop();
        }
    }
}
