//! The `redrive` binary: parses the command line, sets up telemetry and calls the library.

use anyhow::Context;
use clap::Parser;
use redrive::cli::{Cli, Command, PurgeArgs, ReplayArgs, RunArgs};
use redrive::config::{redact_url, PostgresConfig};
use redrive::handler::http::HttpHandler;
use redrive::Config;
use secrecy::ExposeSecret;
use std::process::ExitCode;

/// Messages are copied out of librdkafka on one thread and freed on another; the system allocator
/// pays for that in locks and consolidation, mimalloc does not (BENCHMARKS.md, happy path).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Transparent huge pages off before mimalloc starts: an ELF constructor of a higher priority than
/// mimalloc's, which has none (see `redrive::support::no_transparent_huge_pages`).
#[used]
#[cfg_attr(target_os = "linux", link_section = ".init_array.00101")]
static NO_THP: extern "C" fn() = redrive::support::no_transparent_huge_pages;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = cli.config.as_deref();
    // `run` reads its configuration first: `[telemetry]` may ask for traces.
    let run_config = matches!(cli.command, Command::Run(_)).then(|| Config::load(path));
    let telemetry = run_config
        .as_ref()
        .and_then(|c| c.as_ref().ok())
        .map(|c| &c.telemetry);
    let traces = redrive::telemetry::init_tracing_with(telemetry);
    if let Some(Ok(config)) = &run_config {
        redrive::telemetry::label_metrics_with_group(config.kafka.group_id());
    }
    // `run` logs its fatal error too, for log collectors; the other commands only print it.
    let logs = matches!(cli.command, Command::Run(_));
    let result = match cli.command {
        Command::Run(parts) => match run_config.expect("loaded above") {
            Ok(config) => run(config, parts).await,
            Err(e) => Err(e.into()),
        },
        Command::Migrate => match PostgresConfig::load(path) {
            Ok(postgres) => migrate(postgres).await,
            Err(e) => Err(e.into()),
        },
        Command::CheckConfig => Config::load(path).map_err(Into::into).map(check_config),
        Command::Replay(args) => replay(path, &args).await,
        Command::Purge(args) => purge(path, &args).await,
        Command::Status(args) => match PostgresConfig::load(path) {
            Ok(postgres) => redrive::ops::status::run(&postgres, &args).await,
            Err(e) => Err(e.into()),
        },
        Command::Breaker(command) => match PostgresConfig::load(path) {
            Ok(postgres) => redrive::ops::breaker::run(&postgres, &command).await,
            Err(e) => Err(e.into()),
        },
        Command::Console(args) => redrive::console::run(path, &args).await,
    };
    if let Some(traces) = traces {
        traces.shutdown();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<Interrupted>() => ExitCode::from(redrive::ops::INTERRUPTED),
        Err(e) => {
            if logs {
                tracing::error!("{e:#}");
            }
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `redrive run`: the HTTP handler, unless this process runs neither consumer nor workers.
async fn run(config: Config, parts: RunArgs) -> anyhow::Result<()> {
    let shutdown = redrive::shutdown::on_signals().context("installing signal handlers")?;
    if parts.no_consumer && parts.no_workers {
        return redrive::app::run(config, redrive::handler::Unused, parts, shutdown).await;
    }
    let handler = HttpHandler::new(&config.handler)?;
    redrive::app::run(config, handler, parts, shutdown).await
}

/// A command stopped early on SIGINT or SIGTERM; it has said so already.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
struct Interrupted;

/// `redrive replay`: `[postgres]`, and the whole configuration for `--to-topic`.
async fn replay(path: Option<&std::path::Path>, args: &ReplayArgs) -> anyhow::Result<()> {
    use redrive::ops::replay::Target;
    let target = if args.to_topic.is_some() {
        Target::Kafka(Box::new(Config::load(path)?))
    } else {
        Target::Requeue(PostgresConfig::load(path)?)
    };
    let stop = redrive::shutdown::on_signals().context("installing signal handlers")?;
    let finished = redrive::ops::replay::run(target, args, &stop).await?;
    interrupted(finished)
}

/// `redrive purge`: needs only `[postgres]`.
async fn purge(path: Option<&std::path::Path>, args: &PurgeArgs) -> anyhow::Result<()> {
    let postgres = PostgresConfig::load(path)?;
    let stop = redrive::shutdown::on_signals().context("installing signal handlers")?;
    let finished = redrive::ops::purge::run(&postgres, args, &stop).await?;
    interrupted(finished)
}

fn interrupted(finished: redrive::ops::Finished) -> anyhow::Result<()> {
    if finished.interrupted {
        Err(Interrupted.into())
    } else {
        Ok(())
    }
}

/// `redrive migrate`: needs only `[postgres]`.
async fn migrate(postgres: PostgresConfig) -> anyhow::Result<()> {
    let applied = redrive::store::migrate::run(&postgres.url).await?;
    for m in &applied {
        println!("applied V{}__{}", m.version, m.name);
    }
    println!(
        "schema is at version {} ({} migration(s) applied now) in {}",
        redrive::store::migrate::required_version(),
        applied.len(),
        redact_url(postgres.url.expose_secret())
    );
    Ok(())
}

/// `redrive check-config`: the effective configuration, secrets redacted.
fn check_config(config: Config) {
    println!("configuration is valid");
    println!(
        "postgres: {}",
        redact_url(config.postgres.url.expose_secret())
    );
    println!("topics: {}", config.kafka.topics.join(", "));
    println!(
        "kafka: {}",
        redrive::kafka::describe(&config.kafka.properties)
    );
    println!("retry (default): {:?}", config.retry.default);
    for (topic, policy) in &config.retry.topics {
        println!("retry ({topic}): {policy:?}");
    }
}
