//! The provider calls `tokenctl login` makes: discovery, the token
//! endpoint (authorization code, device code, client credentials), device
//! authorization (RFC 8628) with its polling rules, and userinfo.
//!
//! Answers are read leniently, the way the agent reads refresh answers:
//! JSON or form-encoded bodies (GitHub without `Accept: application/json`),
//! `expires_in` as a number or a numeric string (Microsoft Entra), and
//! Keycloak's `refresh_expires_in` or GitHub's `refresh_token_expires_in`.
//! That leniency is why this is a few small functions on reqwest instead of
//! the `oauth2` crate, whose typed answers refuse a string `expires_in` and
//! which needs another reqwest major than the agent's.

use std::future::Future;
use std::time::{Duration, Instant};

use reqwest::header::ACCEPT;
use serde_json::{Map, Value};
use token_agent_client::proto::{answer, ClientAuth, Secret};

/// What discovery (or the flags standing in for it) says about a provider.
#[derive(Debug, Clone, Default)]
pub struct Endpoints {
    pub token_endpoint: Option<String>,
    pub authorization_endpoint: Option<String>,
    pub device_authorization_endpoint: Option<String>,
    pub revocation_endpoint: Option<String>,
    pub userinfo_endpoint: Option<String>,
    pub scopes_supported: Vec<String>,
    pub token_endpoint_auth_methods_supported: Vec<String>,
}

/// The client as registered at the provider.
#[derive(Debug, Clone)]
pub struct OAuthClient {
    pub client_id: String,
    pub client_secret: Option<Secret>,
    pub client_auth: ClientAuth,
}

/// A successful token answer.
#[derive(Debug)]
pub struct Tokens {
    pub access_token: Secret,
    pub token_type: String,
    pub expires_in: Option<u64>,
    pub refresh_token: Option<Secret>,
    pub refresh_expires_in: Option<u64>,
    /// The ID token, read for display only.
    pub id_token: Option<Secret>,
    /// The scopes granted, when the provider says.
    pub scope: Option<String>,
}

/// A failed token or device request.
#[derive(Debug)]
pub enum OAuthError {
    /// The provider answered with an OAuth `error`.
    Provider {
        error: String,
        description: Option<String>,
    },
    /// Network trouble, HTTP errors without an OAuth error, garbage.
    Transport(String),
}

impl std::fmt::Display for OAuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OAuthError::Provider {
                error,
                description: Some(description),
            } => write!(f, "{error}: {description}"),
            OAuthError::Provider { error, .. } => f.write_str(error),
            OAuthError::Transport(why) => f.write_str(why),
        }
    }
}

pub fn http_client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .connect_timeout(Duration::from_secs(10))
        .user_agent(concat!("tokenctl/", env!("CARGO_PKG_VERSION")))
        // A token endpoint that redirects is misconfigured; following it
        // could send a code or secret somewhere unexpected.
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|err| format!("cannot set up HTTPS: {err}"))
}

/// Reads `{issuer}/.well-known/openid-configuration`.
pub async fn discover(http: &reqwest::Client, issuer: &str) -> Result<Endpoints, String> {
    let url = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    let response = http
        .get(&url)
        .header(ACCEPT, "application/json")
        .send()
        .await
        .map_err(|err| format!("cannot fetch {url}: {err}"))?;
    let status = response.status().as_u16();
    if status != 200 {
        return Err(format!("{url} answered HTTP {status}"));
    }
    let body = response
        .bytes()
        .await
        .map_err(|err| format!("cannot read {url}: {err}"))?;
    let Ok(Value::Object(doc)) = serde_json::from_slice::<Value>(&body) else {
        return Err(format!("{url} is not a discovery document"));
    };
    let text = |name: &str| doc.get(name).and_then(Value::as_str).map(String::from);
    let list = |name: &str| -> Vec<String> {
        doc.get(name)
            .and_then(Value::as_array)
            .map(|items| {
                items
                    .iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    Ok(Endpoints {
        token_endpoint: text("token_endpoint"),
        authorization_endpoint: text("authorization_endpoint"),
        device_authorization_endpoint: text("device_authorization_endpoint"),
        revocation_endpoint: text("revocation_endpoint"),
        userinfo_endpoint: text("userinfo_endpoint"),
        scopes_supported: list("scopes_supported"),
        token_endpoint_auth_methods_supported: list("token_endpoint_auth_methods_supported"),
    })
}

/// POSTs a form with the client's authentication and returns the answer's
/// fields, or the provider's OAuth error.
async fn post_form(
    http: &reqwest::Client,
    endpoint: &str,
    client: &OAuthClient,
    mut form: Vec<(&str, &str)>,
) -> Result<Map<String, Value>, OAuthError> {
    // GitHub answers form-encoded text unless JSON is asked for.
    let mut request = http.post(endpoint).header(ACCEPT, "application/json");
    match (client.client_auth, &client.client_secret) {
        (ClientAuth::Basic, Some(secret)) => {
            request = request.basic_auth(
                form_encode(&client.client_id),
                Some(form_encode(secret.expose())),
            );
        }
        (ClientAuth::Post, Some(secret)) => {
            form.push(("client_id", &client.client_id));
            form.push(("client_secret", secret.expose()));
        }
        _ => form.push(("client_id", &client.client_id)),
    }
    let response = request
        .form(&form)
        .send()
        .await
        .map_err(|err| OAuthError::Transport(format!("cannot reach {endpoint}: {err}")))?;
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let body = response
        .bytes()
        .await
        .map_err(|err| OAuthError::Transport(format!("answer from {endpoint} cut off: {err}")))?;
    let fields = answer::fields(content_type.as_deref(), &body);
    if let Some(error) = fields.as_ref().and_then(|f| text(f, "error")) {
        return Err(OAuthError::Provider {
            error,
            description: fields.as_ref().and_then(|f| text(f, "error_description")),
        });
    }
    match fields {
        Some(fields) if (200..300).contains(&status) => Ok(fields),
        _ => Err(OAuthError::Transport(format!(
            "{endpoint} answered HTTP {status} ({}) without an OAuth answer",
            content_type.as_deref().unwrap_or("no content type")
        ))),
    }
}

/// One token request (`grant_type` and its parameters in `form`).
pub async fn token_request(
    http: &reqwest::Client,
    endpoint: &str,
    client: &OAuthClient,
    form: Vec<(&str, &str)>,
) -> Result<Tokens, OAuthError> {
    let fields = post_form(http, endpoint, client, form).await?;
    token_answer(&fields).ok_or_else(|| {
        OAuthError::Transport(format!("{endpoint} answered without an access_token"))
    })
}

/// The answer to a device authorization request (RFC 8628 3.2).
#[derive(Debug)]
pub struct DeviceAuthorization {
    pub device_code: Secret,
    pub user_code: String,
    pub verification_uri: String,
    pub verification_uri_complete: Option<String>,
    pub expires_in: u64,
    pub interval: u64,
}

pub async fn device_authorization(
    http: &reqwest::Client,
    endpoint: &str,
    client: &OAuthClient,
    scope: &str,
) -> Result<DeviceAuthorization, OAuthError> {
    let mut form = Vec::new();
    if !scope.is_empty() {
        form.push(("scope", scope));
    }
    let fields = post_form(http, endpoint, client, form).await?;
    let missing = |what: &str| OAuthError::Transport(format!("{endpoint} gave no {what}"));
    Ok(DeviceAuthorization {
        device_code: Secret::new(
            text(&fields, "device_code").ok_or_else(|| missing("device_code"))?,
        ),
        user_code: text(&fields, "user_code").ok_or_else(|| missing("user_code"))?,
        // Google's older endpoint says verification_url.
        verification_uri: text(&fields, "verification_uri")
            .or_else(|| text(&fields, "verification_url"))
            .ok_or_else(|| missing("verification_uri"))?,
        verification_uri_complete: text(&fields, "verification_uri_complete"),
        expires_in: seconds(&fields, "expires_in").unwrap_or(600),
        // RFC 8628 3.2: 5 seconds when the provider says nothing.
        interval: seconds(&fields, "interval").filter(|&s| s > 0).unwrap_or(5),
    })
}

/// How polling the token endpoint for a device code ended badly.
#[derive(Debug)]
pub enum DeviceError {
    /// `expired_token`, or the code's `expires_in` ran out.
    Expired,
    /// `access_denied`: the user refused.
    Denied,
    /// Any other answer the RFC makes final.
    Failed(OAuthError),
}

impl std::fmt::Display for DeviceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceError::Expired => f.write_str(
                "the code expired before the sign-in was finished; run `tokenctl login` again",
            ),
            DeviceError::Denied => f.write_str("the sign-in was refused at the provider"),
            DeviceError::Failed(err) => write!(f, "the provider refused the device code ({err})"),
        }
    }
}

/// The RFC 8628 3.5 polling loop. `sleep` waits between polls (and may draw
/// a spinner); `interval` is the provider's, in seconds. `authorization_pending`
/// polls again after `interval`; `slow_down` adds 5 s to it for this and
/// every later poll; `expired_token` and `access_denied` end the loop;
/// transport trouble is retried at the interval until the code expires.
pub async fn poll_device<S, F>(
    http: &reqwest::Client,
    endpoint: &str,
    client: &OAuthClient,
    device: &DeviceAuthorization,
    mut sleep: S,
) -> Result<Tokens, DeviceError>
where
    S: FnMut(Duration, Instant) -> F,
    F: Future<Output = ()>,
{
    let lifetime = Duration::from_secs(device.expires_in);
    let deadline = Instant::now() + lifetime;
    let mut interval = Duration::from_secs(device.interval);
    // The waits asked for, beside the clock: a poll that cannot come before
    // the code expires is not made, whichever runs out first.
    let mut waited = Duration::ZERO;
    loop {
        if waited + interval > lifetime || Instant::now() + interval > deadline {
            return Err(DeviceError::Expired);
        }
        sleep(interval, deadline).await;
        waited += interval;
        let form = vec![
            ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
            ("device_code", device.device_code.expose()),
        ];
        match token_request(http, endpoint, client, form).await {
            Ok(tokens) => return Ok(tokens),
            Err(OAuthError::Provider { error, description }) => match error.as_str() {
                "authorization_pending" => {}
                "slow_down" => interval += Duration::from_secs(5),
                "expired_token" => return Err(DeviceError::Expired),
                "access_denied" => return Err(DeviceError::Denied),
                _ => {
                    return Err(DeviceError::Failed(OAuthError::Provider {
                        error,
                        description,
                    }))
                }
            },
            Err(OAuthError::Transport(_)) => {}
        }
    }
}

/// `sub`, `preferred_username` and `email` from the userinfo endpoint.
pub async fn userinfo(
    http: &reqwest::Client,
    endpoint: &str,
    access_token: &Secret,
) -> Option<Map<String, Value>> {
    let response = http
        .get(endpoint)
        .header(ACCEPT, "application/json")
        .bearer_auth(access_token.expose())
        .send()
        .await
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    let body = response.bytes().await.ok()?;
    match serde_json::from_slice(&body) {
        Ok(Value::Object(fields)) => Some(fields),
        _ => None,
    }
}

fn token_answer(fields: &Map<String, Value>) -> Option<Tokens> {
    Some(Tokens {
        access_token: Secret::new(text(fields, "access_token")?),
        token_type: text(fields, "token_type")
            .unwrap_or_else(|| "bearer".into())
            .to_ascii_lowercase(),
        expires_in: seconds(fields, "expires_in"),
        refresh_token: text(fields, "refresh_token").map(Secret::new),
        refresh_expires_in: seconds(fields, "refresh_expires_in")
            .or_else(|| seconds(fields, "refresh_token_expires_in")),
        id_token: text(fields, "id_token").map(Secret::new),
        scope: text(fields, "scope"),
    })
}

pub use token_agent_client::proto::answer::text;

/// A lifetime in seconds; a negative one reads as absent.
fn seconds(fields: &Map<String, Value>, name: &str) -> Option<u64> {
    answer::seconds(fields, name).and_then(|s| u64::try_from(s).ok())
}

/// RFC 6749 2.3.1: Basic credentials are form-encoded before base64.
fn form_encode(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    /// A token endpoint answering a script of (content type, body) pairs,
    /// one per request, recording each request's head and body.
    struct FakeEndpoint {
        url: String,
        seen: Arc<Mutex<Vec<String>>>,
    }

    fn fake(script: Vec<(&'static str, String)>) -> FakeEndpoint {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        std::thread::spawn(move || {
            for (content_type, body) in script {
                let Ok((mut stream, _)) = listener.accept() else {
                    return;
                };
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                // Head, then as much body as Content-Length says.
                loop {
                    let n = stream.read(&mut buf).unwrap_or(0);
                    request.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&request).to_string();
                    if let Some((head, rest)) = text.split_once("\r\n\r\n") {
                        let length = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if rest.len() >= length {
                            break;
                        }
                    }
                    if n == 0 {
                        break;
                    }
                }
                record
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&request).into_owned());
                let status = if body.contains("\"error\"") {
                    "400 Bad Request"
                } else {
                    "200 OK"
                };
                let answer = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes());
            }
        });
        FakeEndpoint { url, seen }
    }

    fn error(code: &str) -> (&'static str, String) {
        ("application/json", format!(r#"{{"error":"{code}"}}"#))
    }

    fn tokens() -> (&'static str, String) {
        (
            "application/json",
            r#"{"access_token":"at","token_type":"Bearer","expires_in":300,"refresh_token":"rt"}"#
                .into(),
        )
    }

    fn public_client() -> OAuthClient {
        OAuthClient {
            client_id: "cli".into(),
            client_secret: None,
            client_auth: ClientAuth::None,
        }
    }

    fn device(interval: u64, expires_in: u64) -> DeviceAuthorization {
        DeviceAuthorization {
            device_code: Secret::new("dc"),
            user_code: "ABCD-EFGH".into(),
            verification_uri: "https://id.example/device".into(),
            verification_uri_complete: None,
            expires_in,
            interval,
        }
    }

    /// Polls `endpoint` with sleeps that return at once, recording the
    /// waits asked for.
    fn poll(
        endpoint: &FakeEndpoint,
        device: DeviceAuthorization,
    ) -> (Result<Tokens, DeviceError>, Vec<u64>) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let http = http_client().unwrap();
        let waits = Arc::new(Mutex::new(Vec::new()));
        let record = waits.clone();
        let result = runtime.block_on(poll_device(
            &http,
            &endpoint.url,
            &public_client(),
            &device,
            move |wait, _| {
                record.lock().unwrap().push(wait.as_secs());
                std::future::ready(())
            },
        ));
        let waits = waits.lock().unwrap().clone();
        (result, waits)
    }

    #[test]
    fn authorization_pending_polls_again_at_the_interval() {
        let endpoint = fake(vec![
            error("authorization_pending"),
            error("authorization_pending"),
            tokens(),
        ]);
        let (result, waits) = poll(&endpoint, device(2, 600));
        assert_eq!(result.unwrap().access_token.expose(), "at");
        assert_eq!(waits, [2, 2, 2]);
        let seen = endpoint.seen.lock().unwrap();
        assert!(seen.iter().all(|r| r
            .contains("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Adevice_code")
            && r.contains("device_code=dc")
            && r.contains("client_id=cli")));
    }

    #[test]
    fn slow_down_adds_five_seconds_to_every_later_poll() {
        let endpoint = fake(vec![
            error("authorization_pending"),
            error("slow_down"),
            error("authorization_pending"),
            error("slow_down"),
            tokens(),
        ]);
        let (result, waits) = poll(&endpoint, device(1, 600));
        assert!(result.is_ok());
        assert_eq!(waits, [1, 1, 6, 6, 11]);
    }

    #[test]
    fn expired_token_ends_the_sign_in() {
        let endpoint = fake(vec![error("authorization_pending"), error("expired_token")]);
        let (result, waits) = poll(&endpoint, device(1, 600));
        assert!(matches!(result, Err(DeviceError::Expired)));
        assert_eq!(waits.len(), 2);
    }

    #[test]
    fn access_denied_ends_the_sign_in() {
        let endpoint = fake(vec![error("access_denied")]);
        let (result, _) = poll(&endpoint, device(1, 600));
        let err = result.unwrap_err();
        assert!(matches!(err, DeviceError::Denied));
        assert!(err.to_string().contains("refused"));
    }

    #[test]
    fn polling_stops_when_the_code_runs_out_locally() {
        // Twelve seconds of life, five-second polls: two polls fit.
        let endpoint = fake(vec![
            error("authorization_pending"),
            error("authorization_pending"),
            error("authorization_pending"),
        ]);
        let (result, waits) = poll(&endpoint, device(5, 12));
        assert!(matches!(result, Err(DeviceError::Expired)));
        assert_eq!(waits, [5, 5]);
    }

    #[test]
    fn another_error_is_final_and_named() {
        let endpoint = fake(vec![error("invalid_client")]);
        let (result, _) = poll(&endpoint, device(1, 600));
        let err = result.unwrap_err();
        assert!(err.to_string().contains("invalid_client"), "{err}");
    }

    fn exchange(endpoint: &FakeEndpoint, client: &OAuthClient) -> Result<Tokens, OAuthError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let http = http_client().unwrap();
        runtime.block_on(token_request(
            &http,
            &endpoint.url,
            client,
            vec![("grant_type", "authorization_code"), ("code", "c")],
        ))
    }

    /// GitHub: no discovery, form-encoded answers unless JSON is asked for,
    /// and rotating refresh tokens with their own expiry.
    #[test]
    fn github_form_answers_and_refresh_token_expiry_are_read() {
        let endpoint = fake(vec![(
            "application/x-www-form-urlencoded; charset=utf-8",
            "access_token=ghu_x&expires_in=28800&refresh_token=ghr_x&refresh_token_expires_in=15811200&scope=&token_type=bearer".into(),
        )]);
        let tokens = exchange(&endpoint, &public_client()).unwrap();
        assert_eq!(tokens.expires_in, Some(28800));
        assert_eq!(tokens.refresh_expires_in, Some(15811200));
        assert_eq!(tokens.refresh_token.unwrap().expose(), "ghr_x");
        let seen = endpoint.seen.lock().unwrap();
        assert!(seen[0]
            .to_ascii_lowercase()
            .contains("accept: application/json"));
    }

    /// Entra (v1) sends `expires_in` as a string; Keycloak adds
    /// `refresh_expires_in`.
    #[test]
    fn string_lifetimes_and_keycloak_refresh_deadlines_are_read() {
        let endpoint = fake(vec![
            (
                "application/json",
                r#"{"access_token":"a","token_type":"Bearer","expires_in":"3599","refresh_token":"r"}"#.into(),
            ),
            (
                "application/json",
                r#"{"access_token":"a","token_type":"bearer","expires_in":300,"refresh_expires_in":1800,"refresh_token":"r"}"#.into(),
            ),
        ]);
        let entra = exchange(&endpoint, &public_client()).unwrap();
        assert_eq!(entra.expires_in, Some(3599));
        let keycloak = exchange(&endpoint, &public_client()).unwrap();
        assert_eq!(keycloak.refresh_expires_in, Some(1800));
    }

    #[test]
    fn client_secret_basic_and_post_are_sent_as_registered() {
        let endpoint = fake(vec![tokens(), tokens()]);
        let mut client = OAuthClient {
            client_id: "cli id".into(),
            client_secret: Some(Secret::new("s&cret")),
            client_auth: ClientAuth::Basic,
        };
        exchange(&endpoint, &client).unwrap();
        client.client_auth = ClientAuth::Post;
        exchange(&endpoint, &client).unwrap();
        let seen = endpoint.seen.lock().unwrap();
        // RFC 6749 2.3.1: form-encoded before base64: "cli+id:s%26cret".
        let basic = URL_SAFE_ENGINE.encode("cli+id:s%26cret");
        assert!(
            seen[0].contains(&format!("authorization: Basic {basic}"))
                || seen[0].contains(&format!("Authorization: Basic {basic}")),
            "{}",
            seen[0]
        );
        assert!(!seen[0].contains("client_secret="));
        assert!(seen[1].contains("client_secret=s%26cret") && seen[1].contains("client_id=cli+id"));
        assert!(!seen[1]
            .to_ascii_lowercase()
            .contains("authorization: basic"));
    }

    use base64::engine::general_purpose::STANDARD as URL_SAFE_ENGINE;
    use base64::Engine;
}
