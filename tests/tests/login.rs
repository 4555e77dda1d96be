//! `tokenctl login` and `logout` against the real provider: the test acts
//! as the person at the browser over HTTP (`act-as-user.mjs`), then checks
//! that the agent keeps the new session fresh with the provider accepting
//! every token it serves.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use common::{binary, wait_until, Provider, Workspace};
use serde_json::Value;
use token_agent_client::proto::{ClientAuth, ImportSession, Secret};
use token_agent_client::Client;

/// `tokenctl login` running in the background, its error output (where the
/// code and URL go) read line by line.
struct Login {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Login {
    fn start(ws: &Workspace, args: &[&str]) -> Login {
        let mut child = Command::new(binary("tokenctl"))
            .arg("--socket")
            .arg(ws.socket())
            .arg("login")
            .args(args)
            // No browser here, as over SSH: the URL is printed instead.
            .env_remove("DISPLAY")
            .env_remove("WAYLAND_DISPLAY")
            .env("SSH_CONNECTION", "test")
            .env("TOKEN_AGENT_CONFIG", ws.dir.path().join("config.toml"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tokenctl login");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Login {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The first error-output line `pick` accepts, as `pick` returns it.
    fn wait_for<T>(&mut self, mut pick: impl FnMut(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(20);
        if let Some(found) = self.seen.iter().find_map(|l| pick(l)) {
            return found;
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("tokenctl login printed: {:?}", self.seen));
            let found = pick(&line);
            self.seen.push(line);
            if let Some(found) = found {
                return found;
            }
        }
    }

    /// Waits for tokenctl to end; its standard output and whether it succeeded.
    fn finish(mut self) -> (bool, String, String) {
        let status = self.child.wait().unwrap();
        let mut out = String::new();
        std::io::Read::read_to_string(&mut self.child.stdout.take().unwrap(), &mut out).unwrap();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(line);
        }
        (status.success(), out, self.seen.join("\n"))
    }
}

impl Drop for Login {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Signs in with the device flow as `user`, approving on the provider's
/// device pages.
fn device_login(
    provider: &Provider,
    ws: &Workspace,
    name: &str,
    user: &str,
    extra: &[&str],
) -> Login {
    let mut args = vec![
        name,
        "--issuer",
        &provider.issuer,
        "--client-id",
        "agent-device",
        "--flow",
        "device",
        "--scope",
        "openid",
    ];
    args.extend_from_slice(extra);
    let mut login = Login::start(ws, &args);
    let uri = login.wait_for(|l| l.strip_prefix("To sign in, open ").map(String::from));
    let code = login.wait_for(|l| l.strip_prefix("and enter the code: ").map(String::from));
    let page = provider.act_as_user(&["--device", &uri, "--user-code", &code, "--login", user]);
    assert!(page.contains("Success"), "device approval ended on {page}");
    login
}

/// Asks for tokens until the provider has seen `rotations` refreshes,
/// checking each new token with the provider.
fn keeps_fresh(provider: &Provider, ws: &Workspace, name: &str, rotations: u64) {
    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while provider.stats()["refresh_requests"].as_u64().unwrap() < rotations {
        assert!(
            Instant::now() < deadline,
            "fewer than {rotations} rotations in 60 s"
        );
        let token = ws.tokenctl_ok(&["get", name]).trim().to_string();
        if seen.insert(token.clone()) {
            assert!(provider.is_active(&token), "a served token is refused");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(provider.stats()["replays"], Value::from(0));
}

#[test]
fn a_device_flow_login_is_imported_and_kept_fresh_across_rotations() {
    let provider = Provider::start(5);
    let ws = Workspace::new();
    let _agent = ws.start_agent(&[]);

    let login = device_login(&provider, &ws, "dev", "alice", &["--offline"]);
    let (ok, out, err) = login.finish();
    assert!(ok, "login failed: {err}");
    assert!(out.contains("signed in as alice"), "{out}");
    assert!(
        !out.contains("eyJ") && !err.contains("eyJ"),
        "a token was printed"
    );

    keeps_fresh(&provider, &ws, "dev", 4);
    let status = ws.tokenctl_ok(&["status", "dev"]);
    assert!(status.contains("signed in as:   alice"), "{status}");
    assert!(status.contains("state:          fresh"), "{status}");
}

#[test]
fn a_browser_login_through_the_loopback_redirect_is_kept_fresh() {
    let provider = Provider::start(5);
    let ws = Workspace::new();
    let _agent = ws.start_agent(&[]);

    let mut login = Login::start(
        &ws,
        &[
            "web",
            "--issuer",
            &provider.issuer,
            "--client-id",
            "agent-device",
            "--flow",
            "browser",
            "--scope",
            "openid",
            "--offline",
        ],
    );
    let url = login.wait_for(|l| l.starts_with("http").then(|| l.to_string()));
    assert!(
        url.contains("code_challenge_method=S256") && url.contains("state="),
        "{url}"
    );
    let closed = provider.act_as_user(&["--url", &url, "--login", "bob"]);
    assert!(
        closed.starts_with("200 ") && closed.contains("close this tab"),
        "{closed}"
    );
    let (ok, out, err) = login.finish();
    assert!(ok, "login failed: {err}");
    assert!(out.contains("signed in as bob"), "{out}");

    keeps_fresh(&provider, &ws, "web", 3);
}

#[test]
fn a_client_credentials_session_is_renewed_across_several_expiries() {
    let provider = Provider::start(5);
    let ws = Workspace::new();
    let _agent = ws.start_agent(&[]);
    let secret = ws.secret_file("service.secret", "service-secret");

    let login = Login::start(
        &ws,
        &[
            "svc",
            "--issuer",
            &provider.issuer,
            "--client-id",
            "agent-service",
            "--client-secret-file",
            secret.to_str().unwrap(),
            "--flow",
            "client-credentials",
        ],
    );
    let (ok, out, err) = login.finish();
    assert!(ok, "login failed: {err}");
    assert!(out.contains("imported session svc"), "{out}");

    // Five-second tokens: four distinct ones means three renewals, each
    // made before the token in hand expired.
    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    while seen.len() < 4 {
        assert!(
            Instant::now() < deadline,
            "only {} tokens in 40 s",
            seen.len()
        );
        let token = ws
            .tokenctl_ok(&["get", "svc", "--min-valid", "1s"])
            .trim()
            .to_string();
        if seen.insert(token.clone()) {
            assert!(provider.is_active(&token), "a served token is refused");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let status = ws.tokenctl_ok(&["status", "svc"]);
    assert!(
        status.contains("renewed with its client credentials"),
        "{status}"
    );
    assert!(status.contains("state:          fresh"), "{status}");
    assert_eq!(provider.stats()["refresh_requests"], Value::from(0));
}

#[test]
fn logout_revokes_the_refresh_token_and_removes_the_session() {
    // Long access tokens, so the agent does not rotate the refresh token
    // the test holds before the logout.
    let provider = Provider::start(300);
    let ws = Workspace::new();
    let _agent = ws.start_agent(&[]);

    let answer = provider.sign_in("agent-basic", Some("basic-secret"), "carol");
    let refresh_token = answer["refresh_token"].as_str().unwrap().to_string();
    let mut client = Client::connect(&ws.socket()).unwrap();
    client
        .import(ImportSession {
            name: "work".into(),
            issuer: provider.issuer.clone(),
            token_endpoint: None,
            client_id: "agent-basic".into(),
            client_secret: Some(Secret::new("basic-secret")),
            client_auth: ClientAuth::Basic,
            scopes: vec![],
            refresh_token: Secret::new(refresh_token.clone()),
            grant: Default::default(),
            revocation_endpoint: None,
            identity: None,
            access_token: Some(Secret::new(answer["access_token"].as_str().unwrap())),
            expires_in: answer["expires_in"].as_u64(),
            refresh_expires_in: None,
            idle_timeout_secs: None,
            lifetime_secs: None,
            replace: false,
        })
        .unwrap();
    assert!(provider.is_active(&refresh_token));

    let out = ws.tokenctl_ok(&["logout", "work"]);
    assert!(out.contains("revoked"), "{out}");
    assert!(!provider.is_active(&refresh_token));
    let refused = provider.refresh_directly(&refresh_token);
    assert_eq!(refused["error"], "invalid_grant", "{refused}");
    let listed = ws.tokenctl_ok(&["list"]);
    assert!(listed.contains("no sessions"), "{listed}");
}

#[test]
fn a_login_without_a_refresh_token_says_so_and_imports_nothing() {
    let provider = Provider::start(5);
    let ws = Workspace::new();
    let _agent = ws.start_agent(&[]);

    // No offline_access: the provider signs in but sends no refresh token,
    // as Google does after the first consent.
    let login = device_login(&provider, &ws, "short", "dave", &[]);
    let (ok, _, err) = login.finish();
    assert!(!ok);
    assert!(err.contains("no refresh token"), "{err}");
    assert!(err.contains("prompt=consent"), "{err}");
    let listed = ws.tokenctl_ok(&["list"]);
    assert!(listed.contains("no sessions"), "{listed}");
}

#[test]
fn a_profile_in_the_config_file_needs_no_flags() {
    let provider = Provider::start(5);
    let ws = Workspace::new();
    let _agent = ws.start_agent(&[]);
    std::fs::write(
        ws.dir.path().join("config.toml"),
        format!(
            "[profiles.team]\nissuer = \"{}\"\nclient_id = \"agent-device\"\n\
             scopes = [\"openid\"]\nflow = \"device\"\noffline = true\n",
            provider.issuer
        ),
    )
    .unwrap();

    let mut login = Login::start(&ws, &["team"]);
    let uri = login.wait_for(|l| l.strip_prefix("To sign in, open ").map(String::from));
    let code = login.wait_for(|l| l.strip_prefix("and enter the code: ").map(String::from));
    provider.act_as_user(&["--device", &uri, "--user-code", &code, "--login", "erin"]);
    let (ok, out, err) = login.finish();
    assert!(ok, "login failed: {err}");
    assert!(out.contains("signed in as erin"), "{out}");
    wait_until(Duration::from_secs(5), "the session is listed", || {
        ws.tokenctl_ok(&["list"]).contains("team")
    });
}
