//! The circuit breaker (I13): when the handler's service fails as a whole, the backlog stays in
//! Kafka rather than being copied into the retry table, and no row spends its attempts on a
//! service that is down.
//!
//! A [`Breaker`] watches the first deliveries made to one handler target, in a sliding window of
//! calls or of time. Retry attempts do not open it: the rows in the retry table are failures by
//! selection, and a few bad messages that fail every time would make a healthy service look down
//! whenever the retries are most of the calls. New messages fail too when the service is down. It **opens** when at least `min_calls` calls are in the window and the share of them
//! that failed in a counted class (retryable and timeout by default; a permanent error is a bad
//! message, not a bad service) reaches `failure_rate`. While open, nothing is called. After the
//! open time it is **half-open**: `probes` calls may go, one at a time each (a new message the
//! consumer held back if it has one, else a due retry row); once `failure_rate` of them failed it
//! opens again for twice as long, up to `open_max`, and once all have gone without that it
//! closes, and the callers ramp back up over `ramp`. A `Retry-After` on a counted failure opens it for at least
//! that long, when it opens.
//!
//! The state machine is plain: every method takes the time it is called at, so its tests need no
//! clock. [`Shared`] wraps it for the consumer and the workers, with the state readable without a
//! lock.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

use crate::config::BreakerConfig;
use crate::handler::{ErrorKind, HandlerError};

/// How the breaker is configured; `[breaker]`, and per topic `[breaker.topics."…"]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// `false` turns the breaker off: it never opens.
    pub enabled: bool,
    /// The calls the failure rate is taken over.
    pub window: Window,
    /// Fewer calls than this in the window never open the breaker.
    pub min_calls: u32,
    /// The share of the window's calls that failed in a counted class at which it opens, in
    /// (0, 1].
    pub failure_rate: f64,
    /// The kinds of error that count as failures: retryable and timeout by default, as a
    /// permanent error says the message is bad, not the service.
    pub counted: Vec<ErrorKind>,
    /// How long it stays open the first time; each reopening from half-open doubles it.
    pub open_for: Duration,
    /// The longest it stays open, a `Retry-After` included.
    pub open_max: Duration,
    /// How many calls go while half-open; all must succeed for it to close.
    pub probes: u32,
    /// After closing, the time over which callers go from a trickle back to their full rate.
    pub ramp: Duration,
}

impl Default for Settings {
    /// Conservative: it takes a sustained, mostly failing stream of calls to open it.
    fn default() -> Self {
        Settings {
            enabled: true,
            window: Window::Time(Duration::from_secs(30)),
            min_calls: 20,
            failure_rate: 0.5,
            counted: vec![ErrorKind::Retryable, ErrorKind::Timeout],
            open_for: Duration::from_secs(10),
            open_max: Duration::from_secs(300),
            probes: 3,
            ramp: Duration::from_secs(30),
        }
    }
}

/// The sliding window of calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Window {
    /// The last this many calls.
    Calls(u32),
    /// The calls of the last this long, in ten buckets.
    Time(Duration),
}

/// What a call to the handler came to, as the breaker sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    Success,
    /// A failure, with the service's `Retry-After` if it gave one.
    Failed {
        kind: ErrorKind,
        retry_after: Option<Duration>,
    },
}

impl Call {
    pub fn of(result: &Result<(), HandlerError>) -> Call {
        match result {
            Ok(()) => Call::Success,
            Err(e) => Call::Failed {
                kind: e.kind,
                retry_after: e.retry_after,
            },
        }
    }
}

/// The breaker's state, as reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }

    /// The gauge's value: 0 closed, 1 open, 2 half-open.
    pub fn gauge(self) -> f64 {
        match self {
            State::Closed => 0.0,
            State::Open => 1.0,
            State::HalfOpen => 2.0,
        }
    }

    fn from_u8(v: u8) -> State {
        match v {
            1 => State::Open,
            2 => State::HalfOpen,
            _ => State::Closed,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
        }
    }
}

/// A change of state, for the log line and the counter.
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    pub from: State,
    pub to: State,
    /// Why: the failure rate and the calls it was taken over, or what a probe did.
    pub cause: String,
    /// How long it is open for, when it opened.
    pub open_for: Option<Duration>,
}

/// Calls and counted failures, in a window of calls or of time.
#[derive(Debug)]
struct Recent {
    window: Window,
    /// By call: whether each failed.
    calls: VecDeque<bool>,
    /// By time: (bucket number, calls, failures), oldest first.
    buckets: VecDeque<(u64, u32, u32)>,
    origin: Instant,
    total: u32,
    failed: u32,
}

impl Recent {
    fn new(window: Window, origin: Instant) -> Self {
        Recent {
            window,
            calls: VecDeque::new(),
            buckets: VecDeque::new(),
            origin,
            total: 0,
            failed: 0,
        }
    }

    fn bucket_width(&self) -> Duration {
        match self.window {
            Window::Time(d) => (d / 10).max(Duration::from_millis(1)),
            Window::Calls(_) => Duration::MAX,
        }
    }

    fn add(&mut self, now: Instant, calls: u32, failed: u32) {
        match self.window {
            Window::Calls(n) => {
                for i in 0..calls {
                    let f = i < failed;
                    self.calls.push_back(f);
                    self.total += 1;
                    self.failed += u32::from(f);
                    if self.calls.len() > n as usize {
                        let old = self.calls.pop_front().unwrap_or(false);
                        self.total -= 1;
                        self.failed -= u32::from(old);
                    }
                }
            }
            Window::Time(_) => {
                self.expire(now);
                let b = self.bucket_of(now);
                match self.buckets.back_mut() {
                    Some((n, c, f)) if *n == b => {
                        *c += calls;
                        *f += failed;
                    }
                    _ => self.buckets.push_back((b, calls, failed)),
                }
                self.total += calls;
                self.failed += failed;
            }
        }
    }

    fn bucket_of(&self, now: Instant) -> u64 {
        let width = self.bucket_width().as_nanos().max(1);
        (now.saturating_duration_since(self.origin).as_nanos() / width) as u64
    }

    /// Drops the buckets that left the window.
    fn expire(&mut self, now: Instant) {
        if let Window::Time(_) = self.window {
            let current = self.bucket_of(now);
            while let Some(&(n, c, f)) = self.buckets.front() {
                if n + 10 > current {
                    break;
                }
                self.buckets.pop_front();
                self.total -= c;
                self.failed -= f;
            }
        }
    }

    fn clear(&mut self) {
        self.calls.clear();
        self.buckets.clear();
        self.total = 0;
        self.failed = 0;
    }

    fn rate(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            f64::from(self.failed) / f64::from(self.total)
        }
    }
}

#[derive(Debug)]
enum Inner {
    /// Closed since `at`; callers ramp up until `at + ramp`.
    Closed {
        at: Option<Instant>,
    },
    Open {
        until: Instant,
    },
    /// `passed` probes succeeded and `failed` failed so far; `out` while one is under way (one
    /// at a time).
    HalfOpen {
        out: bool,
        passed: u32,
        failed: u32,
    },
}

/// The breaker of one handler target.
#[derive(Debug)]
pub struct Breaker {
    settings: Settings,
    inner: Inner,
    tally: Recent,
    /// How many times in a row it opened without closing in between.
    opened: u32,
    /// The longest `Retry-After` among the window's failures.
    retry_after: Option<Duration>,
    /// Set by an operator: the state held whatever the calls say.
    forced: Option<State>,
    /// Whether the hold follows the group's deciding processes rather than an operator.
    followed: bool,
}

impl Breaker {
    pub fn new(settings: Settings, now: Instant) -> Self {
        let tally = Recent::new(settings.window, now);
        Breaker {
            settings,
            inner: Inner::Closed { at: None },
            tally,
            opened: 0,
            retry_after: None,
            forced: None,
            followed: false,
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The state at `now`; an open breaker whose time is up is half-open.
    pub fn state(&mut self, now: Instant) -> (State, Option<Transition>) {
        if let Some(f) = self.forced {
            return (f, None);
        }
        let t = match self.inner {
            Inner::Open { until } if now >= until => {
                self.inner = Inner::HalfOpen {
                    out: false,
                    passed: 0,
                    failed: 0,
                };
                Some(Transition {
                    from: State::Open,
                    to: State::HalfOpen,
                    cause: format!(
                        "open time over: {} probe call(s) may go",
                        self.settings.probes
                    ),
                    open_for: None,
                })
            }
            _ => None,
        };
        (self.current(), t)
    }

    fn current(&self) -> State {
        if let Some(f) = self.forced {
            return f;
        }
        match self.inner {
            Inner::Closed { .. } => State::Closed,
            Inner::Open { .. } => State::Open,
            Inner::HalfOpen { .. } => State::HalfOpen,
        }
    }

    /// When an open breaker turns half-open.
    pub fn open_until(&self) -> Option<Instant> {
        match self.inner {
            Inner::Open { until } if self.forced.is_none() => Some(until),
            _ => None,
        }
    }

    /// Whether a probe may go now (half-open, and no other probe out). If so it is out until
    /// [`Breaker::record`] is told how it went.
    pub fn take_probe(&mut self, now: Instant) -> (bool, Option<Transition>) {
        let (state, t) = self.state(now);
        if state != State::HalfOpen || self.forced.is_some() {
            return (false, t);
        }
        match &mut self.inner {
            Inner::HalfOpen { out, .. } if !*out => {
                *out = true;
                (true, t)
            }
            _ => (false, t),
        }
    }

    /// Gives back a probe that was taken but not made (there was nothing due to send).
    pub fn return_probe(&mut self) {
        if let Inner::HalfOpen { out, .. } = &mut self.inner {
            *out = false;
        }
    }

    /// The share of the callers' full rate they may use at `now`: 1 except while ramping up
    /// after closing, when it grows from one probe's worth to 1 over `ramp`.
    pub fn share(&self, now: Instant) -> f64 {
        match (self.current(), &self.inner) {
            (State::Closed, Inner::Closed { at: Some(at) }) if self.forced.is_none() => {
                let ramp = self.settings.ramp.as_secs_f64();
                if ramp <= 0.0 {
                    return 1.0;
                }
                let gone = now.saturating_duration_since(*at).as_secs_f64();
                (gone / ramp).clamp(0.05, 1.0)
            }
            (State::Closed, _) => 1.0,
            _ => 0.0,
        }
    }

    /// Whether a call counts as a failure.
    pub fn counts(&self, call: Call) -> bool {
        match call {
            Call::Success => false,
            Call::Failed { kind, .. } => self.settings.counted.contains(&kind),
        }
    }

    /// Records one call; `probe` says it was let go by [`Breaker::take_probe`].
    pub fn record(&mut self, now: Instant, call: Call, probe: bool) -> Option<Transition> {
        let failed = self.counts(call);
        if let Call::Failed {
            retry_after: Some(r),
            ..
        } = call
        {
            self.retry_after = longest(self.retry_after, r);
        }
        if probe {
            return self.probed(now, failed);
        }
        self.record_many(now, 1, u32::from(failed))
    }

    /// Records `calls` calls of which `failed` failed in a counted class (a consumer's batch).
    /// Calls that finish while open or half-open, having started before, change nothing.
    pub fn record_many(&mut self, now: Instant, calls: u32, failed: u32) -> Option<Transition> {
        if !self.settings.enabled || self.forced.is_some() || calls == 0 {
            return None;
        }
        if !matches!(self.inner, Inner::Closed { .. }) {
            return None;
        }
        self.tally.add(now, calls, failed.min(calls));
        self.tally.expire(now);
        let (total, rate) = (self.tally.total, self.tally.rate());
        if total >= self.settings.min_calls.max(1) && rate >= self.settings.failure_rate {
            let cause = format!(
                "{:.0} % of the last {total} calls failed (threshold {:.0} %)",
                rate * 100.0,
                self.settings.failure_rate * 100.0
            );
            return Some(self.open(now, State::Closed, cause));
        }
        None
    }

    fn probed(&mut self, now: Instant, failed: bool) -> Option<Transition> {
        let Inner::HalfOpen {
            out,
            passed,
            failed: failures,
        } = &mut self.inner
        else {
            return None;
        };
        *out = false;
        let probes = self.settings.probes.max(1);
        // Some messages fail whatever the service does: the probes, like the window, are judged
        // by their failure rate, not by each one.
        if failed {
            *failures += 1;
            if f64::from(*failures) / f64::from(probes) >= self.settings.failure_rate {
                let cause = format!("{} of {probes} probe calls failed", *failures);
                return Some(self.open(now, State::HalfOpen, cause));
            }
        } else {
            *passed += 1;
        }
        if *passed + *failures < probes {
            return None;
        }
        let cause = format!("{} of {probes} probe calls succeeded", *passed);
        self.inner = Inner::Closed { at: Some(now) };
        self.opened = 0;
        self.tally.clear();
        self.retry_after = None;
        Some(Transition {
            from: State::HalfOpen,
            to: State::Closed,
            cause,
            open_for: None,
        })
    }

    fn open(&mut self, now: Instant, from: State, cause: String) -> Transition {
        let doubled = self
            .settings
            .open_for
            .saturating_mul(1u32.checked_shl(self.opened.min(30)).unwrap_or(u32::MAX));
        let mut open_for = doubled.min(self.settings.open_max);
        if let Some(r) = self.retry_after.take() {
            open_for = open_for.max(r.min(self.settings.open_max));
        }
        self.opened = self.opened.saturating_add(1);
        self.inner = Inner::Open {
            until: now + open_for,
        };
        self.tally.clear();
        Transition {
            from,
            to: State::Open,
            cause,
            open_for: Some(open_for),
        }
    }

    /// An operator's hold: `Some(Open)` or `Some(Closed)` holds that state whatever the calls
    /// say; `None` lets the calls decide again, from a closed breaker and an empty window.
    pub fn force(&mut self, now: Instant, hold: Option<State>) -> Option<Transition> {
        self.hold(now, hold, "an operator", false)
    }

    /// Holds the state as [`Breaker::force`] does; `by` says who, for the log line, and
    /// `followed` that the hold follows the group's deciding processes (a process that makes no
    /// first deliveries), not an operator.
    pub fn hold(
        &mut self,
        now: Instant,
        hold: Option<State>,
        by: &str,
        followed: bool,
    ) -> Option<Transition> {
        let from = self.current();
        self.followed = followed && hold.is_some();
        if self.forced == hold {
            return None;
        }
        self.forced = hold;
        if hold.is_none() {
            self.inner = Inner::Closed { at: Some(now) };
            self.opened = 0;
            self.tally.clear();
            self.retry_after = None;
        }
        let to = self.current();
        (from != to).then(|| Transition {
            from,
            to,
            cause: match hold {
                Some(s) => format!("held {} by {by}", s.as_str()),
                None => format!("the hold by {by} was lifted"),
            },
            open_for: None,
        })
    }

    pub fn forced(&self) -> Option<State> {
        self.forced
    }

    /// Whether its hold follows the group's deciding processes.
    pub fn followed(&self) -> bool {
        self.followed
    }

    /// Ends a hold by going half-open: the next calls are probes, judged as usual. A process that
    /// follows the group's deciding processes goes so when they stop being open, and finds out
    /// for itself whether the service is back.
    pub fn probe_after_hold(&mut self, cause: &str) -> Option<Transition> {
        let from = self.current();
        self.forced = None;
        self.followed = false;
        self.inner = Inner::HalfOpen {
            out: false,
            passed: 0,
            failed: 0,
        };
        self.tally.clear();
        (from != State::HalfOpen).then(|| Transition {
            from,
            to: State::HalfOpen,
            cause: format!("{cause}: {} probe call(s) may go", self.settings.probes),
            open_for: None,
        })
    }
}

/// A [`Breaker`] shared by the consumer and the workers, its state readable without the lock.
#[derive(Debug)]
pub struct Shared {
    name: String,
    group: String,
    /// Copies of the settings the hot path reads without the lock.
    enabled: bool,
    counted: Vec<ErrorKind>,
    ramp: Duration,
    breaker: Mutex<Breaker>,
    state: AtomicU8,
    /// Counts every change of state, for those who wait on one.
    changed: Arc<watch::Sender<u64>>,
    /// Counts every probe that ended or was given back.
    probes: Arc<watch::Sender<u64>>,
    /// Whether the consumer holds back new messages of this breaker's topics: they make better
    /// probes than retry rows, whose failures are the rows' own as often as the service's.
    fresh: std::sync::atomic::AtomicBool,
    /// The last change of state: when, and why (`None` before the first).
    last: Mutex<(chrono::DateTime<chrono::Utc>, Option<String>)>,
}

/// One breaker as a process reports it (`redrive.breaker_states`).
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    pub breaker: String,
    pub state: State,
    /// Whether an operator holds it in this state.
    pub held: bool,
    /// Whether it follows the group's deciding processes (a process that makes no first
    /// deliveries).
    pub followed: bool,
    /// Since when it is in this state (since the process started, if it never changed).
    pub since: chrono::DateTime<chrono::Utc>,
    /// Why it changed to this state.
    pub cause: Option<String>,
    /// When an open breaker turns half-open.
    pub open_until: Option<chrono::DateTime<chrono::Utc>>,
}

impl Shared {
    fn new(
        name: impl Into<String>,
        group: &str,
        settings: Settings,
        changed: Arc<watch::Sender<u64>>,
        probes: Arc<watch::Sender<u64>>,
    ) -> Self {
        let name = name.into();
        metrics::gauge!("redrive_breaker_state", "group" => group.to_string(), "breaker" => name.clone())
            .set(0.0);
        Shared {
            name,
            group: group.to_string(),
            enabled: settings.enabled,
            counted: settings.counted.clone(),
            ramp: settings.ramp,
            breaker: Mutex::new(Breaker::new(settings, Instant::now())),
            state: AtomicU8::new(State::Closed.to_u8()),
            changed,
            probes,
            fresh: std::sync::atomic::AtomicBool::new(false),
            last: Mutex::new((chrono::Utc::now(), None)),
        }
    }

    /// Its state now, with when and why it changed last, for reporting.
    pub fn snapshot(&self) -> Snapshot {
        let (state, forced, followed, until) = self.with(|b, now| {
            let (state, t) = b.state(now);
            (
                (state, b.forced().is_some(), b.followed(), b.open_until()),
                t,
            )
        });
        let (since, cause) = self.last.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let open_until = until.map(|u| {
            let left = u.saturating_duration_since(Instant::now());
            chrono::Utc::now() + chrono::Duration::from_std(left).unwrap_or(chrono::Duration::MAX)
        });
        Snapshot {
            breaker: self.name.clone(),
            state,
            held: forced && !followed,
            followed: forced && followed,
            since,
            cause,
            open_until,
        }
    }

    /// The operator's hold it is under, if any.
    pub fn forced(&self) -> Option<State> {
        self.with(|b, _| (b.forced(), None))
    }

    /// The name it is reported under: `default`, or the topic it was configured for.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The state last seen, without the lock; cheap enough for every message. An open breaker
    /// whose time is up reads as open until someone calls [`Shared::state`].
    pub fn seen(&self) -> State {
        State::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// The state now, under the lock.
    pub fn state(&self) -> State {
        self.with(|b, now| b.state(now))
    }

    /// Runs `f` on the breaker and publishes what changed.
    pub fn with<T>(&self, f: impl FnOnce(&mut Breaker, Instant) -> (T, Option<Transition>)) -> T {
        let now = Instant::now();
        let mut b = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        let (out, t) = f(&mut b, now);
        let (state, later) = b.state(now);
        self.state.store(state.to_u8(), Ordering::Relaxed);
        drop(b);
        let mut any = false;
        for t in t.into_iter().chain(later) {
            self.report(&t);
            any = true;
        }
        if any {
            self.changed.send_modify(|n| *n += 1);
        }
        out
    }

    /// Records calls of which `failed` failed in a counted class; `retry_after` is the longest
    /// `Retry-After` among those failures.
    pub fn record_many(&self, calls: u32, failed: u32, retry_after: Option<Duration>) {
        if calls == 0 {
            return;
        }
        self.with(|b, now| {
            if let Some(r) = retry_after {
                b.retry_after = longest(b.retry_after, r);
            }
            ((), b.record_many(now, calls, failed))
        })
    }

    /// Records one call; `probe` when it went as a probe. A probe's end is announced to the
    /// watchers even when the state stays, so that the next probe goes at once.
    pub fn record(&self, result: &Result<(), HandlerError>, probe: bool) {
        self.with(|b, now| ((), b.record(now, Call::of(result), probe)));
        if probe {
            self.probes.send_modify(|n| *n += 1);
        }
    }

    /// Whether a call of this result counts as a failure.
    pub fn counts(&self, result: &Result<(), HandlerError>) -> bool {
        result
            .as_ref()
            .is_err_and(|e| self.counted.contains(&e.kind))
    }

    /// Takes the probe, if one may go now.
    pub fn take_probe(&self) -> bool {
        self.with(|b, now| b.take_probe(now))
    }

    /// Says whether the consumer holds back new messages that can be probes.
    pub fn set_fresh(&self, fresh: bool) {
        self.fresh.store(fresh, Ordering::Relaxed);
    }

    /// Takes the probe for a retry row: only when the consumer holds back no new message to probe
    /// with.
    pub fn take_probe_for_row(&self) -> bool {
        !self.fresh.load(Ordering::Relaxed) && self.take_probe()
    }

    /// Gives back a probe that was not made.
    pub fn return_probe(&self) {
        self.with(|b, _| {
            b.return_probe();
            ((), None)
        });
        self.probes.send_modify(|n| *n += 1);
    }

    /// The share of their full rate callers may use now (see [`Breaker::share`]).
    pub fn share(&self) -> f64 {
        self.with(|b, now| (b.share(now), None))
    }

    /// Whether it is closed now: without the lock when it was last seen closed, as only a call
    /// under the lock opens it.
    pub fn closed(&self) -> bool {
        self.seen() == State::Closed || self.state() == State::Closed
    }

    /// When an open breaker turns half-open.
    pub fn open_until(&self) -> Option<Instant> {
        self.with(|b, _| (b.open_until(), None))
    }

    /// Holds the state for `by` (see [`Breaker::hold`]).
    pub fn hold(&self, hold: Option<State>, by: &str, followed: bool) {
        self.with(|b, now| ((), b.hold(now, hold, by, followed)))
    }

    /// Whether its hold follows the group's deciding processes.
    pub fn followed(&self) -> bool {
        self.with(|b, _| (b.followed(), None))
    }

    /// Ends a followed hold by going half-open (see [`Breaker::probe_after_hold`]).
    pub fn probe_after_hold(&self, cause: &str) {
        self.with(|b, _| ((), b.probe_after_hold(cause)))
    }

    fn report(&self, t: &Transition) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) =
            (chrono::Utc::now(), Some(t.cause.clone()));
        metrics::counter!("redrive_breaker_transitions_total", "group" => self.group.clone(),
            "breaker" => self.name.clone(), "from" => t.from.as_str(), "to" => t.to.as_str())
        .increment(1);
        metrics::gauge!("redrive_breaker_state", "group" => self.group.clone(),
            "breaker" => self.name.clone())
        .set(t.to.gauge());
        match t.to {
            State::Open => tracing::warn!(
                breaker = %self.name,
                from = t.from.as_str(),
                open_for = ?t.open_for,
                "breaker opened: {}; the consumer pauses and the workers send only probes",
                t.cause
            ),
            _ => tracing::info!(
                breaker = %self.name,
                from = t.from.as_str(),
                to = t.to.as_str(),
                "breaker {}: {}", t.to.as_str(), t.cause
            ),
        }
    }
}

/// The process's breakers: one that topics without an override share, and one per topic with an
/// override in `[breaker.topics]`.
#[derive(Debug)]
pub struct Breakers {
    default: Arc<Shared>,
    topics: HashMap<String, Arc<Shared>>,
    changed: Arc<watch::Sender<u64>>,
    probes: Arc<watch::Sender<u64>>,
}

impl Breakers {
    /// The breakers of `config`, for consumer group `group`.
    pub fn new(config: &BreakerConfig, group: &str) -> Self {
        let changed = Arc::new(watch::Sender::new(0));
        let probes = Arc::new(watch::Sender::new(0));
        let shared = |name: &str, policy: &crate::config::BreakerPolicy| {
            let settings = policy.settings();
            Arc::new(Shared::new(
                name,
                group,
                settings,
                changed.clone(),
                probes.clone(),
            ))
        };
        let default = shared("default", &config.default);
        let topics = config
            .topics
            .iter()
            .map(|(topic, policy)| (topic.clone(), shared(topic, policy)))
            .collect();
        Breakers {
            default,
            topics,
            changed,
            probes,
        }
    }

    /// The breaker that a topic's calls go through.
    pub fn for_topic(&self, topic: &str) -> &Arc<Shared> {
        if self.topics.is_empty() {
            return &self.default;
        }
        self.topics.get(topic).unwrap_or(&self.default)
    }

    /// Every breaker, the default first.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Shared>> {
        std::iter::once(&self.default).chain(self.topics.values())
    }

    /// Whether every breaker was closed when last seen; cheap.
    pub fn all_closed(&self) -> bool {
        self.all().all(|b| b.seen() == State::Closed)
    }

    /// The share of their full rate callers of every breaker may use now: the least of them.
    pub fn share(&self) -> f64 {
        self.all().map(|b| b.share()).fold(1.0, f64::min)
    }

    /// The earliest time an open breaker turns half-open.
    pub fn next_change(&self) -> Option<Instant> {
        self.all().filter_map(|b| b.open_until()).min()
    }

    /// A receiver that sees every change of any breaker's state (`changed().await`).
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// A receiver that sees every probe end or be given back: the next one may go.
    pub fn watch_probes(&self) -> watch::Receiver<u64> {
        self.probes.subscribe()
    }
}

/// The longer of a `Retry-After` kept so far and a new one.
fn longest(kept: Option<Duration>, new: Duration) -> Option<Duration> {
    Some(kept.map_or(new, |k| k.max(new)))
}

/// Counts a batch's calls per breaker and records them together: one lock per batch, not one per
/// call.
pub struct Tally<'a> {
    breakers: &'a Breakers,
    current: Option<&'a Arc<Shared>>,
    calls: u32,
    failed: u32,
    retry_after: Option<Duration>,
}

impl<'a> Tally<'a> {
    pub fn new(breakers: &'a Breakers) -> Self {
        Tally {
            breakers,
            current: None,
            calls: 0,
            failed: 0,
            retry_after: None,
        }
    }

    /// Counts one call of a message of `topic`.
    pub fn add(&mut self, topic: &str, result: &Result<(), HandlerError>) {
        let breaker = self.breakers.for_topic(topic);
        if !breaker.enabled {
            return;
        }
        if self.current.is_some_and(|c| !Arc::ptr_eq(c, breaker)) {
            self.flush();
        }
        self.current = Some(breaker);
        self.calls += 1;
        if let Err(e) = result {
            if breaker.counted.contains(&e.kind) {
                self.failed += 1;
                if let Some(r) = e.retry_after {
                    self.retry_after = longest(self.retry_after, r);
                }
            }
        }
    }

    /// Records what was counted.
    pub fn flush(&mut self) {
        if let Some(breaker) = self.current.take() {
            breaker.record_many(self.calls, self.failed, self.retry_after.take());
        }
        (self.calls, self.failed) = (0, 0);
    }
}

/// After `breaker` closed, holds back most of `total` slots and lets them go as its ramp goes on,
/// so a service that just came back is not flattened by the whole backlog at once. Ends when every
/// slot is back, or when the breaker is no longer closed (the callers stop on their own then).
pub async fn ramp(slots: Arc<tokio::sync::Semaphore>, total: usize, breaker: Arc<Shared>) {
    let floor = (total / 20).max(1);
    let hold = total.saturating_sub(floor);
    if hold == 0 || breaker.share() >= 1.0 {
        return;
    }
    let step = (breaker.ramp / 20).max(Duration::from_millis(10));
    let Ok(mut held) = slots.acquire_many_owned(hold as u32).await else {
        return;
    };
    loop {
        if breaker.seen() != State::Closed {
            return;
        }
        let allowed = ((total as f64 * breaker.share()).ceil() as usize).max(floor);
        let keep = total.saturating_sub(allowed);
        let n = held.num_permits();
        if n > keep {
            drop(held.split(n - keep));
        }
        if keep == 0 {
            return;
        }
        tokio::time::sleep(step).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            window: Window::Calls(10),
            min_calls: 5,
            failure_rate: 0.5,
            open_for: Duration::from_secs(10),
            open_max: Duration::from_secs(35),
            probes: 2,
            ramp: Duration::from_secs(10),
            ..Settings::default()
        }
    }

    const FAIL: Call = Call::Failed {
        kind: ErrorKind::Retryable,
        retry_after: None,
    };
    const TIMEOUT: Call = Call::Failed {
        kind: ErrorKind::Timeout,
        retry_after: None,
    };
    const PERMANENT: Call = Call::Failed {
        kind: ErrorKind::Permanent,
        retry_after: None,
    };

    fn after(s: u64) -> Call {
        Call::Failed {
            kind: ErrorKind::Retryable,
            retry_after: Some(secs(s)),
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn opens_at_the_failure_rate_once_enough_calls_are_in_the_window() {
        let t0 = Instant::now();
        let mut b = Breaker::new(settings(), t0);
        for _ in 0..4 {
            assert_eq!(b.record(t0, FAIL, false), None, "fewer than min_calls");
        }
        let t = b.record(t0, TIMEOUT, false).expect("opens at the fifth");
        assert_eq!(
            (t.from, t.to, t.open_for),
            (State::Closed, State::Open, Some(secs(10)))
        );
        assert!(t.cause.contains("100 % of the last 5 calls"), "{}", t.cause);
        assert_eq!(b.state(t0).0, State::Open);
        assert_eq!(b.share(t0), 0.0);
    }

    #[test]
    fn permanent_errors_and_a_rate_below_the_threshold_keep_it_closed() {
        let t0 = Instant::now();
        let mut b = Breaker::new(settings(), t0);
        for _ in 0..100 {
            assert_eq!(b.record(t0, PERMANENT, false), None);
        }
        // 4 failures in every 10 calls: 40 %.
        for i in 0..100 {
            let call = if i % 10 < 4 { FAIL } else { Call::Success };
            assert_eq!(b.record(t0, call, false), None, "call {i}");
        }
        assert_eq!(b.state(t0).0, State::Closed);
        let mut counting = Breaker::new(
            Settings {
                counted: vec![ErrorKind::Permanent],
                ..settings()
            },
            t0,
        );
        let opened = (0..5).find_map(|_| counting.record(t0, PERMANENT, false));
        assert!(opened.is_some(), "count_permanent counts them");
    }

    #[test]
    fn the_time_window_forgets_old_failures() {
        let t0 = Instant::now();
        let s = Settings {
            window: Window::Time(secs(10)),
            ..settings()
        };
        let mut b = Breaker::new(s, t0);
        for _ in 0..4 {
            assert_eq!(b.record(t0, FAIL, false), None);
        }
        // 11 s later the four failures are out of the window: four more are not enough.
        let later = t0 + secs(11);
        for _ in 0..4 {
            assert_eq!(b.record(later, FAIL, false), None);
        }
        assert!(b.record(later, FAIL, false).is_some(), "five in the window");
    }

    #[test]
    fn half_open_probes_close_it_one_at_a_time_and_it_ramps_up() {
        let t0 = Instant::now();
        let mut b = Breaker::new(settings(), t0);
        (0..5).for_each(|_| drop(b.record(t0, FAIL, false)));
        assert_eq!(b.take_probe(t0 + secs(9)), (false, None), "still open");
        let (ok, t) = b.take_probe(t0 + secs(10));
        assert!(ok);
        assert_eq!(t.map(|t| t.to), Some(State::HalfOpen));
        assert!(!b.take_probe(t0 + secs(10)).0, "one probe out at a time");
        // A call that started before it opened changes nothing now.
        assert_eq!(b.record(t0 + secs(10), Call::Success, false), None);
        assert_eq!(b.record(t0 + secs(10), Call::Success, true), None);
        b.take_probe(t0 + secs(11))
            .0
            .then_some(())
            .expect("the next probe");
        let t = b
            .record(t0 + secs(11), Call::Success, true)
            .expect("closes");
        assert_eq!((t.from, t.to), (State::HalfOpen, State::Closed));
        assert_eq!(b.share(t0 + secs(11)), 0.05);
        assert!((b.share(t0 + secs(16)) - 0.5).abs() < 1e-9);
        assert_eq!(b.share(t0 + secs(30)), 1.0);
        // The window starts empty after closing.
        (0..4).for_each(|_| assert_eq!(b.record(t0 + secs(31), FAIL, false), None));
    }

    #[test]
    fn a_failed_probe_reopens_it_for_twice_as_long_up_to_the_cap() {
        let t0 = Instant::now();
        let mut b = Breaker::new(settings(), t0);
        (0..5).for_each(|_| drop(b.record(t0, FAIL, false)));
        let mut opens = vec![];
        for _ in 0..4 {
            let now = b.open_until().unwrap();
            assert!(b.take_probe(now).0);
            let t = b.record(now, FAIL, true).expect("reopens");
            assert_eq!((t.from, t.to), (State::HalfOpen, State::Open));
            opens.push(t.open_for.unwrap().as_secs());
        }
        assert_eq!(opens, [20, 35, 35, 35]);
        // Closing resets the growth.
        let now = b.open_until().unwrap();
        for _ in 0..2 {
            assert!(b.take_probe(now).0);
            b.record(now, Call::Success, true);
        }
        assert_eq!(b.state(now).0, State::Closed);
        let t = (0..5).find_map(|_| b.record(now, FAIL, false)).unwrap();
        assert_eq!(t.open_for, Some(secs(10)));
    }

    #[test]
    fn a_probe_of_a_bad_message_does_not_reopen_it_alone() {
        let t0 = Instant::now();
        let mut b = Breaker::new(
            Settings {
                probes: 3,
                ..settings()
            },
            t0,
        );
        (0..5).for_each(|_| drop(b.record(t0, FAIL, false)));
        let now = b.open_until().unwrap();
        // One of three fails (33 %, under the 50 % rate): it closes after the third.
        for call in [FAIL, Call::Success] {
            assert!(b.take_probe(now).0);
            assert_eq!(b.record(now, call, true), None);
        }
        assert!(b.take_probe(now).0);
        let t = b.record(now, Call::Success, true).unwrap();
        assert_eq!(t.to, State::Closed);
        assert!(
            t.cause.contains("2 of 3 probe calls succeeded"),
            "{}",
            t.cause
        );
        // Two of three fail: it opens again at the second.
        (0..5).for_each(|_| drop(b.record(now, FAIL, false)));
        let now = b.open_until().unwrap();
        assert!(b.take_probe(now).0);
        assert_eq!(b.record(now, FAIL, true), None);
        assert!(b.take_probe(now).0);
        assert_eq!(b.record(now, FAIL, true).unwrap().to, State::Open);
    }

    #[test]
    fn a_retry_after_opens_it_for_at_least_that_long_but_only_at_the_rate() {
        let t0 = Instant::now();
        let mut b = Breaker::new(settings(), t0);
        let later = after(25);
        // One 503 with Retry-After among successes: below the rate, nothing happens.
        assert_eq!(b.record(t0, later, false), None);
        for _ in 0..9 {
            assert_eq!(b.record(t0, Call::Success, false), None);
        }
        assert_eq!(b.state(t0).0, State::Closed);
        let t = (0..10).find_map(|_| b.record(t0, later, false)).unwrap();
        assert_eq!(t.open_for, Some(secs(25)));
        // Capped by open_max.
        let mut c = Breaker::new(settings(), t0);
        let far = after(3600);
        let t = (0..5).find_map(|_| c.record(t0, far, false)).unwrap();
        assert_eq!(t.open_for, Some(secs(35)));
    }

    #[test]
    fn disabled_it_never_opens_and_an_operator_hold_wins() {
        let t0 = Instant::now();
        let mut off = Breaker::new(
            Settings {
                enabled: false,
                ..settings()
            },
            t0,
        );
        assert!((0..100).all(|_| off.record(t0, FAIL, false).is_none()));
        let mut b = Breaker::new(settings(), t0);
        let t = b.force(t0, Some(State::Open)).unwrap();
        assert_eq!(t.to, State::Open);
        assert_eq!(b.state(t0 + secs(3600)).0, State::Open, "held");
        assert!(!b.take_probe(t0 + secs(3600)).0);
        assert_eq!(b.force(t0, Some(State::Closed)).unwrap().to, State::Closed);
        assert!(
            (0..100).all(|_| b.record(t0, FAIL, false).is_none()),
            "held closed"
        );
        assert_eq!(b.force(t0, None), None, "closed either way");
        assert!((0..5).any(|_| b.record(t0, FAIL, false).is_some()));
    }

    #[test]
    fn a_batch_is_recorded_at_once() {
        let t0 = Instant::now();
        let mut b = Breaker::new(settings(), t0);
        assert_eq!(b.record_many(t0, 4, 4), None);
        assert!(b.record_many(t0, 6, 1).is_some(), "5 of 10");
    }
}
