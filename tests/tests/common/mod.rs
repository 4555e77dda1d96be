//! Shared pieces of the end-to-end tests: a real OpenID provider
//! (oidc-provider on Node, from `tests/provider/`), the real `token-agent`
//! and `tokenctl` binaries as child processes, and a small HTTP client for
//! asking the provider about tokens.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The folder of a binary built by `cargo build --workspace`: this test runs
/// from `target/<profile>/deps/`, so the binaries sit one level up.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target folder");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace`), as scripts/test does",
        path.display()
    );
    path
}

fn provider_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("provider")
}

/// A running oidc-provider on 127.0.0.1, stopped when dropped.
pub struct Provider {
    child: Child,
    pub issuer: String,
    port: u16,
}

impl Provider {
    /// Starts a provider with refresh-token rotation and `access_ttl`-second
    /// access tokens.
    pub fn start(access_ttl: u64) -> Provider {
        let dir = provider_dir();
        assert!(
            dir.join("node_modules/oidc-provider").exists(),
            "oidc-provider is not installed: run `npm ci --prefix tests/provider` (scripts/test does)"
        );
        let mut child = Command::new("node")
            .arg("server.mjs")
            .current_dir(&dir)
            .env("ACCESS_TOKEN_TTL", access_ttl.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start node server.mjs");

        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("provider announces itself");
        let announced: Value = serde_json::from_str(&line).expect("provider's JSON line");
        Provider {
            child,
            issuer: announced["issuer"].as_str().unwrap().to_string(),
            port: announced["port"].as_u64().unwrap() as u16,
        }
    }

    /// Signs in through the provider's own login and consent pages and
    /// returns the token endpoint's answer (with a refresh token).
    pub fn sign_in(&self, client_id: &str, client_secret: Option<&str>, login: &str) -> Value {
        let mut command = Command::new("node");
        command
            .arg("sign-in.mjs")
            .current_dir(provider_dir())
            .args([
                "--issuer",
                &self.issuer,
                "--client-id",
                client_id,
                "--login",
                login,
            ]);
        if let Some(secret) = client_secret {
            command.args(["--client-secret", secret]);
        }
        let output = command.output().expect("run sign-in.mjs");
        assert!(
            output.status.success(),
            "sign-in failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("token answer")
    }

    /// Runs `act-as-user.mjs` (the person at the browser, over HTTP) and
    /// returns its standard output, failing the test if it fails.
    pub fn act_as_user(&self, args: &[&str]) -> String {
        let output = Command::new("node")
            .arg("act-as-user.mjs")
            .args(args)
            .current_dir(provider_dir())
            .output()
            .expect("run act-as-user.mjs");
        assert!(
            output.status.success(),
            "act-as-user {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// `{refresh_requests, distinct_refresh_tokens, replays}`.
    pub fn stats(&self) -> Value {
        self.http("GET", "/test/stats", None, &[])
    }

    pub fn reset_stats(&self) {
        self.http("POST", "/test/reset-stats", None, &[]);
    }

    /// Holds every token answer back this long after the provider made it.
    pub fn set_token_delay(&self, delay: Duration) {
        let path = format!("/test/token-delay?ms={}", delay.as_millis());
        self.http("POST", &path, None, &[]);
    }

    /// Asks the provider whether `token` is active, as client agent-basic.
    pub fn is_active(&self, token: &str) -> bool {
        self.introspect(token)["active"] == Value::Bool(true)
    }

    /// The provider's introspection answer for `token` (RFC 7662): `active`,
    /// `scope`, `aud`, `exp` and so on.
    pub fn introspect(&self, token: &str) -> Value {
        let body = format!("token={}", form_encode(token));
        self.http(
            "POST",
            "/token/introspection",
            Some(&body),
            &["Authorization: Basic YWdlbnQtYmFzaWM6YmFzaWMtc2VjcmV0"],
        )
    }

    /// Presents a refresh token directly, as a stray second holder would.
    pub fn refresh_directly(&self, refresh_token: &str) -> Value {
        let body = format!(
            "grant_type=refresh_token&refresh_token={}",
            form_encode(refresh_token)
        );
        self.http(
            "POST",
            "/token",
            Some(&body),
            &["Authorization: Basic YWdlbnQtYmFzaWM6YmFzaWMtc2VjcmV0"],
        )
    }

    /// One HTTP/1.1 exchange with `Connection: close`; the JSON body back.
    fn http(&self, method: &str, path: &str, body: Option<&str>, headers: &[&str]) -> Value {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to provider");
        let body = body.unwrap_or("");
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\nAccept: application/json\r\nContent-Length: {}\r\n",
            self.port,
            body.len()
        );
        if !body.is_empty() {
            request.push_str("Content-Type: application/x-www-form-urlencoded\r\n");
        }
        for header in headers {
            request.push_str(header);
            request.push_str("\r\n");
        }
        request.push_str("\r\n");
        request.push_str(body);
        stream.write_all(request.as_bytes()).unwrap();

        let mut response = Vec::new();
        stream.read_to_end(&mut response).unwrap();
        let text = String::from_utf8_lossy(&response);
        let (head, rest) = text.split_once("\r\n\r\n").expect("HTTP head");
        let rest = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(rest)
        } else {
            rest.to_string()
        };
        serde_json::from_str(&rest).unwrap_or_else(|_| panic!("not JSON from {path}: {rest}"))
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
    out
}

fn form_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A private folder for one test: store, socket, secrets, logs.
pub struct Workspace {
    pub dir: tempfile::TempDir,
}

impl Workspace {
    pub fn new() -> Workspace {
        Workspace {
            dir: tempfile::tempdir().expect("temporary folder"),
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("run/agent.sock")
    }

    pub fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// Writes a secret to a file and returns its path.
    pub fn secret_file(&self, name: &str, value: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, value).unwrap();
        path
    }

    /// Starts `token-agent` on this workspace's store and socket, and waits
    /// until it answers.
    pub fn start_agent(&self, extra: &[&str]) -> Agent {
        let mut agent = self.spawn_agent(extra);
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(self.socket()).is_err() {
            // Its log says why, and the folder holding it goes with the test.
            let log = || std::fs::read_to_string(&agent.log).unwrap_or_default();
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!(
                    "the agent exited ({status}) before listening; its log:\n{}",
                    log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not start listening; its log:\n{}",
                log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        agent
    }

    /// Spawns `token-agent` on this workspace's socket and store without
    /// waiting.
    pub fn spawn_agent(&self, extra: &[&str]) -> Agent {
        self.spawn_agent_on(&self.socket(), &self.store(), extra)
    }

    /// Spawns `token-agent` on the given socket and store without waiting.
    pub fn spawn_agent_on(&self, socket: &Path, store: &Path, extra: &[&str]) -> Agent {
        let log = self.dir.path().join(format!("agent-{}.log", log_number()));
        let child = Command::new(binary("token-agent"))
            .arg("--socket")
            .arg(socket)
            .arg("--store-dir")
            .arg(store)
            .args(extra)
            .env("RUST_LOG", "token_agent=debug")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start token-agent");
        Agent { child, log }
    }

    /// Runs `tokenctl` against this workspace's agent.
    pub fn tokenctl(&self, args: &[&str]) -> Output {
        Command::new(binary("tokenctl"))
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .output()
            .expect("run tokenctl")
    }

    /// Runs `tokenctl` and returns its standard output, failing the test
    /// with its error output if it fails.
    pub fn tokenctl_ok(&self, args: &[&str]) -> String {
        let output = self.tokenctl(args);
        assert!(
            output.status.success(),
            "tokenctl {args:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// Signs in to `provider` as agent-basic and imports the session.
    pub fn import(&self, provider: &Provider, name: &str, extra: &[&str]) -> Value {
        let answer = provider.sign_in("agent-basic", Some("basic-secret"), name);
        let refresh_token = answer["refresh_token"].as_str().expect("refresh token");
        let rt_file = self.secret_file(&format!("{name}.rt"), refresh_token);
        let secret_file = self.secret_file("client.secret", "basic-secret");
        let mut args = vec![
            "import",
            name,
            "--issuer",
            &provider.issuer,
            "--client-id",
            "agent-basic",
            "--client-secret-file",
            secret_file.to_str().unwrap(),
            "--refresh-token-file",
            rt_file.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        self.tokenctl_ok(&args);
        answer
    }
}

fn log_number() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed).to_string()
}

/// A running `token-agent` child process, killed when dropped.
pub struct Agent {
    pub child: Child,
    pub log: PathBuf,
}

impl Agent {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn kill_hard(&mut self) {
        self.child.kill().expect("SIGKILL the agent");
        self.child.wait().unwrap();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill with a pid we own and a valid signal number.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not stop after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` every 50 ms until it holds or `limit` passes.
pub fn wait_until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
