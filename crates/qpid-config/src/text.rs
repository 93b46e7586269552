//! Qpid's fixed text formats for `qpid-config` listings (reference 3.3), as pure functions from
//! what the broker reported to lines, so they are tested without a broker. Python 2's `print x,`
//! spacing is kept: two spaces between a row's name column and its first attribute.

use std::collections::BTreeMap;

use mgmt_client::{BindingInfo, ExchangeInfo, ManagedObject, QueueInfo, reference_name};
use serde_json::{Map, Value};

/// Queue arguments that have their own option, so they are not shown as `--argument`.
const QUEUE_SPECIAL_ARGUMENTS: &[&str] = &[
    "qpid.replicate",
    "qpid.max_size",
    "qpid.max_count",
    "qpid.policy_type",
    "qpid.last_value_queue_key",
];

/// A value as Python's `%s` shows it: strings bare, everything else as JSON.
pub fn value_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        other => other.to_string(),
    }
}

fn rule(repeat: usize) -> String {
    "=====".repeat(repeat)
}

fn row(start: String, attributes: &[String]) -> String {
    let mut line = start;
    for attribute in attributes {
        line.push(' ');
        line.push_str(attribute);
    }
    line
}

/// The overview printed when no command is given.
pub fn overview(exchanges: &[ExchangeInfo], queues: &[QueueInfo]) -> Vec<String> {
    let mut lines = vec![format!("Total Exchanges: {}", exchanges.len())];
    let mut by_type: BTreeMap<&str, usize> = BTreeMap::new();
    for exchange in exchanges {
        *by_type.entry(exchange.exchange_type.as_str()).or_default() += 1;
    }
    for (exchange_type, count) in by_type {
        lines.push(format!("{exchange_type:>15}: {count}"));
    }
    let durable = queues.iter().filter(|q| q.durable).count();
    lines.push(String::new());
    lines.push(format!("   Total Queues: {}", queues.len()));
    lines.push(format!("        durable: {durable}"));
    lines.push(format!("    non-durable: {}", queues.len() - durable));
    lines
}

/// `exchanges`: the header, the rule and one row per exchange given (already filtered).
pub fn exchange_list(exchanges: &[&ExchangeInfo]) -> Vec<String> {
    let caption = "Type      ";
    let width = exchanges
        .iter()
        .map(|e| e.name.len())
        .chain(["Exchange Name".len()])
        .max()
        .unwrap_or_default();
    let mut lines = vec![
        format!("{caption}{:<width$}  Attributes", "Exchange Name"),
        rule((width + caption.len()) / 5 + 5),
    ];
    for exchange in exchanges {
        let mut attributes = Vec::new();
        if exchange.durable {
            attributes.push("--durable".to_string());
        }
        if let Some(level) = exchange.arguments.get("qpid.replicate") {
            attributes.push(format!("--replicate={}", value_text(level)));
        }
        if let Some(alternate) = &exchange.alternate_exchange {
            attributes.push(format!("--alternate-exchange={alternate}"));
        }
        let start = format!("{:<10}{:<width$} ", exchange.exchange_type, exchange.name);
        lines.push(row(start, &attributes));
    }
    lines
}

/// `queues`: the header, the rule and one row per queue given (already filtered).
pub fn queue_list(queues: &[&QueueInfo]) -> Vec<String> {
    let width = queues
        .iter()
        .map(|q| q.name.len())
        .chain(["Queue Name".len()])
        .max()
        .unwrap_or_default();
    let mut lines = vec![
        format!("{:<width$}  Attributes", "Queue Name"),
        rule(width / 5 + 5),
    ];
    for queue in queues {
        lines.push(row(
            format!("{:<width$} ", queue.name),
            &queue_attributes(queue),
        ));
    }
    lines
}

fn queue_attributes(queue: &QueueInfo) -> Vec<String> {
    let arguments = &queue.arguments;
    let mut attributes = Vec::new();
    if queue.durable {
        attributes.push("--durable".to_string());
    }
    if let Some(level) = arguments.get("qpid.replicate") {
        attributes.push(format!("--replicate={}", value_text(level)));
    }
    if queue.auto_delete {
        attributes.push("auto-del".into());
    }
    if queue.exclusive {
        attributes.push("excl".into());
    }
    if let Some(size) = arguments.get("qpid.max_size") {
        attributes.push(format!("--max-queue-size={}", value_text(size)));
    }
    if let Some(count) = arguments.get("qpid.max_count") {
        attributes.push(format!("--max-queue-count={}", value_text(count)));
    }
    if let Some(policy) = arguments.get("qpid.policy_type") {
        let policy = value_text(policy).replace('_', "-");
        attributes.push(format!("--limit-policy={policy}"));
    }
    if let Some(key) = arguments.get("qpid.last_value_queue_key") {
        attributes.push(format!("--lvq-key={}", value_text(key)));
    }
    if let Some(alternate) = &queue.alternate_exchange {
        attributes.push(format!("--alternate-exchange={alternate}"));
    }
    for (name, value) in arguments {
        let is_alternate = name == "x-dead-letter-exchange" && queue.alternate_exchange.is_some();
        if !QUEUE_SPECIAL_ARGUMENTS.contains(&name.as_str()) && !is_alternate {
            attributes.push(format!("--argument {name}={}", value_text(value)));
        }
    }
    attributes
}

/// `-r` with `queues`: each queue and the bindings to it (the default exchange's first, as
/// `''`, unless `ignore_default`).
pub fn queue_bindings(
    queues: &[&QueueInfo],
    bindings: &[BindingInfo],
    ignore_default: bool,
) -> Vec<String> {
    let mut lines = Vec::new();
    for queue in queues {
        lines.push(format!("Queue '{}'", queue.name));
        if !ignore_default {
            lines.push(format!("    bind [{}] => ''", queue.name));
        }
        for binding in bindings.iter().filter(|b| b.queue == queue.name) {
            lines.push(format!(
                "    bind [{}] => {}",
                binding.key, binding.exchange
            ));
        }
    }
    lines
}

/// `-r` with `exchanges`: each exchange and its bindings, with their arguments if any.
pub fn exchange_bindings(
    exchanges: &[&ExchangeInfo],
    bindings: &[BindingInfo],
    queues: &[QueueInfo],
) -> Vec<String> {
    let mut lines = Vec::new();
    for exchange in exchanges {
        lines.push(format!(
            "Exchange '{}' ({})",
            exchange.name, exchange.exchange_type
        ));
        if exchange.name.is_empty() {
            for queue in queues {
                lines.push(format!("    bind [{}] => {}", queue.name, queue.name));
            }
        }
        for binding in bindings.iter().filter(|b| b.exchange == exchange.name) {
            let mut line = format!("    bind [{}] => {}", binding.key, binding.queue);
            if !binding.arguments.is_empty() {
                line.push(' ');
                line.push_str(&Value::Object(binding.arguments.clone()).to_string());
            }
            lines.push(line);
        }
    }
    lines
}

/// The columns `list` shows when no `--show-property` is given.
pub fn default_columns(object_type: &str, objects: &[ManagedObject]) -> Vec<String> {
    match object_type {
        "exchange" => vec!["name".into(), "type".into(), "durable".into()],
        "queue" => vec!["name".into(), "durable".into(), "autoDelete".into()],
        _ => {
            let Some(first) = objects.first() else {
                return vec!["name".into()];
            };
            let mut columns: Vec<String> = first.values.keys().cloned().collect();
            if let Some(at) = columns.iter().position(|c| c == "name") {
                let name = columns.remove(at);
                columns.insert(0, name);
            }
            columns.truncate(6);
            columns
        }
    }
}

fn cell(values: &Map<String, Value>, column: &str) -> String {
    match values.get(column) {
        None | Some(Value::Null) => String::new(),
        Some(reference @ Value::Object(map)) if map.contains_key("_object_name") => {
            reference_name(reference)
        }
        Some(value) => value_text(value),
    }
}

/// `list`: Qpid's `Display.table`: a title, then (if there are objects) a header, a rule of `=`
/// and the rows, each prefixed by two spaces, columns padded to their widest cell plus two.
pub fn object_table(
    object_type: &str,
    columns: &[String],
    objects: &[ManagedObject],
) -> Vec<String> {
    let mut lines = vec![format!("Objects of type '{object_type}'")];
    if objects.is_empty() {
        return lines;
    }
    let rows: Vec<Vec<String>> = objects
        .iter()
        .map(|o| columns.iter().map(|c| cell(&o.values, c)).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, head)| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([head.len()])
                .max()
                .unwrap_or(0)
                + 2
        })
        .collect();
    let format_row = |cells: &[String]| {
        let mut line = "  ".to_string();
        for (i, text) in cells.iter().enumerate() {
            line.push_str(text);
            if i + 1 < cells.len() {
                line.push_str(&" ".repeat(widths[i] - text.len()));
            }
        }
        line
    };
    lines.push(format_row(columns));
    let mut rule_line = format!("  {}", "=".repeat(widths.iter().sum()));
    rule_line.truncate(255);
    lines.push(rule_line);
    for cells in &rows {
        lines.push(format_row(cells));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn queue(name: &str, durable: bool, arguments: Value) -> QueueInfo {
        QueueInfo {
            name: name.into(),
            durable,
            auto_delete: false,
            exclusive: false,
            arguments: arguments.as_object().cloned().unwrap_or_default(),
            alternate_exchange: None,
            message_depth: 0,
            byte_depth: 0,
            consumer_count: 0,
            binding_count: 1,
        }
    }

    #[test]
    fn queue_rows_follow_qpid() {
        let q1 = queue(
            "q1",
            true,
            json!({"qpid.max_count": 5, "qpid.policy_type": "ring", "x-a": "b"}),
        );
        let lines = queue_list(&[&q1]);
        assert_eq!(lines[0], "Queue Name  Attributes");
        assert_eq!(lines[1], "=".repeat(5 * 7));
        assert_eq!(
            lines[2],
            "q1          --durable --max-queue-count=5 --limit-policy=ring --argument x-a=b"
        );
    }

    #[test]
    fn tables_are_autosized() {
        let object = ManagedObject {
            object_name: "x".into(),
            values: json!({"name": "q1", "durable": false, "autoDelete": true})
                .as_object()
                .cloned()
                .unwrap(),
        };
        let columns = default_columns("queue", std::slice::from_ref(&object));
        assert_eq!(
            object_table("queue", &columns, &[object]),
            vec![
                "Objects of type 'queue'",
                "  name  durable  autoDelete",
                "  ===========================",
                "  q1    False    True",
            ]
        );
    }
}
