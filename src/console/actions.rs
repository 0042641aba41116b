//! The actions: each POST to `/preview` shows what an action would do (the count, a sample, what
//! changes) and asks for a reason; the confirmed POST to `/run` does it. Replays and purges run
//! in the background in the CLI's chunks, one short transaction each, so closing the tab does not
//! stop them; `/jobs/{id}` shows their progress.

use super::html::{esc, hidden, page, when};
use super::pages::{pairs, store_problem, Criteria};
use super::{html_response, problem, Shared, Who};
use crate::config::Role;
use crate::ops::replay::ToTopic;
use crate::store::find::{Filter, Scope};
use crate::store::purge::Chunk;
use crate::store::replay::Audit;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use chrono::{DateTime, Utc};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What an operator can do from the console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Dead rows back to pending, due now, with a fresh attempt budget.
    Replay {
        selected: bool,
    },
    /// Dead rows' records produced back to Kafka; the rows marked replayed.
    ReplayToTopic {
        selected: bool,
    },
    /// Dead (acknowledged by the DLQ) and replayed rows deleted.
    Purge {
        selected: bool,
    },
    /// A pending row made due now.
    RetryNow,
    Pause,
    Resume,
}

impl Action {
    fn parse(s: &str) -> Option<Action> {
        Some(match s {
            "replay-selected" => Action::Replay { selected: true },
            "replay-matching" => Action::Replay { selected: false },
            "replay-topic-selected" => Action::ReplayToTopic { selected: true },
            "replay-topic-matching" => Action::ReplayToTopic { selected: false },
            "purge-selected" => Action::Purge { selected: true },
            "purge-matching" => Action::Purge { selected: false },
            "retry-now" => Action::RetryNow,
            "pause" => Action::Pause,
            "resume" => Action::Resume,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Action::Replay { selected: true } => "replay-selected",
            Action::Replay { selected: false } => "replay-matching",
            Action::ReplayToTopic { selected: true } => "replay-topic-selected",
            Action::ReplayToTopic { selected: false } => "replay-topic-matching",
            Action::Purge { selected: true } => "purge-selected",
            Action::Purge { selected: false } => "purge-matching",
            Action::RetryNow => "retry-now",
            Action::Pause => "pause",
            Action::Resume => "resume",
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Action::Replay { .. } => "replay",
            Action::ReplayToTopic { .. } => "replay to a topic",
            Action::Purge { .. } => "purge",
            Action::RetryNow => "retry now",
            Action::Pause => "pause",
            Action::Resume => "resume",
        }
    }

    /// Whether the action acts on the ids the form names rather than on its filters.
    fn selected(self) -> bool {
        matches!(
            self,
            Action::Replay { selected: true }
                | Action::ReplayToTopic { selected: true }
                | Action::Purge { selected: true }
                | Action::RetryNow
        )
    }
}

/// A POST's fields, checked: an operator, a valid CSRF token, a known action.
struct Form {
    action: Action,
    criteria: Criteria,
    fields: Vec<(String, String)>,
}

impl Form {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    }

    /// The topic and group a pause or resume is about.
    fn pause_target(&self) -> Result<(String, String), String> {
        let topic = self
            .field("pause_topic")
            .ok_or("name the topic to pause or resume")?;
        Ok((
            topic.into(),
            self.field("pause_group").unwrap_or("*").into(),
        ))
    }
}

fn check(console: &Shared, who: &Who, body: &[u8]) -> Result<Form, Box<Response>> {
    let fields = pairs(body);
    if who.role != Role::Operator {
        tracing::warn!(user = %who.name, "console: refused an action to a read-only user");
        return Err(Box::new(problem(
            StatusCode::FORBIDDEN,
            who,
            "your role is read-only: actions need the operator role",
        )));
    }
    let token = fields
        .iter()
        .find(|(k, _)| k == "csrf")
        .map_or("", |(_, v)| v.as_str());
    if !console.csrf_ok(who, token) {
        tracing::warn!(user = %who.name, "console: refused a POST without a valid CSRF token");
        return Err(Box::new(problem(
            StatusCode::FORBIDDEN,
            who,
            "the form's CSRF token is missing or stale: reload the page and try again",
        )));
    }
    let action = fields
        .iter()
        .find(|(k, _)| k == "action")
        .and_then(|(_, v)| Action::parse(v))
        .ok_or_else(|| Box::new(problem(StatusCode::BAD_REQUEST, who, "unknown action")))?;
    let mut criteria = Criteria::parse(&fields)
        .map_err(|e| Box::new(problem(StatusCode::BAD_REQUEST, who, &e)))?;
    if action.selected() {
        if criteria.ids.is_empty() {
            return Err(Box::new(problem(
                StatusCode::BAD_REQUEST,
                who,
                "select at least one row",
            )));
        }
        criteria = Criteria {
            ids: criteria.ids,
            ..Criteria::default()
        };
    } else {
        criteria.ids.clear();
    }
    Ok(Form {
        action,
        criteria,
        fields,
    })
}

/// `POST /preview`: what the action would do, and a form to confirm it with a reason.
pub async fn preview(
    State(console): State<Shared>,
    Extension(who): Extension<Who>,
    body: Bytes,
) -> Response {
    let form = match check(&console, &who, &body) {
        Ok(f) => f,
        Err(r) => return *r,
    };
    let filter = form.criteria.filter().expect("checked when parsed");
    let store = &console.store;
    let now = Utc::now();
    let mut b = String::new();
    let mut extra = String::new();
    let _ = write!(
        b,
        r#"<p>Filter: <strong>{}</strong></p>"#,
        esc(&form.criteria.describe())
    );
    match form.action {
        Action::Replay { .. } | Action::ReplayToTopic { .. } | Action::Purge { .. } => {
            let (scope, with_unpublished) = match form.action {
                Action::Purge { .. } => (Scope::Finished, false),
                _ => (Scope::Dead, true),
            };
            let matched = match store.count_matching(scope, &filter, with_unpublished).await {
                Ok(m) => m,
                Err(e) => return store_problem(&who, e, "counting the matching rows"),
            };
            let sample = match store
                .sample_matching(scope, &filter, with_unpublished, 10)
                .await
            {
                Ok(s) => s,
                Err(e) => return store_problem(&who, e, "reading the matching rows"),
            };
            let skipped = match store.outside_scope(scope, &filter.ids).await {
                Ok(s) => s,
                Err(e) => return store_problem(&who, e, "looking up the selected rows"),
            };
            let change = match form.action {
                Action::Replay { .. } => "become <strong>pending</strong>, due now, with a fresh attempt budget; their error history is kept and the audit columns record you and your reason. Running workers take them at once; in a topic with key order, each goes back into its key's line.".to_string(),
                Action::ReplayToTopic { .. } => {
                    match &console.kafka {
                        Ok(_) => {}
                        Err(e) => return problem(StatusCode::BAD_REQUEST, &who, &format!("replay to a topic needs the whole configuration, with [kafka], and it did not load: {e}")),
                    }
                    extra = r#"<label>to topic <input name="to_topic" placeholder="(each row's own topic)"></label>"#.into();
                    "are <strong>produced back to Kafka</strong> (to the topic below, or each to its own), then marked replayed, with you and your reason recorded. A record Kafka does not acknowledge leaves its row dead.".to_string()
                }
                _ => "are <strong>deleted</strong> from the retry table for good. Dead rows the DLQ broker has not acknowledged yet are kept.".to_string(),
            };
            let _ = write!(
                b,
                r#"<p class="banner"><strong>{}</strong> row(s) {change}</p>"#,
                matched.eligible
            );
            if matched.unpublished > 0 {
                let _ = write!(
                    b,
                    r#"<p class="note">{} matching dead row(s) are kept: the DLQ broker has not acknowledged them yet.</p>"#,
                    matched.unpublished
                );
            }
            for s in &skipped {
                let _ = write!(
                    b,
                    r#"<p class="note">Row {} is left alone: it is {}.</p>"#,
                    s.id,
                    esc(s.state.as_deref().unwrap_or("gone"))
                );
            }
            if form.criteria.is_empty() {
                b.push_str(r#"<p class="banner">There is no filter: this acts on <strong>every</strong> such row of every topic.</p>"#);
            }
            if !sample.is_empty() {
                let _ = write!(b, "<h2>The oldest {} of them</h2>", sample.len());
                b.push_str(r#"<table><tr><th>group</th><th>topic</th><th class="num">partition</th><th class="num">offset</th><th>key</th><th>state</th><th class="num">attempts</th><th>died</th><th>last error</th></tr>"#);
                for s in &sample {
                    let _ = write!(
                        b,
                        r#"<tr><td>{}</td><td><a href="/messages/{id}">{}</a></td><td class="num">{}</td><td class="num">{}</td><td>{}</td><td>{}</td><td class="num">{}</td><td>{}</td><td class="err">{}</td></tr>"#,
                        esc(&s.consumer_group),
                        esc(&s.topic),
                        s.partition,
                        s.offset,
                        super::html::clip(s.key.as_deref().unwrap_or("-"), 40),
                        esc(&s.state),
                        s.attempts,
                        when(s.dead_at, now),
                        super::html::clip(s.last_error.as_deref().unwrap_or(""), 120),
                        id = s.id,
                    );
                }
                b.push_str("</table>");
            }
            if matched.eligible == 0 {
                b.push_str(r#"<p>Nothing to do.</p>"#);
                return html_response(page("Preview", &who, &b));
            }
        }
        Action::RetryNow => {
            let n = match store.count_rows(&["pending".into()], &filter).await {
                Ok(n) => n,
                Err(e) => return store_problem(&who, e, "counting the pending rows"),
            };
            let _ = write!(
                b,
                r#"<p class="banner"><strong>{n}</strong> pending row(s) become due now; a worker takes them at its next claim. A row a worker is attempting already is left alone.</p>"#
            );
            if n == 0 {
                b.push_str(r#"<p>Nothing to do: the row is not pending.</p>"#);
                return html_response(page("Preview", &who, &b));
            }
        }
        Action::Pause | Action::Resume => {
            let (topic, group) = match form.pause_target() {
                Ok(t) => t,
                Err(e) => return problem(StatusCode::BAD_REQUEST, &who, &e),
            };
            let state = if form.action == Action::Pause {
                "pending"
            } else {
                "paused"
            };
            let target = Filter {
                topics: vec![topic.clone()],
                consumer_groups: if group == "*" {
                    vec![]
                } else {
                    vec![group.clone()]
                },
                ..Filter::default()
            };
            let n = match store.count_rows(&[state.into()], &target).await {
                Ok(n) => n,
                Err(e) => return store_problem(&who, e, "counting the topic's rows"),
            };
            let groups = if group == "*" {
                "every group".to_string()
            } else {
                format!("group {}", esc(&group))
            };
            let change = if form.action == Action::Pause {
                format!("Retries of topic <strong>{}</strong> in {groups} stop: its <strong>{n}</strong> pending row(s) become paused, and so do its new failures, until it is resumed. Rows a worker is attempting finish first.", esc(&topic))
            } else {
                format!("Retries of topic <strong>{}</strong> in {groups} go on: its <strong>{n}</strong> paused row(s) become pending.", esc(&topic))
            };
            let _ = write!(b, r#"<p class="banner">{change}</p>"#);
            extra = format!(
                "{}{}",
                hidden("pause_topic", &topic),
                hidden("pause_group", &group)
            );
        }
    }
    let _ = write!(
        b,
        r#"<form method="post" action="/run" class="actions">{}{}{}{}{}<label>reason <input name="reason" required maxlength="500" placeholder="a ticket, an incident, a release"></label><button class="{}">Confirm: {}</button> <a href="/messages?{}">cancel</a></form>"#,
        hidden("csrf", &console.csrf_token(&who)),
        hidden("action", form.action.name()),
        form.criteria.hidden(),
        form.criteria
            .ids
            .iter()
            .map(|id| hidden("id", &id.to_string()))
            .collect::<String>(),
        extra,
        if matches!(form.action, Action::Purge { .. }) {
            "danger"
        } else {
            "primary"
        },
        form.action.verb(),
        esc(&form.criteria.query()),
    );
    html_response(page(&format!("Preview: {}", form.action.verb()), &who, &b))
}

/// `POST /run`: does the confirmed action, then shows its page under `/jobs`.
pub async fn run(
    State(console): State<Shared>,
    Extension(who): Extension<Who>,
    body: Bytes,
) -> Response {
    let form = match check(&console, &who, &body) {
        Ok(f) => f,
        Err(r) => return *r,
    };
    let Some(reason) = form.field("reason").map(str::to_string) else {
        return problem(
            StatusCode::BAD_REQUEST,
            &who,
            "give a reason: it is recorded with the change",
        );
    };
    if reason.chars().count() > 500 {
        return problem(
            StatusCode::BAD_REQUEST,
            &who,
            "the reason is longer than 500 characters",
        );
    }
    let filter = form.criteria.filter().expect("checked when parsed");
    let described = form.criteria.describe();
    let job = console
        .jobs
        .start(form.action.verb(), &who.name, &described, &reason);
    tracing::info!(user = %who.name, action = form.action.verb(), filter = %described, reason = %reason, job = job.id, "console: action started");
    let store = console.store.clone();
    match form.action {
        Action::RetryNow => {
            let mut done = 0;
            for id in &filter.ids {
                match store.retry_now(*id).await {
                    Ok(true) => done += 1,
                    Ok(false) => {}
                    Err(e) => {
                        job.fail(format!("{:#}", crate::ops::explain(e, "retry now")));
                        return see(job.id);
                    }
                }
            }
            job.set_total(filter.ids.len() as u64);
            job.add(done);
            job.finish(format!("{done} row(s) due now"));
        }
        Action::Pause | Action::Resume => {
            let (topic, group) = match form.pause_target() {
                Ok(t) => t,
                Err(e) => return problem(StatusCode::BAD_REQUEST, &who, &e),
            };
            let result = if form.action == Action::Pause {
                store
                    .pause_topic(&topic, &group, Some(&reason), &who.name)
                    .await
            } else {
                store.resume_topic(&topic, &group).await
            };
            match result {
                Ok(n) => {
                    job.add(n as u64);
                    job.set_total(n as u64);
                    let what = if form.action == Action::Pause {
                        "paused"
                    } else {
                        "resumed"
                    };
                    job.finish(format!(
                        "topic {topic} {what} in {}: {n} row(s) {what}",
                        if group == "*" { "every group" } else { &group }
                    ));
                }
                Err(e) => job.fail(format!("{:#}", crate::ops::explain(e, form.action.verb()))),
            }
        }
        Action::Replay { .. } | Action::Purge { .. } | Action::ReplayToTopic { .. } => {
            let (scope, with_unpublished) = match form.action {
                Action::Purge { .. } => (Scope::Finished, false),
                _ => (Scope::Dead, true),
            };
            match store.count_matching(scope, &filter, with_unpublished).await {
                Ok(m) => job.set_total(m.eligible as u64),
                Err(e) => {
                    job.fail(format!(
                        "{:#}",
                        crate::ops::explain(e, "counting the matching rows")
                    ));
                    return see(job.id);
                }
            }
            let to_topic = match form.action {
                Action::ReplayToTopic { .. } => {
                    let config = match &console.kafka {
                        Ok(c) => c,
                        Err(e) => {
                            job.fail(format!("replay to a topic needs [kafka]: {e}"));
                            return see(job.id);
                        }
                    };
                    match ToTopic::new(config, form.field("to_topic").unwrap_or("")) {
                        Ok(t) => Some(t),
                        Err(e) => {
                            job.fail(format!("{e:#}"));
                            return see(job.id);
                        }
                    }
                }
                _ => None,
            };
            let audit = Audit {
                by: who.name.clone(),
                reason: Some(reason),
            };
            let id = job.id;
            let (console, job) = (console.clone(), job.clone());
            let chunk = console.config.chunk_size as i64;
            let action = form.action;
            tokio::spawn(async move {
                let store = &console.store;
                let mut filter = filter;
                loop {
                    if console.stop.is_cancelled() {
                        job.fail(
                            "stopped: the console was shut down; the chunks done are kept".into(),
                        );
                        break;
                    }
                    let step: anyhow::Result<Chunk> = match action {
                        Action::Replay { .. } => store
                            .replay_chunk(&filter, chunk, &audit, None)
                            .await
                            .map_err(|e| crate::ops::explain(e, "replay")),
                        Action::Purge { .. } => store
                            .purge_chunk(&filter, false, chunk)
                            .await
                            .map_err(|e| crate::ops::explain(e, "purge")),
                        _ => {
                            to_topic
                                .as_ref()
                                .expect("made above")
                                .chunk(store, &filter, chunk, &audit)
                                .await
                        }
                    };
                    match step {
                        Ok(c) if c.selected == 0 => {
                            let done = job.done.load(Ordering::Relaxed);
                            tracing::info!(job = job.id, user = %job.user, action = job.what, count = done, "console: action finished");
                            job.finish(format!("{done} row(s) done"));
                            break;
                        }
                        Ok(c) => {
                            job.add(c.changed);
                            // The next chunk starts where this one stopped (Filter::start_at).
                            filter.start_at(c.last_dead_at);
                        }
                        Err(e) => {
                            let done = job.done.load(Ordering::Relaxed);
                            tracing::warn!(job = job.id, user = %job.user, "console: action failed after {done} row(s): {e:#}");
                            job.fail(format!(
                                "{e:#} (stopped after {done} row(s); the chunks done are kept)"
                            ));
                            break;
                        }
                    }
                }
            });
            return see(id);
        }
    }
    tracing::info!(user = %who.name, action = form.action.verb(), job = job.id, outcome = %job.outcome_text(), "console: action finished");
    see(job.id)
}

/// Redirects to a job's page (303: the browser follows with a GET, so a reload does not repeat
/// the POST).
fn see(id: u64) -> Response {
    (
        StatusCode::SEE_OTHER,
        [(header::LOCATION, format!("/jobs/{id}"))],
    )
        .into_response()
}

/// The actions this console has run since it started.
#[derive(Default)]
pub struct Jobs {
    next: AtomicU64,
    list: Mutex<Vec<Arc<Job>>>,
}

/// One action, and how far it got.
pub struct Job {
    pub id: u64,
    pub what: &'static str,
    pub user: String,
    pub filter: String,
    pub reason: String,
    pub started: DateTime<Utc>,
    total: AtomicU64,
    done: AtomicU64,
    /// `None` while it runs; then what happened, and whether it went well.
    outcome: Mutex<Option<(bool, String)>>,
}

impl Jobs {
    fn start(&self, what: &'static str, user: &str, filter: &str, reason: &str) -> Arc<Job> {
        let job = Arc::new(Job {
            id: self.next.fetch_add(1, Ordering::Relaxed) + 1,
            what,
            user: user.into(),
            filter: filter.into(),
            reason: reason.into(),
            started: Utc::now(),
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            outcome: Mutex::new(None),
        });
        let mut list = self.list.lock().expect("not poisoned");
        list.push(job.clone());
        // The newest thousand are enough to look back on; the table's audit columns keep the rest.
        if list.len() > 1000 {
            list.remove(0);
        }
        job
    }

    fn get(&self, id: u64) -> Option<Arc<Job>> {
        self.list
            .lock()
            .expect("not poisoned")
            .iter()
            .find(|j| j.id == id)
            .cloned()
    }

    fn all(&self) -> Vec<Arc<Job>> {
        self.list
            .lock()
            .expect("not poisoned")
            .iter()
            .rev()
            .cloned()
            .collect()
    }
}

impl Job {
    fn set_total(&self, n: u64) {
        self.total.store(n, Ordering::Relaxed);
    }
    fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }
    fn finish(&self, what: String) {
        *self.outcome.lock().expect("not poisoned") = Some((true, what));
    }
    fn fail(&self, why: String) {
        *self.outcome.lock().expect("not poisoned") = Some((false, why));
    }
    fn outcome(&self) -> Option<(bool, String)> {
        self.outcome.lock().expect("not poisoned").clone()
    }
    fn outcome_text(&self) -> String {
        self.outcome().map_or("running".into(), |(_, s)| s)
    }
}

/// `GET /jobs`: every action since the console started, newest first.
pub async fn jobs(State(console): State<Shared>, Extension(who): Extension<Who>) -> Response {
    let now = Utc::now();
    let mut b = String::new();
    let all = console.jobs.all();
    if all.is_empty() {
        b.push_str(r#"<p class="muted">No action since the console started. Each change is also recorded in the rows' audit columns and in the console's log.</p>"#);
    } else {
        b.push_str(r#"<table><tr><th>#</th><th>action</th><th>by</th><th>filter</th><th>reason</th><th>started</th><th class="num">rows</th><th>state</th></tr>"#);
        for j in all {
            let _ = write!(
                b,
                r#"<tr><td><a href="/jobs/{id}">{id}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class="num">{} of {}</td><td>{}</td></tr>"#,
                j.what,
                esc(&j.user),
                super::html::clip(&j.filter, 80),
                super::html::clip(&j.reason, 60),
                when(Some(j.started), now),
                j.done.load(Ordering::Relaxed),
                j.total.load(Ordering::Relaxed),
                esc(&j.outcome().map_or("running".into(), |(ok, _)| if ok {
                    "done".into()
                } else {
                    "failed".to_string()
                })),
                id = j.id,
            );
        }
        b.push_str("</table>");
    }
    html_response(page("Actions", &who, &b))
}

/// `GET /jobs/{id}`: one action's progress; the page reloads itself each second while it runs.
pub async fn job(
    State(console): State<Shared>,
    Extension(who): Extension<Who>,
    Path(id): Path<u64>,
) -> Response {
    let Some(j) = console.jobs.get(id) else {
        return problem(
            StatusCode::NOT_FOUND,
            &who,
            "no such action since the console started",
        );
    };
    let (done, total) = (
        j.done.load(Ordering::Relaxed),
        j.total.load(Ordering::Relaxed),
    );
    let outcome = j.outcome();
    let mut b = String::new();
    let _ = write!(
        b,
        r#"<dl class="kv"><dt>action</dt><dd>{}</dd><dt>by</dt><dd>{}</dd><dt>filter</dt><dd>{}</dd><dt>reason</dt><dd>{}</dd><dt>started</dt><dd>{}</dd><dt>rows</dt><dd><progress id="progress" max="{}" value="{done}"></progress> <span id="done">{done}</span> of {total}</dd></dl>"#,
        j.what,
        esc(&j.user),
        esc(&j.filter),
        esc(&j.reason),
        when(Some(j.started), Utc::now()),
        total.max(1),
    );
    match &outcome {
        None => b.push_str(r#"<p class="banner" id="outcome">Running; this page reloads itself. It goes on if you close it.</p>"#),
        Some((true, what)) => { let _ = write!(b, r#"<p class="banner ok" id="outcome">Done: {}</p>"#, esc(what)); }
        Some((false, why)) => { let _ = write!(b, r#"<p class="banner err" id="outcome">Failed: {}</p>"#, esc(why)); }
    }
    b.push_str(r#"<p><a href="/messages">Messages</a> · <a href="/jobs">All actions</a></p>"#);
    let mut html = page(&format!("Action {}: {}", j.id, j.what), &who, &b);
    if outcome.is_none() {
        html = html.replacen(
            "<head>",
            r#"<head><meta http-equiv="refresh" content="1">"#,
            1,
        );
    }
    html_response(html)
}
