//! The `redrive` binary: parses the command line, sets up telemetry and calls the library.

use anyhow::Context;
use clap::Parser;
use redrive::cli::{Cli, Command, RunArgs};
use redrive::config::{redact_url, PostgresConfig};
use redrive::handler::http::HttpHandler;
use redrive::Config;
use secrecy::ExposeSecret;
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    redrive::telemetry::init_tracing();
    let path = cli.config.as_deref();
    let result = match cli.command {
        Command::Run(parts) => match Config::load(path) {
            Ok(config) => run(config, parts).await,
            Err(e) => Err(e.into()),
        },
        Command::Migrate => match PostgresConfig::load(path) {
            Ok(postgres) => migrate(postgres).await,
            Err(e) => Err(e.into()),
        },
        Command::CheckConfig => Config::load(path).map_err(Into::into).map(check_config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
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
