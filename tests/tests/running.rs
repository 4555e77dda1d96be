//! Running the agent for real: systemd units and socket activation,
//! readiness notices, ssh-agent-style backgrounding, signals, reloads,
//! status and metrics.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{binary, wait_until, Provider, Workspace};

fn repo_file(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

#[test]
fn the_systemd_units_pass_systemd_analyze_verify() {
    let ws = Workspace::new();
    let units = ws.dir.path().join("units");
    let runtime = ws.dir.path().join("runtime");
    std::fs::create_dir_all(&units).unwrap();
    std::fs::create_dir_all(&runtime).unwrap();

    // The unit names the installed binary; point it at the built one.
    let service = std::fs::read_to_string(repo_file("systemd/token-agent.service")).unwrap();
    let service = service.replace(
        "%h/.cargo/bin/token-agent",
        binary("token-agent").to_str().unwrap(),
    );
    std::fs::write(units.join("token-agent.service"), service).unwrap();
    std::fs::copy(
        repo_file("systemd/token-agent.socket"),
        units.join("token-agent.socket"),
    )
    .unwrap();

    let output = Command::new("systemd-analyze")
        .args([
            "verify",
            "--user",
            "token-agent.socket",
            "token-agent.service",
        ])
        .current_dir(&units)
        .env("XDG_RUNTIME_DIR", &runtime)
        .output()
        .expect("run systemd-analyze (Debian package systemd)");
    assert!(
        output.status.success(),
        "systemd-analyze verify failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn a_socket_activated_agent_serves_and_reports_ready() {
    let provider = Provider::start(30);
    let ws = Workspace::new();
    let notify_path = ws.dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    std::fs::create_dir_all(ws.socket().parent().unwrap()).unwrap();

    let mut activator = Command::new("systemd-socket-activate")
        .arg("--listen")
        .arg(ws.socket())
        .arg("-E")
        .arg(format!("NOTIFY_SOCKET={}", notify_path.display()))
        .arg(binary("token-agent"))
        .arg("--store-dir")
        .arg(ws.store())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run systemd-socket-activate (Debian package systemd)");
    wait_until(Duration::from_secs(10), "the activator listens", || {
        ws.socket().exists()
    });

    // The first connection starts the agent on the passed socket.
    ws.import(&provider, "work", &[]);
    let mut messages = String::new();
    let mut buffer = [0u8; 4096];
    while !messages.contains("READY=1") {
        let len = notify
            .recv(&mut buffer)
            .expect("a readiness notice within 20 s");
        messages.push_str(&String::from_utf8_lossy(&buffer[..len]));
        messages.push('\n');
    }
    let token = ws.tokenctl_ok(&["get", "work"]);
    assert!(provider.is_active(token.trim()));

    // SIGTERM says STOPPING=1 and leaves systemd's socket file alone.
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(activator.id() as i32, libc::SIGTERM) };
    while !messages.contains("STOPPING=1") {
        let len = notify.recv(&mut buffer).expect("a stopping notice");
        messages.push_str(&String::from_utf8_lossy(&buffer[..len]));
    }
    assert!(activator.wait().unwrap().success());
}

#[test]
fn eval_of_dash_s_gives_a_working_agent_and_dash_k_stops_it() {
    let ws = Workspace::new();
    let script = format!(
        r#"set -e
eval "$({agent} -s --socket {socket} --store-dir {store})"
test -n "$TOKEN_AGENT_PID"
{tokenctl} ping
eval "$({agent} -k)"
test -z "$TOKEN_AGENT_SOCK"
"#,
        agent = binary("token-agent").display(),
        tokenctl = binary("tokenctl").display(),
        socket = ws.socket().display(),
        store = ws.store().display(),
    );
    let output = Command::new("sh").arg("-c").arg(&script).output().unwrap();
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    wait_until(
        Duration::from_secs(10),
        "the backgrounded agent is gone",
        || !ws.socket().exists(),
    );
}

#[test]
fn dash_s_reports_a_failed_start_instead_of_printing_variables() {
    let ws = Workspace::new();
    let _first = ws.start_agent(&[]);
    let output = Command::new(binary("token-agent"))
        .args(["-s", "--socket"])
        .arg(ws.dir.path().join("second.sock"))
        .arg("--store-dir")
        .arg(ws.store())
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        output.stdout.is_empty(),
        "printed variables for an agent that did not start"
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("in use by another token-agent"));
}

#[test]
fn sigterm_during_a_refresh_in_flight_keeps_the_rotated_token() {
    let provider = Provider::start(30);
    let ws = Workspace::new();
    let mut agent = ws.start_agent(&[]);
    ws.import(&provider, "work", &[]);

    // The provider rotates at once but holds the answer back for 2 s; the
    // agent is told to stop while the answer is on its way.
    provider.set_token_delay(Duration::from_secs(2));
    let refresh = {
        let socket = ws.socket();
        std::thread::spawn(move || {
            Command::new(binary("tokenctl"))
                .arg("--socket")
                .arg(socket)
                .args(["refresh", "work"])
                .output()
                .unwrap()
        })
    };
    wait_until(
        Duration::from_secs(5),
        "the refresh reaches the provider",
        || provider.stats()["refresh_requests"] == 2,
    );
    assert_eq!(agent.terminate().code(), Some(0));
    assert!(
        refresh.join().unwrap().status.success(),
        "the refresh in hand was not answered"
    );
    provider.set_token_delay(Duration::ZERO);

    // The rotated token was stored: the next refresh is accepted, and the
    // provider never saw a token twice.
    let _agent = ws.start_agent(&[]);
    ws.tokenctl_ok(&["refresh", "work"]);
    let token = ws.tokenctl_ok(&["get", "work"]);
    assert!(provider.is_active(token.trim()));
    assert_eq!(provider.stats()["replays"], 0);
}

#[test]
fn sighup_applies_a_good_config_and_keeps_the_old_one_on_a_broken_one() {
    let provider = Provider::start(30);
    let ws = Workspace::new();
    let config = ws.secret_file(
        "config.toml",
        "[sessions.work]\nallowed_executables = [\"/nowhere\"]\n",
    );
    let agent = ws.start_agent(&["--config", config.to_str().unwrap()]);
    ws.import(&provider, "work", &[]);
    assert_eq!(ws.tokenctl(&["get", "work"]).status.code(), Some(9));

    // A good file: the rule is gone.
    std::fs::write(&config, "[timing]\nmin_lead = \"30s\"\n").unwrap();
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(agent.pid(), libc::SIGHUP) };
    wait_until(Duration::from_secs(5), "the reload takes effect", || {
        ws.tokenctl(&["get", "work"]).status.success()
    });

    // A broken file: reported, and the previous configuration stays.
    std::fs::write(&config, "[sessions.work\nallowed = ").unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(agent.pid(), libc::SIGHUP) };
    wait_until(
        Duration::from_secs(5),
        "the broken file is reported",
        || agent.log_text().contains("the old one stays"),
    );
    ws.tokenctl_ok(&["get", "work"]);
    ws.tokenctl_ok(&["ping"]);
}

#[test]
fn status_puts_sessions_needing_sign_in_first_and_metrics_count_refreshes() {
    let provider = Provider::start(30);
    let ws = Workspace::new();
    let _agent = ws.start_agent(&[]);
    ws.import(&provider, "alpha", &[]);
    let zulu = ws.import(&provider, "zulu", &[]);

    // zulu's grant is revoked by a replay; its next refresh is refused.
    provider.refresh_directly(zulu["refresh_token"].as_str().unwrap());
    assert_eq!(ws.tokenctl(&["refresh", "zulu"]).status.code(), Some(5));

    let status = ws.tokenctl_ok(&["status"]);
    let banner = status
        .find("!! NEEDS SIGN-IN: zulu")
        .expect("a sign-in banner");
    let table = status.find("NAME").unwrap();
    assert!(banner < table, "{status}");
    assert!(
        status.find("zulu").unwrap() < status.find("alpha").unwrap(),
        "{status}"
    );
    assert!(
        status.contains("1 fresh") && status.contains("1 needs sign in"),
        "{status}"
    );

    let json: serde_json::Value =
        serde_json::from_str(&ws.tokenctl_ok(&["status", "--json"])).unwrap();
    assert_eq!(json["sessions"][0]["name"], "zulu");
    assert_eq!(json["sessions"][0]["state"], "needs_sign_in");
    assert_eq!(json["agent"]["sessions_by_state"]["fresh"], 1);

    ws.tokenctl_ok(&["get", "alpha"]);
    let metrics = ws.tokenctl_ok(&["metrics"]);
    assert!(
        metrics.contains("token_agent_refreshes_total{outcome=\"success\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("token_agent_refreshes_total{outcome=\"needs_sign_in\"} 1"));
    assert!(metrics.contains("token_agent_gets_total{result=\"served\"} 1"));
    assert!(metrics.contains("token_agent_sessions{state=\"needs_sign_in\"} 1"));
}

#[test]
fn metrics_are_served_over_http_on_loopback_when_configured() {
    use std::io::{Read, Write};

    // A free port: bind, note it, let it go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ws = Workspace::new();
    let config = ws.secret_file(
        "config.toml",
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    let _agent = ws.start_agent(&["--config", config.to_str().unwrap()]);

    let mut body = String::new();
    wait_until(Duration::from_secs(10), "metrics answer over HTTP", || {
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            return false;
        };
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        body.clear();
        stream.read_to_string(&mut body).is_ok() && body.starts_with("HTTP/1.1 200")
    });
    assert!(
        body.contains("token_agent_sessions{state=\"fresh\"} 0"),
        "{body}"
    );
    assert!(body.contains("# TYPE token_agent_refreshes_total counter"));
}
