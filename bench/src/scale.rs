//! Figures 4 and 6: for each store size, start to ready, resident memory,
//! idle CPU with nothing due, store size on disk, and `get` latency beside
//! the echo floor, so growth with the number of sessions shows.

use std::time::{Duration, Instant};

use crate::daemon::{Agent, Echo};
use crate::procstat;
use crate::serve::{filled_rest_store, latency, NameFrames, Target};
use crate::stats::{thousands, us, verdict, Table};
use crate::wire::{self, EchoMode, RawConn};
use crate::Common;

#[derive(clap::Args, Debug)]
pub struct ScaleArgs {
    /// Store sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
    pub sessions: Vec<usize>,
    /// Seconds of idle CPU measurement, nothing due.
    #[arg(long, default_value_t = 60.0)]
    pub idle: f64,
    /// Starts per size; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub starts: usize,
    /// Timed gets per size (and as many echo round trips).
    #[arg(long, default_value_t = 50_000)]
    pub requests: usize,
    #[command(flatten)]
    pub common: Common,
}

struct Row {
    sessions: usize,
    ready: Vec<Duration>,
    /// CPU the agent used from exec to ready, per start.
    ready_cpu: Vec<Duration>,
    rss_ready: u64,
    rss_served: u64,
    hwm: u64,
    threads: u64,
    idle_cpu: Duration,
    idle_wakeups: f64,
    disk: (u64, u64),
    get: [u64; 3],
    floor_p50: u64,
}

pub fn run(args: &ScaleArgs) -> anyhow::Result<()> {
    let work = args.common.work_dir()?;
    let binary = args.common.agent_binary()?;
    let mut rows = Vec::new();
    for &sessions in &args.sessions {
        let store = filled_rest_store(&work, sessions, args.common.token_bytes)?;
        let socket = work.join("agent-scale.sock");
        let log = work.join(format!("agent-scale-{sessions}.log"));

        // Start-up: every start but the last is stopped at once.
        let mut ready = Vec::new();
        let mut ready_cpu = Vec::new();
        let mut agent = None;
        for k in 0..args.starts.max(1) {
            let started = Agent::start(&binary, &store, &socket, &log, &[])?;
            ready.push(started.ready_after);
            ready_cpu.push(procstat::cpu_time(started.pid)?);
            if k + 1 == args.starts.max(1) {
                agent = Some(started);
            } else {
                started.stop()?;
            }
        }
        let agent = agent.expect("one start kept");
        let rss_ready = procstat::status_bytes(agent.pid, "VmRSS")?;
        let threads = procstat::threads(agent.pid);

        // Idle: nothing is due for hours.
        std::thread::sleep(Duration::from_millis(500));
        let cpu0 = procstat::thread_cpu_ns(agent.pid);
        let switches0 = procstat::context_switches(agent.pid);
        let idle_start = Instant::now();
        std::thread::sleep(Duration::from_secs_f64(args.idle));
        let idle_cpu = procstat::cpu_since(agent.pid, &cpu0);
        let idle_wakeups = procstat::context_switches(agent.pid).saturating_sub(switches0) as f64
            / idle_start.elapsed().as_secs_f64();

        // Latency beside the floor, in the same run.
        let names = NameFrames::new(sessions, 4096);
        let reply_bytes = {
            let mut conn = RawConn::connect(&agent.socket)?;
            let body = conn.round_trip(&names.frames[0])?;
            anyhow::ensure!(
                wire::is_token(body),
                "the agent did not answer with a token"
            );
            body.len()
        };
        let echo = Echo::start(
            &work.join("echo-scale.sock"),
            reply_bytes,
            EchoMode::Threads,
        )?;
        let targets = [
            Target {
                label: "echo",
                pid: echo.pid,
                socket: echo.socket.clone(),
                expect_token: false,
            },
            Target {
                label: "agent",
                pid: agent.pid,
                socket: agent.socket.clone(),
                expect_token: true,
            },
        ];
        // Client and servers on one core: the software path, free of the
        // cross-core wake-ups that dominate otherwise (see figure 1).
        let all = procstat::all_cpus();
        for target in &targets {
            procstat::pin_process(target.pid, &[0])?;
        }
        procstat::pin_this_thread(&[0])?;
        let measured = latency(&targets, &names, args.requests);
        procstat::pin_this_thread(&all)?;
        procstat::pin_process(agent.pid, &all)?;
        let mut samples = measured?;
        drop(echo);
        let rss_served = procstat::status_bytes(agent.pid, "VmRSS")?;
        let hwm = procstat::status_bytes(agent.pid, "VmHWM")?;
        agent.stop()?;
        let disk = procstat::disk_usage(&store);

        rows.push(Row {
            sessions,
            ready,
            ready_cpu,
            rss_ready,
            rss_served,
            hwm,
            threads,
            idle_cpu,
            idle_wakeups,
            disk,
            get: [
                samples[1].quantile(0.5),
                samples[1].quantile(0.99),
                samples[1].quantile(0.999),
            ],
            floor_p50: samples[0].quantile(0.5),
        });
        println!("measured {} sessions", thousands(sessions as u64));
    }

    let mb = |b: u64| format!("{:.1}", b as f64 / 1e6);
    let median = |v: &[Duration]| {
        let mut v = v.to_vec();
        v.sort();
        v[v.len() / 2]
    };
    let mut table = Table::new(
        &format!(
            "4. scale: start to ready (median of {} starts), memory, idle CPU over {} s, store on disk",
            args.starts, args.idle
        ),
        &[
            "sessions", "ready ms", "all starts ms", "CPU to ready ms", "RSS ready MB", "RSS after gets MB", "peak RSS MB",
            "threads", "idle CPU ms", "idle CPU %", "wake-ups/s", "store MB (apparent)", "store MB (allocated)",
        ],
    );
    for row in &rows {
        table.row(vec![
            thousands(row.sessions as u64),
            format!("{:.0}", median(&row.ready).as_secs_f64() * 1e3),
            row.ready
                .iter()
                .map(|d| format!("{:.0}", d.as_secs_f64() * 1e3))
                .collect::<Vec<_>>()
                .join(" / "),
            format!("{:.0}", median(&row.ready_cpu).as_secs_f64() * 1e3),
            mb(row.rss_ready),
            mb(row.rss_served),
            mb(row.hwm),
            row.threads.to_string(),
            format!("{:.1}", row.idle_cpu.as_secs_f64() * 1e3),
            format!("{:.3}", row.idle_cpu.as_secs_f64() * 100.0 / args.idle),
            format!("{:.1}", row.idle_wakeups),
            mb(row.disk.0),
            mb(row.disk.1),
        ]);
    }
    table.print();

    let mut table = Table::new(
        "6. growth: per-session cost, and get latency by store size (client and servers on one core)",
        &[
            "sessions",
            "ready µs/session",
            "RSS KB/session",
            "store KB/session",
            "get p50 µs",
            "get p99 µs",
            "get p99.9 µs",
            "echo p50 µs",
            "p50 / echo",
        ],
    );
    for row in &rows {
        let n = row.sessions.max(1) as f64;
        table.row(vec![
            thousands(row.sessions as u64),
            format!("{:.2}", median(&row.ready).as_secs_f64() * 1e6 / n),
            format!("{:.2}", row.rss_served as f64 / 1e3 / n),
            format!("{:.2}", row.disk.0 as f64 / 1e3 / n),
            us(row.get[0]),
            us(row.get[1]),
            us(row.get[2]),
            us(row.floor_p50),
            format!("{:.2}x", row.get[0] as f64 / row.floor_p50.max(1) as f64),
        ]);
    }
    table.print();

    if let Some(row) = rows.iter().find(|r| r.sessions == 100_000) {
        let ready = median(&row.ready);
        println!(
            "goal ready in under 1 s at 100,000 sessions: {:.0} ms, {}",
            ready.as_secs_f64() * 1e3,
            verdict(ready < Duration::from_secs(1))
        );
        let rss = row.rss_served.max(row.rss_ready);
        println!(
            "goal under 150 MB resident at 100,000 sessions: {:.1} MB (peak {:.1} MB), {}",
            rss as f64 / 1e6,
            row.hwm as f64 / 1e6,
            verdict(rss < 150_000_000)
        );
        let pct = row.idle_cpu.as_secs_f64() * 100.0 / args.idle;
        println!(
            "goal idle CPU near zero (under 0.1% of a core) at 100,000 sessions: {pct:.3}%, {}",
            verdict(pct < 0.1)
        );
    }
    crate::print_conditions();
    Ok(())
}
