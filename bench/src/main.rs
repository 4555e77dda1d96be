//! token-agent-bench: how fast token-agent does its job and how its cost
//! grows, beside the physical floor and beside oidc-agent.
//!
//! Each subcommand measures one group of figures and prints plain-text
//! (markdown) tables; `scripts/bench.sh` runs them all and documents the
//! exact commands. Nothing here asserts on time: the figures are printed,
//! the goals are stated as met or missed.

mod daemon;
mod populate;
mod procstat;
mod provider;
mod scale;
mod schedule;
mod serve;
mod stats;
mod wire;

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::stats::{thousands, verdict, Table};

#[derive(Parser)]
#[command(
    name = "token-agent-bench",
    about = "Measure token-agent beside its floors and peers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Figures 1 and 2: get latency and throughput beside a Unix-socket echo.
    Serve(serve::ServeArgs),
    /// Figures 4 and 6: start to ready, memory, idle CPU, store size and get
    /// latency at each store size.
    Scale(scale::ScaleArgs),
    /// Figure 5: scheduled refreshes against a fast local fake provider.
    Schedule(schedule::ScheduleArgs),
    /// Figure 3: a hyperfine JSON export as a table with ratios.
    Hyperfine {
        /// The file written by `hyperfine --export-json`.
        json: PathBuf,
    },
    /// Fills a store with sessions at rest (for profiling by hand).
    Populate {
        #[arg(long)]
        store_dir: PathBuf,
        #[arg(long, default_value_t = 100_000)]
        sessions: usize,
        #[arg(long, default_value_t = 800)]
        token_bytes: usize,
    },
    /// Problem 4: adding new sessions one at a time through `Store::save`
    /// (as imports do) to an empty store, at each size.
    Saves {
        /// Sessions to add, one new store per size.
        #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
        sessions: Vec<usize>,
        /// Stop a size after this many seconds and report the rate so far.
        #[arg(long, default_value_t = 600)]
        give_up_after: u64,
        #[arg(long, default_value_t = 800)]
        token_bytes: usize,
        /// Where the stores go [default: a new folder in /tmp, removed after].
        #[arg(long, value_name = "DIR")]
        work_dir: Option<PathBuf>,
    },
    /// Sends gets to an agent that is already running (for profiling by
    /// hand: perf, callgrind) and prints their latency.
    Load {
        /// The agent's socket.
        #[arg(long)]
        socket: PathBuf,
        /// Sessions in its store (names session-000000 up).
        #[arg(long, default_value_t = 100_000)]
        sessions: usize,
        #[arg(long, default_value_t = 100_000)]
        requests: usize,
    },
    /// Serves fixed-size replies to every frame on a Unix socket (the floor).
    #[command(hide = true)]
    EchoServer {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        reply_bytes: usize,
        #[arg(long, value_enum)]
        mode: wire::EchoMode,
    },
}

/// Options every measurement takes.
#[derive(clap::Args, Debug)]
pub struct Common {
    /// The token-agent binary [default: beside this one].
    #[arg(long, value_name = "PATH")]
    pub agent_bin: Option<PathBuf>,
    /// Where stores, sockets and logs go [default: a new folder in /tmp].
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// Length of each access token, in bytes (a typical JWT is 800-1500);
    /// refresh tokens are half as long.
    #[arg(long, default_value_t = 800)]
    pub token_bytes: usize,
}

impl Common {
    pub fn work_dir(&self) -> anyhow::Result<PathBuf> {
        let dir = match &self.work_dir {
            Some(dir) => dir.clone(),
            None => std::env::temp_dir().join(format!("token-agent-bench-{}", std::process::id())),
        };
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(dir)
    }

    pub fn agent_binary(&self) -> anyhow::Result<PathBuf> {
        daemon::agent_binary(self.agent_bin.as_deref())
    }
}

/// The machine's state next to the figures: load and running compilers.
pub fn print_conditions() {
    let compilers = procstat::busy_compilers();
    println!(
        "conditions: load average (1 min) {}, compilers running: {}",
        procstat::load_average(),
        if compilers.is_empty() {
            "none".to_string()
        } else {
            compilers.join(", ")
        }
    );
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::EchoServer {
        socket,
        reply_bytes,
        mode,
    } = &cli.command
    {
        return wire::echo_server(socket, *reply_bytes, *mode);
    }

    match cli.command {
        Command::Serve(args) => {
            print_conditions();
            serve::run(&args)
        }
        Command::Scale(args) => {
            print_conditions();
            scale::run(&args)
        }
        Command::Schedule(args) => {
            print_conditions();
            schedule::run(&args).map(drop)
        }
        Command::Hyperfine { json } => hyperfine_report(&json),
        Command::Populate {
            store_dir,
            sessions,
            token_bytes,
        } => {
            let took =
                populate::fill_store(&store_dir, populate::Fill::at_rest(sessions, token_bytes))?;
            println!(
                "filled {} with {} sessions in {:.1} s",
                store_dir.display(),
                thousands(sessions as u64),
                took.as_secs_f64()
            );
            Ok(())
        }
        Command::Saves {
            sessions,
            give_up_after,
            token_bytes,
            work_dir,
        } => {
            print_conditions();
            saves(&sessions, give_up_after, token_bytes, work_dir)
        }
        Command::Load {
            socket,
            sessions,
            requests,
        } => {
            let names = serve::NameFrames::new(sessions, 4096);
            let mut conn = wire::RawConn::connect(&socket)?;
            let mut samples = stats::Samples::with_capacity(requests);
            for frame in names.frames.iter().cycle().take(requests) {
                let start = std::time::Instant::now();
                let body = conn.round_trip(frame)?;
                samples.push(start.elapsed());
                anyhow::ensure!(wire::is_token(body), "not a token reply");
            }
            println!(
                "{} gets: p50 {} µs, p99 {} µs, p99.9 {} µs, max {} µs",
                thousands(requests as u64),
                stats::us(samples.quantile(0.5)),
                stats::us(samples.quantile(0.99)),
                stats::us(samples.quantile(0.999)),
                stats::us(samples.max())
            );
            Ok(())
        }
        Command::EchoServer { .. } => unreachable!("handled above"),
    }
}

/// Figure 3 from hyperfine's JSON: every command beside the first (the
/// baseline, `/bin/true`), with ratios of the means and the medians.
fn hyperfine_report(path: &Path) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text)?;
    let results = json["results"]
        .as_array()
        .context("no results in the hyperfine export")?;
    let field = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or(0.0) * 1e3;
    let baseline = results.first().context("hyperfine ran no command")?;
    let (base_mean, base_median) = (field(baseline, "mean"), field(baseline, "median"));

    let mut table = Table::new(
        "3. one whole process, exec to exit (hyperfine, same run)",
        &[
            "command",
            "runs",
            "mean ms",
            "σ ms",
            "median ms",
            "min ms",
            "user ms",
            "system ms",
            "mean / true",
            "median / true",
        ],
    );
    for r in results {
        table.row(vec![
            format!("`{}`", r["command"].as_str().unwrap_or("?")),
            r["times"].as_array().map_or(0, |t| t.len()).to_string(),
            format!("{:.3}", field(r, "mean")),
            format!("{:.3}", field(r, "stddev")),
            format!("{:.3}", field(r, "median")),
            format!("{:.3}", field(r, "min")),
            format!("{:.3}", field(r, "user")),
            format!("{:.3}", field(r, "system")),
            format!("{:.2}x", field(r, "mean") / base_mean),
            format!("{:.2}x", field(r, "median") / base_median),
        ]);
    }
    table.print();

    let find = |needle: &str| {
        results
            .iter()
            .find(|r| r["command"].as_str().is_some_and(|c| c.contains(needle)))
    };
    if let Some(tokenctl) = find("tokenctl") {
        let ratio = field(tokenctl, "mean") / base_mean;
        println!(
            "goal tokenctl get within 1.3x of /bin/true: {ratio:.2}x (median {:.2}x), {}",
            field(tokenctl, "median") / base_median,
            verdict(ratio <= 1.3)
        );
        if let Some(oidc) = find("oidc-token") {
            println!(
                "goal tokenctl get faster than oidc-token: {:.3} ms vs {:.3} ms ({:.2}x of /bin/true), {}",
                field(tokenctl, "mean"),
                field(oidc, "mean"),
                field(oidc, "mean") / base_mean,
                verdict(field(tokenctl, "mean") < field(oidc, "mean"))
            );
        }
    }
    Ok(())
}

/// Problem 4's figure: `Store::save` for new sessions, one at a time.
fn saves(
    sizes: &[usize],
    give_up_after: u64,
    token_bytes: usize,
    work_dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    let (root, remove) = match work_dir {
        Some(dir) => (dir, false),
        None => (
            std::env::temp_dir().join(format!("token-agent-saves-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let mut table = Table::new(
        "problem 4: new sessions through Store::save, one at a time",
        &[
            "sessions",
            "saved",
            "total s",
            "saves/s",
            "mean ms",
            "p50 ms",
            "p99 ms",
            "max ms",
            "index KiB",
            "reopen + load_all ms",
        ],
    );
    let ms = |ns: u64| format!("{:.2}", ns as f64 / 1e6);
    for &n in sizes {
        let dir = root.join(format!("store-{n}"));
        let mut saved = populate::save_one_by_one(
            &dir,
            populate::Fill::at_rest(n, token_bytes),
            std::time::Duration::from_secs(give_up_after),
        )?;
        let took = saved.took.as_secs_f64();
        table.row(vec![
            thousands(n as u64),
            if saved.saved < n {
                format!("{} (gave up)", thousands(saved.saved as u64))
            } else {
                thousands(saved.saved as u64)
            },
            format!("{took:.1}"),
            format!("{:.0}", saved.saved as f64 / took),
            format!("{:.2}", saved.samples.mean() / 1e6),
            ms(saved.samples.quantile(0.5)),
            ms(saved.samples.quantile(0.99)),
            ms(saved.samples.max()),
            format!("{:.0}", saved.index_bytes as f64 / 1024.0),
            format!("{:.0}", saved.reopen.as_secs_f64() * 1e3),
        ]);
        if remove {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    table.print();
    if remove {
        let _ = std::fs::remove_dir_all(&root);
    }
    Ok(())
}
