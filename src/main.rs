//! The `redrive` binary: parses the command line, sets up telemetry and calls the library.

use anyhow::Context;
use clap::Parser;
use redrive::cli::{Cli, Command};
use redrive::handler::http::HttpHandler;
use redrive::{config::redact_url, Config};
use secrecy::ExposeSecret;
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    redrive::telemetry::init_tracing();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Run(parts) => {
            let handler = if parts.no_consumer && parts.no_workers {
                None
            } else {
                Some(HttpHandler::new(&config.handler)?)
            };
            let shutdown = redrive::shutdown::on_signals().context("installing signal handlers")?;
            match handler {
                Some(h) => redrive::app::run(config, h, parts, shutdown).await,
                None => redrive::app::run(config, redrive::handler::Unused, parts, shutdown).await,
            }
        }
        Command::Migrate => {
            let applied = redrive::store::migrate::run(&config.postgres.url).await?;
            for m in &applied {
                println!("applied V{}__{}", m.version, m.name);
            }
            println!(
                "schema is at version {} ({} migration(s) applied now) in {}",
                redrive::store::migrate::required_version(),
                applied.len(),
                redact_url(config.postgres.url.expose_secret())
            );
            Ok(())
        }
        Command::CheckConfig => {
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
            Ok(())
        }
    }
}
