//! The identity-provider client: the only module that speaks HTTP to
//! providers. It builds refresh requests, reads discovery documents, and
//! turns every answer, however odd, into one [`Answer`].
//!
//! Classification goes by the OAuth `error` code and the HTTP status, never by
//! the wording of `error_description`: providers word the same failure in
//! many ways ("Token is not active", "Stale token", "refresh token expired").

use std::time::{Duration, SystemTime};

use reqwest::header::{ACCEPT, CONTENT_TYPE, DATE, RETRY_AFTER};
use serde::Deserialize;
use serde_json::Value;
use token_agent_proto::{answer, ClientAuth, ProviderError, Secret};

use crate::store::ClientConfig;

/// A successful token answer. Lifetimes are as the provider sent them;
/// deadlines are worked out by the caller from the time of receipt.
#[derive(Debug)]
pub struct TokenAnswer {
    pub access_token: Secret,
    /// Lowercased; `bearer` is the one type the agent serves.
    pub token_type: String,
    pub expires_in: Option<i64>,
    pub refresh_token: Option<Secret>,
    /// Keycloak's `refresh_expires_in`, GitHub's `refresh_token_expires_in`.
    /// Zero means the refresh token does not expire.
    pub refresh_expires_in: Option<i64>,
}

/// How a refresh went, as far as the provider's answer tells.
#[derive(Debug)]
pub enum Answer {
    Tokens(TokenAnswer),
    /// The refresh token is dead: expired, revoked, reused or superseded.
    /// Only a new sign-in helps.
    NeedsSignIn(ProviderError),
    /// The client is refused (`invalid_client`, `unauthorized_client`,
    /// `unsupported_grant_type`); the refresh token may still be good.
    ClientRejected(ProviderError),
    /// Worth retrying later: the network, the provider's health, garbage.
    Transient(Transient),
}

#[derive(Debug)]
pub struct Transient {
    /// For an operator: status, content type, a cleaned excerpt. No token.
    pub reason: String,
    /// The provider's `Retry-After`, when it sent one.
    pub retry_after: Option<Duration>,
}

impl Transient {
    fn new(reason: impl Into<String>) -> Self {
        Transient {
            reason: reason.into(),
            retry_after: None,
        }
    }
}

/// What an HTTP exchange produced, for [`classify`].
pub struct RawAnswer<'a> {
    pub status: u16,
    pub content_type: Option<&'a str>,
    pub retry_after: Option<&'a str>,
    pub body: &'a [u8],
}

pub struct Provider {
    http: reqwest::Client,
}

impl Provider {
    pub fn new(timeout: Duration) -> anyhow::Result<Provider> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("token-agent/", env!("CARGO_PKG_VERSION")))
            // A token endpoint that redirects is misconfigured; following
            // it could send the refresh token somewhere unexpected.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Provider { http })
    }

    /// Reads the endpoints the agent uses from the issuer's discovery
    /// document.
    pub async fn discover(&self, issuer: &str) -> Result<Endpoints, String> {
        #[derive(Deserialize)]
        struct Discovery {
            token_endpoint: String,
            revocation_endpoint: Option<String>,
        }

        let url = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let response = self
            .http
            .get(&url)
            .header(ACCEPT, "application/json")
            .send()
            .await
            .map_err(|err| format!("cannot fetch {url}: {}", describe_http_error(&err)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("{url} answered HTTP {}", status.as_u16()));
        }
        let body = response
            .bytes()
            .await
            .map_err(|err| format!("cannot read {url}: {}", describe_http_error(&err)))?;
        let discovery: Discovery = serde_json::from_slice(&body)
            .map_err(|err| format!("{url} is not a discovery document: {err}"))?;
        for endpoint in
            std::iter::once(&discovery.token_endpoint).chain(&discovery.revocation_endpoint)
        {
            url::Url::parse(endpoint)
                .map_err(|err| format!("{url} names an endpoint that is not a URL: {err}"))?;
        }
        Ok(Endpoints {
            token_endpoint: discovery.token_endpoint,
            revocation_endpoint: discovery.revocation_endpoint,
        })
    }

    /// Revokes a refresh token (RFC 7009). Any 2xx counts: the RFC has the
    /// provider answer 200 for tokens it no longer knows, too.
    pub async fn revoke(
        &self,
        client: &ClientConfig,
        refresh_token: &Secret,
    ) -> Result<(), String> {
        let Some(endpoint) = &client.revocation_endpoint else {
            return Err("the provider has no revocation endpoint".into());
        };
        let form = vec![
            ("token", refresh_token.expose()),
            ("token_type_hint", "refresh_token"),
        ];
        let request = self.http.post(endpoint).header(ACCEPT, "application/json");
        let response = authenticate(request, form, client)
            .send()
            .await
            .map_err(|err| describe_http_error(&err))?;
        match response.status().as_u16() {
            200..=299 => Ok(()),
            status => Err(format!("the revocation endpoint answered HTTP {status}")),
        }
    }

    /// Presents `refresh_token` once and classifies the answer. Network
    /// failures come back as [`Answer::Transient`]; the caller decides what
    /// the answer means for the session.
    ///
    /// The session's scopes go along when it has any: Microsoft Entra
    /// requires `scope` on every refresh, and other providers take the
    /// granted scopes as a no-op narrowing.
    pub async fn refresh(&self, client: &ClientConfig, refresh_token: &Secret) -> Answered {
        self.refresh_narrowed(client, refresh_token, &[], None)
            .await
    }

    /// Like [`Provider::refresh`], asking for a down-scoped access token:
    /// `scope` (when not empty) in place of the session's scopes, and an
    /// `audience`. An audience that is an absolute URI goes out as RFC 8707
    /// `resource`; any other as `audience` (Auth0, Okta, Keycloak style).
    pub async fn refresh_narrowed(
        &self,
        client: &ClientConfig,
        refresh_token: &Secret,
        scope: &[String],
        audience: Option<&str>,
    ) -> Answered {
        let form: Vec<(&str, &str)> = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token.expose()),
        ];
        self.token_request(client, form, scope, audience).await
    }

    /// Asks for a new access token with the client's own credentials
    /// (`grant_type=client_credentials`): a service account has no refresh
    /// token. Classified like a refresh answer.
    pub async fn client_credentials(&self, client: &ClientConfig) -> Answered {
        let form: Vec<(&str, &str)> = vec![("grant_type", "client_credentials")];
        self.token_request(client, form, &[], None).await
    }

    /// Sends one token request: `form` plus the scope (the session's unless
    /// narrowed), the audience and the client's authentication.
    async fn token_request(
        &self,
        client: &ClientConfig,
        mut form: Vec<(&str, &str)>,
        scope: &[String],
        audience: Option<&str>,
    ) -> Answered {
        let scope = if scope.is_empty() {
            client.scopes.join(" ")
        } else {
            scope.join(" ")
        };
        if !scope.is_empty() {
            form.push(("scope", &scope));
        }
        if let Some(audience) = audience {
            form.push((audience_parameter(audience), audience));
        }

        // GitHub answers form-encoded text unless JSON is asked for.
        let request = self
            .http
            .post(&client.token_endpoint)
            .header(ACCEPT, "application/json");

        let started = SystemTime::now();
        let result = authenticate(request, form, client).send().await;
        let response = match result {
            Ok(response) => response,
            Err(err) => {
                return Answered {
                    answer: Answer::Transient(Transient::new(describe_http_error(&err))),
                    received_at: SystemTime::now(),
                    server_date: None,
                    took: started.elapsed().unwrap_or_default(),
                }
            }
        };

        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
        let server_date = header(DATE).and_then(|d| httpdate::parse_http_date(d).ok());
        let body = response.bytes().await;
        let received_at = SystemTime::now();
        let took = started.elapsed().unwrap_or_default();

        let answer = match body {
            Ok(body) => classify(&RawAnswer {
                status,
                content_type: header(CONTENT_TYPE),
                retry_after: header(RETRY_AFTER),
                body: &body,
            }),
            Err(err) => Answer::Transient(Transient::new(format!(
                "HTTP {status}, body cut off: {}",
                describe_http_error(&err)
            ))),
        };
        Answered {
            answer,
            received_at,
            server_date,
            took,
        }
    }
}

/// An answer with the facts about its arrival.
#[derive(Debug)]
pub struct Answered {
    pub answer: Answer,
    /// Local time the answer was read; deadlines count from here.
    pub received_at: SystemTime,
    /// The provider's `Date` header, for spotting clock skew.
    pub server_date: Option<SystemTime>,
    pub took: Duration,
}

/// The endpoints a session uses, from discovery or given by hand.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub token_endpoint: String,
    pub revocation_endpoint: Option<String>,
}

/// Adds the client's authentication to a form request, the way the client
/// is registered: HTTP Basic, secret in the body, or a public client's id.
fn authenticate<'a>(
    request: reqwest::RequestBuilder,
    mut form: Vec<(&'a str, &'a str)>,
    client: &'a ClientConfig,
) -> reqwest::RequestBuilder {
    let request = match (client.client_auth, &client.client_secret) {
        (ClientAuth::Basic, Some(secret)) => request.basic_auth(
            form_encode(&client.client_id),
            Some(form_encode(secret.expose())),
        ),
        (ClientAuth::Post, Some(secret)) => {
            form.push(("client_id", &client.client_id));
            form.push(("client_secret", secret.expose()));
            request
        }
        _ => {
            form.push(("client_id", &client.client_id));
            request
        }
    };
    request.form(&form)
}

/// RFC 6749 2.3.1: Basic credentials are form-encoded before base64.
fn form_encode(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// A reqwest error in words, without the URL's query (none is sent) and
/// without any body.
fn describe_http_error(err: &reqwest::Error) -> String {
    let kind = if err.is_timeout() {
        "timed out"
    } else if err.is_connect() {
        "connection failed"
    } else if err.is_body() || err.is_decode() {
        "answer cut off"
    } else {
        "request failed"
    };
    let mut detail = String::new();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        detail = cause.to_string();
        source = cause.source();
    }
    if detail.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}: {detail}")
    }
}

/// RFC 8707 `resource` wants an absolute URI; anything else is an
/// audience name for the providers that take `audience`.
pub fn audience_parameter(audience: &str) -> &'static str {
    match url::Url::parse(audience) {
        Ok(url) if !url.cannot_be_a_base() => "resource",
        _ => "audience",
    }
}

/// Turns one HTTP answer into an [`Answer`]. Pure, so every odd answer a
/// provider or proxy can give is tested directly.
pub fn classify(raw: &RawAnswer<'_>) -> Answer {
    let fields = answer::fields(raw.content_type, raw.body);

    // An `error` member decides, whatever the status: GitHub reports a dead
    // refresh token inside an HTTP 200.
    if let Some(fields) = &fields {
        if let Some(error) = answer::text(fields, "error") {
            let provider_error = ProviderError {
                error: error.clone(),
                description: answer::text(fields, "error_description"),
                codes: provider_codes(fields),
            };
            return classify_error_code(raw, provider_error);
        }
    }

    if raw.status == 429 || raw.status == 408 || raw.status >= 500 {
        return Answer::Transient(Transient {
            reason: describe_unexpected(raw),
            retry_after: parse_retry_after(raw.retry_after),
        });
    }
    if !(200..300).contains(&raw.status) {
        return Answer::Transient(Transient::new(describe_unexpected(raw)));
    }

    let Some(fields) = fields else {
        return Answer::Transient(Transient::new(describe_unexpected(raw)));
    };
    match token_answer(&fields) {
        Some(tokens) => Answer::Tokens(tokens),
        None => Answer::Transient(Transient::new(format!(
            "HTTP {} without an access_token: not a token answer",
            raw.status
        ))),
    }
}

fn classify_error_code(raw: &RawAnswer<'_>, error: ProviderError) -> Answer {
    match error.error.as_str() {
        "invalid_client" | "unauthorized_client" | "unsupported_grant_type" => {
            Answer::ClientRejected(error)
        }
        // RFC 6749 lets a provider say it is busy or broken in a proper
        // error body; that is a passing state, not a verdict on the token.
        "temporarily_unavailable" | "server_error" | "slow_down" => Answer::Transient(Transient {
            reason: format!("HTTP {}: provider said {}", raw.status, error.error),
            retry_after: parse_retry_after(raw.retry_after),
        }),
        // invalid_grant in all its wordings, GitHub's bad_refresh_token,
        // invalid_token, invalid_request ("claimed by another client"),
        // invalid_scope and anything else a provider states plainly: the
        // refresh token will not work again as it is.
        _ => Answer::NeedsSignIn(error),
    }
}

/// Microsoft's `error_codes` and `suberror`, as text.
fn provider_codes(fields: &serde_json::Map<String, Value>) -> Vec<String> {
    let mut codes: Vec<String> = match fields.get("error_codes") {
        Some(Value::Array(list)) => list
            .iter()
            .filter_map(|code| match code {
                Value::Number(n) => Some(n.to_string()),
                Value::String(s) => Some(s.clone()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    codes.extend(answer::text(fields, "suberror"));
    codes
}

fn token_answer(fields: &serde_json::Map<String, Value>) -> Option<TokenAnswer> {
    let access_token = answer::text(fields, "access_token")?;
    Some(TokenAnswer {
        access_token: Secret::new(access_token),
        // RFC 6749 requires token_type; lenient providers omit it and mean
        // Bearer.
        token_type: answer::text(fields, "token_type")
            .unwrap_or_else(|| "bearer".into())
            .to_ascii_lowercase(),
        expires_in: answer::seconds(fields, "expires_in"),
        refresh_token: answer::text(fields, "refresh_token").map(Secret::new),
        refresh_expires_in: answer::seconds(fields, "refresh_expires_in")
            .or_else(|| answer::seconds(fields, "refresh_token_expires_in")),
    })
}

/// `Retry-After` as seconds or as an HTTP date.
fn parse_retry_after(value: Option<&str>) -> Option<Duration> {
    let value = value?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or_default())
}

/// "HTTP 502 (text/html): 502 Bad Gateway" — enough for an operator to see
/// which proxy or page answered. Bodies that look like JSON are never
/// quoted, since a malformed token answer could still carry a token.
fn describe_unexpected(raw: &RawAnswer<'_>) -> String {
    let content_type = raw.content_type.unwrap_or("no content type");
    let looks_like_json = raw.body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    if raw.body.is_empty() {
        return format!("HTTP {} ({content_type}), empty body", raw.status);
    }
    if looks_like_json {
        return format!("HTTP {} ({content_type}), unexpected JSON", raw.status);
    }
    format!(
        "HTTP {} ({content_type}): {}",
        raw.status,
        body_excerpt(raw.body)
    )
}

/// The visible text of a body, tags and control characters dropped, long
/// token-like words masked, cut to 80 characters.
fn body_excerpt(body: &[u8]) -> String {
    let text = visible_text(body);
    let words: Vec<String> = text.split(' ').map(mask_token_like).collect();
    let mut out = words.join(" ");
    if out.chars().count() > 80 {
        out = out.chars().take(80).collect::<String>() + "…";
    }
    out
}

/// A proxy's error page may echo the request, refresh token included: any
/// long unbroken run of token characters is replaced.
fn mask_token_like(word: &str) -> String {
    let is_token_char = |c: char| c.is_ascii_alphanumeric() || "-_.~+/=".contains(c);
    if word.len() >= 20 && word.chars().all(is_token_char) {
        "[redacted]".into()
    } else {
        word.to_string()
    }
}

fn visible_text(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(4096)]);
    let mut out = String::new();
    let mut in_tag = false;
    let mut last_space = true;
    for c in text.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            _ if in_tag => {}
            c if c.is_whitespace() || c.is_control() => {
                if !last_space {
                    out.push(' ');
                    last_space = true;
                }
            }
            c => {
                out.push(c);
                last_space = false;
            }
        }
        if out.len() >= 1024 {
            break;
        }
    }
    out.trim().to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_audience_uri_is_a_resource_and_a_name_an_audience() {
        assert_eq!(audience_parameter("https://api.example/v1"), "resource");
        assert_eq!(audience_parameter("urn:example:api"), "audience");
        assert_eq!(audience_parameter("api://default"), "resource");
        assert_eq!(audience_parameter("billing"), "audience");
    }

    use super::*;

    fn answer(status: u16, content_type: &str, body: &str) -> Answer {
        classify(&RawAnswer {
            status,
            content_type: Some(content_type),
            retry_after: None,
            body: body.as_bytes(),
        })
    }

    const JSON: &str = "application/json";

    #[test]
    fn a_plain_success_is_read_in_full() {
        let Answer::Tokens(t) = answer(
            200,
            JSON,
            r#"{"access_token":"at-2","token_type":"Bearer","expires_in":300,"refresh_token":"rt-2","refresh_expires_in":1800}"#,
        ) else {
            panic!("not a success")
        };
        assert_eq!(t.access_token.expose(), "at-2");
        assert_eq!(t.token_type, "bearer");
        assert_eq!(t.expires_in, Some(300));
        assert_eq!(t.refresh_token.unwrap().expose(), "rt-2");
        assert_eq!(t.refresh_expires_in, Some(1800));
    }

    #[test]
    fn http_200_with_error_body_is_treated_as_failed_refresh() {
        let body = r#"{"error":"bad_refresh_token","error_description":"incorrect or expired","error_uri":"https://docs.example/x"}"#;
        match answer(200, JSON, body) {
            Answer::NeedsSignIn(e) => assert_eq!(e.error, "bad_refresh_token"),
            other => panic!("classified as {other:?}"),
        }
    }

    #[test]
    fn a_form_encoded_answer_is_parsed() {
        let body = "access_token=ghu_fake2&expires_in=28800&refresh_token=ghr_fake2&refresh_token_expires_in=15811200&scope=&token_type=bearer";
        let Answer::Tokens(t) = answer(
            200,
            "application/x-www-form-urlencoded; charset=utf-8",
            body,
        ) else {
            panic!("not a success")
        };
        assert_eq!(t.expires_in, Some(28800));
        assert_eq!(t.refresh_expires_in, Some(15811200));
        assert_eq!(t.refresh_token.unwrap().expose(), "ghr_fake2");
    }

    #[test]
    fn expires_in_may_be_a_string_and_token_type_any_case() {
        let Answer::Tokens(t) = answer(
            200,
            JSON,
            r#"{"access_token":"a","token_type":"BEARER","expires_in":"3600"}"#,
        ) else {
            panic!("not a success")
        };
        assert_eq!(t.expires_in, Some(3600));
        assert_eq!(t.token_type, "bearer");
        assert!(t.refresh_token.is_none());
    }

    #[test]
    fn every_invalid_grant_wording_needs_sign_in() {
        for description in [
            "Token is not active",
            "Stale token",
            "Session not active",
            "Maximum allowed refresh token reuse exceeded",
            "AADSTS700082: refresh token expired due to inactivity",
        ] {
            let body =
                format!(r#"{{"error":"invalid_grant","error_description":"{description}"}}"#);
            assert!(matches!(answer(400, JSON, &body), Answer::NeedsSignIn(_)));
        }
        let entra = r#"{"error":"invalid_grant","error_description":"AADSTS700082: expired","error_codes":[700082],"suberror":"bad_token"}"#;
        match answer(400, JSON, entra) {
            Answer::NeedsSignIn(e) => assert_eq!(e.codes, ["700082", "bad_token"]),
            other => panic!("classified as {other:?}"),
        }
        let superseded = r#"{"error":"invalid_request","error_description":"Refresh token is invalid or has already been claimed by another client."}"#;
        assert!(matches!(
            answer(400, JSON, superseded),
            Answer::NeedsSignIn(_)
        ));
        let not_found =
            r#"{"error":"invalid_token","error_description":"refresh token not found"}"#;
        assert!(matches!(
            answer(401, JSON, not_found),
            Answer::NeedsSignIn(_)
        ));
    }

    #[test]
    fn client_errors_blame_the_client_not_the_token() {
        for code in [
            "invalid_client",
            "unauthorized_client",
            "unsupported_grant_type",
        ] {
            let body = format!(r#"{{"error":"{code}"}}"#);
            assert!(matches!(
                answer(401, JSON, &body),
                Answer::ClientRejected(_)
            ));
        }
    }

    #[test]
    fn outages_and_garbage_are_transient() {
        let cases = [
            (503, JSON, r#"{"error":"temporarily_unavailable"}"#),
            (
                502,
                "text/html",
                "<html><body><h1>502 Bad Gateway</h1></body></html>",
            ),
            (200, "text/html", "<html>login to Wi-Fi</html>"),
            (500, "text/plain", ""),
            (200, JSON, "not json"),
            (200, JSON, r#"{"token_type":"Bearer","expires_in":300}"#),
            (404, "text/html", "<h1>Not Found</h1>"),
        ];
        for (status, content_type, body) in cases {
            assert!(
                matches!(answer(status, content_type, body), Answer::Transient(_)),
                "{status} {content_type} {body}"
            );
        }
    }

    #[test]
    fn the_reason_names_status_and_content_type_and_quotes_no_json() {
        let Answer::Transient(t) = answer(
            502,
            "text/html",
            "<html><body><h1>502 Bad Gateway</h1></body></html>",
        ) else {
            panic!()
        };
        assert_eq!(t.reason, "HTTP 502 (text/html): 502 Bad Gateway");

        let Answer::Transient(t) = answer(200, JSON, r#"{"refresh_token":"rt-secret"}"#) else {
            panic!()
        };
        assert!(!t.reason.contains("rt-secret"));
    }

    #[test]
    fn an_error_page_echoing_a_token_does_not_reach_the_reason() {
        let page = "<html><body>Bad request: refresh_token=eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1In0.c2ln</body></html>";
        let Answer::Transient(t) = answer(400, "text/html", page) else {
            panic!()
        };
        assert!(!t.reason.contains("eyJhbGciOiJSUzI1NiJ9"), "{}", t.reason);
        assert!(t.reason.contains("[redacted]"));
    }

    #[test]
    fn retry_after_is_read_as_seconds_or_a_date() {
        let rate_limited = classify(&RawAnswer {
            status: 429,
            content_type: None,
            retry_after: Some("120"),
            body: b"",
        });
        let Answer::Transient(t) = rate_limited else {
            panic!()
        };
        assert_eq!(t.retry_after, Some(Duration::from_secs(120)));

        let later = SystemTime::now() + Duration::from_secs(600);
        let date = httpdate::fmt_http_date(later);
        let waited = parse_retry_after(Some(&date)).unwrap();
        assert!(waited > Duration::from_secs(590) && waited <= Duration::from_secs(600));
    }
}
