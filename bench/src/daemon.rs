//! The real `token-agent` binary as a child process, as a user runs it, and
//! the echo servers, which run the same way so that both sides of every
//! comparison cross a process boundary.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use token_agent_client::Client;

use crate::wire::EchoMode;

/// `token-agent` beside this binary (both built by the same
/// `cargo build --release`), unless given.
pub fn agent_binary(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(path) => path.to_path_buf(),
        None => std::env::current_exe()?
            .parent()
            .context("no folder for the bench binary")?
            .join("token-agent"),
    };
    anyhow::ensure!(
        path.exists(),
        "{} is missing: cargo build --release -p token-agent (or pass --agent-bin)",
        path.display()
    );
    Ok(path)
}

pub struct Agent {
    child: Child,
    pub pid: u32,
    pub socket: PathBuf,
    /// From spawn until the first `ping` was answered.
    pub ready_after: Duration,
    log: PathBuf,
}

impl Agent {
    /// Spawns the agent on `store` and waits until it answers a ping: the
    /// store opened, every session loaded and scheduled, the socket served.
    pub fn start(
        binary: &Path,
        store: &Path,
        socket: &Path,
        log: &Path,
        extra_args: &[String],
    ) -> anyhow::Result<Agent> {
        let _ = std::fs::remove_file(socket);
        let log_file = File::create(log)?;
        let spawned = Instant::now();
        let mut child = Command::new(binary)
            .arg("--store-dir")
            .arg(store)
            .arg("--socket")
            .arg(socket)
            .args(extra_args)
            // No configuration file of the person running the bench.
            .env("XDG_CONFIG_HOME", store.join("no-config"))
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let pid = child.id();

        loop {
            if let Ok(mut client) = Client::connect(socket) {
                if client.ping().is_ok() {
                    break;
                }
            }
            if let Some(status) = child.try_wait()? {
                anyhow::bail!(
                    "the agent exited ({status}) before answering; its log:\n{}",
                    tail(log)
                );
            }
            if spawned.elapsed() > Duration::from_secs(300) {
                let _ = child.kill();
                anyhow::bail!(
                    "the agent did not answer within 300 s; its log:\n{}",
                    tail(log)
                );
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        Ok(Agent {
            ready_after: spawned.elapsed(),
            child,
            pid,
            socket: socket.to_path_buf(),
            log: log.to_path_buf(),
        })
    }

    /// SIGTERM, then waits for the agent to drain and exit.
    pub fn stop(self) -> anyhow::Result<()> {
        match self.stop_within(Duration::from_secs(60))? {
            Some(_) => Ok(()),
            None => anyhow::bail!("the agent did not stop within 60 s of SIGTERM and was killed"),
        }
    }

    /// SIGTERM; how long the agent took to exit, or `None` when it had
    /// not exited after `grace` and was killed.
    pub fn stop_within(mut self, grace: Duration) -> anyhow::Result<Option<Duration>> {
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < grace {
            if self.child.try_wait()?.is_some() {
                return Ok(Some(start.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        eprintln!(
            "the agent (pid {}) did not stop within {grace:?} of SIGTERM; killing it. Its log ends:\n{}",
            self.pid,
            tail(&self.log)
        );
        self.child.kill()?;
        self.child.wait()?;
        Ok(None)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An echo server: this binary's hidden `echo-server` subcommand.
pub struct Echo {
    child: Child,
    pub pid: u32,
    pub socket: PathBuf,
}

impl Echo {
    pub fn start(socket: &Path, reply_bytes: usize, mode: EchoMode) -> anyhow::Result<Echo> {
        let _ = std::fs::remove_file(socket);
        let mode = match mode {
            EchoMode::Threads => "threads",
            EchoMode::Tokio => "tokio",
            EchoMode::TokioCurrent => "tokio-current",
        };
        let child = Command::new(std::env::current_exe()?)
            .args(["echo-server", "--reply-bytes", &reply_bytes.to_string()])
            .args(["--mode", mode, "--socket"])
            .arg(socket)
            .stdin(Stdio::null())
            .spawn()?;
        crate::wire::wait_for_socket(socket, Duration::from_secs(10))?;
        Ok(Echo {
            pid: child.id(),
            child,
            socket: socket.to_path_buf(),
        })
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
