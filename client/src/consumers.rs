//! The ways programs other than Rust ones take a token: a command's
//! environment, kubectl's exec credential plugin, git's credential helper
//! protocol, and a stream of new tokens for long-running programs.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{BufRead, Write};
use std::os::unix::process::CommandExt;

use serde_json::json;
use token_agent_client::proto::{ErrorCode, TokenReply};
use token_agent_client::{Client, ClientError};

use crate::{failure, Failure};

/// Replaces this process with `command`, the token in `var`; returns only
/// when the command cannot be started. The command's exit code is then the
/// exit code, as the process is the command.
pub fn exec(var: &str, token: &TokenReply, command: &[OsString]) -> Failure {
    let (program, args) = command.split_first().expect("clap requires a command");
    let err = std::process::Command::new(program)
        .args(args)
        .env(var, token.access_token.expose())
        .exec();
    Failure {
        message: format!("cannot run {}: {err}", program.to_string_lossy()),
        // As shells do: 127 not found, 126 found but not runnable.
        exit_code: if err.kind() == std::io::ErrorKind::NotFound {
            127
        } else {
            126
        },
    }
}

/// kubectl's `ExecCredential` (client.authentication.k8s.io/v1). kubectl
/// caches the token until `expirationTimestamp` and runs the plugin again
/// after it.
pub fn exec_credential(token: &TokenReply) -> serde_json::Value {
    json!({
        "apiVersion": "client.authentication.k8s.io/v1",
        "kind": "ExecCredential",
        "status": {
            "token": token.access_token.expose(),
            "expirationTimestamp": rfc3339(token.expires_at),
        }
    })
}

/// Unix seconds as `2026-12-03T16:40:00Z`.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rest = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3_600,
        rest % 3_600 / 60,
        rest % 60
    )
}

/// What git sent a credential helper: its attributes, and the
/// capabilities it announced.
#[derive(Debug, Default)]
pub struct GitRequest {
    pub attributes: BTreeMap<String, String>,
    pub capabilities: Vec<String>,
}

/// Reads git's request: `key=value` lines up to a blank line or the end.
pub fn read_git_request() -> Result<GitRequest, Failure> {
    let stdin = std::io::stdin();
    parse_git_request(stdin.lock())
        .map_err(|err| failure(format!("cannot read git's request: {err}")))
}

pub fn parse_git_request(input: impl BufRead) -> std::io::Result<GitRequest> {
    let mut request = GitRequest::default();
    for line in input.lines() {
        let line = line?;
        if line.is_empty() {
            break;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        if key == "capability[]" {
            request.capabilities.push(value.to_string());
        } else {
            request
                .attributes
                .insert(key.to_string(), value.to_string());
        }
    }
    Ok(request)
}

/// git's `store` and `erase` carry attributes to read and ignore.
pub fn drain_stdin() {
    let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
}

/// The helper's answer to `get`. With git's `authtype` capability the
/// token goes out as a Bearer credential; otherwise as the password of
/// HTTP Basic (the user name git had, else `oauth2`), which servers such
/// as GitHub, GitLab and Gitea accept for OAuth tokens. Either way
/// `password_expiry_utc` keeps git from reusing it past its expiry.
pub fn git_answer(request: &GitRequest, token: &TokenReply) -> String {
    let secret = token.access_token.expose();
    let expiry = token.expires_at;
    if request.capabilities.iter().any(|c| c == "authtype") {
        format!(
            "capability[]=authtype\nauthtype=Bearer\ncredential={secret}\nephemeral=1\npassword_expiry_utc={expiry}\n"
        )
    } else {
        let username = request
            .attributes
            .get("username")
            .map_or("oauth2", String::as_str);
        format!("username={username}\npassword={secret}\npassword_expiry_utc={expiry}\n")
    }
}

/// Prints the token now and each new one as it comes, until the session
/// is removed (exit 4) or the connection breaks.
pub fn watch(agent: Client, name: &str, json: bool) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    let watcher = agent.watch(name)?;
    for event in watcher {
        // Once subscribed, a broken stream means the agent went away.
        let event = event.map_err(|err| match err {
            ClientError::Protocol(_) => Failure {
                message: format!(
                    "the agent closed the watch of {name} (it stopped or restarted); \
                     run tokenctl watch again once it is back"
                ),
                exit_code: 3,
            },
            other => other.into(),
        })?;
        if json {
            let line = serde_json::to_string(&event).expect("events serialize");
            writeln!(out, "{line}")
        } else if let Some(token) = &event.token {
            writeln!(out, "{}", token.access_token.expose())
        } else {
            Ok(())
        }
        .and_then(|()| out.flush())
        .map_err(|err| failure(format!("cannot write the output: {err}")))?;

        if let Some(error) = &event.error {
            // A removal is told once, by the failure returned below.
            if !json && error.code != ErrorCode::NoSuchSession {
                eprintln!("tokenctl: {}", error.message);
            }
            if error.code == ErrorCode::NoSuchSession {
                return Err(Failure {
                    message: format!("session {name} was removed"),
                    exit_code: 4,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use token_agent_client::proto::Secret;

    fn token() -> TokenReply {
        TokenReply {
            access_token: Secret::new("tok"),
            token_type: "Bearer".into(),
            expires_at: 1_796_300_000,
            scope: vec![],
            audience: None,
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_300_000), "2026-12-03T12:13:20Z");
    }

    #[test]
    fn an_exec_credential_has_the_v1_fields() {
        let credential = exec_credential(&token());
        assert_eq!(credential["apiVersion"], "client.authentication.k8s.io/v1");
        assert_eq!(credential["kind"], "ExecCredential");
        assert_eq!(credential["status"]["token"], "tok");
        assert_eq!(
            credential["status"]["expirationTimestamp"],
            "2026-12-03T12:13:20Z"
        );
    }

    #[test]
    fn git_gets_a_bearer_credential_only_when_it_offers_authtype() {
        let input = "protocol=https\nhost=git.example\nusername=alice\n\n";
        let basic = parse_git_request(input.as_bytes()).unwrap();
        let answer = git_answer(&basic, &token());
        assert_eq!(
            answer,
            "username=alice\npassword=tok\npassword_expiry_utc=1796300000\n"
        );

        let input = "capability[]=authtype\ncapability[]=state\nprotocol=https\nhost=h\n";
        let bearer = parse_git_request(input.as_bytes()).unwrap();
        let answer = git_answer(&bearer, &token());
        assert!(answer.starts_with("capability[]=authtype\nauthtype=Bearer\ncredential=tok\n"));
        assert!(answer.contains("password_expiry_utc=1796300000\n"));
    }
}
