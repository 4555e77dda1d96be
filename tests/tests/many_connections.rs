//! The real binary started with the usual soft limit of 1,024 open files,
//! then 5,000 client connections at once: the agent lifts its soft limit to
//! the hard one at start, so it accepts them all and still serves a
//! newcomer at once.

mod common;

use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::Workspace;
use token_agent_client::Client;

fn limits() -> libc::rlimit {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a valid rlimit.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    limit
}

#[test]
fn five_thousand_connections_do_not_lock_out_a_newcomer() {
    // This process needs room for the crowd itself.
    let mut own = limits();
    own.rlim_cur = own.rlim_max;
    // SAFETY: setrlimit on this process with a valid rlimit.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &own) };
    if own.rlim_max < 12_000 {
        println!(
            "SKIPPED: the hard open-file limit ({}) is too low",
            own.rlim_max
        );
        return;
    }

    let ws = Workspace::new();
    let mut command = Command::new(common::binary("token-agent"));
    command
        .arg("--socket")
        .arg(ws.socket())
        .arg("--store-dir")
        .arg(ws.store())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: only setrlimit between fork and exec.
    unsafe {
        command.pre_exec(|| {
            let mut limit = limits();
            limit.rlim_cur = 1024;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            Ok(())
        });
    }
    let mut agent = command.spawn().expect("start token-agent");
    common::wait_until(Duration::from_secs(20), "the agent listens", || {
        UnixStream::connect(ws.socket()).is_ok()
    });

    let socket = ws.socket();
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let crowd: Vec<UnixStream> = (0..5_000)
            .map(|_| UnixStream::connect(&socket).expect("a connection in the crowd"))
            .collect();
        let mut newcomer = Client::connect(&socket).expect("the newcomer connects");
        newcomer.set_timeout(Duration::from_secs(5)).unwrap();
        let started = Instant::now();
        let answered = newcomer.ping().map(|()| started.elapsed());
        let _ = done_tx.send(answered.map_err(|e| e.to_string()));
        drop(crowd);
    });
    let answered = done_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the crowd's connections were not all accepted");
    let took = answered.expect("the newcomer was not served amid 5,000 connections");
    println!("newcomer served in {took:?} amid 5,000 connections");
    let _ = agent.kill();
    let _ = agent.wait();
}
