//! `redrive status`: tables for people, `--json` for scripts. Both show the same [`Status`].

use super::{clip, connect, count, explain, table, when};
use crate::cli::StatusArgs;
use crate::config::{redact_url, PostgresConfig};
use crate::store::status::{Limits, Status};
use secrecy::ExposeSecret;

/// Runs `redrive status` and prints it.
pub async fn run(postgres: &PostgresConfig, args: &StatusArgs) -> anyhow::Result<()> {
    let store = connect(postgres).await?;
    let status = store
        .status(
            args.window,
            args.top,
            if args.exact {
                Limits::EXACT
            } else {
                Limits::DEFAULT
            },
        )
        .await
        .map_err(|e| explain(e, "reading the status"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!(
            "{}",
            render(&status, &redact_url(postgres.url.expose_secret()))
        );
    }
    Ok(())
}

/// The status as text tables.
pub fn render(s: &Status, database: &str) -> String {
    let mut out = format!(
        "redrive status of {database} at {}\n\n",
        s.at.format("%Y-%m-%d %H:%M:%S UTC")
    );
    out += "Rows by topic\n";
    if s.topics.is_empty() {
        out += "  (the retry table is empty)\n";
    } else {
        let mut t = table(&[
            "group", "topic", "pending", "running", "paused", "dead", "replayed", "waiting",
        ]);
        for c in &s.topics {
            let n = |n: i64| count(n, c.estimated);
            t.add_row(vec![
                c.consumer_group.clone(),
                c.topic.clone(),
                n(c.pending),
                n(c.running),
                n(c.paused),
                n(c.dead),
                n(c.replayed),
                n(c.waiting),
            ]);
        }
        out += &format!("{t}\n");
    }
    if !s.groups.is_empty() {
        out += "\nRetries and DLQ outbox by group\n";
        let mut t = table(&[
            "group",
            "due now",
            "oldest due",
            "next due",
            "DLQ backlog",
            "oldest unpublished",
            "DLQ refused",
        ]);
        for g in &s.groups {
            let n = |n: i64| count(n, g.estimated);
            t.add_row(vec![
                g.consumer_group.clone(),
                n(g.due),
                when(g.oldest_due_at, s.at),
                when(g.next_due_at, s.at),
                n(g.dlq_backlog),
                when(g.dlq_oldest_dead_at, s.at),
                n(g.dlq_refused),
            ]);
        }
        out += &format!("{t}\n");
    }
    if !s.paused_topics.is_empty() {
        out += "\nPaused topics\n";
        let mut t = table(&["group", "topic", "since", "by", "reason"]);
        for p in &s.paused_topics {
            t.add_row(vec![
                p.consumer_group.clone(),
                p.topic.clone(),
                when(Some(p.paused_at), s.at),
                p.paused_by.clone(),
                p.reason.clone().unwrap_or_default(),
            ]);
        }
        out += &format!("{t}\n");
    }
    if !s.breakers.is_empty() || !s.breaker_holds.is_empty() {
        out += "\n";
        out += &super::breaker::render(&s.breaker_holds, &s.breakers, s.at);
    }
    if !s.key_lines.is_empty() {
        out += &format!(
            "\nKeys waiting behind a row of theirs ({} in all; `redrive.key_lines` has them all)\n",
            s.key_lines_total
        );
        let mut t = table(&[
            "group",
            "topic",
            "partition",
            "key",
            "head offset",
            "head",
            "waiting",
        ]);
        for l in &s.key_lines {
            let head = if l.needs_operator {
                "dead: replay or purge it".to_string()
            } else {
                l.head_state.clone()
            };
            t.add_row(vec![
                l.consumer_group.clone(),
                l.topic.clone(),
                l.partition.to_string(),
                l.key.as_deref().map(|k| clip(k, 40)).unwrap_or_default(),
                l.head_offset.to_string(),
                head,
                l.waiting.to_string(),
            ]);
        }
        out += &format!("{t}\n");
    }
    let window = humantime::format_duration(std::time::Duration::from_secs(s.error_window_seconds));
    out += &format!("\nTop errors in the last {window}\n");
    if s.top_errors.is_empty() {
        out += "  (no failed attempts recorded in the window)\n";
    } else {
        let mut t = table(&["failures", "rows", "kind", "error", "last seen"]);
        for e in &s.top_errors {
            t.add_row(vec![
                count(e.failures, s.top_errors_estimated),
                count(e.rows, s.top_errors_estimated),
                e.kind.clone().unwrap_or_default(),
                e.error.as_deref().map(|e| clip(e, 72)).unwrap_or_default(),
                when(e.last_at, s.at),
            ]);
        }
        out += &format!("{t}\n");
    }
    if let Some(sample) = s.sample {
        out += &format!(
            "\n~ estimated from a random {:.2} % of the table's {} pages: counting every row would \
             read the whole table. `redrive status --exact` does.\n",
            sample.percent, sample.table_pages
        );
    }
    out
}
