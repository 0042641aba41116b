//! The retry workers: claim due rows in batches, call the handler, and pass each outcome to the
//! completer.
//!
//! A dispatcher never attempts a row before its `next_attempt_at` (the claim compares with the
//! database clock) and wakes promptly once one is due (I7): on a `redrive_pending` NOTIFY, on a
//! timer set to the earliest due row or lease expiry, and at the latest after `max_idle`. While
//! rows come due one after another it claims on a tick instead. Every claim also takes the rows
//! that come due within [`CLAIM_AHEAD`], and holds each until it is due: rows are attempted on time
//! rather than on the next claim after it, and each statement takes the rows of several
//! milliseconds. With a backlog, further claims run while the rows of the first are started.
//!
//! While a breaker is not closed (I13) the workers claim nothing but probes: one row at a time
//! when a half-open breaker lets one go and the consumer holds back no new message to probe with.
//! A probe is an attempt like any other, so a row that fails whatever the service does dies in
//! its time rather than holding the breaker open. Attempts do not open a breaker; only first
//! deliveries do. A claimed row whose breaker is open when it comes due,
//! or whose attempt fails in a counted class while its breaker is open, is released with its
//! attempt given back, so no row spends its budget on a service that is down. After a breaker
//! closes the workers ramp up from a trickle to `concurrency` over its `ramp`.

use crate::breaker::{Breakers, Shared as Breaker, State};
use crate::completer::{CompleteHandle, Urgency};
use crate::config::{RetryConfig, WorkersConfig};
use crate::handler::{call_with_timeout, Delivery, ErrorKind, Handler, HandlerError};
use crate::store::claim::{Claim, Claimed, Unreadable};
use crate::store::complete::{Completion, Outcome};
use crate::store::{Store, StoreError};
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::task::{Id, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

/// NOTIFY channel for rows that became pending.
pub const PENDING_CHANNEL: &str = "redrive_pending";

/// Claim statements under way at once for a backlog: the next batches are being claimed in Postgres
/// while the rows of the last are attempted, so the workers do not wait out each claim's round
/// trip, and several backends share the claiming. Each claim reserves its slots, so `concurrency`
/// bounds how many run at once.
const CLAIMS_IN_FLIGHT: usize = 4;

/// How soon to claim again after a claim that took some rows but not a full batch. Rows are then
/// coming due one after another: claiming on this tick bounds how many statements they cost (one
/// claim per tick, and no look-up of the next due time), whatever their rate.
const CLAIM_TICK: Duration = Duration::from_millis(20);

/// How far ahead a claim takes rows that are not yet due. Longer than a tick and its round trip,
/// so the claim of one tick takes every row that comes due before the next claim's rows are back:
/// a row is then late only by its timer. A row held before it is due keeps its slot and its lease,
/// which runs from its due time.
const CLAIM_AHEAD: Duration = Duration::from_millis(40);

/// Retry workers for one consumer group.
pub struct Dispatcher<H> {
    store: Store,
    handler: Arc<H>,
    complete: CompleteHandle,
    group: Arc<str>,
    worker: String,
    retry: Arc<RetryConfig>,
    config: WorkersConfig,
    timeout: Duration,
    breakers: Arc<Breakers>,
    meters: Arc<Meters>,
}

/// The metrics every attempt records, looked up once per group rather than once per attempt: a
/// look-up formats and hashes the labels, which costs more than the recording. Each is registered
/// on its first use, so a series appears only once something is recorded in it.
struct Meters {
    group: Arc<str>,
    lateness: OnceLock<metrics::Histogram>,
    end_to_end: OnceLock<Arc<crate::telemetry::Durations>>,
    /// `redrive_attempts_total` by outcome: succeeded, retry, dead.
    attempts: crate::telemetry::OutcomeCounters<3>,
    durations: [OnceLock<Arc<crate::telemetry::Durations>>; 3],
}

impl Meters {
    fn new(group: Arc<str>) -> Self {
        Self {
            group,
            lateness: OnceLock::new(),
            end_to_end: OnceLock::new(),
            attempts: crate::telemetry::OutcomeCounters::new("redrive_attempts_total"),
            durations: Default::default(),
        }
    }

    fn lateness(&self) -> &metrics::Histogram {
        self.lateness.get_or_init(|| {
            metrics::histogram!("redrive_retry_lateness_seconds", "group" => self.group.to_string())
        })
    }

    fn end_to_end(&self) -> &crate::telemetry::Durations {
        self.end_to_end
            .get_or_init(|| crate::telemetry::end_to_end(&self.group, "retry"))
    }

    /// The attempt's outcome counted, and its handler call's duration recorded.
    fn attempted(&self, outcome: &Outcome, took: Duration) {
        let (at, label) = match outcome {
            Outcome::Succeeded => (0, "succeeded"),
            Outcome::Retry { .. } => (1, "retry"),
            Outcome::Dead { .. } => (2, "dead"),
        };
        self.attempts.add(at, label, 1);
        self.durations[at]
            .get_or_init(|| crate::telemetry::handler_durations(&self.group, "retry", label))
            .record(took);
    }
}

/// When to claim again, judged from what the last claim took.
enum Next {
    /// The claim was full: more may be due now.
    Now,
    /// It took some rows but not a full batch: rows are coming due one after another, so claim
    /// again [`CLAIM_TICK`] after this claim was sent.
    Tick,
    /// It took nothing, or failed: wait this long unless a NOTIFY comes first.
    Wait(Duration),
}

/// A finished claim statement: the rows it asked for, when it was sent, what it took, and the
/// breaker whose probe it is, if it is one.
type ClaimDone = (
    usize,
    tokio::time::Instant,
    Result<Claim, StoreError>,
    Option<Arc<Breaker>>,
);

/// Attempts in flight, by task, with the claim (row id, claim token) each holds.
type Running = (JoinSet<()>, HashMap<Id, (Uuid, Uuid)>);

impl<H: Handler> Dispatcher<H> {
    /// Creates the workers; `timeout` bounds each handler call, and `breakers` are shared with the
    /// consumer.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        handler: Arc<H>,
        complete: CompleteHandle,
        group: &str,
        retry: RetryConfig,
        config: WorkersConfig,
        timeout: Duration,
        breakers: Arc<Breakers>,
    ) -> Self {
        let group: Arc<str> = group.into();
        Self {
            store,
            handler,
            complete,
            meters: Arc::new(Meters::new(group.clone())),
            group,
            worker: worker_id(),
            retry: Arc::new(retry),
            config,
            timeout,
            breakers,
        }
    }

    /// Claims and attempts rows until `shutdown`; then in-flight attempts get `drain` to finish and
    /// the claims of the rest are released.
    pub async fn run(
        self,
        shutdown: CancellationToken,
        drain: Duration,
    ) -> Result<(), crate::store::StoreError> {
        let mut listener = self.store.listen(PENDING_CHANNEL).await?;
        let mut running: Running = (JoinSet::new(), HashMap::new());
        // Claim statements under way, each with the slots it reserved.
        let mut claims = FuturesUnordered::new();
        let mut reserved = 0;
        // Whether the last claim was full: only a backlog is worth a second claim at once. Rows
        // that come due one by one are taken by one claim; a second would find nothing.
        let mut backlog = false;
        // Whether rows may be due now: at the start, after a full claim, on a NOTIFY and when the
        // timer fires. A finished attempt alone makes nothing due, so it costs no statement.
        let mut due = true;
        let mut look_at = tokio::time::Instant::now();
        let mut breakers = self.breakers.watch();
        let in_flight =
            metrics::gauge!("redrive_in_flight_attempts", "group" => self.group.to_string());
        while !shutdown.is_cancelled() {
            // Finished attempts still sit in the set until joined; reap them so the count is true.
            while let Some(done) = running.0.try_join_next_with_id() {
                forget(&mut running.1, done);
            }
            in_flight.set(running.0.len() as f64);
            // While a breaker is not closed, only probes are claimed; wake when it may let one go.
            let mut reopen = None;
            while due && (claims.is_empty() || backlog && claims.len() < CLAIMS_IN_FLIGHT) {
                let (asked, probe) = match self.to_claim(running.0.len() + reserved) {
                    Claimable::Rows(n) => (n, None),
                    Claimable::Probe(b) => (1, Some(b)),
                    Claimable::Nothing => break,
                    Claimable::NotYet(at) => {
                        reopen = at;
                        break;
                    }
                };
                reserved += asked;
                claims.push(self.claim(asked, probe));
            }
            let wake = reopen.map(tokio::time::Instant::from_std);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some((asked, sent, claimed, probe)) = claims.next(), if !claims.is_empty() => {
                    reserved -= asked;
                    let next = match claimed {
                        Ok(claim) => self.start(claim, asked, probe, &mut running).await,
                        Err(e) => {
                            tracing::error!("claiming due rows failed: {e}");
                            Next::Wait(Duration::from_secs(1))
                        }
                    };
                    backlog = matches!(next, Next::Now);
                    due = backlog;
                    look_at = match next {
                        Next::Now => tokio::time::Instant::now(),
                        // A tick counts from when the claim was sent, so its round trip is not
                        // added to how late the next rows are.
                        Next::Tick => sent + CLAIM_TICK,
                        Next::Wait(wait) => tokio::time::Instant::now() + wait,
                    };
                }
                Some(done) = running.0.join_next_with_id(), if !running.0.is_empty() => {
                    forget(&mut running.1, done);
                }
                _ = listener.wait() => due = true,
                _ = tokio::time::sleep_until(look_at), if !due => due = true,
                _ = breakers.changed() => due = true,
                _ = tokio::time::sleep_until(wake.unwrap_or(look_at)), if wake.is_some() => due = true,
            }
        }
        // Rows claimed as the workers stop are not attempted: their claims are released with the
        // unfinished attempts'.
        let mut unstarted = Vec::new();
        while let Some((_, _, claimed, _)) = claims.next().await {
            if let Ok(claim) = claimed {
                unstarted.extend(claim.rows.iter().map(|r| (r.id, r.token)));
                unstarted.extend(claim.unreadable.iter().map(|r| (r.id, r.token)));
            }
        }
        drop(claims);
        self.drain(running, unstarted, drain).await;
        Ok(())
    }

    /// What to claim with `busy` slots taken (running or reserved by a claim under way): nothing
    /// until enough are free for a worthwhile batch (half a batch), unless nothing runs. While a
    /// breaker is not closed, a probe if one may go; after one closed, fewer slots while it ramps.
    fn to_claim(&self, busy: usize) -> Claimable {
        let mut concurrency = self.config.concurrency;
        if !self.breakers.all_closed() {
            let mut open = false;
            for b in self.breakers.all() {
                match b.state() {
                    State::Closed => {}
                    State::HalfOpen if busy == 0 && b.take_probe_for_row() => {
                        return Claimable::Probe(b.clone());
                    }
                    _ => open = true,
                }
            }
            if open {
                return Claimable::NotYet(self.breakers.next_change());
            }
        }
        let share = self.breakers.share();
        if share < 1.0 {
            concurrency = ((concurrency as f64 * share).ceil() as usize).max(1);
        }
        let free = concurrency.saturating_sub(busy);
        let batch = self.config.claim_batch_size.min(concurrency);
        if free == 0 || (free < batch.div_ceil(2) && busy > 0) {
            return Claimable::Nothing;
        }
        Claimable::Rows(free.min(self.config.claim_batch_size))
    }

    /// One claim statement for `asked` rows, with the number it asked for and when it was sent.
    fn claim(&self, asked: usize, probe: Option<Arc<Breaker>>) -> BoxFuture<'_, ClaimDone> {
        let sent = tokio::time::Instant::now();
        let claim = self.store.claim_ahead(
            &self.group,
            asked as i64,
            self.config.lease,
            &self.worker,
            CLAIM_AHEAD,
        );
        Box::pin(async move { (asked, sent, claim.await, probe) })
    }

    /// Starts the attempts of what one claim took, and says when to claim again: at once when the
    /// claim was full, on the tick when it took some, else when the next row is due.
    async fn start(
        &self,
        claimed: Claim,
        asked: usize,
        mut probe: Option<Arc<Breaker>>,
        running: &mut Running,
    ) -> Next {
        // A row's wait is counted from the database's now() when it was claimed; counted from here,
        // after the statement's round trip, the handler is called late rather than early.
        let received = tokio::time::Instant::now();
        let got = claimed.len();
        for bad in claimed.unreadable {
            self.fail_unreadable(bad).await;
        }
        for row in claimed.rows {
            let claim = (row.id, row.token);
            // A span per attempt only when someone reads it: a child of the first delivery's
            // span, which the row keeps, or of the record's own trace context.
            let attempt = u32::try_from(row.attempt).unwrap_or(u32::MAX);
            let span = crate::telemetry::process_span(
                &row.message,
                &self.group,
                attempt,
                Some(row.id),
                row.trace.as_deref(),
            );
            // A row due already needs no timer.
            let due = (!row.wait.is_zero()).then(|| received + row.wait);
            let breaker = self.breakers.for_topic(&row.message.topic).clone();
            // A probe is made only by a row of the breaker that let it go.
            let probing = probe.take_if(|p| Arc::ptr_eq(p, &breaker)).is_some();
            let task = self
                .attempt(row, received, due, breaker, probing)
                .instrument(span);
            let handle = running.0.spawn(task);
            running.1.insert(handle.id(), claim);
        }
        if let Some(unused) = probe {
            unused.return_probe();
        }
        match got {
            _ if got == asked => Next::Now,
            0 => Next::Wait(self.until_next_wake().await),
            _ => Next::Tick,
        }
    }

    /// A row whose stored message cannot be read is dead at once, without a handler call: only
    /// that row fails, and it stays in the table for an operator (I10).
    async fn fail_unreadable(&self, bad: Unreadable) {
        tracing::error!(id = %bad.id, "a claimed row cannot be read; it is dead: {}", bad.problem);
        metrics::counter!("redrive_attempts_total", "outcome" => "unreadable").increment(1);
        let completion = Completion {
            id: bad.id,
            attempt: bad.attempt,
            token: bad.token,
            outcome: Outcome::Dead {
                error: HandlerError::permanent(bad.problem),
            },
        };
        self.complete.send(completion).await;
    }

    /// How long to wait for the next row or expired lease: a row is claimed half of
    /// [`CLAIM_AHEAD`] before it is due, so it is attempted on time.
    async fn until_next_wake(&self) -> Duration {
        let wake = match self.store.next_wake(&self.group, CLAIM_AHEAD / 2).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("reading the next due time failed: {e}");
                return Duration::from_secs(1);
            }
        };
        let Some(wait) = wake else {
            return self.config.max_idle;
        };
        // A little late rather than early: the rescue of an expired lease compares with the
        // database clock, and a claim that comes too soon costs a statement and rescues nothing.
        let wait = wait + Duration::from_millis(1);
        wait.clamp(Duration::from_millis(1), self.config.max_idle)
    }

    /// One attempt of `row`, its handler called at `due` (when it was claimed ahead) or at once,
    /// through its topic's breaker (`probe` when the breaker let it go as its probe).
    fn attempt(
        &self,
        row: Claimed,
        received: tokio::time::Instant,
        due: Option<tokio::time::Instant>,
        breaker: Arc<Breaker>,
        probe: bool,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (handler, complete, retry, group, store, meters) = (
            self.handler.clone(),
            self.complete.clone(),
            self.retry.clone(),
            self.group.clone(),
            self.store.clone(),
            self.meters.clone(),
        );
        let timeout = self.timeout;
        async move {
            if let Some(due) = due {
                tokio::time::sleep_until(due).await;
            }
            if !probe && !breaker.closed() {
                return give_back(&store, &row, "refused").await;
            }
            let attempt = u32::try_from(row.attempt).unwrap_or(u32::MAX);
            let delivery = Delivery {
                message: &row.message,
                attempt,
                group: &group,
            };
            // How late the attempt starts: late at the claim, plus the time since, less what a
            // row claimed ahead had to wait.
            let late = row.late + received.elapsed().saturating_sub(row.wait);
            meters.lateness().record(late.as_secs_f64());
            let started = std::time::Instant::now();
            let result = call_with_timeout(handler.as_ref(), delivery, timeout).await;
            let took = started.elapsed();
            // Only a probe's outcome counts: retries do not open the breaker (see crate::breaker).
            if probe {
                breaker.record(&result, true);
            }
            // A probe is an attempt like any other; an attempt under way when the breaker opened
            // that fails with it says nothing about the row, and gets its attempt back.
            if !probe && result.is_err() && breaker.counts(&result) && !breaker.closed() {
                return give_back(&store, &row, "refunded").await;
            }
            let outcome = match result {
                Ok(()) => Outcome::Succeeded,
                Err(error)
                    if error.kind == ErrorKind::Permanent || row.attempt >= row.max_attempts =>
                {
                    tracing::info!(id = %row.id, topic = %row.message.topic,
                        partition = row.message.partition, offset = row.message.offset,
                        attempt = row.attempt, "attempt failed, row is dead: {error}");
                    Outcome::Dead { error }
                }
                Err(error) => {
                    let policy = retry.for_topic(&row.message.topic);
                    let delay =
                        policy
                            .backoff()
                            .delay(attempt, rand::random::<f64>(), error.retry_after);
                    tracing::debug!(retry_in = ?delay, "attempt failed: {error}");
                    Outcome::Retry {
                        retry_in: delay,
                        error,
                    }
                }
            };
            meters.attempted(&outcome, took);
            if matches!(outcome, Outcome::Succeeded) {
                let since =
                    crate::telemetry::since_record(row.message.timestamp, chrono::Utc::now());
                if let Some(d) = since {
                    meters.end_to_end().record(d);
                }
            }
            // A success, or a death, takes the row out of its key line, if it is in one: the next
            // row of the line waits for that to be written.
            let ordered = retry.for_topic(&row.message.topic).ordered().is_some()
                && row.message.key.is_some();
            let urgency = match outcome {
                Outcome::Succeeded | Outcome::Dead { .. } if ordered => Urgency::LineWaits,
                _ => Urgency::Batched,
            };
            let completion = Completion {
                id: row.id,
                attempt: row.attempt,
                token: row.token,
                outcome,
            };
            complete.send_with(completion, urgency).await;
        }
    }

    async fn drain(
        self,
        (mut tasks, mut claims): Running,
        unstarted: Vec<(Uuid, Uuid)>,
        limit: Duration,
    ) {
        tracing::info!(
            in_flight = tasks.len(),
            "retry workers stopping: finishing in-flight attempts"
        );
        let _ = tokio::time::timeout(limit, async {
            while let Some(done) = tasks.join_next_with_id().await {
                let id = match done {
                    Ok((id, ())) => id,
                    Err(e) => e.id(),
                };
                claims.remove(&id);
            }
        })
        .await;
        tasks.abort_all();
        let mut unfinished: Vec<(Uuid, Uuid)> = claims.into_values().collect();
        unfinished.extend(unstarted);
        if unfinished.is_empty() {
            return;
        }
        match self.store.release(&unfinished).await {
            Ok(n) => tracing::info!(released = n, "released the claims of unfinished attempts"),
            Err(e) => {
                tracing::warn!("releasing claims failed; their leases will expire instead: {e}")
            }
        }
    }
}

/// What the workers may claim now.
enum Claimable {
    Rows(usize),
    /// One row, as the probe of this breaker.
    Probe(Arc<Breaker>),
    /// Nothing now: slots are busy.
    Nothing,
    /// Nothing while a breaker is not closed; look again when it may turn half-open.
    NotYet(Option<std::time::Instant>),
}

/// Releases a claimed row that was not attempted, or whose failure is not held against it, with
/// its attempt given back (I13): it is due again, with its budget as it was.
async fn give_back(store: &Store, row: &Claimed, why: &'static str) {
    metrics::counter!("redrive_attempts_total", "outcome" => why).increment(1);
    tracing::debug!(id = %row.id, "breaker not closed: the attempt is given back ({why})");
    if let Err(e) = store.release(&[(row.id, row.token)]).await {
        tracing::warn!(id = %row.id, "giving an attempt back failed; its lease will expire instead: {e}");
    }
}

/// Drops the claim of a finished attempt task (finished normally, panicked or aborted).
fn forget(claims: &mut HashMap<Id, (Uuid, Uuid)>, done: Result<(Id, ()), tokio::task::JoinError>) {
    let id = match done {
        Ok((id, ())) => id,
        Err(e) => e.id(),
    };
    claims.remove(&id);
}

/// `host-pid`, recorded in `locked_by` so operators can see who holds a row.
pub fn worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "redrive".to_string());
    format!("{host}-{}", std::process::id())
}
