//! Exchanges and routing: direct, fanout, topic (`*`, `#`) and headers (`x-match` all/any).
//!
//! An exchange holds its bindings behind a read-write lock; routing takes the read lock and
//! appends the matching queues to a caller-owned vector (reused per channel, so routing
//! allocates nothing). A queue bound twice to one exchange receives one copy.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use amq_protocol::types::{AMQPValue, FieldTable};
use parking_lot::RwLock;

use crate::error::AmqpError;
use crate::fields;
use crate::message::Message;
use crate::queue::Queue;

/// The exchange types this broker implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeKind {
    /// Routing key equals binding key.
    Direct,
    /// Every bound queue.
    Fanout,
    /// Dotted words with `*` (one word) and `#` (zero or more words).
    Topic,
    /// Message headers against binding arguments.
    Headers,
}

impl ExchangeKind {
    /// Parses the type name of exchange.declare.
    pub fn parse(name: &str) -> Option<ExchangeKind> {
        Some(match name {
            "direct" => ExchangeKind::Direct,
            "fanout" => ExchangeKind::Fanout,
            "topic" => ExchangeKind::Topic,
            "headers" => ExchangeKind::Headers,
            _ => return None,
        })
    }

    /// The type name.
    pub fn name(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Headers => "headers",
        }
    }
}

/// One binding of a queue to an exchange.
#[derive(Debug, Clone)]
pub struct Binding {
    /// The bound queue.
    pub queue: Arc<Queue>,
    /// The binding key.
    pub key: String,
    /// The binding arguments (headers exchanges match on them).
    pub arguments: FieldTable,
}

#[derive(Debug, Default)]
struct Bindings {
    all: Vec<Binding>,
    /// Direct exchanges: key -> queues, for O(1) routing.
    by_key: HashMap<String, Vec<Arc<Queue>>>,
}

/// An exchange.
#[derive(Debug)]
pub struct Exchange {
    /// Its name ("" is the default exchange).
    pub name: String,
    /// Its type.
    pub kind: ExchangeKind,
    /// Survives a restart (once there is a store).
    pub durable: bool,
    /// Deleted when its last binding goes.
    pub auto_delete: bool,
    /// Clients may not publish to it.
    pub internal: bool,
    /// Declare arguments as the client gave them.
    pub arguments: FieldTable,
    /// The `alternate-exchange` argument: where messages that match no binding go.
    pub alternate: Option<String>,
    bindings: RwLock<Bindings>,
    ever_bound: AtomicBool,
}

impl Exchange {
    /// A new exchange with no bindings.
    pub fn new(
        name: String,
        kind: ExchangeKind,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: FieldTable,
    ) -> Exchange {
        Exchange {
            name,
            kind,
            durable,
            auto_delete,
            internal,
            alternate: fields::get(&arguments, "alternate-exchange")
                .and_then(fields::as_str)
                .map(str::to_string),
            arguments,
            bindings: RwLock::new(Bindings::default()),
            ever_bound: AtomicBool::new(false),
        }
    }

    /// Appends the queues `message` routes to. Queues already in `out` are not added again.
    pub fn route(&self, routing_key: &str, message: &Message, out: &mut Vec<Arc<Queue>>) {
        let b = self.bindings.read();
        match self.kind {
            ExchangeKind::Direct => {
                if let Some(qs) = b.by_key.get(routing_key) {
                    for q in qs {
                        push_unique(out, q);
                    }
                }
            }
            ExchangeKind::Fanout => {
                for binding in &b.all {
                    push_unique(out, &binding.queue);
                }
            }
            ExchangeKind::Topic => {
                for binding in &b.all {
                    if topic_matches(&binding.key, routing_key) {
                        push_unique(out, &binding.queue);
                    }
                }
            }
            ExchangeKind::Headers => {
                if b.all.is_empty() {
                    return;
                }
                let headers = message
                    .summary()
                    .headers
                    .and_then(fields::decode_table)
                    .unwrap_or_default();
                for binding in &b.all {
                    if headers_match(&binding.arguments, &headers) {
                        push_unique(out, &binding.queue);
                    }
                }
            }
        }
    }

    /// Adds a binding; binding the same queue with the same key and arguments again is a no-op.
    pub fn bind(
        &self,
        queue: &Arc<Queue>,
        key: &str,
        arguments: &FieldTable,
    ) -> Result<bool, AmqpError> {
        if self.kind == ExchangeKind::Headers {
            validate_x_match(arguments)?;
        }
        let mut b = self.bindings.write();
        if b.all.iter().any(|x| same_binding(x, queue, key, arguments)) {
            return Ok(false);
        }
        b.all.push(Binding {
            queue: queue.clone(),
            key: key.to_string(),
            arguments: arguments.clone(),
        });
        if self.kind == ExchangeKind::Direct {
            b.by_key
                .entry(key.to_string())
                .or_default()
                .push(queue.clone());
        }
        self.ever_bound.store(true, Ordering::Relaxed);
        Ok(true)
    }

    /// Removes a binding. Returns false if there was none.
    pub fn unbind(&self, queue: &Arc<Queue>, key: &str, arguments: &FieldTable) -> bool {
        let mut b = self.bindings.write();
        let before = b.all.len();
        b.all.retain(|x| !same_binding(x, queue, key, arguments));
        let removed = b.all.len() != before;
        if removed && self.kind == ExchangeKind::Direct {
            remove_from_key(&mut b.by_key, key, queue);
        }
        removed
    }

    /// Removes every binding of `queue` (the queue is being deleted).
    pub fn unbind_queue(&self, queue: &Arc<Queue>) {
        let mut b = self.bindings.write();
        let keys: Vec<String> = b
            .all
            .iter()
            .filter(|x| Arc::ptr_eq(&x.queue, queue))
            .map(|x| x.key.clone())
            .collect();
        b.all.retain(|x| !Arc::ptr_eq(&x.queue, queue));
        for key in keys {
            remove_from_key(&mut b.by_key, &key, queue);
        }
    }

    /// A copy of the bindings, for listings.
    pub fn bindings(&self) -> Vec<Binding> {
        self.bindings.read().all.clone()
    }

    /// How many bindings it has.
    pub fn binding_count(&self) -> usize {
        self.bindings.read().all.len()
    }

    /// True if it is auto-delete, was bound once, and has no binding left.
    pub fn should_auto_delete(&self) -> bool {
        self.auto_delete && self.ever_bound.load(Ordering::Relaxed) && self.binding_count() == 0
    }
}

fn same_binding(b: &Binding, queue: &Arc<Queue>, key: &str, arguments: &FieldTable) -> bool {
    Arc::ptr_eq(&b.queue, queue)
        && b.key == key
        && fields::tables_equivalent(&b.arguments, arguments)
}

fn remove_from_key(by_key: &mut HashMap<String, Vec<Arc<Queue>>>, key: &str, queue: &Arc<Queue>) {
    if let Some(qs) = by_key.get_mut(key) {
        if let Some(i) = qs.iter().position(|q| Arc::ptr_eq(q, queue)) {
            qs.swap_remove(i);
        }
        if qs.is_empty() {
            by_key.remove(key);
        }
    }
}

fn push_unique(out: &mut Vec<Arc<Queue>>, q: &Arc<Queue>) {
    if !out.iter().any(|x| Arc::ptr_eq(x, q)) {
        out.push(q.clone());
    }
}

/// Topic matching: `*` matches exactly one word, `#` zero or more.
pub fn topic_matches(pattern: &str, key: &str) -> bool {
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = if key.is_empty() {
        Vec::new()
    } else {
        key.split('.').collect()
    };
    let p: &[&str] = if pattern.is_empty() { &[] } else { &p };
    topic_match_words(p, &k)
}

fn topic_match_words(p: &[&str], k: &[&str]) -> bool {
    // Iterative with backtracking over the last '#', like glob matching.
    let (mut pi, mut ki) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ki < k.len() {
        if pi < p.len() && p[pi] == "#" {
            star = Some((pi, ki));
            pi += 1;
        } else if pi < p.len() && (p[pi] == "*" || p[pi] == k[ki]) {
            pi += 1;
            ki += 1;
        } else if let Some((sp, sk)) = star {
            pi = sp + 1;
            ki = sk + 1;
            star = Some((sp, sk + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|w| *w == "#")
}

fn validate_x_match(arguments: &FieldTable) -> Result<(), AmqpError> {
    match fields::get(arguments, "x-match").map(|v| fields::as_str(v)) {
        None => Ok(()),
        Some(Some("all" | "any" | "all-with-x" | "any-with-x")) => Ok(()),
        Some(_) => Err(AmqpError::precondition_failed(
            "x-match must be one of all, any, all-with-x, any-with-x",
        )),
    }
}

/// Headers matching: `x-match` `all` (default) or `any`; binding keys starting with `x-` are
/// ignored unless the mode ends in `-with-x`. A binding value of type void matches presence.
pub fn headers_match(binding: &FieldTable, headers: &FieldTable) -> bool {
    let mode = fields::get(binding, "x-match")
        .and_then(fields::as_str)
        .unwrap_or("all");
    let with_x = mode.ends_with("-with-x");
    let any = mode.starts_with("any");
    let mut considered = binding.inner().iter().filter(|(k, _)| {
        let k = k.as_str();
        k != "x-match" && (with_x || !k.starts_with("x-"))
    });
    let matches =
        |(k, v): (&amq_protocol::types::ShortString, &AMQPValue)| match headers.inner().get(k) {
            None => false,
            Some(h) => matches!(v, AMQPValue::Void) || fields::values_match(v, h),
        };
    if any {
        considered.any(matches)
    } else {
        considered.all(matches)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_wildcards() {
        let cases = [
            ("a.b.c", "a.b.c", true),
            ("a.*.c", "a.b.c", true),
            ("a.*.c", "a.c", false),
            ("a.#", "a", true),
            ("a.#", "a.b.c", true),
            ("#", "", true),
            ("#", "x.y", true),
            ("#.c", "a.b.c", true),
            ("#.c", "a.b.d", false),
            ("a.#.c", "a.c", true),
            ("a.#.c", "a.x.y.c", true),
            ("*", "", false),
            ("*.*", "a", false),
            ("a.#.#.b", "a.b", true),
            ("", "", true),
            ("", "a", false),
            ("#.#", "a.b", true),
        ];
        for (p, k, want) in cases {
            assert_eq!(topic_matches(p, k), want, "{p} vs {k}");
        }
    }

    fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert((*k).into(), v.clone());
        }
        t
    }

    #[test]
    fn headers_all_and_any() {
        let h = table(&[
            ("a", AMQPValue::LongString("1".into())),
            ("b", AMQPValue::LongInt(2)),
        ]);
        let all = table(&[
            ("x-match", AMQPValue::LongString("all".into())),
            ("a", AMQPValue::LongString("1".into())),
            ("b", AMQPValue::LongLongInt(2)),
        ]);
        assert!(headers_match(&all, &h));
        let all_missing = table(&[
            ("a", AMQPValue::LongString("1".into())),
            ("c", AMQPValue::Void),
        ]);
        assert!(!headers_match(&all_missing, &h));
        let any = table(&[
            ("x-match", AMQPValue::LongString("any".into())),
            ("a", AMQPValue::LongString("2".into())),
            ("b", AMQPValue::LongInt(2)),
        ]);
        assert!(headers_match(&any, &h));
    }
}
