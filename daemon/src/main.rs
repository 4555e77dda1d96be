//! The `token-agent` binary: flags, logging, runtime, then [`token_agent::start`]
//! until SIGTERM or SIGINT.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use token_agent::config::{Args, Config};
use tracing::error;

fn main() -> ExitCode {
    // Everything the agent creates (store files, the socket) is owner-only
    // from the moment it exists.
    // SAFETY: umask has no preconditions and cannot fail.
    unsafe { libc::umask(0o077) };
    harden();

    let args = Args::parse();
    init_logging(args.log_level.as_deref());

    let result = args.resolve().and_then(|config| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?
            .block_on(run(config))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            error!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Keeps tokens out of core dumps and away from ptrace by other processes
/// of the same user: a non-dumpable process can be attached only by root.
fn harden() {
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on this process with valid arguments; failure
    // leaves the defaults, which is worth a warning but not a stop.
    let (core, dumpable) = unsafe {
        (
            libc::setrlimit(libc::RLIMIT_CORE, &no_core),
            libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0),
        )
    };
    if core != 0 || dumpable != 0 {
        eprintln!("token-agent: warning: cannot disable core dumps or ptrace attach");
    }
}

fn init_logging(level: Option<&str>) {
    let filter = match level {
        Some(level) => tracing_subscriber::EnvFilter::new(level),
        None => tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

async fn run(config: Config) -> anyhow::Result<()> {
    let running = token_agent::start(config).await?;
    tokio::spawn(token_agent::shutdown::on_signal(running.shutdown.clone()));
    running.stopped().await
}
