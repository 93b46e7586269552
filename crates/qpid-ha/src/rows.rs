//! `query`'s tables beyond Qpid's lines: one row per replica queue of the broker and one per
//! replicating subscriber it serves as an original, from the HA object's `replicas` and
//! `subscriptions` (JSON objects as the broker reports them; missing fields print as `-`).

use serde_json::Value;

/// The cluster members table (a cluster member's view), or nothing outside a cluster.
pub fn member_table(members: &[Value]) -> String {
    let rows: Vec<Vec<String>> = members
        .iter()
        .map(|m| {
            vec![
                text(&m["system-id"]),
                text(&m["status"]),
                text(&m["address"]),
            ]
        })
        .collect();
    table("Members", &["System ID", "Status", "Address"], &rows)
}

/// The store table (what the broker's store holds per durable queue, with the epoch it
/// knows), or nothing without durable queues.
pub fn store_table(epoch: u64, store: &[Value]) -> String {
    let rows: Vec<Vec<String>> = store
        .iter()
        .map(|r| {
            vec![
                text(&r["queue"]),
                text(&r["incarnation"]),
                text(&r["lastId"]),
                text(&r["messages"]),
            ]
        })
        .collect();
    table(
        &format!("Store (epoch {epoch})"),
        &["Queue", "Incarnation", "Last ID", "Messages"],
        &rows,
    )
}

/// The replicas table, or nothing when there are no replicas.
pub fn replica_table(replicas: &[Value]) -> String {
    let rows: Vec<Vec<String>> = replicas
        .iter()
        .map(|r| {
            vec![
                text(&r["queue"]),
                text(&r["original"]),
                text(&r["state"]),
                lag(&r["lag"]),
            ]
        })
        .collect();
    table("Replicas", &["Queue", "Original", "State", "Lag"], &rows)
}

/// The replicating subscriptions table, or nothing when there are none.
pub fn subscription_table(subscriptions: &[Value]) -> String {
    let rows: Vec<Vec<String>> = subscriptions
        .iter()
        .map(|s| {
            vec![
                text(&s["queue"]),
                text(&s["replica"]),
                text(&s["state"]),
                lag(&s["lag"]),
                text(&s["confirmsHeld"]),
            ]
        })
        .collect();
    table(
        "Replicating subscriptions",
        &["Queue", "Replica", "State", "Lag", "Confirms held"],
        &rows,
    )
}

/// A lag object `{messages, bytes, oldestUnackedMs}` as `12 msgs 3.4 KiB 15 ms`; `-` when the
/// lag is unknown (null or absent).
pub fn lag(lag: &Value) -> String {
    let Some(fields) = lag.as_object() else {
        return "-".into();
    };
    let number = |key: &str| fields.get(key).and_then(Value::as_u64);
    let messages = match number("messages") {
        Some(1) => "1 msg".to_string(),
        Some(n) => format!("{n} msgs"),
        None => "- msgs".into(),
    };
    let bytes = number("bytes").map_or_else(|| "- B".into(), size);
    let age = number("oldestUnackedMs").map_or_else(|| "- ms".into(), |ms| format!("{ms} ms"));
    format!("{messages} {bytes} {age}")
}

/// Bytes in binary units with one decimal: `512 B`, `3.4 KiB`, `1.0 MiB`.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A blank line, the title, then (Qpid's `Display.table`) a header, a rule of `=` and the rows,
/// each prefixed by two spaces, columns padded to their widest cell plus two.
fn table(title: &str, columns: &[&str], rows: &[Vec<String>]) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, head)| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([head.len()])
                .max()
                .unwrap_or(0)
                + 2
        })
        .collect();
    let format_row = |cells: &[&str]| {
        let mut line = "  ".to_string();
        for (i, text) in cells.iter().enumerate() {
            line.push_str(text);
            if i + 1 < cells.len() {
                line.push_str(&" ".repeat(widths[i] - text.chars().count()));
            }
        }
        line.push('\n');
        line
    };
    let mut out = format!("\n{title}\n");
    out.push_str(&format_row(columns));
    out.push_str(&format!("  {}\n", "=".repeat(widths.iter().sum())));
    for row in rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        out.push_str(&format_row(&cells));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lag_reads_as_messages_bytes_and_age() {
        assert_eq!(
            lag(&json!({"messages": 12, "bytes": 3482, "oldestUnackedMs": 15})),
            "12 msgs 3.4 KiB 15 ms"
        );
        assert_eq!(
            lag(&json!({"messages": 1, "bytes": 100, "oldestUnackedMs": 0})),
            "1 msg 100 B 0 ms"
        );
        assert_eq!(lag(&Value::Null), "-");
        assert_eq!(lag(&json!({"messages": 0})), "0 msgs - B - ms");
        assert_eq!(size(1023), "1023 B");
        assert_eq!(size(1024), "1.0 KiB");
        assert_eq!(size(5 * 1024 * 1024 + 512 * 1024), "5.5 MiB");
        assert_eq!(size(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }

    #[test]
    fn replica_rows() {
        let rows = [
            json!({"queue": "orders", "original": "node1:5672", "state": "ready",
                "link": "ready", "lag": {"messages": 0, "bytes": 0, "oldestUnackedMs": 0}}),
            json!({"queue": "jobs", "original": "node1:5672,node1b:5672",
                "state": "disconnected since 2026-11-25 20:35:42", "link": "connecting",
                "lag": {"messages": 12, "bytes": 3482, "oldestUnackedMs": 15}}),
            json!({"queue": "q", "original": "node3", "state": "connecting", "lag": null}),
        ];
        assert_eq!(
            replica_table(&rows),
            "\nReplicas\n\
             \x20 Queue   Original                State                                   Lag\n\
             \x20 ===============================================================================================\n\
             \x20 orders  node1:5672              ready                                   0 msgs 0 B 0 ms\n\
             \x20 jobs    node1:5672,node1b:5672  disconnected since 2026-11-25 20:35:42  12 msgs 3.4 KiB 15 ms\n\
             \x20 q       node3                   connecting                              -\n"
        );
        assert_eq!(replica_table(&[]), "");
    }

    #[test]
    fn subscription_rows() {
        let rows = [json!({"queue": "orders", "replica": "127.0.0.1:40312",
            "replicaHost": "node2:5672", "state": "ready",
            "lag": {"messages": 2, "bytes": 2048, "oldestUnackedMs": 3}, "confirmsHeld": 2,
            "stalls": 0})];
        assert_eq!(
            subscription_table(&rows),
            "\nReplicating subscriptions\n\
             \x20 Queue   Replica          State  Lag                  Confirms held\n\
             \x20 ====================================================================\n\
             \x20 orders  127.0.0.1:40312  ready  2 msgs 2.0 KiB 3 ms  2\n"
        );
        assert_eq!(subscription_table(&[]), "");
    }
}
