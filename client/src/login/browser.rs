//! The authorization code flow with PKCE (RFC 7636, S256) through a
//! loopback redirect on 127.0.0.1 and an ephemeral port (RFC 8252 7.3).

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The path the provider redirects to on the loopback listener.
pub const CALLBACK_PATH: &str = "/callback";

const CLOSE_PAGE: &str =
    "<!doctype html><html><head><meta charset=\"utf-8\"><title>tokenctl</title></head>\
<body><p>Signed in. You can close this tab and return to the terminal.</p></body></html>";

/// A PKCE verifier and its S256 challenge.
pub struct Pkce {
    pub verifier: String,
    pub challenge: String,
}

impl Pkce {
    pub fn new() -> Pkce {
        Pkce::from_verifier(random_text())
    }

    fn from_verifier(verifier: String) -> Pkce {
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
        Pkce {
            verifier,
            challenge,
        }
    }
}

/// 32 random bytes, base64url: a PKCE verifier, `state` or `nonce`.
pub fn random_text() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

/// Whether a browser can be opened here: a graphical session on this
/// machine, not an SSH login.
pub fn has_browser() -> bool {
    let set = |name| std::env::var_os(name).is_some_and(|v| !v.is_empty());
    if set("SSH_CONNECTION") || set("SSH_TTY") || set("SSH_CLIENT") {
        return false;
    }
    cfg!(target_os = "macos") || set("DISPLAY") || set("WAYLAND_DISPLAY")
}

/// The listener the provider redirects to.
pub struct Loopback {
    listener: TcpListener,
    pub redirect_uri: String,
}

impl Loopback {
    pub async fn bind() -> Result<Loopback, String> {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|err| format!("cannot listen on 127.0.0.1 for the redirect: {err}"))?;
        let port = listener
            .local_addr()
            .map_err(|err| format!("cannot read the loopback port: {err}"))?
            .port();
        Ok(Loopback {
            listener,
            redirect_uri: format!("http://127.0.0.1:{port}{CALLBACK_PATH}"),
        })
    }

    /// Waits for the redirect carrying `state` and returns its `code`. Other
    /// requests (a favicon, a stray visitor) get a 404 and are ignored; a
    /// redirect with the wrong `state` is refused.
    pub async fn wait_for_code(&self, state: &str, timeout: Duration) -> Result<String, String> {
        let wait = async {
            loop {
                let Ok((stream, _)) = self.listener.accept().await else {
                    continue;
                };
                if let Some(result) = answer(stream, state).await {
                    return result;
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| "nobody came back from the provider in time".to_string())?
    }
}

/// Reads one request; `None` when it was not the callback.
async fn answer(mut stream: TcpStream, state: &str) -> Option<Result<String, String>> {
    let mut buffer = vec![0u8; 8192];
    let mut filled = 0;
    let head_end = loop {
        let read =
            tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer[filled..]))
                .await
                .ok()?
                .ok()?;
        if read == 0 {
            return None;
        }
        filled += read;
        if let Some(end) = buffer[..filled].windows(2).position(|w| w == b"\r\n") {
            break end;
        }
        if filled == buffer.len() {
            return None;
        }
    };
    let line = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let target = line.split(' ').nth(1).unwrap_or("");
    let url = url::Url::parse(&format!("http://127.0.0.1{target}")).ok()?;
    if url.path() != CALLBACK_PATH {
        respond(&mut stream, "404 Not Found", "Not found.").await;
        return None;
    }
    let param = |name: &str| {
        url.query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    };
    if param("state").as_deref() != Some(state) {
        respond(
            &mut stream,
            "400 Bad Request",
            "This sign-in does not belong to tokenctl's request (state mismatch).",
        )
        .await;
        return Some(Err(
            "the redirect's state does not match the request; nothing was signed in".into(),
        ));
    }
    if let Some(error) = param("error") {
        let description = param("error_description").unwrap_or_default();
        respond(
            &mut stream,
            "200 OK",
            "The sign-in failed; see the terminal.",
        )
        .await;
        return Some(Err(format!(
            "the provider refused the sign-in: {error} {description}"
        )));
    }
    let Some(code) = param("code") else {
        respond(&mut stream, "400 Bad Request", "No code in the redirect.").await;
        return Some(Err("the redirect carried no code".into()));
    };
    let page = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n{CLOSE_PAGE}",
        CLOSE_PAGE.len()
    );
    let _ = stream.write_all(page.as_bytes()).await;
    let _ = stream.shutdown().await;
    Some(Ok(code))
}

async fn respond(stream: &mut TcpStream, status: &str, text: &str) {
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    let _ = stream.write_all(reply.as_bytes()).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_challenge_is_the_s256_of_the_verifier() {
        // RFC 7636 appendix B.
        let rfc = Pkce::from_verifier("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk".into());
        assert_eq!(rfc.challenge, "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM");
        let pkce = Pkce::new();
        assert_eq!(pkce.verifier.len(), 43);
        assert_ne!(pkce.verifier, pkce.challenge);
    }
}
