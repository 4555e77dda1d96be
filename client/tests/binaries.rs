//! The two binaries: the fast `tokenctl` answers `get` itself, and hands
//! everything else to `tokenctl-full` beside it. No agent is needed here;
//! the e2e tests run both against a real one.

use std::process::{Command, Output};

fn tokenctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tokenctl"))
        .args(args)
        .env("TOKEN_AGENT_SOCK", "/nonexistent/token-agent.sock")
        .output()
        .expect("run tokenctl")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn get_without_an_agent_fails_alike_in_both() {
    for args in [
        &["get", "work"][..],
        &["get", "work", "--min-valid", "1h 30m"],
        &["get", "work", "--format", "json", "--scope", "read"],
    ] {
        let fast = tokenctl(args);
        let full = Command::new(env!("CARGO_BIN_EXE_tokenctl-full"))
            .args(args)
            .env("TOKEN_AGENT_SOCK", "/nonexistent/token-agent.sock")
            .output()
            .expect("run tokenctl-full");
        assert_eq!(
            fast.status.code(),
            Some(3),
            "{args:?}: {}",
            text(&fast.stderr)
        );
        assert_eq!(fast.status.code(), full.status.code(), "{args:?}");
        assert_eq!(text(&fast.stderr), text(&full.stderr), "{args:?}");
        assert!(text(&fast.stderr).starts_with("tokenctl: no token-agent is running on"));
        assert!(fast.stdout.is_empty());
    }
}

#[test]
fn other_commands_are_handed_to_the_full_command_line() {
    let version = tokenctl(&["--version"]);
    assert!(version.status.success());
    assert_eq!(
        text(&version.stdout),
        format!("tokenctl {}\n", env!("CARGO_PKG_VERSION"))
    );

    let help = tokenctl(&["get", "--help"]);
    assert!(help.status.success());
    assert!(text(&help.stdout).contains("Usage: tokenctl get [OPTIONS] <NAME>"));

    // A usage error is clap's, exit code 2, under the name tokenctl.
    let typo = tokenctl(&["get", "work", "--fromat", "json"]);
    assert_eq!(typo.status.code(), Some(2));
    assert!(text(&typo.stderr).contains("Usage: tokenctl get"));

    let man = tokenctl(&["man"]);
    assert!(man.status.success());
    assert!(text(&man.stdout).contains(".TH tokenctl"));

    let ping = tokenctl(&["ping"]);
    assert_eq!(ping.status.code(), Some(3));
}

#[test]
fn tokenctl_finds_tokenctl_full_beside_its_real_file() {
    let dir = tempfile::tempdir().unwrap();

    // Through a symbolic link elsewhere, the real file's folder counts.
    let link = dir.path().join("linked-tokenctl");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_tokenctl"), &link).unwrap();
    let version = Command::new(&link).arg("--version").output().unwrap();
    assert!(version.status.success(), "{}", text(&version.stderr));
    assert!(text(&version.stdout).starts_with("tokenctl "));

    // A copy alone cannot hand over, and says what is missing. A hard
    // link, not a copy: writing an executable here while another test
    // forks could leave it busy (ETXTBSY) when run. Beside the binary, so
    // on the same file system.
    let target = std::path::Path::new(env!("CARGO_BIN_EXE_tokenctl"))
        .parent()
        .unwrap();
    let dir = tempfile::tempdir_in(target).unwrap();
    let alone = dir.path().join("tokenctl");
    std::fs::hard_link(env!("CARGO_BIN_EXE_tokenctl"), &alone).unwrap();
    let list = Command::new(&alone)
        .arg("list")
        .env("TOKEN_AGENT_SOCK", "/nonexistent/token-agent.sock")
        .output()
        .unwrap();
    assert_eq!(list.status.code(), Some(1));
    let stderr = text(&list.stderr);
    assert!(
        stderr.contains(&format!(
            "cannot run {}",
            dir.path().join("tokenctl-full").display()
        )),
        "{stderr}"
    );
    assert!(list.stdout.is_empty());
}

/// An agent stand-in on a real Unix socket: answers one connection's hello
/// and get with `token`, as the agent does.
fn one_shot_agent(dir: &std::path::Path, token: &str) -> std::path::PathBuf {
    use token_agent_client::proto::{
        read_frame, write_frame, Request, Response, Secret, TokenReply, MAX_REQUEST_LEN,
        MAX_RESPONSE_LEN, PROTOCOL_VERSION,
    };

    let socket = dir.join("agent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
    let token = token.to_string();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let hello: Request = read_frame(&mut stream, MAX_REQUEST_LEN).expect("hello");
        assert!(matches!(hello, Request::Hello { .. }));
        let _get: Request = read_frame(&mut stream, MAX_REQUEST_LEN).expect("get");
        let replies = [
            Response::Hello {
                version: PROTOCOL_VERSION,
                agent: "stand-in".into(),
            },
            Response::Token(TokenReply {
                access_token: Secret::new(token),
                token_type: "Bearer".into(),
                expires_at: u64::MAX / 2,
                scope: Vec::new(),
                audience: None,
            }),
        ];
        for reply in &replies {
            write_frame(&mut stream, reply, MAX_RESPONSE_LEN).expect("reply");
        }
    });
    socket
}

/// The fast binary skips Rust's own start-up; what that start-up gave a
/// `get` must hold all the same: the token printed in full, and a closed
/// output pipe reported as an error with exit status 1, not a silent death
/// by SIGPIPE.
#[test]
fn the_fast_get_prints_its_token_and_reports_a_closed_pipe() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;

    let dir = tempfile::tempdir().unwrap();
    let socket = one_shot_agent(dir.path(), "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.c2ln");
    let printed = Command::new(env!("CARGO_BIN_EXE_tokenctl"))
        .args(["get", "work"])
        .env("TOKEN_AGENT_SOCK", &socket)
        .output()
        .expect("run tokenctl");
    assert!(printed.status.success(), "{}", text(&printed.stderr));
    assert_eq!(
        text(&printed.stdout),
        "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.c2ln\n"
    );

    let dir = tempfile::tempdir().unwrap();
    let socket = one_shot_agent(dir.path(), &"t".repeat(100_000));
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokenctl"))
        .args(["get", "work"])
        .env("TOKEN_AGENT_SOCK", &socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tokenctl");
    // Nobody reads the output: the write fails on a closed pipe.
    drop(child.stdout.take());
    let closed = child.wait_with_output().expect("wait");
    assert_eq!(closed.status.signal(), None, "killed by a signal");
    assert_eq!(closed.status.code(), Some(1), "{}", text(&closed.stderr));
    assert!(
        text(&closed.stderr).contains("cannot write the output"),
        "{}",
        text(&closed.stderr)
    );
}
