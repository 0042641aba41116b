//! The worker processes of a chaos run and the faults done to them and to the services.
//!
//! Every process is started with its own log file. A process that exits without being told to is
//! recorded (the run fails) and started again, so the run goes on.

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// How long a frozen process stays frozen: longer than the group's session timeout, so the group
/// moves its partitions while it sleeps.
pub const FREEZE_FOR: Duration = Duration::from_secs(8);

/// One worker process.
pub struct Worker {
    pub name: String,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    /// Environment variables of its own (a `group.instance.id`, say).
    env: Vec<(String, String)>,
    child: Option<Child>,
}

/// A fault, and when it started and ended.
#[derive(Debug, Clone)]
pub struct Fault {
    /// Its kind, as the plan names it: kill, freeze, term, postgres or broker.
    pub kind: &'static str,
    pub what: String,
    pub from: Instant,
    pub to: Instant,
}

impl Worker {
    pub fn new(name: &str, program: &Path, args: &[&str], logs: &Path) -> Self {
        Worker {
            name: name.to_string(),
            program: program.to_path_buf(),
            args: args.iter().map(|a| a.to_string()).collect(),
            log: logs.join(format!("{name}.log")),
            env: Vec::new(),
            child: None,
        }
    }

    /// Sets an environment variable for the process, from its next start on.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.push((key.to_string(), value.to_string()));
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let child = Command::new(&self.program)
            .args(&self.args)
            // Warnings, and the group's rebalances (what a duplicate is traced back to), unless
            // CHAOS_WORKER_LOG says otherwise.
            .env(
                "REDRIVE_LOG",
                std::env::var("CHAOS_WORKER_LOG")
                    .unwrap_or_else(|_| "warn,redrive::kafka=info".to_string()),
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.program.display()))?;
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref()?.id()
    }

    /// `Some(status)` when the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    fn signal(&self, sig: &str) -> anyhow::Result<()> {
        let pid = self.pid().context("the process is not running")?;
        let ok = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()?
            .success();
        anyhow::ensure!(ok, "kill {sig} {pid} failed");
        Ok(())
    }

    /// SIGKILL, then start again.
    pub async fn kill_and_restart(&mut self) -> anyhow::Result<()> {
        self.signal("-KILL")?;
        if let Some(c) = self.child.as_mut() {
            c.wait().await?;
        }
        self.start()
    }

    /// SIGSTOP for [`FREEZE_FOR`], then SIGCONT.
    pub async fn freeze(&mut self) -> anyhow::Result<()> {
        self.signal("-STOP")?;
        tokio::time::sleep(FREEZE_FOR).await;
        self.signal("-CONT")
    }

    /// SIGTERM and wait (bounded) for the exit, which must be clean. `Err` names what went wrong.
    pub async fn terminate(&mut self) -> anyhow::Result<()> {
        self.signal("-TERM")?;
        let child = self.child.as_mut().context("not running")?;
        let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
            .await
            .with_context(|| format!("{} did not stop within 60 s of SIGTERM", self.name))??;
        self.child = None;
        anyhow::ensure!(
            status.success(),
            "{} exited with {status} after SIGTERM",
            self.name
        );
        Ok(())
    }

    /// Peak resident memory so far, in bytes (`VmHWM`).
    pub fn peak_rss(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }
}

/// Runs one of the project's service scripts (`restart`), with the environment that points it at
/// the chaos services.
pub async fn service(script: &str, command: &str) -> anyhow::Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(script);
    let out = Command::new(&path)
        .arg(command)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .await
        .with_context(|| format!("running {}", path.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{script} {command} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
