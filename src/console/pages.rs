//! The pages that only read: the overview, the browse list and one message's detail.

use super::html::{self, esc, hidden, page, q, when};
use super::{html_response, problem, Shared, Who};
use crate::config::Role;
use crate::store::console::{Timeline, Whole};
use crate::store::find::Filter;
use crate::store::status::Limits;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Extension;
use chrono::{DateTime, Utc};
use std::fmt::Write;
use std::time::Duration;
use uuid::Uuid;

/// The states a row can be browsed in.
pub const STATES: [&str; 5] = ["pending", "paused", "waiting", "dead", "replayed"];

/// The filters of the browse page, from its query string, so a link carries them.
#[derive(Debug, Clone, Default)]
pub struct Criteria {
    pub groups: Vec<String>,
    pub topics: Vec<String>,
    pub key: Option<String>,
    pub error: Option<String>,
    pub kinds: Vec<String>,
    /// Empty: every state.
    pub states: Vec<String>,
    pub dead_since: Option<String>,
    pub dead_before: Option<String>,
    pub ids: Vec<Uuid>,
}

impl Criteria {
    /// Reads the fields of a query string or a form; unknown ones are ignored.
    pub fn parse(pairs: &[(String, String)]) -> Result<Self, String> {
        let mut c = Criteria::default();
        for (k, v) in pairs {
            let v = v.trim();
            if v.is_empty() {
                continue;
            }
            match k.as_str() {
                "group" => c.groups.push(v.into()),
                "topic" => c.topics.push(v.into()),
                "key" => c.key = Some(v.into()),
                "error" => c.error = Some(v.into()),
                "kind" => {
                    if !["retryable", "permanent", "timeout"].contains(&v) {
                        return Err(format!(
                            "unknown error kind {v:?}: retryable, permanent or timeout"
                        ));
                    }
                    c.kinds.push(v.into())
                }
                "state" => {
                    if !STATES.contains(&v) {
                        return Err(format!("unknown state {v:?}: one of {}", STATES.join(", ")));
                    }
                    c.states.push(v.into())
                }
                "dead_since" => c.dead_since = Some(v.into()),
                "dead_before" => c.dead_before = Some(v.into()),
                "id" => c
                    .ids
                    .push(v.parse().map_err(|_| format!("{v:?} is not a row id"))?),
                _ => {}
            }
        }
        c.filter()?;
        Ok(c)
    }

    /// The store's filter: the same one `redrive replay` and `redrive purge` build.
    pub fn filter(&self) -> Result<Filter, String> {
        let time = |s: &Option<String>, name: &str| {
            s.as_deref()
                .map(crate::cli::parse_when)
                .transpose()
                .map_err(|e| format!("{name}: {e}"))
        };
        Ok(Filter {
            ids: self.ids.clone(),
            topics: self.topics.clone(),
            consumer_groups: self.groups.clone(),
            key: self.key.clone(),
            error_contains: self.error.clone(),
            error_kinds: self.kinds.clone(),
            dead_since: time(&self.dead_since, "dead since")?,
            dead_before: time(&self.dead_before, "dead before")?,
        })
    }

    /// The states to look in: those chosen, or all.
    pub fn states(&self) -> Vec<String> {
        if self.states.is_empty() {
            STATES.iter().map(|s| s.to_string()).collect()
        } else {
            self.states.clone()
        }
    }

    /// The filters as `name=value` pairs (ids left out).
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        out.extend(self.groups.iter().map(|g| ("group", g.clone())));
        out.extend(self.topics.iter().map(|t| ("topic", t.clone())));
        out.extend(self.key.iter().map(|k| ("key", k.clone())));
        out.extend(self.error.iter().map(|e| ("error", e.clone())));
        out.extend(self.kinds.iter().map(|k| ("kind", k.clone())));
        out.extend(self.states.iter().map(|s| ("state", s.clone())));
        out.extend(self.dead_since.iter().map(|d| ("dead_since", d.clone())));
        out.extend(self.dead_before.iter().map(|d| ("dead_before", d.clone())));
        out
    }

    /// The filters as a query string, for links.
    pub fn query(&self) -> String {
        self.pairs()
            .iter()
            .map(|(k, v)| format!("{k}={}", q(v)))
            .collect::<Vec<_>>()
            .join("&")
    }

    /// The filters as hidden form fields.
    pub fn hidden(&self) -> String {
        self.pairs().iter().map(|(k, v)| hidden(k, v)).collect()
    }

    /// The filters in words, for previews and logs.
    pub fn describe(&self) -> String {
        let pairs = self.pairs();
        let mut parts: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
        if !self.ids.is_empty() {
            parts.push(format!("{} selected row(s)", self.ids.len()));
        }
        if parts.is_empty() {
            "no filter (every row)".into()
        } else {
            parts.join(", ")
        }
    }

    pub fn is_empty(&self) -> bool {
        self.pairs().is_empty() && self.ids.is_empty()
    }
}

/// Parses a query string or a form body into pairs.
pub fn pairs(raw: &[u8]) -> Vec<(String, String)> {
    url::form_urlencoded::parse(raw).into_owned().collect()
}

/// `GET /`: rows by group, topic and state, the groups' due rows and DLQ backlog, paused topics,
/// the top errors and a chart of failures and deaths over the window.
pub async fn overview(
    State(console): State<Shared>,
    Extension(who): Extension<Who>,
    RawQuery(raw): RawQuery,
) -> Response {
    let args = pairs(raw.unwrap_or_default().as_bytes());
    let window_name = args
        .iter()
        .find(|(k, _)| k == "window")
        .map_or("24h", |(_, v)| v.as_str());
    let Some((window, bucket)) = WINDOWS
        .iter()
        .find(|(name, ..)| *name == window_name)
        .map(|(_, w, b)| (*w, *b))
    else {
        return problem(
            StatusCode::BAD_REQUEST,
            &who,
            "window: one of 1h, 24h, 7d, 30d",
        );
    };
    let status = match console.store.status(window, 10, Limits::DEFAULT).await {
        Ok(s) => s,
        Err(e) => return store_problem(&who, e, "reading the status"),
    };
    let since = status.at - chrono::Duration::from_std(window).expect("a short window");
    let timeline = match console
        .store
        .timeline(since, bucket, Limits::DEFAULT.sample_pages)
        .await
    {
        Ok(t) => t,
        Err(e) => return store_problem(&who, e, "reading failures over time"),
    };
    let now = status.at;
    let mut b = String::new();

    let _ = write!(
        b,
        r#"<p class="muted">As of {} UTC. Window: "#,
        now.format("%Y-%m-%d %H:%M:%S")
    );
    for (name, ..) in WINDOWS {
        if name == window_name {
            let _ = write!(b, "<strong>{name}</strong> ");
        } else {
            let _ = write!(b, r#"<a href="/?window={name}">{name}</a> "#);
        }
    }
    b.push_str("</p>");

    b.push_str(r#"<div class="cards">"#);
    let sum =
        |f: fn(&crate::store::status::TopicCounts) -> i64| status.topics.iter().map(f).sum::<i64>();
    let any_estimated = status.topics.iter().any(|t| t.estimated);
    for (label, n, state) in [
        ("pending", sum(|t| t.pending), "pending"),
        ("running", sum(|t| t.running), "pending"),
        ("waiting", sum(|t| t.waiting), "waiting"),
        ("paused", sum(|t| t.paused), "paused"),
        ("dead", sum(|t| t.dead), "dead"),
    ] {
        let _ = write!(
            b,
            r#"<div class="card"><div class="muted">{label}</div><div class="big"><a href="/messages?state={state}">{}</a></div></div>"#,
            crate::ops::count(n, any_estimated)
        );
    }
    let backlog: i64 = status.groups.iter().map(|g| g.dlq_backlog).sum();
    let oldest_due = status.groups.iter().filter_map(|g| g.oldest_due_at).min();
    let _ = write!(
        b,
        r#"<div class="card"><div class="muted">DLQ backlog</div><div class="big">{}</div></div><div class="card"><div class="muted">oldest due row</div><div>{}</div></div></div>"#,
        crate::ops::count(backlog, status.groups.iter().any(|g| g.estimated)),
        when(oldest_due, now)
    );

    b.push_str("<h2>Failures and deaths</h2>");
    b.push_str(&chart(&timeline, since, bucket, now));

    b.push_str("<h2>Rows by consumer group and topic</h2>");
    if status.topics.is_empty() {
        b.push_str(r#"<p class="muted">The retry table is empty: nothing has failed.</p>"#);
    } else {
        b.push_str(r#"<table><tr><th>group</th><th>topic</th><th class="num">pending</th><th class="num">running</th><th class="num">waiting</th><th class="num">paused</th><th class="num">dead</th><th class="num">replayed</th></tr>"#);
        for t in &status.topics {
            let link = |state: &str, n: i64| {
                format!(
                    r#"<td class="num"><a href="/messages?group={}&amp;topic={}&amp;state={state}">{}</a></td>"#,
                    esc(&q(&t.consumer_group)),
                    esc(&q(&t.topic)),
                    crate::ops::count(n, t.estimated)
                )
            };
            let _ = write!(
                b,
                "<tr><td>{}</td><td>{}</td>{}<td class=\"num\">{}</td>{}{}{}{}</tr>",
                esc(&t.consumer_group),
                esc(&t.topic),
                link("pending", t.pending),
                crate::ops::count(t.running, t.estimated),
                link("waiting", t.waiting),
                link("paused", t.paused),
                link("dead", t.dead),
                link("replayed", t.replayed),
            );
        }
        b.push_str("</table>");
    }
    if let Some(s) = status.sample {
        let _ = write!(
            b,
            r#"<p class="note">Counts marked ~ are estimated from a sample of {:.1} % of the table's {} pages, as counting every row of a table this large would take too long; the times are exact.</p>"#,
            s.percent, s.table_pages
        );
    }

    b.push_str("<h2>Consumer groups</h2>");
    if !status.groups.is_empty() {
        b.push_str(r#"<table><tr><th>group</th><th class="num">due</th><th>oldest due</th><th>next due</th><th class="num">DLQ backlog</th><th>oldest unpublished</th><th class="num">DLQ refused</th></tr>"#);
        for g in &status.groups {
            let _ = write!(
                b,
                r#"<tr><td>{}</td><td class="num">{}</td><td>{}</td><td>{}</td><td class="num">{}</td><td>{}</td><td class="num">{}</td></tr>"#,
                esc(&g.consumer_group),
                crate::ops::count(g.due, g.estimated),
                when(g.oldest_due_at, now),
                when(g.next_due_at, now),
                crate::ops::count(g.dlq_backlog, g.estimated),
                when(g.dlq_oldest_dead_at, now),
                crate::ops::count(g.dlq_refused, g.estimated),
            );
        }
        b.push_str("</table>");
    }

    b.push_str("<h2>Paused topics</h2>");
    let token = console.csrf_token(&who);
    if status.paused_topics.is_empty() {
        b.push_str(r#"<p class="muted">No topic is paused.</p>"#);
    } else {
        b.push_str("<table><tr><th>group</th><th>topic</th><th>since</th><th>by</th><th>why</th><th></th></tr>");
        for p in &status.paused_topics {
            let resume = if who.role == Role::Operator {
                format!(
                    r#"<form method="post" action="/preview">{}{}{}{}<button>Resume…</button></form>"#,
                    hidden("csrf", &token),
                    hidden("action", "resume"),
                    hidden("pause_topic", &p.topic),
                    hidden("pause_group", &p.consumer_group),
                )
            } else {
                String::new()
            };
            let _ = write!(
                b,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{resume}</td></tr>",
                esc(&p.consumer_group),
                esc(&p.topic),
                when(Some(p.paused_at), now),
                esc(&p.paused_by),
                esc(p.reason.as_deref().unwrap_or("")),
            );
        }
        b.push_str("</table>");
    }
    if who.role == Role::Operator {
        let _ = write!(
            b,
            r#"<form class="actions" method="post" action="/preview">{}{}<label>topic <input name="pause_topic" required></label><label>group <input name="pause_group" value="*"></label><button>Pause a topic…</button></form>"#,
            hidden("csrf", &token),
            hidden("action", "pause"),
        );
    }

    let _ = write!(b, "<h2>Top errors, last {window_name}</h2>");
    if status.top_errors.is_empty() {
        b.push_str(r#"<p class="muted">No failed attempt in the window.</p>"#);
    } else {
        b.push_str(r#"<table><tr><th>kind</th><th>error</th><th class="num">failures</th><th class="num">rows</th><th>last</th></tr>"#);
        for e in &status.top_errors {
            let text = e.error.as_deref().unwrap_or("");
            let _ = write!(
                b,
                r#"<tr><td>{}</td><td><a href="/messages?error={}">{}</a></td><td class="num">{}</td><td class="num">{}</td><td>{}</td></tr>"#,
                esc(e.kind.as_deref().unwrap_or("")),
                esc(&q(&crate::ops::clip(text, 200))),
                html::clip(text, 160),
                crate::ops::count(e.failures, status.top_errors_estimated),
                crate::ops::count(e.rows, status.top_errors_estimated),
                when(e.last_at, now),
            );
        }
        b.push_str("</table>");
        if status.top_errors_estimated {
            b.push_str(r#"<p class="note">Estimated from the sample: the window holds too many failed rows to read every one.</p>"#);
        }
    }
    html_response(page("Overview", &who, &b))
}

/// The overview's windows: name, length, bucket of the chart.
const WINDOWS: [(&str, Duration, Duration); 4] = [
    ("1h", Duration::from_secs(3600), Duration::from_secs(300)),
    (
        "24h",
        Duration::from_secs(86_400),
        Duration::from_secs(3600),
    ),
    (
        "7d",
        Duration::from_secs(7 * 86_400),
        Duration::from_secs(86_400),
    ),
    (
        "30d",
        Duration::from_secs(30 * 86_400),
        Duration::from_secs(86_400),
    ),
];

/// A bar chart in SVG, drawn here: per bucket, rows that first failed and rows that died.
fn chart(t: &Timeline, since: DateTime<Utc>, bucket: Duration, now: DateTime<Utc>) -> String {
    let step = chrono::Duration::from_std(bucket).expect("a short bucket");
    let mut starts = Vec::new();
    let mut s = since;
    while s <= now {
        starts.push(s);
        s += step;
    }
    let value = |start: DateTime<Utc>| {
        t.buckets
            .iter()
            .find(|b| b.start == start)
            .map_or((0, 0), |b| (b.failed, b.died))
    };
    let max = starts
        .iter()
        .map(|s| {
            let (f, d) = value(*s);
            f.max(d)
        })
        .max()
        .unwrap_or(0)
        .max(1);
    let (w, h, left, bottom) = (900.0, 160.0, 48.0, 22.0);
    let slot = (w - left) / starts.len().max(1) as f64;
    let bar = (slot / 2.0 - 1.0).max(1.0);
    let y = |n: i64| (h - bottom) * n as f64 / max as f64;
    let mut out = format!(
        r#"<svg role="img" aria-label="rows that failed and died over time" viewBox="0 0 {w} {h}" width="100%" height="{h}">"#
    );
    let _ = write!(
        out,
        r#"<text x="0" y="12">{max}</text><text x="0" y="{}">0</text>"#,
        h - bottom
    );
    for (i, s) in starts.iter().enumerate() {
        let (f, d) = value(*s);
        let x = left + i as f64 * slot;
        let label = s.format(if bucket >= Duration::from_secs(86_400) {
            "%m-%d"
        } else {
            "%H:%M"
        });
        let _ = write!(
            out,
            r#"<rect class="failed" x="{x:.1}" y="{:.1}" width="{bar:.1}" height="{:.1}"><title>{label}: {f} failed</title></rect><rect class="died" x="{:.1}" y="{:.1}" width="{bar:.1}" height="{:.1}"><title>{label}: {d} died</title></rect>"#,
            h - bottom - y(f),
            y(f),
            x + bar + 1.0,
            h - bottom - y(d),
            y(d),
        );
        if i % (starts.len() / 8).max(1) == 0 {
            let _ = write!(out, r#"<text x="{x:.1}" y="{}">{label}</text>"#, h - 6.0);
        }
    }
    out.push_str("</svg>");
    out.push_str(r#"<p class="note"><svg width="10" height="10"><rect class="failed" width="10" height="10"/></svg> rows that first failed (of those still in the table) · <svg width="10" height="10"><rect class="died" width="10" height="10"/></svg> rows that died"#);
    if t.estimated {
        out.push_str(" · estimated from a sample of the table's pages");
    }
    out.push_str(" · UTC</p>");
    out
}

/// `GET /messages`: the rows the filters match, newest first, a page at a time.
pub async fn browse(
    State(console): State<Shared>,
    Extension(who): Extension<Who>,
    RawQuery(raw): RawQuery,
) -> Response {
    let args = pairs(raw.unwrap_or_default().as_bytes());
    let criteria = match Criteria::parse(&args) {
        Ok(c) => c,
        Err(e) => return problem(StatusCode::BAD_REQUEST, &who, &e),
    };
    let before = match args.iter().find(|(k, _)| k == "before") {
        Some((_, v)) => match v.parse::<Uuid>() {
            Ok(id) => Some(id),
            Err(_) => return problem(StatusCode::BAD_REQUEST, &who, "before: not a row id"),
        },
        None => None,
    };
    let filter = criteria.filter().expect("checked when parsed");
    let limit = i64::from(console.config.page_size);
    let rows = match console
        .store
        .browse(&criteria.states(), &filter, before, limit + 1)
        .await
    {
        Ok(r) => r,
        Err(e) => return store_problem(&who, e, "reading the rows"),
    };
    let more = rows.len() as i64 > limit;
    let rows = &rows[..rows.len().min(limit as usize)];
    let now = Utc::now();
    let mut b = String::new();

    // The filters, as a GET form: the URL carries them, so a link can be shared.
    let value = |v: Option<&String>| esc(v.map_or("", |s| s.as_str()));
    let _ = write!(
        b,
        r#"<form class="filters" method="get" action="/messages">
<label>group <input name="group" value="{}"></label>
<label>topic <input name="topic" value="{}"></label>
<label>key <input name="key" value="{}"></label>
<label>error contains <input name="error" value="{}"></label>
<label>error kind <select name="kind"><option value="">any</option>{}</select></label>
<label>state <select name="state"><option value="">any</option>{}</select></label>
<label>dead since <input name="dead_since" placeholder="2h, 2026-11-20" value="{}"></label>
<label>dead before <input name="dead_before" value="{}"></label>
<button class="primary">Filter</button> <a href="/messages">clear</a></form>"#,
        value(criteria.groups.first()),
        value(criteria.topics.first()),
        value(criteria.key.as_ref()),
        value(criteria.error.as_ref()),
        options(
            &["retryable", "permanent", "timeout"],
            criteria.kinds.first()
        ),
        options(&STATES, criteria.states.first()),
        value(criteria.dead_since.as_ref()),
        value(criteria.dead_before.as_ref()),
    );

    let operator = who.role == Role::Operator;
    if operator {
        let _ = write!(
            b,
            r#"<form method="post" action="/preview">{}{}"#,
            hidden("csrf", &console.csrf_token(&who)),
            criteria.hidden()
        );
        b.push_str(r#"<div class="actions"><span class="muted">Selected rows:</span><button name="action" value="replay-selected">Replay…</button><button name="action" value="purge-selected">Purge…</button><span class="muted">Everything the filter matches:</span><button name="action" value="replay-matching">Replay…</button><button name="action" value="replay-topic-matching">Replay to a topic…</button><button name="action" value="purge-matching">Purge…</button></div>"#);
    }
    if rows.is_empty() {
        b.push_str(r#"<p class="muted">No row matches.</p>"#);
    } else {
        b.push_str("<table><tr>");
        if operator {
            b.push_str("<th></th>");
        }
        b.push_str(r#"<th>topic</th><th class="num">partition</th><th class="num">offset</th><th>key</th><th>state</th><th class="num">attempts</th><th>first failed</th><th>next attempt / died</th><th>last error</th><th>group</th></tr>"#);
        for r in rows {
            b.push_str("<tr>");
            if operator {
                let _ = write!(
                    b,
                    r#"<td><input type="checkbox" name="id" value="{}" aria-label="select"></td>"#,
                    r.id
                );
            }
            let time = match r.dead_at {
                Some(d) => when(Some(d), now),
                None if r.state == "pending" => when(Some(r.next_attempt_at), now),
                None => "-".into(),
            };
            let _ = write!(
                b,
                r#"<td><a href="/messages/{id}">{topic}</a></td><td class="num">{p}</td><td class="num"><a href="/messages/{id}">{o}</a></td><td class="mono">{key}</td><td class="state-{state}">{state}</td><td class="num">{a}/{m}</td><td>{first}</td><td>{time}</td><td class="err">{kind}{error}</td><td>{group}</td></tr>"#,
                id = r.id,
                topic = esc(&r.topic),
                p = r.partition,
                o = r.offset,
                key = key_text(r.key.as_deref(), 40),
                state = esc(&r.state),
                a = r.attempts,
                m = r.max_attempts,
                first = when(Some(r.first_failed_at), now),
                kind = r
                    .error_kind
                    .as_deref()
                    .map(|k| format!("[{}] ", esc(k)))
                    .unwrap_or_default(),
                error = html::clip(r.last_error.as_deref().unwrap_or(""), 120),
                group = esc(&r.consumer_group),
            );
        }
        b.push_str("</table>");
    }
    if operator {
        b.push_str("</form>");
    }
    b.push_str(r#"<div class="pager">"#);
    let query = criteria.query();
    if before.is_some() {
        let _ = write!(b, r#"<a href="/messages?{}">first page</a>"#, esc(&query));
    }
    if more {
        let last = rows.last().expect("a full page").id;
        let sep = if query.is_empty() { "" } else { "&" };
        let _ = write!(
            b,
            r#"<a href="/messages?{}{sep}before={last}">next page</a>"#,
            esc(&query)
        );
    }
    let _ = write!(
        b,
        r#"<span class="muted">{} row(s) shown, newest first</span></div>"#,
        rows.len()
    );
    html_response(page("Messages", &who, &b))
}

fn options(values: &[&str], selected: Option<&String>) -> String {
    values
        .iter()
        .map(|v| {
            let sel = if selected.is_some_and(|s| s == v) {
                " selected"
            } else {
                ""
            };
            format!(r#"<option{sel}>{v}</option>"#)
        })
        .collect()
}

/// A key as text when it is UTF-8, else as base64, marked so.
pub fn key_text(key: Option<&[u8]>, max: usize) -> String {
    match key {
        None => r#"<span class="muted">(none)</span>"#.into(),
        Some(k) => match std::str::from_utf8(k) {
            Ok(s) if !s.chars().any(char::is_control) => html::clip(s, max),
            _ => format!(
                r#"<span class="muted">base64:</span>{}"#,
                html::clip(&base64(k), max)
            ),
        },
    }
}

fn base64(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// `GET /messages/{id}`: one row whole.
pub async fn detail(
    State(console): State<Shared>,
    Extension(who): Extension<Who>,
    Path(id): Path<String>,
) -> Response {
    let Ok(id) = id.parse::<Uuid>() else {
        return problem(StatusCode::BAD_REQUEST, &who, "not a row id");
    };
    let row = match console.store.whole(id).await {
        Ok(Some(r)) => r,
        Ok(None) => {
            return problem(
                StatusCode::NOT_FOUND,
                &who,
                &format!("no row {id}: it succeeded, or was purged"),
            )
        }
        Err(e) => return store_problem(&who, e, "reading the row"),
    };
    let now = Utc::now();
    let mut b = String::new();
    let operator = who.role == Role::Operator;
    if operator {
        b.push_str(&row_actions(&console, &who, &row));
    }
    let opt = |s: &Option<String>| esc(s.as_deref().unwrap_or("-"));
    let _ = write!(
        b,
        r#"<dl class="kv"><dt>id</dt><dd class="mono">{id}</dd><dt>consumer group</dt><dd>{group}</dd><dt>topic</dt><dd>{topic}</dd><dt>partition / offset</dt><dd>{p} / {o}</dd><dt>record time</dt><dd>{ts}</dd><dt>state</dt><dd class="state-{state}">{state}{order}</dd><dt>attempts</dt><dd>{a} of {m}</dd><dt>next attempt</dt><dd>{next}</dd><dt>first failed</dt><dd>{first}</dd><dt>updated</dt><dd>{updated}</dd><dt>died</dt><dd>{dead}</dd><dt>last error</dt><dd class="err">{kind}{error}</dd><dt>trace</dt><dd class="mono">{trace}</dd></dl>"#,
        id = row.id,
        group = esc(&row.consumer_group),
        topic = esc(&row.topic),
        p = row.partition,
        o = row.offset,
        ts = when(row.kafka_timestamp, now),
        state = esc(&row.state),
        order = row
            .order_on_dead
            .as_deref()
            .map(|o| format!(
                " <span class=\"muted\">(key order; a dead row {} its key)</span>",
                if o == "block" {
                    "blocks"
                } else {
                    "does not block"
                }
            ))
            .unwrap_or_default(),
        a = row.attempts,
        m = row.max_attempts,
        next = if row.state == "pending" || row.state == "running" {
            when(Some(row.next_attempt_at), now)
        } else {
            "-".into()
        },
        first = when(Some(row.first_failed_at), now),
        updated = when(Some(row.updated_at), now),
        dead = when(row.dead_at, now),
        kind = row
            .error_kind
            .as_deref()
            .map(|k| format!("[{}] ", esc(k)))
            .unwrap_or_default(),
        error = opt(&row.last_error),
        // The trace id of the first delivery's `traceparent`, to look the message up by.
        trace = esc((row.trace_context.as_deref())
            .and_then(|t| t.split('-').nth(1))
            .unwrap_or("-")),
    );
    if let Some(lease) = row.lease_expires_at {
        let _ = write!(
            b,
            r#"<p class="note">A worker ({}) is attempting it; its lease ends {}.</p>"#,
            opt(&row.locked_by),
            when(Some(lease), now)
        );
    }

    b.push_str("<h2>Key</h2>");
    b.push_str(&bytes_block(row.key.as_deref()));
    b.push_str("<h2>Headers</h2>");
    b.push_str(&headers_table(&row.headers));
    let _ = write!(
        b,
        "<h2>Payload <span class=\"muted\">({})</span></h2>",
        row.payload
            .as_ref()
            .map_or("none".into(), |p| format!("{} bytes", p.len()))
    );
    b.push_str(&payload_block(row.payload.as_deref()));

    b.push_str("<h2>Attempts</h2>");
    b.push_str(&history(&row.error_history));

    b.push_str("<h2>Dead letter and replays</h2>");
    let _ = write!(
        b,
        r#"<dl class="kv"><dt>DLQ topic</dt><dd>{}</dd><dt>published to the DLQ</dt><dd>{}</dd><dt>DLQ refused</dt><dd>{}</dd><dt>DLQ error</dt><dd class="err">{}</dd><dt>replays</dt><dd>{}</dd><dt>last replayed</dt><dd>{}</dd><dt>last replayed by</dt><dd>{}</dd><dt>replay reason</dt><dd>{}</dd><dt>replayed to topic</dt><dd>{}</dd></dl>"#,
        opt(&row.dlq_topic),
        when(row.dlq_published_at, now),
        when(row.dlq_refused_at, now),
        opt(&row.dlq_error),
        row.replay_count,
        when(row.last_replayed_at, now),
        opt(&row.last_replayed_by),
        opt(&row.last_replay_reason),
        opt(&row.replayed_to_topic),
    );
    html_response(page(&format!("Message {}", row.id), &who, &b))
}

/// The buttons of one row, each to a preview.
fn row_actions(console: &Shared, who: &Who, row: &Whole) -> String {
    let mut buttons = String::new();
    let state = row.state.as_str();
    if state == "dead" {
        buttons.push_str(r#"<button name="action" value="replay-selected">Replay…</button><button name="action" value="replay-topic-selected">Replay to a topic…</button>"#);
    }
    if state == "dead" || state == "replayed" {
        buttons.push_str(r#"<button name="action" value="purge-selected">Purge…</button>"#);
    }
    if state == "pending" {
        buttons.push_str(r#"<button name="action" value="retry-now">Retry now…</button>"#);
    }
    if buttons.is_empty() {
        return String::new();
    }
    format!(
        r#"<form class="actions" method="post" action="/preview">{}{}{buttons}</form>"#,
        hidden("csrf", &console.csrf_token(who)),
        hidden("id", &row.id.to_string()),
    )
}

/// Bytes as UTF-8 text when they are, else as base64 and hex.
fn bytes_block(b: Option<&[u8]>) -> String {
    match b {
        None => r#"<p class="muted">(none)</p>"#.into(),
        Some(b) => match std::str::from_utf8(b) {
            Ok(s) => format!("<pre>{}</pre>", esc(s)),
            Err(_) => format!(
                r#"<p class="note">not UTF-8: base64</p><pre>{}</pre>"#,
                esc(&base64(b))
            ),
        },
    }
}

/// The payload: pretty JSON when it is JSON, text when it is UTF-8 without NUL bytes, a hex dump
/// otherwise (its first 64 KiB).
pub fn payload_block(p: Option<&[u8]>) -> String {
    let Some(p) = p else {
        return r#"<p class="muted">(none: a tombstone)</p>"#.into();
    };
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(p) {
        let pretty = serde_json::to_string_pretty(&v).unwrap_or_default();
        return format!(r#"<p class="note">JSON</p><pre>{}</pre>"#, esc(&pretty));
    }
    if let Ok(s) = std::str::from_utf8(p) {
        if !s.contains('\0') {
            return format!(r#"<p class="note">text</p><pre>{}</pre>"#, esc(s));
        }
    }
    const SHOWN: usize = 64 * 1024;
    let mut out = String::from(r#"<p class="note">binary: hex</p><pre class="hex">"#);
    for (i, line) in p[..p.len().min(SHOWN)].chunks(16).enumerate() {
        let hex: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
        let text: String = line
            .iter()
            .map(|b| {
                if b.is_ascii_graphic() || *b == b' ' {
                    *b as char
                } else {
                    '.'
                }
            })
            .collect();
        let _ = writeln!(out, "{:08x}  {:<47}  {}", i * 16, hex.join(" "), esc(&text));
    }
    if p.len() > SHOWN {
        let _ = write!(out, "… {} more bytes", p.len() - SHOWN);
    }
    out.push_str("</pre>");
    out
}

/// The record's headers, values decoded as UTF-8 where they are, in base64 where not.
fn headers_table(headers: &serde_json::Value) -> String {
    let Some(list) = headers.as_array().filter(|l| !l.is_empty()) else {
        return r#"<p class="muted">(none)</p>"#.into();
    };
    let mut out = String::from("<table><tr><th>name</th><th>value</th></tr>");
    for h in list {
        let name = match (h["key"].as_str(), h["key_b64"].as_str()) {
            (Some(name), _) => format!(r#"<span class="mono">{}</span>"#, esc(name)),
            (None, Some(b64)) => format!(
                r#"<span class="muted">not UTF-8, base64:</span> <span class="mono">{}</span>"#,
                esc(b64)
            ),
            (None, None) => String::new(),
        };
        let value = match h["value"].as_str() {
            None => r#"<span class="muted">(null)</span>"#.to_string(),
            Some(b64) => {
                use base64::Engine;
                match base64::engine::general_purpose::STANDARD.decode(b64) {
                    Ok(bytes) => match String::from_utf8(bytes) {
                        Ok(s) => format!(r#"<span class="mono">{}</span>"#, esc(&s)),
                        Err(_) => format!(
                            r#"<span class="muted">not UTF-8, base64:</span> <span class="mono">{}</span>"#,
                            esc(b64)
                        ),
                    },
                    Err(_) => esc(b64),
                }
            }
        };
        let _ = write!(out, "<tr><td>{name}</td><td>{value}</td></tr>");
    }
    out.push_str("</table>");
    out
}

/// The error history as a list of attempts, oldest first.
fn history(h: &serde_json::Value) -> String {
    let Some(list) = h.as_array().filter(|l| !l.is_empty()) else {
        return r#"<p class="muted">No failed attempt recorded.</p>"#.into();
    };
    let mut out = String::from(r#"<ol class="timeline">"#);
    for e in list {
        let _ = write!(
            out,
            r#"<li><strong>attempt {}</strong> <span class="muted">{}</span> [{}] <span class="err">{}</span></li>"#,
            e["attempt"].as_i64().map_or("?".into(), |a| a.to_string()),
            esc(e["at"].as_str().unwrap_or("")),
            esc(e["kind"].as_str().unwrap_or("")),
            esc(e["error"].as_str().unwrap_or("")),
        );
    }
    out.push_str("</ol>");
    out
}

/// An error page for a failed store call, in the CLI's words.
pub fn store_problem(who: &Who, e: crate::store::StoreError, what: &str) -> Response {
    let e = crate::ops::explain(e, what);
    tracing::warn!(user = %who.name, "console: {e:#}");
    problem(StatusCode::INTERNAL_SERVER_ERROR, who, &format!("{e:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn criteria_round_trip_through_a_query_string() {
        let c = Criteria::parse(&pairs(
            b"topic=orders&error=%3Cb%3E+500&state=dead&kind=&x=1",
        ))
        .unwrap();
        assert_eq!(c.topics, ["orders"]);
        assert_eq!(c.error.as_deref(), Some("<b> 500"));
        assert_eq!(c.states, ["dead"]);
        assert!(c.kinds.is_empty());
        assert_eq!(c.query(), "topic=orders&error=%3Cb%3E+500&state=dead");
        let again = Criteria::parse(&pairs(c.query().as_bytes())).unwrap();
        assert_eq!(again.query(), c.query());
        assert!(Criteria::parse(&pairs(b"state=gone")).is_err());
        assert!(Criteria::parse(&pairs(b"dead_since=yesterday-ish")).is_err());
        assert!(Criteria::parse(&pairs(b"id=nope")).is_err());
    }

    #[test]
    fn a_payload_shows_as_json_text_or_hex() {
        assert!(payload_block(Some(br#"{"a":1}"#)).contains("JSON"));
        let text = payload_block(Some(b"<script>alert(1)</script>"));
        assert!(
            text.contains("&lt;script&gt;") && !text.contains("<script>"),
            "{text}"
        );
        let hex = payload_block(Some(&[0, 159, 146, 150, b'<']));
        assert!(
            hex.contains("binary: hex") && hex.contains("00 9f 92 96 3c"),
            "{hex}"
        );
        assert!(hex.contains(".&lt;") || hex.contains("....&lt;"), "{hex}");
    }
}
