//! Figures 1 and 2: `get` latency over one persistent connection beside a
//! bare Unix-socket echo of the same frame sizes, and gets per second with
//! 1, 16 and 64 connections beside the same echo.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use token_agent_client::Client;

use crate::daemon::{Agent, Echo};
use crate::populate::{self, Fill};
use crate::procstat;
use crate::stats::{ratio, thousands, us, verdict, Samples, Table};
use crate::wire::{self, AsyncConn, EchoMode, RawConn};
use crate::Common;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Sessions in the store.
    #[arg(long, default_value_t = 100_000)]
    pub sessions: usize,
    /// Timed gets per server and placement for the latency figure.
    #[arg(long, default_value_t = 100_000)]
    pub requests: usize,
    /// Seconds per server and client count for the throughput figure.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Client connection counts for the throughput figure.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub clients: Vec<usize>,
    #[command(flatten)]
    pub common: Common,
}

/// A server under test: the agent or an echo.
#[derive(Clone)]
pub struct Target {
    pub label: &'static str,
    /// The serving process, for its CPU time.
    pub pid: u32,
    pub socket: PathBuf,
    /// Replies must be token replies (the agent), or anything (echo).
    pub expect_token: bool,
}

pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    let work = args.common.work_dir()?;
    let store = filled_rest_store(&work, args.sessions, args.common.token_bytes)?;
    let agent = Agent::start(
        &args.common.agent_binary()?,
        &store,
        &work.join("agent.sock"),
        &work.join("agent-serve.log"),
        &[],
    )?;
    println!(
        "agent pid {} ready after {:.0} ms with {} sessions",
        agent.pid,
        agent.ready_after.as_secs_f64() * 1e3,
        thousands(args.sessions as u64)
    );

    let names = NameFrames::new(args.sessions, 4096);
    let reply_bytes = {
        let mut conn = RawConn::connect(&agent.socket)?;
        let body = conn.round_trip(&names.frames[0])?;
        anyhow::ensure!(
            wire::is_token(body),
            "the agent did not answer with a token"
        );
        body.len()
    };
    println!(
        "frames: request {} bytes, reply {} bytes (access token {} bytes), both plus a 4-byte length",
        names.frames[0].len() - 4,
        reply_bytes,
        args.common.token_bytes
    );

    let echo_threads = Echo::start(
        &work.join("echo-threads.sock"),
        reply_bytes,
        EchoMode::Threads,
    )?;
    let echo_tokio = Echo::start(&work.join("echo-tokio.sock"), reply_bytes, EchoMode::Tokio)?;
    let echo_current = Echo::start(
        &work.join("echo-tokio-current.sock"),
        reply_bytes,
        EchoMode::TokioCurrent,
    )?;
    let targets = [
        Target {
            label: "echo, blocking threads",
            pid: echo_threads.pid,
            socket: echo_threads.socket.clone(),
            expect_token: false,
        },
        Target {
            label: "echo, tokio + length codec",
            pid: echo_tokio.pid,
            socket: echo_tokio.socket.clone(),
            expect_token: false,
        },
        Target {
            label: "echo, tokio current-thread + length codec",
            pid: echo_current.pid,
            socket: echo_current.socket.clone(),
            expect_token: false,
        },
        Target {
            label: "token-agent get",
            pid: agent.pid,
            socket: agent.socket.clone(),
            expect_token: true,
        },
    ];

    // Figure 1, in three placements: where the client and the server run
    // decides the floor on this machine, so each is measured beside its
    // own echo.
    let all = procstat::all_cpus();
    let placements: Vec<(&str, Vec<usize>, Vec<usize>)> = if all.len() >= 2 {
        vec![
            ("same core", vec![0], vec![0]),
            ("cross core", vec![1], vec![0]),
            ("unpinned", all.clone(), all.clone()),
        ]
    } else {
        vec![("unpinned", all.clone(), all.clone())]
    };
    let mut table = Table::new(
        &format!(
            "1. get latency over a persistent connection, {} sessions ({} timed requests per row, in 10 \
             rounds interleaved between the servers, a new connection per round)",
            thousands(args.sessions as u64),
            thousands(args.requests as u64)
        ),
        &["placement", "server", "p50 µs", "p99 µs", "p99.9 µs", "max µs", "mean µs", "p50 / floor"],
    )
    .text_columns(2);
    let mut goals = Vec::new();
    for (placement, client_cpus, server_cpus) in &placements {
        for target in &targets {
            procstat::pin_process(target.pid, server_cpus)?;
        }
        procstat::pin_this_thread(client_cpus)?;
        let mut results = latency(&targets, &names, args.requests)?;
        let mut client_lib =
            client_library_latency(&agent.socket, args.sessions, args.requests / 4)?;
        // The floor: the fastest echo in this placement.
        let floor = (0..targets.len())
            .filter(|&i| !targets[i].expect_token)
            .min_by_key(|&i| results[i].quantile(0.5))
            .expect("an echo is a target");
        let floor_p50 = results[floor].quantile(0.5) as f64;
        let floor_p99 = results[floor].quantile(0.99);
        for (target, samples) in targets.iter().zip(results.iter_mut()) {
            let mut row = vec![placement.to_string()];
            row.extend(latency_row(target.label, samples, floor_p50));
            table.row(row);
        }
        let mut row = vec![placement.to_string()];
        row.extend(latency_row(
            "token-agent get via token-agent-client (JSON both ways)",
            &mut client_lib,
            floor_p50,
        ));
        table.row(row);
        let agent_index = targets
            .iter()
            .position(|t| t.expect_token)
            .expect("the agent is a target");
        let agent_p50 = results[agent_index].quantile(0.5) as f64;
        let agent_p99 = results[agent_index].quantile(0.99);
        goals.push(format!(
            "{placement}: goal p50 within 3x of the floor (the fastest echo): {:.2}x, {}; goal p99 under \
             100 µs: {} µs, {} (the floor's own p99: {} µs)",
            agent_p50 / floor_p50,
            verdict(agent_p50 <= 3.0 * floor_p50),
            us(agent_p99),
            verdict(agent_p99 < 100_000),
            us(floor_p99),
        ));
    }
    for target in &targets {
        procstat::pin_process(target.pid, &all)?;
    }
    procstat::pin_this_thread(&all)?;
    table.print();
    for goal in goals {
        println!("{goal}");
    }

    // Figure 2.
    let short = |t: &Target| {
        t.label
            .split(" (")
            .next()
            .unwrap_or(t.label)
            .replace(" + length codec", "")
    };
    let mut header: Vec<String> = vec!["connections".into()];
    header.extend(targets.iter().map(|t| format!("{} /s", short(t))));
    header.push("agent / best echo".into());
    header.extend(targets.iter().map(|t| format!("CPU µs/req {}", short(t))));
    header.push("agent cores busy".into());
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    let mut table = Table::new(
        &format!(
            "2. throughput, gets per second over N connections, {} s each, {} sessions; \
             server CPU per request in µs (all its threads)",
            args.seconds,
            thousands(args.sessions as u64)
        ),
        &header,
    );
    let mut agent_at_64 = None;
    for &clients in &args.clients {
        let mut rates = Vec::new();
        let mut cpu = Vec::new();
        let mut agent_cores = 0.0;
        for target in &targets {
            let cpu_before = procstat::cpu_time(target.pid)?;
            let started = Instant::now();
            let (rate, requests) = throughput(
                target,
                &names,
                clients,
                Duration::from_secs_f64(args.seconds),
            )?;
            let used = (procstat::cpu_time(target.pid)? - cpu_before).as_secs_f64();
            rates.push(rate);
            // Warm-up and wind-down requests are counted too: CPU over
            // everything the server did while the client ran.
            cpu.push(format!("{:.2}", used * 1e6 / requests.max(1) as f64));
            if target.expect_token {
                agent_cores = used / started.elapsed().as_secs_f64();
                if clients == 64 {
                    agent_at_64 = Some(rate);
                }
            }
        }
        let mut row = vec![clients.to_string()];
        row.extend(rates.iter().map(|r| thousands(*r as u64)));
        let agent_index = targets
            .iter()
            .position(|t| t.expect_token)
            .expect("the agent is a target");
        let best_echo = (0..targets.len())
            .filter(|&i| !targets[i].expect_token)
            .map(|i| rates[i])
            .fold(0.0, f64::max);
        row.push(ratio(rates[agent_index], best_echo));
        row.extend(cpu);
        row.push(format!("{agent_cores:.2}"));
        table.row(row);
    }
    table.print();
    if let Some(rate) = agent_at_64 {
        println!(
            "goal over 100,000 gets/s at 64 connections: {}, {}",
            thousands(rate as u64),
            verdict(rate > 100_000.0)
        );
    }
    println!(
        "agent after serving: VmRSS {} MiB, VmHWM {} MiB, {} threads",
        crate::stats::mib(procstat::status_bytes(agent.pid, "VmRSS")?),
        crate::stats::mib(procstat::status_bytes(agent.pid, "VmHWM")?),
        procstat::threads(agent.pid)
    );
    crate::print_conditions();
    agent.stop()?;
    Ok(())
}

pub fn latency_row(label: &str, samples: &mut Samples, floor_p50: f64) -> Vec<String> {
    vec![
        label.to_string(),
        us(samples.quantile(0.5)),
        us(samples.quantile(0.99)),
        us(samples.quantile(0.999)),
        us(samples.max()),
        format!("{:.1}", samples.mean() / 1_000.0),
        ratio(samples.quantile(0.5) as f64, floor_p50),
    ]
}

/// A store of `sessions` sessions at rest under `work`, filled once per run.
pub fn filled_rest_store(
    work: &Path,
    sessions: usize,
    token_bytes: usize,
) -> anyhow::Result<PathBuf> {
    let store = work.join(format!("store-rest-{sessions}-{token_bytes}"));
    let marker = work.join(format!("store-rest-{sessions}-{token_bytes}.filled"));
    if !marker.exists() {
        let _ = std::fs::remove_dir_all(&store);
        let took = populate::fill_store(&store, Fill::at_rest(sessions, token_bytes))?;
        println!(
            "filled a store with {} sessions in {:.1} s (batched sled writes, see bench/src/populate.rs)",
            thousands(sessions as u64),
            took.as_secs_f64(),
        );
        std::fs::write(&marker, b"")?;
    }
    Ok(store)
}

/// Get frames for session names spread over the store, pre-encoded so the
/// client allocates nothing while timing.
pub struct NameFrames {
    pub frames: Vec<Vec<u8>>,
}

impl NameFrames {
    pub fn new(sessions: usize, count: usize) -> NameFrames {
        let mut state: u64 = 0x2545_F491_4F6C_DD1D;
        let frames = (0..count.min(sessions.max(1)))
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                wire::get_frame(&populate::session_name(
                    (state % sessions.max(1) as u64) as usize,
                ))
            })
            .collect();
        NameFrames { frames }
    }
}

/// Timed round trips to each target, in interleaved blocks so that a
/// neighbour's burst of work hits all of them alike.
pub fn latency(
    targets: &[Target],
    names: &NameFrames,
    requests: usize,
) -> anyhow::Result<Vec<Samples>> {
    const ROUNDS: usize = 10;
    let per_round = requests.div_ceil(ROUNDS);
    for target in targets {
        let mut conn = RawConn::connect(&target.socket)?;
        // Warm-up: caches, the allocator, the scheduler's wake-up paths.
        for frame in names.frames.iter().cycle().take(5_000) {
            conn.round_trip(frame)?;
        }
    }
    let mut samples: Vec<Samples> = targets
        .iter()
        .map(|_| Samples::with_capacity(requests))
        .collect();
    let mut k = 0;
    for _ in 0..ROUNDS {
        for (target, samples) in targets.iter().zip(samples.iter_mut()) {
            // A new connection each round: which thread and core end up
            // serving a connection varies, and every round counts alike.
            let mut conn = RawConn::connect(&target.socket)?;
            for frame in names.frames.iter().cycle().take(100) {
                conn.round_trip(frame)?;
            }
            for _ in 0..per_round {
                let frame = &names.frames[k % names.frames.len()];
                k += 1;
                let start = Instant::now();
                let body = conn.round_trip(frame)?;
                let took = start.elapsed();
                if target.expect_token && !wire::is_token(body) {
                    anyhow::bail!(
                        "{} answered with something else than a token: {}",
                        target.label,
                        String::from_utf8_lossy(&body[..body.len().min(200)])
                    );
                }
                samples.push(took);
            }
        }
    }
    Ok(samples)
}

/// The same through `token_agent_client::Client::get`, which encodes and
/// decodes JSON as any Rust caller does.
fn client_library_latency(
    socket: &Path,
    sessions: usize,
    requests: usize,
) -> anyhow::Result<Samples> {
    let mut client = Client::connect(socket)?;
    let names: Vec<String> = (0..4096)
        .map(|i| populate::session_name((i * 7919) % sessions.max(1)))
        .collect();
    for name in names.iter().cycle().take(5_000) {
        client.get(name, Duration::ZERO)?;
    }
    let mut samples = Samples::with_capacity(requests);
    for name in names.iter().cycle().take(requests) {
        let start = Instant::now();
        let token = client
            .get(name, Duration::ZERO)
            .context("get via the client library")?;
        samples.push(start.elapsed());
        std::hint::black_box(token);
    }
    Ok(samples)
}

/// Round trips per second over `clients` connections for `duration`, all
/// driven from one client thread (a current-thread tokio runtime), so the
/// load generator takes at most one of the two cores.
/// Returns the rate in the timed window and every request made.
pub fn throughput(
    target: &Target,
    names: &NameFrames,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<(f64, u64)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut conns = Vec::with_capacity(clients);
        for _ in 0..clients {
            conns.push(AsyncConn::connect(&target.socket).await?);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let total = Arc::new(AtomicU64::new(0));
        let frames = Arc::new(names.frames.clone());
        let measuring = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for (c, mut conn) in conns.into_iter().enumerate() {
            let stop = stop.clone();
            let count = count.clone();
            let total = total.clone();
            let frames = frames.clone();
            let measuring = measuring.clone();
            let expect_token = target.expect_token;
            tasks.push(tokio::spawn(async move {
                let mut k = c * 131;
                while !stop.load(Ordering::Relaxed) {
                    let frame = &frames[k % frames.len()];
                    k += 1;
                    let len = conn.round_trip(frame).await?;
                    if expect_token && !wire::is_token(conn.body(len)) {
                        anyhow::bail!("a reply was not a token");
                    }
                    total.fetch_add(1, Ordering::Relaxed);
                    if measuring.load(Ordering::Relaxed) {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(())
            }));
        }
        // A short warm-up, then the timed window.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = count.load(Ordering::Relaxed);
        measuring.store(true, Ordering::Relaxed);
        let started = Instant::now();
        tokio::time::sleep(duration).await;
        let done = count.load(Ordering::Relaxed) - before;
        let elapsed = started.elapsed();
        stop.store(true, Ordering::Relaxed);
        for task in tasks {
            task.await??;
        }
        Ok((
            done as f64 / elapsed.as_secs_f64(),
            total.load(Ordering::Relaxed),
        ))
    })
}
