//! The footprint case: the release `redrive run` binary, with its default settings, consumes `N`
//! messages (1,000,000 unless set) of 1 KiB through its HTTP handler to a local endpoint; printed
//! is the peak resident memory of the process (`VmHWM`), and its rate beside it.

use super::{
    create_topic, delete_topic, produce, redrive_binary, spread, start_stub, Committed, DEADLINE,
};
use std::time::Instant;

/// One run: the peak RSS in MiB, and messages per second.
struct Footprint {
    peak_mib: f64,
    rate: f64,
}

/// Runs the case `runs` times and prints the medians and ranges.
pub async fn run(admin_url: &str, kafka: &str, n: usize, runs: usize) -> anyhow::Result<()> {
    let mut got = vec![];
    for round in 1..=runs {
        let f = once(admin_url, kafka, n).await?;
        eprintln!(
            "round {round}/{runs}: footprint: peak RSS {:.1} MiB, {:.0} messages/s",
            f.peak_mib, f.rate
        );
        got.push(f);
    }
    let peak: Vec<f64> = got.iter().map(|f| f.peak_mib).collect();
    let rate: Vec<f64> = got.iter().map(|f| f.rate).collect();
    let ((plo, pmid, phi), (rlo, rmid, rhi)) = (spread(&peak), spread(&rate));
    println!(
        "\nFootprint of `redrive run` with its defaults, {n} messages through the HTTP handler, \
         median [range] of {runs}:\n\n| measure | value | goal |\n|---|---|---|\n\
         | peak RSS | {pmid:.1} [{plo:.1}–{phi:.1}] MiB | ≤ 64 MiB |\n\
         | messages/s | {rmid:.0} [{rlo:.0}–{rhi:.0}] | – |"
    );
    Ok(())
}

async fn once(admin_url: &str, kafka: &str, n: usize) -> anyhow::Result<Footprint> {
    let db = super::fresh_db(admin_url).await?;
    let stamp = chrono::Utc::now().timestamp_millis();
    let (topic, group) = (
        format!("bench.footprint.{stamp}"),
        format!("bench-footprint-{stamp}"),
    );
    produce(kafka, &topic, n).await?;
    // The dead-letter topic must exist, by redrive's default `<topic>.dlq`; nothing dies here.
    let dlq = format!("{topic}.dlq");
    create_topic(kafka, &dlq, 1).await?;
    let committed = Committed::new(kafka, &group, &topic)?;
    let stub = start_stub().await?;
    let config = std::env::temp_dir().join(format!("redrive-footprint-{stamp}.toml"));
    // Only what must be said: everything else is redrive's default, unless BENCH_KAFKA_EXTRA adds
    // lines to [kafka] (to weigh other pre-fetch limits, for example).
    let extra = super::env("BENCH_KAFKA_EXTRA", "");
    std::fs::write(
        &config,
        format!(
            "[postgres]\nurl = \"{db}\"\n[kafka]\ntopics = [\"{topic}\"]\n\
             \"bootstrap.servers\" = \"{kafka}\"\n\"group.id\" = \"{group}\"\n{extra}\n\
             [handler]\nurl = \"http://{stub}/\"\n"
        ),
    )?;
    let mut child = tokio::process::Command::new(redrive_binary()?)
        .arg("--config")
        .arg(&config)
        .arg("run")
        .env("REDRIVE_LOG", "warn")
        .kill_on_drop(true)
        .spawn()?;
    let pid = child
        .id()
        .ok_or_else(|| anyhow::anyhow!("redrive exited at once"))?;
    let started = Instant::now();
    let waited = tokio::select! {
        r = committed.wait_all("footprint", n) => r,
        status = child.wait() => Err(anyhow::anyhow!("redrive run exited early: {status:?}")),
        _ = tokio::time::sleep(DEADLINE) => Err(anyhow::anyhow!("footprint: gave up after {DEADLINE:?}")),
    };
    let secs = started.elapsed().as_secs_f64();
    let peak_kib = peak_kib(pid);
    child.kill().await.ok();
    std::fs::remove_file(&config).ok();
    waited?;
    delete_topic(kafka, &topic).await?;
    delete_topic(kafka, &dlq).await?;
    Ok(Footprint {
        peak_mib: peak_kib? as f64 / 1024.0,
        // From the process's start: its start-up and the group's join are in it.
        rate: n as f64 / secs,
    })
}

/// The peak resident set of a process, in KiB (`VmHWM` in /proc/PID/status).
fn peak_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmHWM in /proc/{pid}/status"))
}
