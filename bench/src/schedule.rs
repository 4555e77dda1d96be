//! Figure 5: sessions whose refreshes fall due within a window, against a
//! fast local fake provider. Lateness is the provider's arrival time minus
//! the session's planned `next_refresh_at`, which the agent reads from the
//! store at start-up and does not move. The refresh's first step (writing
//! and flushing the in-flight marker) happens before the request leaves,
//! so it is part of the lateness, as it is part of starting a refresh.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use token_agent_client::Client;

use crate::daemon::Agent;
use crate::populate::{self, now_ms, Fill};
use crate::procstat;
use crate::provider::FakeProvider;
use crate::stats::{thousands, verdict, Samples, Table};
use crate::Common;

#[derive(clap::Args, Debug)]
pub struct ScheduleArgs {
    /// Sessions, all due within the window.
    #[arg(long, value_delimiter = ',', default_value = "10000")]
    pub sessions: Vec<usize>,
    /// Seconds over which the due times are spread; 0 makes every session
    /// due at start-up (a burst: the agent's refresh capacity).
    #[arg(long, default_value_t = 60.0)]
    pub window: f64,
    /// Extra seconds to wait after the last planned time.
    #[arg(long, default_value_t = 30.0)]
    pub grace: f64,
    /// How long the fake provider holds each answer.
    #[arg(long, default_value_t = 0)]
    pub provider_delay_ms: u64,
    /// The agent's --max-concurrent-refreshes.
    #[arg(long, default_value_t = 16)]
    pub max_concurrent: usize,
    #[command(flatten)]
    pub common: Common,
}

pub struct Outcome {
    pub refreshed: usize,
    pub lateness: Samples,
    pub due_before_ready: usize,
    pub rate: f64,
    pub cpu_per_refresh_ms: f64,
    pub max_in_flight: usize,
    pub connections: usize,
    pub replays: u64,
    pub ready: Duration,
    pub rss: u64,
    pub checked: (usize, usize),
    /// The agent stopped refreshing before all were done.
    pub stalled: bool,
    /// How long the agent took to exit after SIGTERM; `None`: it did not.
    pub stopped: Option<Duration>,
}

pub fn run(args: &ScheduleArgs) -> anyhow::Result<Vec<Outcome>> {
    let work = args.common.work_dir()?;
    let mode = if args.window > 0.0 {
        format!("due over {} s", args.window)
    } else {
        "all due at start-up (burst)".into()
    };
    let mut table = Table::new(
        &format!(
            "5. scheduled refreshes, {mode}, fake provider delay {} ms, --max-concurrent-refreshes {}",
            args.provider_delay_ms, args.max_concurrent
        ),
        &[
            "sessions", "refreshed", "late p50 ms", "late p99 ms", "late max ms", "refreshes/s",
            "agent CPU ms/refresh", "max in flight", "connections", "replays", "ready ms", "RSS MB",
            "SIGTERM to exit ms",
        ],
    );
    let mut outcomes = Vec::new();
    for &sessions in &args.sessions {
        let outcome = run_one(args, sessions, &work)?;
        let mut lateness = outcome.lateness.clone();
        let has_lateness = args.window > 0.0 && lateness.len() > 0;
        let late = |q: f64, l: &mut Samples| {
            if has_lateness {
                format!("{:.1}", l.quantile(q) as f64 / 1e6)
            } else {
                "-".into()
            }
        };
        table.row(vec![
            thousands(sessions as u64),
            if outcome.stalled {
                format!("{} (STALLED)", thousands(outcome.refreshed as u64))
            } else {
                thousands(outcome.refreshed as u64)
            },
            late(0.5, &mut lateness),
            late(0.99, &mut lateness),
            late(1.0, &mut lateness),
            format!("{:.0}", outcome.rate),
            format!("{:.3}", outcome.cpu_per_refresh_ms),
            outcome.max_in_flight.to_string(),
            outcome.connections.to_string(),
            outcome.replays.to_string(),
            format!("{:.0}", outcome.ready.as_secs_f64() * 1e3),
            format!("{:.1}", outcome.rss as f64 / 1e6),
            match outcome.stopped {
                Some(took) => format!("{:.0}", took.as_secs_f64() * 1e3),
                None => "hung, killed".into(),
            },
        ]);
        outcomes.push(outcome);
    }
    table.print();
    for (outcome, &sessions) in outcomes.iter_mut().zip(&args.sessions) {
        if outcome.due_before_ready > 0 && args.window > 0.0 {
            println!(
                "{}: {} sessions were due before the agent was ready and are left out of the lateness",
                thousands(sessions as u64),
                outcome.due_before_ready
            );
        }
        println!(
            "{}: sampled {} sessions afterwards, {} show the new refresh stored",
            thousands(sessions as u64),
            outcome.checked.0,
            outcome.checked.1
        );
        if args.window > 0.0 && outcome.lateness.len() > 0 {
            let p99 = outcome.lateness.quantile(0.99);
            println!(
                "goal p99 lateness under 1 s at {} sessions: {:.1} ms, {}",
                thousands(sessions as u64),
                p99 as f64 / 1e6,
                verdict(p99 < 1_000_000_000 && outcome.refreshed == sessions)
            );
        }
        println!(
            "goal concurrency limit {} honoured at {} sessions: max {} in flight at the provider, {}",
            args.max_concurrent,
            thousands(sessions as u64),
            outcome.max_in_flight,
            verdict(outcome.max_in_flight <= args.max_concurrent)
        );
    }
    crate::print_conditions();
    Ok(outcomes)
}

fn run_one(
    args: &ScheduleArgs,
    sessions: usize,
    work: &std::path::Path,
) -> anyhow::Result<Outcome> {
    let provider = FakeProvider::start(
        Duration::from_millis(args.provider_delay_ms),
        populate::token_of_len(args.common.token_bytes, 7),
    )?;
    let store: PathBuf = work.join(format!("store-schedule-{sessions}"));
    let _ = std::fs::remove_dir_all(&store);

    // The due times are fixed before the first record is written, so the
    // filling and the start-up have to fit before the window opens.
    let fill_estimate = 1.0 + sessions as f64 * 40e-6;
    let ready_estimate = 0.5 + sessions as f64 * 60e-6;
    let lead_ms = ((fill_estimate + ready_estimate * 2.0 + 2.0) * 1e3) as u64;

    let now = now_ms();
    let window_ms = (args.window * 1e3) as u64;
    let first_due = if window_ms > 0 { now + lead_ms } else { now };
    let due_at = move |i: usize| first_due + (i as u64 * window_ms) / sessions.max(1) as u64;
    let fill = Fill {
        sessions,
        access_token_bytes: args.common.token_bytes,
        refresh_token_bytes: (args.common.token_bytes / 2).max(32),
        token_endpoint: provider.token_endpoint(),
        due: Box::new(move |i| Some(due_at(i))),
        // Valid well past the run: serving never refreshes on demand here.
        access_expires_at: now + 2 * 3_600_000,
    };
    let took = populate::fill_store(&store, fill)?;
    println!(
        "filled {} sessions in {:.1} s; first due {:+.1} s from now, last {:+.1} s",
        thousands(sessions as u64),
        took.as_secs_f64(),
        (first_due as f64 - now_ms() as f64) / 1e3,
        (due_at(sessions.saturating_sub(1)) as f64 - now_ms() as f64) / 1e3,
    );

    let agent = Agent::start(
        &args.common.agent_binary()?,
        &store,
        &work.join("agent-schedule.sock"),
        &work.join(format!("agent-schedule-{sessions}.log")),
        &[
            "--max-concurrent-refreshes".into(),
            args.max_concurrent.to_string(),
        ],
    )?;
    let ready_ms = now_ms();
    let cpu_at_ready = procstat::cpu_time(agent.pid)?;

    let deadline = Instant::now()
        + Duration::from_millis(due_at(sessions.saturating_sub(1)).saturating_sub(now_ms()))
        + Duration::from_secs_f64(args.grace);
    // A stall: sessions are overdue and nothing has reached the provider
    // for STALL; the agent has stopped refreshing.
    const STALL: Duration = Duration::from_secs(10);
    let mut stalled = false;
    let mut last_progress = (0, Instant::now());
    while provider.hits() < sessions && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let hits = provider.hits();
        if hits != last_progress.0 {
            last_progress = (hits, Instant::now());
        }
        let overdue = (0..sessions)
            .filter(|&i| due_at(i) + 1_000 < now_ms())
            .count();
        if hits < overdue && last_progress.1.elapsed() > STALL {
            stalled = true;
            eprintln!(
                "STALLED: {hits} of {sessions} refreshes reached the provider, {overdue} are overdue, \
                 and none arrived for {STALL:?}"
            );
            break;
        }
    }
    // The last answers still have to be stored.
    let settle = Instant::now();
    while provider.in_flight() > 0 && settle.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(500));
    let cpu = procstat::cpu_time(agent.pid)? - cpu_at_ready;
    let rss = procstat::status_bytes(agent.pid, "VmRSS")?;

    // Spot check through the socket: the new tokens are in place.
    let mut checked = (0, 0);
    if let Ok(mut client) = Client::connect(&agent.socket) {
        for k in 0..100.min(sessions) {
            let i = (k * 7919) % sessions;
            if let Ok(status) = client.status(&populate::session_name(i)) {
                checked.0 += 1;
                if status.last_refresh_at.unwrap_or(0) * 1000 + 1000 >= ready_ms {
                    checked.1 += 1;
                }
            }
        }
    }
    let ready = agent.ready_after;
    let stopped = agent.stop_within(Duration::from_secs(if stalled { 5 } else { 45 }))?;

    let seen = provider.seen.lock().unwrap();
    let mut lateness = Samples::with_capacity(seen.hits.len());
    let mut due_before_ready = 0;
    let mut first = u64::MAX;
    let mut last = 0;
    let mut refreshed = 0;
    for hit in &seen.hits {
        let Some(i) = hit.session else { continue };
        refreshed += 1;
        first = first.min(hit.at_ms);
        last = last.max(hit.at_ms);
        let planned = due_at(i);
        if planned < ready_ms {
            due_before_ready += 1;
            continue;
        }
        lateness.push_ns(hit.at_ms.saturating_sub(planned) * 1_000_000);
    }
    let span = (last.saturating_sub(first)) as f64 / 1e3;
    let rate = if span > 0.0 {
        refreshed as f64 / span
    } else {
        0.0
    };
    Ok(Outcome {
        refreshed,
        lateness,
        due_before_ready,
        rate,
        cpu_per_refresh_ms: cpu.as_secs_f64() * 1e3 / refreshed.max(1) as f64,
        max_in_flight: provider
            .max_in_flight
            .load(std::sync::atomic::Ordering::Relaxed),
        connections: provider
            .connections
            .load(std::sync::atomic::Ordering::Relaxed),
        replays: seen.replays,
        ready,
        rss,
        checked,
        stalled,
        stopped,
    })
}
