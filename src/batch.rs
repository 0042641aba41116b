//! Batching shared by the capturer and the completer: wait for one item, then gather more for a
//! few milliseconds, so one statement carries many rows (DESIGN §2b). Also the write-until-durable
//! retry loop both use while Postgres is away.

use std::future::Future;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Waits for the first item, then collects until `max` items or `linger` has passed.
/// `None` once the channel is closed and empty.
pub async fn collect<T>(
    rx: &mut mpsc::Receiver<T>,
    max: usize,
    linger: Duration,
) -> Option<Vec<T>> {
    let first = rx.recv().await?;
    let mut items = Vec::with_capacity(max.min(1024));
    items.push(first);
    let deadline = Instant::now() + linger;
    while items.len() < max {
        // Take what is already queued without waiting, then wait out the linger.
        match rx.try_recv() {
            Ok(item) => {
                items.push(item);
                continue;
            }
            Err(mpsc::error::TryRecvError::Disconnected) => break,
            Err(mpsc::error::TryRecvError::Empty) => {}
        }
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(item)) => items.push(item),
            Ok(None) | Err(_) => break,
        }
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
    let mut delay = Duration::from_millis(100);
    let mut failures: u64 = 0;
    loop {
        failures += 1;
        match write().await {
            Ok(v) => return v,
            Err(e) => {
                metrics::counter!("redrive_store_write_failures_total", "what" => what.to_string())
                    .increment(1);
                tracing::error!(failures, retry_in = %humantime::format_duration(delay), "{what} failed, retrying: {e}");
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn collects_what_is_queued_up_to_max() {
        let (tx, mut rx) = mpsc::channel(10);
        for i in 0..5 {
            tx.send(i).await.unwrap();
        }
        let got = collect(&mut rx, 3, Duration::from_secs(60)).await.unwrap();
        assert_eq!(got, vec![0, 1, 2]);
        drop(tx);
        assert_eq!(
            collect(&mut rx, 10, Duration::from_secs(60)).await.unwrap(),
            vec![3, 4]
        );
        assert_eq!(collect(&mut rx, 10, Duration::from_secs(60)).await, None);
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
