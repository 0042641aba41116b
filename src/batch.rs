//! Batching shared by the capturer and the completer: wait for one item, then gather more for a
//! few milliseconds, so one statement carries many rows (DESIGN §2b), bounded by count and by bytes
//! so no statement grows past what Postgres accepts. Also the write-until-durable retry loop both
//! use while Postgres is away, and the split that isolates a row Postgres refuses (I10).

use crate::store::StoreError;
use std::future::Future;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// How big a batch may grow: by count, and by the bytes its items carry.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most items.
    pub max: usize,
    /// Most bytes, as the weight function counts them. A batch ends once it reaches this, so a
    /// single item larger than the limit still makes a batch of its own.
    pub max_bytes: usize,
    /// How long to wait for more once the first item is in.
    pub linger: Duration,
}

/// Waits for the first item, then collects until `limits.max` items, `limits.max_bytes` bytes (as
/// `weight` counts them) or `limits.linger` has passed. `None` once the channel is closed and empty.
pub async fn collect<T>(
    rx: &mut mpsc::Receiver<T>,
    limits: Limits,
    weight: impl Fn(&T) -> usize,
) -> Option<Vec<T>> {
    collect_until(rx, limits, weight, |_| false).await
}

/// [`collect`], except that once an item that `urgent` picks is in the batch, the batch takes only
/// what is queued already and does not wait out the linger: something waits on that item.
pub async fn collect_until<T>(
    rx: &mut mpsc::Receiver<T>,
    limits: Limits,
    weight: impl Fn(&T) -> usize,
    urgent: impl Fn(&T) -> bool,
) -> Option<Vec<T>> {
    let first = rx.recv().await?;
    let mut bytes = weight(&first);
    let mut hurry = urgent(&first);
    let mut items = Vec::with_capacity(limits.max.min(1024));
    items.push(first);
    let deadline = Instant::now() + limits.linger;
    while items.len() < limits.max && bytes < limits.max_bytes {
        // Take what is already queued without waiting, then wait out the linger.
        let item = match rx.try_recv() {
            Ok(item) => item,
            Err(mpsc::error::TryRecvError::Disconnected) => break,
            Err(mpsc::error::TryRecvError::Empty) if hurry => break,
            Err(mpsc::error::TryRecvError::Empty) => {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(item)) => item,
                    Ok(None) | Err(_) => break,
                }
            }
        };
        bytes += weight(&item);
        hurry |= urgent(&item);
        items.push(item);
    }
    Some(items)
}

/// Runs `write` until it succeeds, backing off up to 30 s and logging each failure.
///
/// Used where giving up would lose an outcome: the caller is aborted at shutdown instead, and
/// whatever was not written is redelivered by Kafka or rescued by its lease.
pub async fn until_written<T, E, F, Fut>(what: &str, mut write: F) -> T
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut retry = Backoff::new(what);
    loop {
        match write().await {
            Ok(v) => return v,
            Err(e) => retry.failed(e.to_string()).await,
        }
    }
}

/// Writes `items` in one statement, and keeps one bad item from blocking the rest (I10).
///
/// A transient failure (Postgres away) is retried with backoff, like [`until_written`]. A batch
/// refused for any other reason is split in halves, and the halves written in order, until the
/// refused item stands alone; `safe` then writes that item in a form Postgres accepts, given the
/// database's error text, retried until it is written. Returns the sum of what the writes returned,
/// and records the batch's size and time (`redrive_batch_rows`, `redrive_batch_duration_seconds`,
/// labelled `what` and `group`).
pub async fn write_isolating<'a, T, R, W, WFut, S, SFut>(
    what: &str,
    group: &str,
    items: &'a [T],
    mut write: W,
    mut safe: S,
) -> R
where
    R: Default + std::ops::AddAssign,
    W: FnMut(&'a [T]) -> WFut,
    WFut: Future<Output = Result<R, StoreError>>,
    S: FnMut(&'a T, String) -> SFut,
    SFut: Future<Output = Result<R, StoreError>>,
{
    let started = std::time::Instant::now();
    let mut total = R::default();
    // Slices still to write, the next one last.
    let mut todo = vec![items];
    let mut retry = Backoff::new(what);
    while let Some(chunk) = todo.pop() {
        let error = match write(chunk).await {
            Ok(r) => {
                total += r;
                continue;
            }
            Err(e) if e.is_transient() => {
                retry.failed(e.to_string()).await;
                todo.push(chunk);
                continue;
            }
            Err(e) => e,
        };
        if let [item] = chunk {
            metrics::counter!("redrive_rows_isolated_total", "what" => what.to_string(), "group" => group.to_string())
                .increment(1);
            tracing::error!("{what}: postgres refused one row, which is written in a safe form instead: {error}");
            let error = error.to_string();
            total += until_written(what, || safe(item, error.clone())).await;
        } else {
            metrics::counter!("redrive_batch_splits_total", "what" => what.to_string(), "group" => group.to_string())
                .increment(1);
            tracing::warn!(
                rows = chunk.len(),
                "{what}: postgres refused the batch, splitting it to find the row: {error}"
            );
            let (first, second) = chunk.split_at(chunk.len() / 2);
            todo.push(second);
            todo.push(first);
        }
    }
    let labels = [("what", what.to_string()), ("group", group.to_string())];
    metrics::histogram!("redrive_batch_rows", &labels).record(items.len() as f64);
    metrics::histogram!("redrive_batch_duration_seconds", &labels)
        .record(started.elapsed().as_secs_f64());
    total
}

/// The wait between tries of a failing write: 100 ms doubling to 30 s, each failure logged and
/// counted.
struct Backoff<'a> {
    what: &'a str,
    delay: Duration,
    failures: u64,
}

impl<'a> Backoff<'a> {
    fn new(what: &'a str) -> Self {
        Backoff {
            what,
            delay: Duration::from_millis(100),
            failures: 0,
        }
    }

    async fn failed(&mut self, e: String) {
        self.failures += 1;
        let (what, failures) = (self.what, self.failures);
        metrics::counter!("redrive_store_write_failures_total", "what" => what.to_string())
            .increment(1);
        tracing::error!(failures, retry_in = %humantime::format_duration(self.delay), "{what} failed, retrying: {e}");
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(Duration::from_secs(30));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[tokio::test]
    async fn collects_what_is_queued_up_to_max() {
        let (tx, mut rx) = mpsc::channel(10);
        for i in 0..5 {
            tx.send(i).await.unwrap();
        }
        let got = collect(&mut rx, limits(3, usize::MAX), |_| 1)
            .await
            .unwrap();
        assert_eq!(got, vec![0, 1, 2]);
        drop(tx);
        let rest = collect(&mut rx, limits(10, usize::MAX), |_| 1).await;
        assert_eq!(rest.unwrap(), vec![3, 4]);
        assert_eq!(collect(&mut rx, limits(10, usize::MAX), |_| 1).await, None);
    }

    /// An urgent item ends the linger: the batch takes what is queued and goes, where it would
    /// otherwise wait 60 s for more.
    #[tokio::test]
    async fn an_urgent_item_does_not_wait_out_the_linger() {
        let (tx, mut rx) = mpsc::channel(10);
        for i in [1, 2, 3] {
            tx.send(i).await.unwrap();
        }
        let batch = collect_until(&mut rx, limits(10, usize::MAX), |_| 1, |i| *i == 2);
        let got = tokio::time::timeout(Duration::from_secs(30), batch).await;
        assert_eq!(got.expect("no linger").unwrap(), vec![1, 2, 3]);
        drop(tx);
    }

    fn limits(max: usize, max_bytes: usize) -> Limits {
        Limits {
            max,
            max_bytes,
            linger: Duration::from_secs(60),
        }
    }

    #[tokio::test]
    async fn a_batch_ends_once_it_carries_max_bytes() {
        let (tx, mut rx) = mpsc::channel(300);
        // 256 records of 4 MiB: one statement of them all would be 1 GiB.
        for _ in 0..256 {
            tx.send(4usize << 20).await.unwrap();
        }
        drop(tx);
        let mut sizes = Vec::new();
        while let Some(b) = collect(&mut rx, limits(500, 16 << 20), |n| *n).await {
            sizes.push(b.len());
        }
        assert_eq!(sizes, vec![4; 64], "16 MiB a batch");
        let (tx, mut rx) = mpsc::channel(3);
        tx.send(100usize << 20).await.unwrap();
        tx.send(1).await.unwrap();
        drop(tx);
        let first = collect(&mut rx, limits(500, 16 << 20), |n| *n).await;
        assert_eq!(first.unwrap().len(), 1, "an item over the limit goes alone");
    }

    /// A fake statement: refuses any batch holding a negative number, as Postgres refuses a row.
    async fn refuse_negative(items: &[i32], log: &Mutex<Vec<Vec<i32>>>) -> Result<u32, StoreError> {
        log.lock().unwrap().push(items.to_vec());
        if items.iter().any(|i| *i < 0) {
            Err(StoreError::Schema("refused".into()))
        } else {
            Ok(items.len() as u32)
        }
    }

    #[tokio::test]
    async fn a_refused_batch_is_split_until_the_bad_item_stands_alone() {
        let log = Mutex::new(Vec::new());
        let safe = Mutex::new(Vec::new());
        let items = [1, 2, 3, -4, 5, 6, 7, 8];
        let written = write_isolating(
            "test",
            "g",
            &items,
            |chunk| refuse_negative(chunk, &log),
            |item, _e| {
                safe.lock().unwrap().push(*item);
                async { Ok(1) }
            },
        )
        .await;
        assert_eq!(written, 8, "every item is written, one of them safely");
        assert_eq!(*safe.lock().unwrap(), vec![-4]);
        let written_in_order: Vec<i32> = log
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.iter().all(|i| *i >= 0))
            .flatten()
            .copied()
            .collect();
        assert_eq!(written_in_order, vec![1, 2, 3, 5, 6, 7, 8]);
        assert!(log.lock().unwrap().len() <= 8, "a split is logarithmic");
    }

    #[tokio::test]
    async fn retries_until_the_write_succeeds() {
        let mut calls = 0;
        let v: u32 = until_written("test", || {
            calls += 1;
            let n = calls;
            async move {
                if n < 3 {
                    Err("down")
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(v, 3);
    }
}
