//! One AMQP channel: content assembly for publishes, the exchange, queue, basic, confirm and tx
//! methods, and cleanup when it closes. Owned by its connection's reader; the parts queues need
//! for delivery live in its `ChannelLink`.

use std::sync::Arc;

use amq_protocol::protocol::{AMQPClass, basic, channel, confirm, exchange, queue, tx};
use amq_protocol::types::ShortString;

use crate::broker::{Broker, ExchangeDeclare, QueueDeclare, server_generated_name};
use crate::confirms::{Confirms, PendingConfirm};
use crate::delivery::{ChannelLink, Consumer, Unacked};
use crate::error::AmqpError;
use crate::message::{Message, MessageBuilder, parse_expiration};
use crate::mgmt::Event;
use crate::mgmt::events::SubscriptionEvent;
use crate::protocol::control::write_method;
use crate::protocol::hot::{self, ContentHeader, Publish, Settle};
use crate::queue::{DequeueReason, EnqueueOutcome, Queue, QueuedMessage};
use crate::queue_settings::Overflow;
use crate::replication::{self, ReplicatingSubscription};

/// What the channel needs from its connection.
#[derive(Debug)]
pub struct ChannelContext<'a> {
    /// The broker.
    pub broker: &'a Arc<Broker>,
    /// The connection's id.
    pub connection_id: u64,
    /// The authenticated user, when authentication is on (publishes whose `user-id` property
    /// names someone else are refused, as in RabbitMQ).
    pub checked_user: Option<&'a str>,
    /// The principal has the `admin` tag (management requests).
    pub admin: bool,
    /// The principal has the `ha` tag (replicating subscriptions).
    pub ha: bool,
    /// The connection's remote address.
    pub peer: std::net::SocketAddr,
}

/// A publish waiting for its content.
#[derive(Debug)]
struct PendingPublish {
    exchange: String,
    routing_key: String,
    mandatory: bool,
    builder: Option<MessageBuilder>,
}

/// A message whose content is complete, ready to route (now, or at tx.commit).
#[derive(Debug)]
struct Publication {
    message: Message,
    mandatory: bool,
}

#[derive(Debug)]
struct ConfirmState {
    /// Sequence number of the last publish seen (the first is 1).
    last_seq: u64,
    /// Decided publishes and their holds; acks are written once per read batch, `multiple`.
    confirms: Arc<Confirms>,
}

#[derive(Debug, Default)]
struct TxState {
    publishes: Vec<Publication>,
    settles: Vec<(Settle, SettleKind)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SettleKind {
    Ack,
    Nack,
}

/// A channel.
#[derive(Debug)]
pub struct Channel {
    /// Its delivery side, shared with queues.
    pub link: Arc<ChannelLink>,
    /// Waiting for channel.close-ok after we closed it: everything else is dropped.
    pub closing: bool,
    pending: Option<PendingPublish>,
    confirm: Option<ConfirmState>,
    tx: Option<TxState>,
    default_prefetch: u32,
    last_queue: Option<String>,
    route_buf: Vec<Arc<Queue>>,
    /// The replicating subscription this channel carries (it then carries nothing else).
    replication: Option<Arc<ReplicatingSubscription>>,
    /// A backup's configuration subscription (clusters), likewise alone on its channel.
    config_sub: Option<Arc<replication::cluster::ConfigSubscription>>,
}

impl Channel {
    /// A new open channel.
    pub fn new(link: Arc<ChannelLink>) -> Channel {
        Channel {
            link,
            closing: false,
            pending: None,
            confirm: None,
            tx: None,
            default_prefetch: 0,
            last_queue: None,
            route_buf: Vec::new(),
            replication: None,
            config_sub: None,
        }
    }

    fn id(&self) -> u16 {
        self.link.channel
    }

    fn reply(&self, method: AMQPClass) {
        let ch = self.id();
        self.link.out.write(|out| write_method(out, ch, method));
    }

    /// True while a publish waits for its header or body frames.
    pub fn expects_content(&self) -> bool {
        self.pending.is_some()
    }

    // ---- the message path -------------------------------------------------------------------

    /// basic.publish (hand-parsed).
    pub fn publish(&mut self, ctx: &ChannelContext<'_>, p: Publish<'_>) -> Result<(), AmqpError> {
        if p.immediate {
            return Err(AmqpError::not_implemented("immediate=true"));
        }
        if p.exchange == replication::CONTROL_EXCHANGE {
            if self
                .replication
                .as_ref()
                .is_none_or(|r| r.tag != p.routing_key)
            {
                return Err(AmqpError::access_refused(format!(
                    "only the channel of replicating subscription '{}' may publish to '{}'",
                    p.routing_key,
                    replication::CONTROL_EXCHANGE
                )));
            }
        } else if !p.exchange.is_empty() {
            match ctx.broker.exchange(p.exchange) {
                None => {
                    return Err(AmqpError::not_found(format!(
                        "no exchange '{}' in vhost '/'",
                        p.exchange
                    )));
                }
                Some(e) if e.internal => {
                    return Err(AmqpError::access_refused(format!(
                        "cannot publish to internal exchange '{}' in vhost '/'",
                        p.exchange
                    )));
                }
                Some(_) => {}
            }
        }
        self.pending = Some(PendingPublish {
            exchange: p.exchange.to_string(),
            routing_key: p.routing_key.to_string(),
            mandatory: p.mandatory,
            builder: None,
        });
        Ok(())
    }

    /// A content header frame. `Ok(false)`: unexpected here (a connection error for the caller).
    pub fn content_header(
        &mut self,
        ctx: &ChannelContext<'_>,
        h: ContentHeader<'_>,
    ) -> Result<bool, AmqpError> {
        let Some(pending) = self.pending.as_mut() else {
            return Ok(false);
        };
        if pending.builder.is_some() {
            return Ok(false);
        }
        let max = ctx.broker.config.max_message_size;
        if h.body_size > max {
            self.pending = None;
            return Err(AmqpError::precondition_failed(format!(
                "message size {} is larger than configured max size {max} (--max-message-size)",
                h.body_size
            )));
        }
        if let (Some(claimed), Some(user)) = (h.summary.user_id, ctx.checked_user)
            && claimed != user
        {
            self.pending = None;
            return Err(AmqpError::precondition_failed(format!(
                "user_id property set to '{claimed}' but authenticated user was '{user}'"
            )));
        }
        if let Some(exp) = h.summary.expiration
            && parse_expiration(exp).is_none()
        {
            self.pending = None;
            return Err(AmqpError::precondition_failed(format!(
                "invalid expiration '{exp}'"
            )));
        }
        pending.builder = Some(MessageBuilder::new(
            &pending.exchange,
            &pending.routing_key,
            h.raw_properties,
            &h.summary,
            h.body_size as usize,
        ));
        if h.body_size == 0 {
            self.complete(ctx)?;
        }
        Ok(true)
    }

    /// A body frame. `Ok(false)`: unexpected here (no header yet, or more than announced).
    pub fn content_body(
        &mut self,
        ctx: &ChannelContext<'_>,
        chunk: &[u8],
    ) -> Result<bool, AmqpError> {
        let Some(builder) = self.pending.as_mut().and_then(|p| p.builder.as_mut()) else {
            return Ok(false);
        };
        if !builder.push_body(chunk) {
            return Ok(false);
        }
        if builder.is_complete() {
            self.complete(ctx)?;
        }
        Ok(true)
    }

    fn complete(&mut self, ctx: &ChannelContext<'_>) -> Result<(), AmqpError> {
        let Some(PendingPublish {
            mandatory,
            builder: Some(builder),
            ..
        }) = self.pending.take()
        else {
            return Ok(());
        };
        let publication = Publication {
            message: builder.finish(),
            mandatory,
        };
        if publication.message.exchange() == replication::CONTROL_EXCHANGE {
            return self.id_chunk(&publication.message);
        }
        if let Some(tx) = self.tx.as_mut() {
            tx.publishes.push(publication);
            return Ok(());
        }
        self.route_and_confirm(ctx, publication, None);
        Ok(())
    }

    /// Routes a publication. Its confirm is the channel's next one in confirm mode, or, in a
    /// transaction's commit, the commit's (`commit`: one hold-able record for all of them).
    fn route_and_confirm(
        &mut self,
        ctx: &ChannelContext<'_>,
        p: Publication,
        commit: Option<&Arc<Confirms>>,
    ) {
        let m = &p.message;
        self.route_buf.clear();
        // A management request goes to the agent instead of being routed.
        let to_agent = crate::mgmt::is_request(m.exchange(), m.routing_key());
        if to_agent {
            let requester = crate::mgmt::Requester {
                connection_id: ctx.connection_id,
                admin: ctx.admin,
            };
            crate::mgmt::handle(ctx.broker, requester, m);
        } else {
            // The exchange was checked at basic.publish; if it went away since, the message is
            // unroutable, as in RabbitMQ.
            let _ = ctx
                .broker
                .route(m.exchange(), m.routing_key(), m, &mut self.route_buf);
        }
        let routed = to_agent || !self.route_buf.is_empty();
        let now = ctx.broker.now_ms();
        let mut rejected = false;
        let seq = self.confirm.as_mut().map(|c| {
            c.last_seq += 1;
            c.last_seq
        });
        let pending = match (&self.confirm, seq, commit) {
            (Some(c), Some(seq), _) => Some(PendingConfirm {
                confirms: &c.confirms,
                seq,
            }),
            (_, _, Some(commit)) => Some(PendingConfirm {
                confirms: commit,
                seq: 1,
            }),
            _ => None,
        };
        if let Some(p) = pending
            && ctx.broker.below_min_backups()
            && self.route_buf.iter().any(|q| {
                replication::cluster::queue_level(ctx.broker, q)
                    == crate::config::ReplicateLevel::All
            })
        {
            ctx.broker.hold_for_min_backups(p.hold());
        }
        for q in &self.route_buf {
            if q.enqueue_confirmed(m.clone(), now, pending) == EnqueueOutcome::Rejected {
                rejected = true;
                if q.settings.overflow == Overflow::RejectPublishDlx {
                    let entry = QueuedMessage {
                        id: 0,
                        message: m.clone(),
                        redelivered: false,
                        expires_at_ms: u64::MAX,
                    };
                    ctx.broker
                        .dead_letter(q, vec![(entry, DequeueReason::Rejected)]);
                }
            }
        }
        self.route_buf.clear();
        if !routed && p.mandatory {
            let ch = self.id();
            let frame_max = self.link.frame_max;
            self.link.out.write(|out| {
                hot::write_return(out, ch, 312, "NO_ROUTE", m.exchange(), m.routing_key());
                hot::write_content(out, ch, m.raw_properties(), m.body(), frame_max);
            });
        }
        if let (Some(c), Some(seq)) = (&self.confirm, seq) {
            if rejected {
                c.confirms.nack(seq);
            } else {
                c.confirms.decided(seq);
            }
        }
    }

    /// Writes the publisher confirms decided during this read batch (and not held), as one
    /// `multiple` ack.
    pub fn flush_confirms(&mut self) {
        if let Some(c) = &self.confirm {
            c.confirms.flush();
        }
    }

    /// An id-set chunk of this channel's replicating subscription.
    fn id_chunk(&mut self, m: &Message) -> Result<(), AmqpError> {
        let Some(sub) = self.replication.clone() else {
            return Ok(());
        };
        let last = m
            .summary()
            .headers
            .and_then(crate::fields::decode_table)
            .and_then(|h| {
                crate::fields::get(&h, replication::HEADER_LAST).and_then(crate::fields::as_bool)
            })
            .unwrap_or(false);
        sub.id_chunk(m.body(), last)
    }

    /// basic.ack / basic.nack / basic.reject from a consumer.
    pub fn settle(
        &mut self,
        ctx: &ChannelContext<'_>,
        s: Settle,
        kind_nack: bool,
    ) -> Result<(), AmqpError> {
        let kind = if kind_nack {
            SettleKind::Nack
        } else {
            SettleKind::Ack
        };
        if self.config_sub.is_some() {
            // Configuration events are not held for their acks.
            return Ok(());
        }
        if let Some(sub) = &self.replication {
            if kind == SettleKind::Nack {
                return Err(AmqpError::precondition_failed(
                    "a replicating subscription's deliveries can only be acknowledged",
                ));
            }
            return sub.acked(s.delivery_tag, s.multiple);
        }
        if let Some(tx) = self.tx.as_mut() {
            // Applied (and validated) at tx.commit.
            tx.settles.push((s, kind));
            return Ok(());
        }
        self.apply_settle(ctx, s, kind)
    }

    fn apply_settle(
        &mut self,
        _ctx: &ChannelContext<'_>,
        s: Settle,
        kind: SettleKind,
    ) -> Result<(), AmqpError> {
        let mut settled: Vec<Unacked> = Vec::new();
        self.link
            .lock()
            .settle(s.delivery_tag, s.multiple, &mut settled)?;
        if kind == SettleKind::Nack && s.requeue {
            requeue_all(settled);
        } else {
            let reason = if kind == SettleKind::Ack {
                DequeueReason::Consumed
            } else {
                DequeueReason::Rejected
            };
            settle_all(settled, reason);
        }
        self.dispatch_own_queues();
        Ok(())
    }

    /// After credit was freed, queues this channel consumes from may deliver more.
    fn dispatch_own_queues(&self) {
        let queues: Vec<Arc<Queue>> = {
            let ls = self.link.lock();
            let mut qs: Vec<Arc<Queue>> = Vec::new();
            for c in ls.consumers.values() {
                if !qs.iter().any(|q| Arc::ptr_eq(q, &c.queue)) {
                    qs.push(c.queue.clone());
                }
            }
            qs
        };
        for q in queues {
            q.dispatch();
        }
    }

    // ---- control methods --------------------------------------------------------------------

    /// Any method other than publish/ack/nack/reject and channel.open/close.
    pub fn handle_method(
        &mut self,
        ctx: &ChannelContext<'_>,
        method: AMQPClass,
    ) -> Result<(), AmqpError> {
        match method {
            AMQPClass::Exchange(m) => self.exchange_method(ctx, m),
            AMQPClass::Queue(m) => self.queue_method(ctx, m),
            AMQPClass::Basic(m) => self.basic_method(ctx, m),
            AMQPClass::Confirm(confirm::AMQPMethod::Select(s)) => {
                if self.tx.is_some() {
                    return Err(AmqpError::precondition_failed(
                        "cannot switch from tx to confirm mode",
                    ));
                }
                if self.confirm.is_none() {
                    self.confirm = Some(ConfirmState {
                        last_seq: 0,
                        confirms: Confirms::new(self.link.clone()),
                    });
                }
                if !s.nowait {
                    self.reply(AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(
                        confirm::SelectOk {},
                    )));
                }
                Ok(())
            }
            AMQPClass::Tx(m) => self.tx_method(ctx, m),
            AMQPClass::Channel(channel::AMQPMethod::Flow(f)) => {
                self.link.lock().flow_active = f.active;
                self.reply(AMQPClass::Channel(channel::AMQPMethod::FlowOk(
                    channel::FlowOk { active: f.active },
                )));
                if f.active {
                    self.dispatch_own_queues();
                }
                Ok(())
            }
            other => Err(AmqpError::not_implemented(format!(
                "method {}.{} is not implemented",
                other.get_amqp_class_id(),
                other.get_amqp_method_id()
            ))),
        }
    }

    fn exchange_method(
        &mut self,
        ctx: &ChannelContext<'_>,
        m: exchange::AMQPMethod,
    ) -> Result<(), AmqpError> {
        match &m {
            exchange::AMQPMethod::Declare(d) if d.passive => {}
            _ => ctx.broker.backup_refusal()?,
        }
        match m {
            exchange::AMQPMethod::Declare(d) => {
                ctx.broker.declare_exchange(&ExchangeDeclare {
                    name: d.exchange.to_string(),
                    kind: d.kind.to_string(),
                    passive: d.passive,
                    durable: d.durable,
                    auto_delete: d.auto_delete,
                    internal: d.internal,
                    arguments: d.arguments,
                })?;
                if !d.nowait {
                    self.reply(AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(
                        exchange::DeclareOk {},
                    )));
                }
                Ok(())
            }
            exchange::AMQPMethod::Delete(d) => {
                ctx.broker
                    .delete_exchange(d.exchange.as_str(), d.if_unused)?;
                if !d.nowait {
                    self.reply(AMQPClass::Exchange(exchange::AMQPMethod::DeleteOk(
                        exchange::DeleteOk {},
                    )));
                }
                Ok(())
            }
            _ => Err(AmqpError::not_implemented(
                "exchange-to-exchange bindings are not implemented",
            )),
        }
    }

    fn queue_name(&self, given: &ShortString) -> Result<String, AmqpError> {
        if given.as_str().is_empty() {
            // RabbitMQ's rule: "" names the queue last declared on this channel.
            return self.last_queue.clone().ok_or_else(|| {
                AmqpError::not_found("no previously declared queue on this channel")
            });
        }
        Ok(given.to_string())
    }

    fn queue_method(
        &mut self,
        ctx: &ChannelContext<'_>,
        m: queue::AMQPMethod,
    ) -> Result<(), AmqpError> {
        let b = ctx.broker;
        let conn = ctx.connection_id;
        // On a cluster backup only this connection's own exclusive queues (a management
        // client's reply queue) may change: the rest follows the primary.
        if !b.ha_status().is_primary() {
            let own = |name: &ShortString| {
                self.queue_name(name)
                    .ok()
                    .and_then(|n| b.queue(&n))
                    .is_some_and(|q| q.exclusive_owner() == Some(conn))
            };
            let allowed = match &m {
                queue::AMQPMethod::Declare(d) => d.passive || d.exclusive,
                queue::AMQPMethod::Bind(x) => own(&x.queue),
                queue::AMQPMethod::Unbind(x) => own(&x.queue),
                queue::AMQPMethod::Purge(x) => own(&x.queue),
                queue::AMQPMethod::Delete(x) => own(&x.queue),
                _ => true,
            };
            if !allowed {
                b.backup_refusal()?;
            }
        }
        match m {
            queue::AMQPMethod::Declare(d) => {
                let declared = b.declare_queue(
                    conn,
                    &QueueDeclare {
                        name: d.queue.to_string(),
                        passive: d.passive,
                        durable: d.durable,
                        exclusive: d.exclusive,
                        auto_delete: d.auto_delete,
                        arguments: d.arguments,
                    },
                )?;
                self.last_queue = Some(declared.queue.name.clone());
                if !d.nowait {
                    self.reply(AMQPClass::Queue(queue::AMQPMethod::DeclareOk(
                        queue::DeclareOk {
                            queue: short(&declared.queue.name),
                            message_count: declared.message_count,
                            consumer_count: declared.consumer_count,
                        },
                    )));
                }
                Ok(())
            }
            queue::AMQPMethod::Bind(x) => {
                let name = self.queue_name(&x.queue)?;
                b.bind(
                    conn,
                    &name,
                    x.exchange.as_str(),
                    x.routing_key.as_str(),
                    &x.arguments,
                )?;
                if !x.nowait {
                    self.reply(AMQPClass::Queue(queue::AMQPMethod::BindOk(
                        queue::BindOk {},
                    )));
                }
                Ok(())
            }
            queue::AMQPMethod::Unbind(x) => {
                let name = self.queue_name(&x.queue)?;
                b.unbind(
                    conn,
                    &name,
                    x.exchange.as_str(),
                    x.routing_key.as_str(),
                    &x.arguments,
                )?;
                self.reply(AMQPClass::Queue(queue::AMQPMethod::UnbindOk(
                    queue::UnbindOk {},
                )));
                Ok(())
            }
            queue::AMQPMethod::Purge(x) => {
                let name = self.queue_name(&x.queue)?;
                let n = b.purge(conn, &name)?;
                if !x.nowait {
                    self.reply(AMQPClass::Queue(queue::AMQPMethod::PurgeOk(
                        queue::PurgeOk { message_count: n },
                    )));
                }
                Ok(())
            }
            queue::AMQPMethod::Delete(x) => {
                let name = self.queue_name(&x.queue)?;
                let n = b.delete_queue(conn, &name, x.if_unused, x.if_empty)?;
                if !x.nowait {
                    self.reply(AMQPClass::Queue(queue::AMQPMethod::DeleteOk(
                        queue::DeleteOk { message_count: n },
                    )));
                }
                Ok(())
            }
            _ => Err(AmqpError::command_invalid(
                "server-to-client queue method sent by the client",
            )),
        }
    }

    fn basic_method(
        &mut self,
        ctx: &ChannelContext<'_>,
        m: basic::AMQPMethod,
    ) -> Result<(), AmqpError> {
        match m {
            basic::AMQPMethod::Qos(q) => {
                if q.global {
                    self.link.lock().global_prefetch = u32::from(q.prefetch_count);
                } else {
                    self.default_prefetch = u32::from(q.prefetch_count);
                }
                self.reply(AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})));
                self.dispatch_own_queues();
                Ok(())
            }
            basic::AMQPMethod::Consume(c) => self.consume(ctx, c),
            basic::AMQPMethod::Cancel(c) => {
                self.cancel(ctx, c.consumer_tag.as_str());
                if !c.nowait {
                    self.reply(AMQPClass::Basic(basic::AMQPMethod::CancelOk(
                        basic::CancelOk {
                            consumer_tag: c.consumer_tag,
                        },
                    )));
                }
                Ok(())
            }
            basic::AMQPMethod::Get(g) => {
                let name = self.queue_name(&g.queue)?;
                let q = ctx.broker.queue_for(ctx.connection_id, &name)?;
                q.replica_refusal("get from")?;
                let now = ctx.broker.now_ms();
                if !q.get(&self.link, g.no_ack, now) {
                    self.reply(AMQPClass::Basic(basic::AMQPMethod::GetEmpty(
                        basic::GetEmpty {},
                    )));
                }
                Ok(())
            }
            basic::AMQPMethod::Recover(r) => {
                if !r.requeue {
                    return Err(AmqpError::not_implemented(
                        "basic.recover with requeue=false",
                    ));
                }
                // recover-ok first: clients drop deliveries buffered before it (lapin does),
                // so the redeliveries must follow it.
                self.reply(AMQPClass::Basic(basic::AMQPMethod::RecoverOk(
                    basic::RecoverOk {},
                )));
                self.recover(true)
            }
            basic::AMQPMethod::RecoverAsync(r) => self.recover(r.requeue),
            _ => Err(AmqpError::command_invalid(
                "server-to-client basic method sent by the client",
            )),
        }
    }

    fn recover(&mut self, requeue: bool) -> Result<(), AmqpError> {
        if !requeue {
            return Err(AmqpError::not_implemented(
                "basic.recover with requeue=false",
            ));
        }
        let all = self.link.lock().take_all();
        requeue_all(all);
        Ok(())
    }

    fn consume(&mut self, ctx: &ChannelContext<'_>, c: basic::Consume) -> Result<(), AmqpError> {
        if crate::fields::get(&c.arguments, replication::ARG_REPSUB).is_some() {
            return self.replicating_consume(ctx, c);
        }
        if self.replication.is_some() {
            return Err(AmqpError::precondition_failed(
                "this channel carries a replicating subscription and nothing else",
            ));
        }
        let name = self.queue_name(&c.queue)?;
        let q = ctx.broker.queue_for(ctx.connection_id, &name)?;
        q.replica_refusal("consume from")?;
        let tag = if c.consumer_tag.as_str().is_empty() {
            server_generated_name("amq.ctag-")
        } else {
            c.consumer_tag.to_string()
        };
        {
            let ls = self.link.lock();
            if ls.consumers.contains_key(&tag) {
                return Err(AmqpError::not_allowed(format!(
                    "attempt to reuse consumer tag '{tag}'"
                )));
            }
            let max = ctx.broker.config.max_consumers_per_channel;
            if max != 0 && ls.consumers.len() >= max {
                return Err(AmqpError::precondition_failed(format!(
                    "the limit of {max} consumers per channel (--max-consumers-per-channel) is reached"
                )));
            }
        }
        let consumer = Arc::new(Consumer::new(
            tag.clone(),
            self.link.clone(),
            q.clone(),
            c.no_ack,
            c.exclusive,
            self.default_prefetch,
            c.arguments,
        ));
        let ch = self.id();
        let nowait = c.nowait;
        let reply_tag = short(&tag);
        let added = consumer.clone();
        let _config = ctx.broker.config_guard();
        q.add_consumer(consumer.clone(), ctx.broker.now_ms(), || {
            // Written under the queue's lock, so it precedes the first delivery.
            self.link
                .lock()
                .consumers
                .insert(tag.clone(), consumer.clone());
            if !nowait {
                self.link.out.write(|out| {
                    write_method(
                        out,
                        ch,
                        AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                            consumer_tag: reply_tag,
                        })),
                    );
                });
            }
        })?;
        ctx.broker
            .emit_event(Event::Subscribe(SubscriptionEvent::of(&added)));
        Ok(())
    }

    /// basic.consume of a replicating subscription (`docs/design/replication.md` 3.1).
    fn replicating_consume(
        &mut self,
        ctx: &ChannelContext<'_>,
        c: basic::Consume,
    ) -> Result<(), AmqpError> {
        use crate::fields::{as_i64, as_str, get};
        let b = ctx.broker;
        if !b.config.ha.enabled() {
            return Err(AmqpError::precondition_failed(
                "queue replication is disabled on this broker: start it with ha-queue-replication=yes",
            ));
        }
        if !ctx.ha {
            return Err(AmqpError::access_refused(
                "replication requires a user with the 'ha' tag",
            ));
        }
        if self.replication.is_some()
            || self.config_sub.is_some()
            || !self.link.lock().consumers.is_empty()
        {
            return Err(AmqpError::precondition_failed(
                "a replicating subscription needs a channel of its own",
            ));
        }
        if get(&c.arguments, replication::ARG_REPSUB).and_then(as_str)
            == Some(replication::cluster::REPSUB_CONFIG)
        {
            return self.config_consume(ctx, c);
        }
        let name = c.queue.to_string();
        let q = b
            .queue(&name)
            .ok_or_else(|| AmqpError::not_found(format!("no queue '{name}' in vhost '/'")))?;
        let version = get(&c.arguments, replication::ARG_VERSION).and_then(as_i64);
        if version != Some(replication::PROTOCOL_VERSION) {
            let shown = version.map_or("absent".to_string(), |v| v.to_string());
            return Err(AmqpError::precondition_failed(format!(
                "replication protocol version {shown} is not supported: this broker speaks {}",
                replication::PROTOCOL_VERSION
            )));
        }
        let incarnation = get(&c.arguments, replication::ARG_INCARNATION)
            .and_then(as_str)
            .unwrap_or("");
        let ours = q.incarnation().to_string();
        if !incarnation.is_empty() && incarnation != ours {
            return Err(AmqpError::precondition_failed(format!(
                "incarnation mismatch: the original queue '{name}' is incarnation {ours}"
            )));
        }
        let info = get(&c.arguments, replication::ARG_INFO).and_then(|v| match v {
            amq_protocol::types::AMQPValue::FieldTable(t) => Some(t.clone()),
            _ => None,
        });
        let field = |k: &str| {
            info.as_ref()
                .and_then(|t| get(t, k))
                .and_then(as_str)
                .unwrap_or("")
                .to_string()
        };
        let replica = replication::subscription::ReplicaInfo {
            system_id: field("system-id"),
            host: field("host"),
            port: info
                .as_ref()
                .and_then(|t| get(t, "port"))
                .and_then(as_i64)
                .unwrap_or(0),
            peer: ctx.peer.to_string(),
        };
        if replica.system_id == b.system_id().to_string() {
            return Err(AmqpError::precondition_failed(
                "the original's address is this broker's own: a queue cannot replicate itself",
            ));
        }
        if let Some(theirs) = get(&c.arguments, replication::ARG_EPOCH).and_then(as_i64)
            && theirs > b.epoch() as i64
        {
            return Err(AmqpError::precondition_failed(format!(
                "stale primary: this broker's epoch {} is older than the backup's {theirs}",
                b.epoch()
            )));
        }
        // A replica is not an original, except for this primary's own cluster backups, which
        // copy it as they copy every replicated queue (its messages keep the original's ids).
        let own_backup = b.config.ha.cluster
            && b.config_subscriptions()
                .iter()
                .any(|c| c.system_id == replica.system_id);
        if q.is_replica() && !own_backup {
            return Err(AmqpError::precondition_failed(format!(
                "queue '{name}' is itself a replica here; replicate from its original"
            )));
        }
        let tag = if c.consumer_tag.as_str().is_empty() {
            server_generated_name("qpid.ha-q-")
        } else {
            c.consumer_tag.to_string()
        };
        let flow = b.config.ha.flow_messages;
        let window = match (self.default_prefetch, flow) {
            (0, f) => f,
            (p, 0) => p,
            (p, f) => p.min(f),
        };
        if !c.nowait {
            self.reply(AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(
                basic::ConsumeOk {
                    consumer_tag: short(&tag),
                },
            )));
        }
        let sub = ReplicatingSubscription::start(b, tag, q, self.link.clone(), replica, window);
        b.add_subscription(&sub);
        self.replication = Some(sub);
        Ok(())
    }

    /// basic.consume of a backup's configuration subscription (clusters).
    fn config_consume(
        &mut self,
        ctx: &ChannelContext<'_>,
        c: basic::Consume,
    ) -> Result<(), AmqpError> {
        use crate::fields::{as_i64, as_str, get};
        let b = ctx.broker;
        if !b.config.ha.cluster {
            return Err(AmqpError::precondition_failed(
                "this broker is not a cluster member (ha-cluster=no)",
            ));
        }
        let version = get(&c.arguments, replication::ARG_VERSION).and_then(as_i64);
        if version != Some(replication::PROTOCOL_VERSION) {
            return Err(AmqpError::precondition_failed(format!(
                "replication protocol version {} is not supported: this broker speaks {}",
                version.map_or("absent".to_string(), |v| v.to_string()),
                replication::PROTOCOL_VERSION
            )));
        }
        let (system_id, announced) = match get(&c.arguments, replication::ARG_INFO) {
            Some(amq_protocol::types::AMQPValue::FieldTable(t)) => (
                get(t, "system-id")
                    .and_then(as_str)
                    .unwrap_or("")
                    .to_string(),
                get(t, "address").and_then(as_str).map(str::to_string),
            ),
            _ => (String::new(), None),
        };
        if system_id == b.system_id().to_string() {
            return Err(AmqpError::precondition_failed(
                "the original's address is this broker's own: a broker cannot back itself up",
            ));
        }
        let status = b.ha_status();
        if !status.is_primary() {
            return Err(AmqpError::precondition_failed(format!(
                "not the primary: this broker's status is {}, epoch {}",
                status.as_str(),
                b.epoch()
            )));
        }
        let tag = if c.consumer_tag.as_str().is_empty() {
            server_generated_name("qpid.ha-config-")
        } else {
            c.consumer_tag.to_string()
        };
        if !c.nowait {
            self.reply(AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(
                basic::ConsumeOk {
                    consumer_tag: short(&tag),
                },
            )));
        }
        let _config = b.config_guard();
        let sub = replication::cluster::ConfigSubscription::start(
            b,
            tag,
            self.link.clone(),
            system_id.clone(),
            announced.unwrap_or_else(|| ctx.peer.to_string()),
        );
        b.add_config_subscription(&sub);
        tracing::info!(target: "HA", "backup {} (broker {system_id}) follows this primary's configuration", ctx.peer);
        self.config_sub = Some(sub);
        Ok(())
    }

    fn cancel(&mut self, ctx: &ChannelContext<'_>, tag: &str) {
        if self.replication.as_ref().is_some_and(|r| r.tag == tag) {
            if let Some(sub) = self.replication.take() {
                sub.close();
            }
            return;
        }
        let Some(consumer) = self.link.lock().consumers.remove(tag) else {
            return;
        };
        if consumer.mark_cancelled() {
            remove_consumer(ctx.broker, &consumer);
        }
    }

    fn tx_method(&mut self, ctx: &ChannelContext<'_>, m: tx::AMQPMethod) -> Result<(), AmqpError> {
        match m {
            tx::AMQPMethod::Select(_) => {
                if self.confirm.is_some() {
                    return Err(AmqpError::precondition_failed(
                        "cannot switch from confirm to tx mode",
                    ));
                }
                self.tx.get_or_insert_with(TxState::default);
                self.reply(AMQPClass::Tx(tx::AMQPMethod::SelectOk(tx::SelectOk {})));
                Ok(())
            }
            tx::AMQPMethod::Commit(_) => {
                let Some(tx) = self.tx.as_mut() else {
                    return Err(AmqpError::precondition_failed(
                        "channel is not transactional",
                    ));
                };
                let work = std::mem::take(tx);
                // commit-ok waits, like a confirm, for ready replicas to hold the publishes.
                let commit = Confirms::for_commit(self.link.clone());
                for p in work.publishes {
                    self.route_and_confirm(ctx, p, Some(&commit));
                }
                for (s, kind) in work.settles {
                    self.apply_settle(ctx, s, kind)?;
                }
                commit.decided(1);
                commit.flush();
                Ok(())
            }
            tx::AMQPMethod::Rollback(_) => {
                let Some(tx) = self.tx.as_mut() else {
                    return Err(AmqpError::precondition_failed(
                        "channel is not transactional",
                    ));
                };
                *tx = TxState::default();
                self.reply(AMQPClass::Tx(tx::AMQPMethod::RollbackOk(tx::RollbackOk {})));
                Ok(())
            }
            _ => Err(AmqpError::command_invalid(
                "server-to-client tx method sent by the client",
            )),
        }
    }

    /// The channel is going away (closed by either side, or its connection closed): requeue
    /// its unacked deliveries and cancel its consumers.
    pub fn shutdown(&mut self, broker: &Arc<Broker>) {
        self.pending = None;
        self.tx = None;
        if let Some(sub) = self.replication.take() {
            sub.close();
        }
        let (unacked, consumers) = self.link.close();
        for c in consumers {
            if c.mark_cancelled() {
                remove_consumer(broker, &c);
            }
        }
        requeue_all(unacked);
    }
}

/// Removes a consumer from its queue, deleting an auto-delete queue left without consumers.
fn remove_consumer(broker: &Arc<Broker>, consumer: &Arc<Consumer>) {
    let _config = broker.config_guard();
    let last = consumer.queue.remove_consumer(consumer, broker.now_ms());
    broker.emit_event(Event::Unsubscribe(SubscriptionEvent::of(consumer)));
    if last {
        broker.remove_queue(&consumer.queue);
    }
}

/// Groups settled deliveries by queue and settles each group under one queue lock.
fn settle_all(settled: Vec<Unacked>, reason: DequeueReason) {
    for (q, entries) in group_by_queue(settled) {
        q.settle(entries, reason);
    }
}

fn requeue_all(settled: Vec<Unacked>) {
    for (q, entries) in group_by_queue(settled) {
        q.requeue(entries);
    }
}

fn group_by_queue(settled: Vec<Unacked>) -> Vec<(Arc<Queue>, Vec<QueuedMessage>)> {
    let mut groups: Vec<(Arc<Queue>, Vec<QueuedMessage>)> = Vec::new();
    for u in settled {
        match groups.iter_mut().find(|(q, _)| Arc::ptr_eq(q, &u.queue)) {
            Some((_, v)) => v.push(u.entry),
            None => groups.push((u.queue, vec![u.entry])),
        }
    }
    groups
}

/// Tells a client that its consumer was cancelled by the broker (its queue was deleted).
pub fn write_server_cancel(link: &ChannelLink, tag: &str) {
    let ch = link.channel;
    let method = AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
        consumer_tag: short(tag),
        nowait: true,
    }));
    link.out.write(|out| write_method(out, ch, method));
}

/// A short string from broker-side text that is known to fit (names were short strings on the
/// wire; generated names are short).
fn short(s: &str) -> ShortString {
    ShortString::try_new(s.to_string()).unwrap_or_else(|_| ShortString::from(""))
}
