//! The command line. Each subcommand maps to one library function.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// Durable retries, dead-lettering and replay for Kafka consumers, with Postgres as the retry store.
///
/// redrive consumes Kafka topics in a consumer group and POSTs each message to an HTTP handler as a
/// CloudEvent. Failed messages are stored in the `redrive.retry_messages` table before their offsets
/// are committed, retried with backoff, and dead-lettered to a DLQ topic after the last attempt.
#[derive(Debug, Parser)]
#[command(name = "redrive", version, propagate_version = true)]
pub struct Cli {
    /// The TOML configuration file. Every setting can also be set with an environment variable:
    /// REDRIVE_<SECTION>__<FIELD>, for example REDRIVE_POSTGRES__URL or REDRIVE_RETRY__MAX_ATTEMPTS.
    #[arg(
        short,
        long,
        env = "REDRIVE_CONFIG",
        global = true,
        value_name = "FILE"
    )]
    pub config: Option<PathBuf>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the consumer, the retry workers, the DLQ publisher and the /metrics listener.
    ///
    /// Stops on SIGINT or SIGTERM: polling stops, in-flight messages get `shutdown.timeout` to
    /// finish, stored offsets are committed and unfinished claims are released.
    Run(RunArgs),
    /// Apply the embedded database migrations (creates the `redrive` schema).
    ///
    /// Safe to run at any time and from several places at once; `run` refuses a schema older than
    /// it needs.
    Migrate,
    /// Load and validate the configuration, print it with secrets redacted, and exit.
    CheckConfig,
}

/// Which parts of `run` to start; all by default.
#[derive(Debug, Clone, Copy, Args, Default)]
pub struct RunArgs {
    /// Do not consume Kafka (run only retry workers and/or the DLQ publisher).
    #[arg(long)]
    pub no_consumer: bool,
    /// Do not run retry workers.
    #[arg(long)]
    pub no_workers: bool,
    /// Do not publish dead rows to the DLQ topic.
    #[arg(long)]
    pub no_dlq: bool,
    /// Do not serve /metrics, /healthz and /readyz.
    #[arg(long)]
    pub no_http: bool,
}
