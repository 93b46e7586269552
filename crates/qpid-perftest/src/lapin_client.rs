//! `--client lapin`: the same producers and consumers written with the lapin client, for a
//! comparison figure (lapin spends several µs of CPU per message, so these runs measure the
//! client as much as the broker). Same stamps, same accounting, same report.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use tokio::sync::oneshot;

use crate::consumer::{ConsumerPlan, ConsumerResult};
use crate::frames::Stamp;
use crate::producer::{ProducerPlan, ProducerResult};
use crate::shared::{Phase, Shared};
use crate::tracking::ConfirmTracker;

/// Runs one lapin producer to completion.
pub async fn producer(uri: String, plan: ProducerPlan, shared: Arc<Shared>) -> ProducerResult {
    let mut result = ProducerResult {
        id: plan.id,
        ..Default::default()
    };
    if let Err(e) = run_producer(&uri, &plan, &shared, &mut result).await {
        result.error = Some(format!("lapin producer {}: {e:#}", plan.id));
    }
    result
}

async fn run_producer(
    uri: &str,
    plan: &ProducerPlan,
    shared: &Shared,
    result: &mut ProducerResult,
) -> anyhow::Result<()> {
    let conn = Connection::connect(uri, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let window = plan.confirm_window as usize;
    if window > 0 {
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        result.confirms = Some(ConfirmTracker::new());
    }
    let props = if plan.persistent {
        BasicProperties::default().with_delivery_mode(2)
    } else {
        BasicProperties::default()
    };
    let template: Vec<u8> = (0..plan.size).map(|i| (i % 251) as u8).collect();
    let mut bodies = vec![template; PIPELINE];
    let mut pending = VecDeque::new();
    let limit = plan.count.unwrap_or(u64::MAX);
    let interval_ns = if plan.rate > 0.0 {
        1e9 / plan.rate
    } else {
        0.0
    };
    let t0 = shared.now_ns() + plan.schedule_offset_ns;
    let mut seq = 0u64;
    while seq < limit && shared.phase() < Phase::StopPublishing {
        if shared.over_backlog() {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        let mut k = (limit - seq).min(PIPELINE as u64);
        if window > 0 {
            while pending.len() >= window {
                settle(pending.pop_front().expect("not empty").await?, result);
            }
            k = k.min((window - pending.len()) as u64);
        }
        let now = shared.now_ns();
        if plan.rate > 0.0 {
            let at = t0 + (seq as f64 * interval_ns) as u64;
            if at > now {
                tokio::time::sleep(Duration::from_nanos(at - now)).await;
                continue;
            }
            k = k.min(((now - t0) as f64 / interval_ns) as u64 + 1 - seq);
        }
        for (i, body) in bodies.iter_mut().take(k as usize).enumerate() {
            let n = seq + i as u64;
            let sent_ns = if plan.rate > 0.0 {
                t0 + (n as f64 * interval_ns) as u64
            } else {
                now
            };
            Stamp {
                sent_ns,
                run: shared.run_tag,
                producer: plan.id,
                seq: n as u32,
            }
            .encode(body);
        }
        // lapin resolves a publish only once its io loop has written it: keep several in
        // flight (polled in order, so delivery tags follow sequence numbers).
        let publishes = bodies.iter().take(k as usize).map(|body| {
            ch.basic_publish(
                "".into(),
                plan.routing_key.as_str().into(),
                BasicPublishOptions::default(),
                body,
                props.clone(),
            )
        });
        for confirm in join_in_order(publishes.collect()).await {
            let confirm = confirm?;
            if window > 0 {
                result.confirms.as_mut().expect("confirms on").published(1);
                pending.push_back(confirm);
            }
        }
        seq += k;
        result.sent = seq;
        shared.sent.fetch_add(k, Ordering::Relaxed);
    }
    let drain = async {
        while let Some(c) = pending.pop_front() {
            settle(c.await?, result);
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(plan.confirm_timeout, drain)
        .await
        .unwrap_or(Ok(()))?;
    let _ = conn.close(200, "bye".into()).await;
    Ok(())
}

/// Publishes kept in flight at once by a lapin producer.
const PIPELINE: usize = 64;

/// Polls all futures (the first poll of each in order) until every one is ready.
async fn join_in_order<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (f, out) in futures.iter_mut().zip(outputs.iter_mut()) {
            if out.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => *out = Some(v),
                    Poll::Pending => all = false,
                }
            }
        }
        if all { Poll::Ready(()) } else { Poll::Pending }
    })
    .await;
    outputs.into_iter().map(|o| o.expect("ready")).collect()
}

fn settle(c: Confirmation, result: &mut ProducerResult) {
    if let Some(t) = result.confirms.as_mut() {
        // lapin resolves confirms in publish order: the next unsettled tag.
        let tag = t.published_count() - t.outstanding() + 1;
        t.settle(tag, false, matches!(c, Confirmation::Nack(_)));
    }
}

/// Runs one lapin consumer until the run is done.
pub async fn consumer(
    uri: String,
    plan: ConsumerPlan,
    shared: Arc<Shared>,
    ready: oneshot::Sender<()>,
) -> ConsumerResult {
    let mut result = ConsumerResult::new();
    if let Err(e) = run_consumer(&uri, &plan, &shared, ready, &mut result).await {
        result.error = Some(format!("lapin consumer {}: {e:#}", plan.id));
    }
    result
}

async fn run_consumer(
    uri: &str,
    plan: &ConsumerPlan,
    shared: &Shared,
    ready: oneshot::Sender<()>,
    result: &mut ConsumerResult,
) -> anyhow::Result<()> {
    let conn = Connection::connect(uri, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    if !plan.auto_ack {
        ch.basic_qos(plan.prefetch, BasicQosOptions::default())
            .await?;
    }
    let mut deliveries = ch
        .basic_consume(
            plan.queue.as_str().into(),
            format!("perftest-lapin-c{}", plan.id).into(),
            BasicConsumeOptions {
                no_ack: plan.auto_ack,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let _ = ready.send(());
    let ack_every = if plan.prefetch == 0 {
        100
    } else {
        (u64::from(plan.prefetch) / 4).max(1)
    };
    let mut unacked = 0u64;
    let mut phase_rx = shared.watch_phase();
    loop {
        let d = tokio::select! {
            biased;
            d = deliveries.next() => match d {
                Some(d) => d?,
                None => anyhow::bail!("the consumer stream ended"),
            },
            _ = phase_rx.changed() => {
                if shared.phase() == Phase::Done {
                    break;
                }
                continue;
            }
        };
        let now = shared.now_ns();
        let phase = shared.phase();
        if phase == Phase::Done {
            break;
        }
        result.on_message(&d.data, shared.run_tag, now, phase == Phase::Measure);
        result.redelivered += u64::from(d.redelivered);
        shared.received.fetch_add(1, Ordering::Relaxed);
        if !plan.auto_ack {
            unacked += 1;
            if unacked >= ack_every {
                ch.basic_ack(d.delivery_tag, BasicAckOptions { multiple: true })
                    .await?;
                unacked = 0;
            }
        }
    }
    let _ = conn.close(200, "bye".into()).await;
    Ok(())
}
