//! The `token-agent` binary: flags, hardening, logging, backgrounding, the
//! runtime, then [`token_agent::start_with`] until SIGTERM or SIGINT.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use token_agent::config::{Args, Config, LogFormat, Shell};
use tracing::error;

fn main() -> ExitCode {
    // Everything the agent creates (store files, the socket) is owner-only
    // from the moment it exists.
    // SAFETY: umask has no preconditions and cannot fail.
    unsafe { libc::umask(0o077) };
    harden();
    raise_fd_limit();

    let args = Args::parse();
    if args.kill {
        return report(kill_agent());
    }
    let config = match args.resolve() {
        Ok(config) => config,
        Err(err) => return report(Err(err)),
    };

    // Fork before any thread exists; the parent waits for the child to say
    // it is ready, so the printed variables always name a live agent.
    let ready_pipe = match args.background_shell() {
        Some(shell) => match background(shell, &config) {
            Ok(Some(pipe)) => Some(pipe),
            Ok(None) => return ExitCode::SUCCESS,
            Err(err) => return report(Err(err)),
        },
        None => None,
    };
    if ready_pipe.is_some() {
        if let Err(err) = redirect_stdio(args.log_file.as_deref()) {
            return report(Err(err));
        }
    }
    init_logging(args.log_level.as_deref(), args.log_format);

    let result = token_agent::systemd::activated_listener().and_then(|activated| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?
            .block_on(run(args, config, activated, ready_pipe))
    });
    report(result)
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if tracing::dispatcher::has_been_set() {
                error!("{err:#}");
            } else {
                eprintln!("token-agent: {err:#}");
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(
    args: Args,
    config: Config,
    activated: Option<std::os::unix::net::UnixListener>,
    ready_pipe: Option<OwnedFd>,
) -> anyhow::Result<()> {
    let running = match token_agent::start_with(config, activated).await {
        Ok(running) => running,
        Err(err) => {
            if let Some(pipe) = ready_pipe {
                let _ = std::fs::File::from(pipe).write_all(format!("{err:#}").as_bytes());
            }
            return Err(err);
        }
    };
    if let Some(pipe) = ready_pipe {
        let _ = std::fs::File::from(pipe).write_all(b"ready");
    }

    let reloader = running.reloader();
    tokio::spawn(token_agent::shutdown::watch_signals(
        running.shutdown.clone(),
        move || match args.resolve() {
            Ok(config) => reloader.reload(config),
            Err(err) => error!("the new configuration is invalid, so the old one stays: {err:#}"),
        },
    ));
    running.stopped().await
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

/// Lifts the soft limit on open files to the hard one: every client
/// connection costs a descriptor, and the usual soft limit of 1,024 would
/// let a burst of clients lock out the rest.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit on this process with a valid rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn init_logging(level: Option<&str>, format: LogFormat) {
    let filter = match level {
        Some(level) => tracing_subscriber::EnvFilter::new(level),
        None => tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);

    // The journal stamps every line itself, and shows no colours.
    let to_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let colours = !to_journal && std::io::IsTerminal::is_terminal(&std::io::stderr());
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Auto if to_journal => builder.without_time().with_ansi(false).init(),
        LogFormat::Auto | LogFormat::Plain => builder.with_ansi(colours).init(),
    }
}

/// Forks. The parent waits for the child's word, prints the shell commands
/// and returns `None`; the child returns the pipe to send that word on.
fn background(shell: Shell, config: &Config) -> anyhow::Result<Option<OwnedFd>> {
    let mut fds = [0; 2];
    // SAFETY: pipe writes two descriptors into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot create a pipe");
    }
    // SAFETY: the descriptors were just created and are owned here alone.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };

    // SAFETY: no thread has been started yet, so the child is a complete
    // copy of this single-threaded process.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(std::io::Error::last_os_error()).context("cannot fork"),
        0 => {
            drop(read_end);
            // SAFETY: setsid detaches the child from the terminal's session.
            unsafe { libc::setsid() };
            Ok(Some(write_end))
        }
        child => {
            drop(write_end);
            let mut word = String::new();
            std::fs::File::from(read_end)
                .read_to_string(&mut word)
                .context("cannot hear from the agent")?;
            if word != "ready" {
                anyhow::bail!("the agent did not start: {}", word.trim());
            }
            print!(
                "{}",
                shell_commands(shell, &config.socket.display().to_string(), child)
            );
            Ok(None)
        }
    }
}

/// Points standard input and output at /dev/null and standard error at the
/// log file (or /dev/null), so a detached agent holds no terminal.
fn redirect_stdio(log_file: Option<&std::path::Path>) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;

    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .context("cannot open /dev/null")?;
    let log = match log_file {
        Some(path) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open the log file {}", path.display()))?,
        None => null.try_clone()?,
    };
    for (from, to) in [(&null, 0), (&null, 1), (&log, 2)] {
        // SAFETY: dup2 onto the standard descriptors of this process.
        if unsafe { libc::dup2(from.as_raw_fd(), to) } < 0 {
            return Err(std::io::Error::last_os_error())
                .context("cannot redirect standard streams");
        }
    }
    Ok(())
}

/// What `eval` runs, in the shell's own syntax.
fn shell_commands(shell: Shell, socket: &str, pid: i32) -> String {
    let quoted = format!("'{}'", socket.replace('\'', r"'\''"));
    match shell {
        Shell::Sh => format!(
            "TOKEN_AGENT_SOCK={quoted}; export TOKEN_AGENT_SOCK;\n\
             TOKEN_AGENT_PID={pid}; export TOKEN_AGENT_PID;\n\
             echo Agent pid {pid};\n"
        ),
        Shell::Csh => format!(
            "setenv TOKEN_AGENT_SOCK {quoted};\nsetenv TOKEN_AGENT_PID {pid};\necho Agent pid {pid};\n"
        ),
        Shell::Fish => format!(
            "set -x TOKEN_AGENT_SOCK {quoted};\nset -x TOKEN_AGENT_PID {pid};\necho Agent pid {pid};\n"
        ),
    }
}

/// `token-agent -k`: stops the agent named by TOKEN_AGENT_PID and prints
/// the commands that forget it.
fn kill_agent() -> anyhow::Result<()> {
    let pid: i32 = std::env::var("TOKEN_AGENT_PID")
        .context("TOKEN_AGENT_PID is not set, so there is no agent to stop")?
        .trim()
        .parse()
        .context("TOKEN_AGENT_PID is not a process id")?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .with_context(|| format!("no process {pid} is running"))?;
    if !exe.to_string_lossy().contains("token-agent") {
        anyhow::bail!(
            "process {pid} is {}, not a token-agent; not stopping it",
            exe.display()
        );
    }
    // SAFETY: a signal to a process we checked is a token-agent.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("cannot stop {pid}"));
    }
    let is_fish = std::env::var("SHELL").is_ok_and(|shell| shell.ends_with("fish"));
    let is_csh = std::env::var("SHELL").is_ok_and(|shell| shell.ends_with("csh"));
    if is_fish {
        println!("set -e TOKEN_AGENT_SOCK;\nset -e TOKEN_AGENT_PID;");
    } else if is_csh {
        println!("unsetenv TOKEN_AGENT_SOCK;\nunsetenv TOKEN_AGENT_PID;");
    } else {
        println!("unset TOKEN_AGENT_SOCK;\nunset TOKEN_AGENT_PID;");
    }
    println!("echo Agent pid {pid} killed;");
    Ok(())
}
