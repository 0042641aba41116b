//! `redrive breaker status|open|close|release`: the circuit breakers of the running processes, and
//! operators' holds on them (I13).

use super::{clip, connect, explain, table, when};
use crate::breaker::State;
use crate::cli::{BreakerCommand, BreakerTarget};
use crate::config::PostgresConfig;
use crate::store::breakers::{hold_for, Hold, Reported};
use crate::store::Store;
use chrono::{DateTime, Utc};
use std::time::{Duration, Instant};

/// Runs one `redrive breaker` command and prints what it did.
pub async fn run(postgres: &PostgresConfig, command: &BreakerCommand) -> anyhow::Result<()> {
    let store = connect(postgres).await?;
    match command {
        BreakerCommand::Status { json } => {
            let (holds, reported) = read(&store).await?;
            if *json {
                let value = serde_json::json!({ "holds": holds, "breakers": reported });
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print!("{}", render(&holds, &reported, Utc::now()));
            }
        }
        BreakerCommand::Open(args) | BreakerCommand::Close(args) => {
            let hold = match command {
                BreakerCommand::Open(_) => State::Open,
                _ => State::Closed,
            };
            let t = &args.target;
            store
                .hold_breaker(hold, &t.breaker, &t.consumer_group, args.reason.as_deref())
                .await
                .map_err(|e| explain(e, "writing the hold"))?;
            println!(
                "held {} breaker {} of consumer group {}",
                hold.as_str(),
                shown(&t.breaker),
                shown(&t.consumer_group)
            );
            wait_for(&store, t).await?;
        }
        BreakerCommand::Release(t) => {
            let lifted = store
                .release_breaker(&t.breaker, &t.consumer_group)
                .await
                .map_err(|e| explain(e, "lifting the holds"))?;
            println!(
                "lifted {lifted} hold(s) on breaker {} of consumer group {}",
                shown(&t.breaker),
                shown(&t.consumer_group)
            );
            if lifted > 0 {
                wait_for(&store, t).await?;
            }
        }
    }
    Ok(())
}

async fn read(store: &Store) -> anyhow::Result<(Vec<Hold>, Vec<Reported>)> {
    store
        .breakers()
        .await
        .map_err(|e| explain(e, "reading the breakers"))
}

fn shown(name: &str) -> String {
    if name == "*" {
        "* (all)".into()
    } else {
        name.into()
    }
}

fn matches(pattern: &str, name: &str) -> bool {
    pattern == "*" || pattern == name
}

/// Waits until every live process with a breaker that `target` covers reports the hold that now
/// applies to it (the new one, none, or a more specific one that stays), for up to `--wait`, and
/// says how it went.
async fn wait_for(store: &Store, target: &BreakerTarget) -> anyhow::Result<()> {
    let deadline = Instant::now() + target.wait;
    loop {
        let (holds, reported) = read(store).await?;
        let covered: Vec<&Reported> = reported
            .iter()
            .filter(|r| !r.stale)
            .filter(|r| matches(&target.consumer_group, &r.consumer_group))
            .filter(|r| matches(&target.breaker, &r.breaker))
            .collect();
        let behind: Vec<&&Reported> = covered
            .iter()
            .filter(|r| {
                let wanted = hold_for(&holds, &r.consumer_group, &r.breaker).and_then(Hold::state);
                r.held != wanted.is_some() || wanted.is_some_and(|w| w.as_str() != r.state)
            })
            .collect();
        if covered.is_empty() {
            println!(
                "no running process reports a breaker this covers; processes take the holds when \
                 they start"
            );
            return Ok(());
        }
        if behind.is_empty() {
            println!(
                "{} breaker(s) of {} running process(es) took it",
                covered.len(),
                covered
                    .iter()
                    .map(|r| &r.process)
                    .collect::<std::collections::HashSet<_>>()
                    .len()
            );
            return Ok(());
        }
        if Instant::now() >= deadline {
            let names: Vec<String> = behind
                .iter()
                .map(|r| format!("{} ({}, {})", r.process, r.consumer_group, r.breaker))
                .collect();
            if target.wait > Duration::ZERO {
                println!(
                    "not yet taken after {} by: {}; they take it within {} of reading Postgres \
                     (`redrive breaker status` shows them)",
                    humantime::format_duration(target.wait),
                    names.join(", "),
                    humantime::format_duration(crate::breaker_sync::EVERY)
                );
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The holds and the processes' breakers as text tables.
pub fn render(holds: &[Hold], reported: &[Reported], now: DateTime<Utc>) -> String {
    let mut out = String::from("Circuit breakers\n");
    if reported.is_empty() {
        out += "  (no running process has reported its breakers within the last hour)\n";
    } else {
        let mut t = table(&["group", "breaker", "process", "state", "since", "why"]);
        for r in reported {
            let mut state = r.state.clone();
            if r.held {
                state += " (held)";
            } else if !r.decides && r.state == "open" {
                state += " (following the group's consumers)";
            }
            if let Some(until) = r.open_until.filter(|_| r.state == "open") {
                state += &format!(" until {}", until.format("%H:%M:%S"));
            }
            if r.stale {
                state = format!(
                    "{state}; stale: last reported {}",
                    when(Some(r.reported_at), now)
                );
            }
            t.add_row(vec![
                r.consumer_group.clone(),
                r.breaker.clone(),
                r.process.clone(),
                state,
                when(Some(r.since), now),
                r.cause.as_deref().map(|c| clip(c, 60)).unwrap_or_default(),
            ]);
        }
        out += &format!("{t}\n");
    }
    if !holds.is_empty() {
        out += "\nOperators' holds (`redrive breaker release` lifts them)\n";
        let mut t = table(&["group", "breaker", "hold", "since", "by", "reason"]);
        for h in holds {
            t.add_row(vec![
                h.consumer_group.clone(),
                h.breaker.clone(),
                h.hold.clone(),
                when(Some(h.held_at), now),
                h.held_by.clone(),
                h.reason.clone().unwrap_or_default(),
            ]);
        }
        out += &format!("{t}\n");
    }
    out
}
