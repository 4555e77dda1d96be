//! `tokenctl login`: signs in with the provider from the terminal and hands
//! the session to the agent with an `import`.
//!
//! The flows: device authorization (RFC 8628), authorization code with PKCE
//! through a loopback redirect (RFC 8252), and client credentials for
//! service accounts. This is the only part of `tokenctl` that builds an
//! async runtime or an HTTP client; `get` never comes here. tokenctl keeps
//! no token after the import and never refreshes by itself.

mod browser;
mod oauth;
pub mod profile;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use clap::ValueEnum;
use serde_json::{Map, Value};
use token_agent_client::proto::{ClientAuth, Grant, Identity, ImportSession, Secret};

use oauth::{Endpoints, OAuthClient, Tokens};
use profile::Profile;

/// How long the browser flow waits for the user to come back.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Flow {
    /// Device authorization grant: a code to enter on another device.
    Device,
    /// Authorization code with PKCE through a browser and a loopback redirect.
    Browser,
    /// A service account's own credentials; no person, no refresh token.
    ClientCredentials,
}

#[derive(clap::Args)]
pub struct LoginArgs {
    /// The session's name.
    name: String,
    /// A `[profiles.P]` of the configuration file [default: the profile
    /// named like the session, when there is one and --issuer is not given].
    #[arg(long, value_name = "P")]
    profile: Option<String>,
    /// The provider's issuer URL.
    #[arg(long, value_name = "URL")]
    issuer: Option<String>,
    #[arg(long, value_name = "ID")]
    client_id: Option<String>,
    /// A file holding the client secret (`-` for standard input).
    #[arg(long, value_name = "FILE")]
    client_secret_file: Option<PathBuf>,
    /// basic, post or none [default: what the provider supports; none without a secret].
    #[arg(long, value_parser = ["basic", "post", "none"])]
    client_auth: Option<String>,
    /// The sign-in flow [default: the best the provider and terminal allow].
    #[arg(long, value_enum)]
    flow: Option<Flow>,
    /// A scope to ask for; repeat for several.
    #[arg(long = "scope", value_name = "S")]
    scopes: Vec<String>,
    /// Ask for a long-lived session: adds offline_access when the provider
    /// lists it.
    #[arg(long)]
    offline: bool,
    /// Skip discovery (providers without it, such as GitHub); give the
    /// endpoints below instead.
    #[arg(long)]
    no_discovery: bool,
    #[arg(long, value_name = "URL")]
    token_endpoint: Option<String>,
    #[arg(long, value_name = "URL")]
    authorization_endpoint: Option<String>,
    #[arg(long, value_name = "URL")]
    device_authorization_endpoint: Option<String>,
    #[arg(long, value_name = "URL")]
    revocation_endpoint: Option<String>,
    /// An extra authorization request parameter, e.g. access_type=offline.
    #[arg(long = "auth-param", value_name = "KEY=VALUE")]
    auth_params: Vec<String>,
    /// Print the sign-in URL instead of opening a browser.
    #[arg(long)]
    no_browser: bool,
    /// Refresh ahead only while the session was used within this long.
    #[arg(long, value_parser = humantime::parse_duration)]
    idle_timeout: Option<Duration>,
    /// Remove the session after this long, revoking its refresh token.
    #[arg(long, value_parser = humantime::parse_duration)]
    lifetime: Option<Duration>,
    /// Replace a session of the same name.
    #[arg(long)]
    replace: bool,
    /// The configuration file holding the profiles [default:
    /// $TOKEN_AGENT_CONFIG, else $XDG_CONFIG_HOME/token-agent/config.toml].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

impl LoginArgs {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn replace(&self) -> bool {
        self.replace
    }
}

/// The flags over the profile: everything one sign-in needs.
struct Settings {
    name: String,
    issuer: String,
    client: OAuthClient,
    client_auth_given: bool,
    flow: Option<Flow>,
    scopes: Vec<String>,
    offline: bool,
    discovery: bool,
    explicit: Endpoints,
    userinfo_endpoint: Option<String>,
    auth_params: Vec<(String, String)>,
    no_browser: bool,
    idle_timeout_secs: Option<u64>,
    lifetime_secs: Option<u64>,
    replace: bool,
}

/// What a sign-in produced: the import request and who signed in.
pub struct SignedIn {
    pub import: ImportSession,
}

/// Signs in and returns the import for the agent. Ctrl-C cancels cleanly:
/// nothing is imported and nothing is left behind.
pub fn sign_in(args: &LoginArgs) -> Result<SignedIn, String> {
    let settings = settings(args)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| format!("cannot start: {err}"))?;
    runtime.block_on(async {
        tokio::select! {
            result = login(settings) => result,
            _ = tokio::signal::ctrl_c() => Err("cancelled; nothing was imported".to_string()),
        }
    })
}

fn settings(args: &LoginArgs) -> Result<Settings, String> {
    let profile = match (&args.profile, &args.issuer) {
        (Some(name), _) => load_profile(args, name, true)?,
        (None, None) => load_profile(args, &args.name, false)?,
        (None, Some(_)) => Profile::default(),
    };
    let issuer = args
        .issuer
        .clone()
        .or(profile.issuer.clone())
        .ok_or("no issuer: pass --issuer URL or --profile P (see `tokenctl login --help`)")?;
    let client_id = args
        .client_id
        .clone()
        .or(profile.client_id.clone())
        .ok_or("no client id: pass --client-id ID or set client_id in the profile")?;
    let secret_file = args
        .client_secret_file
        .clone()
        .or(profile.client_secret_file.clone());
    let client_secret = secret_file
        .map(|path| crate::read_secret(&path, "client secret").map_err(|f| f.message))
        .transpose()?;
    let auth_word = args.client_auth.clone().or(profile.client_auth.clone());
    let client_auth = match auth_word.as_deref() {
        Some("basic") => ClientAuth::Basic,
        Some("post") => ClientAuth::Post,
        Some("none") | None if client_secret.is_none() => ClientAuth::None,
        Some("none") => return Err("client auth none takes no client secret".into()),
        None => ClientAuth::Basic,
        Some(other) => {
            return Err(format!(
                "client_auth {other:?}: expected basic, post or none"
            ))
        }
    };
    if client_auth != ClientAuth::None && client_secret.is_none() {
        return Err("this client authentication needs --client-secret-file".into());
    }
    let flow = match (args.flow, profile.flow.as_deref()) {
        (Some(flow), _) => Some(flow),
        (None, Some(word)) => Some(Flow::from_str(word, true).map_err(|_| {
            format!("flow {word:?}: expected device, browser or client-credentials")
        })?),
        (None, None) => None,
    };
    let mut auth_params: Vec<(String, String)> = profile.auth_params.clone().into_iter().collect();
    for pair in &args.auth_params {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("--auth-param {pair:?}: expected KEY=VALUE"))?;
        auth_params.retain(|(k, _)| k != key);
        auth_params.push((key.into(), value.into()));
    }
    let duration = |flag: Option<Duration>, text: &Option<String>| -> Result<Option<u64>, String> {
        match (flag, text) {
            (Some(d), _) => Ok(Some(d.as_secs())),
            (None, Some(t)) => humantime::parse_duration(t)
                .map(|d| Some(d.as_secs()))
                .map_err(|err| format!("{t:?} is not a duration: {err}")),
            (None, None) => Ok(None),
        }
    };
    Ok(Settings {
        name: args.name.clone(),
        issuer,
        client: OAuthClient {
            client_id,
            client_secret,
            client_auth,
        },
        client_auth_given: auth_word.is_some(),
        flow,
        scopes: if args.scopes.is_empty() {
            profile.scopes.clone()
        } else {
            args.scopes.clone()
        },
        offline: args.offline || profile.offline.unwrap_or(false),
        discovery: !args.no_discovery && profile.discovery.unwrap_or(true),
        explicit: Endpoints {
            token_endpoint: args
                .token_endpoint
                .clone()
                .or(profile.token_endpoint.clone()),
            authorization_endpoint: args
                .authorization_endpoint
                .clone()
                .or(profile.authorization_endpoint.clone()),
            device_authorization_endpoint: args
                .device_authorization_endpoint
                .clone()
                .or(profile.device_authorization_endpoint.clone()),
            revocation_endpoint: args
                .revocation_endpoint
                .clone()
                .or(profile.revocation_endpoint.clone()),
            ..Endpoints::default()
        },
        userinfo_endpoint: profile.userinfo_endpoint.clone(),
        auth_params,
        no_browser: args.no_browser,
        idle_timeout_secs: duration(args.idle_timeout, &profile.idle_timeout)?,
        lifetime_secs: duration(args.lifetime, &profile.lifetime)?,
        replace: args.replace,
    })
}

/// The profile `name`; a missing file or profile is an error only when
/// the profile was asked for by name.
fn load_profile(args: &LoginArgs, name: &str, asked: bool) -> Result<Profile, String> {
    let Some(path) = profile::config_path(args.config.as_deref()) else {
        return if asked {
            Err("no configuration file to read profiles from".into())
        } else {
            Ok(Profile::default())
        };
    };
    if !asked && !path.exists() {
        return Ok(Profile::default());
    }
    match profile::load(&path, name) {
        Ok(profile) => Ok(profile),
        Err(why) if asked || !why.contains("no profile") => Err(why),
        Err(_) => Ok(Profile::default()),
    }
}

async fn login(mut settings: Settings) -> Result<SignedIn, String> {
    let http = oauth::http_client()?;
    let endpoints = endpoints(&http, &settings).await?;
    let token_endpoint = endpoints
        .token_endpoint
        .clone()
        .ok_or("the provider names no token endpoint; pass --token-endpoint")?;
    if !settings.client_auth_given && settings.client.client_secret.is_some() {
        settings.client.client_auth = pick_client_auth(&endpoints);
    }
    let scopes = scopes(&settings, &endpoints);
    let flow = choose_flow(&settings, &endpoints)?;

    let scope = scopes.join(" ");
    let tokens = match flow {
        Flow::Device => device_flow(&http, &settings, &endpoints, &token_endpoint, &scope).await?,
        Flow::Browser => {
            browser_flow(&http, &settings, &endpoints, &token_endpoint, &scopes).await?
        }
        Flow::ClientCredentials => {
            let mut form = vec![("grant_type", "client_credentials")];
            if !scope.is_empty() {
                form.push(("scope", &scope));
            }
            oauth::token_request(&http, &token_endpoint, &settings.client, form)
                .await
                .map_err(|err| format!("the provider refused the client credentials: {err}"))?
        }
    };
    check_tokens(&tokens, flow, &settings.issuer)?;

    let identity = match flow {
        Flow::ClientCredentials => None,
        _ => identity(&http, &tokens, &endpoints).await,
    };
    // The agent asks for these scopes on every refresh (Entra requires
    // it): the granted ones when the provider says, else those asked for.
    let session_scopes = match (&tokens.scope, flow) {
        (Some(granted), Flow::Device | Flow::Browser) => {
            granted.split_whitespace().map(String::from).collect()
        }
        _ => scopes,
    };
    let grant = match flow {
        Flow::ClientCredentials => Grant::ClientCredentials,
        _ => Grant::RefreshToken,
    };
    let Tokens {
        access_token,
        expires_in,
        refresh_token,
        refresh_expires_in,
        ..
    } = tokens;
    Ok(SignedIn {
        import: ImportSession {
            name: settings.name,
            issuer: settings.issuer,
            // The discovered endpoints travel with the session, so the agent
            // needs no discovery of its own.
            token_endpoint: Some(token_endpoint),
            client_id: settings.client.client_id,
            client_secret: settings.client.client_secret,
            client_auth: settings.client.client_auth,
            scopes: session_scopes,
            refresh_token: refresh_token.unwrap_or_else(Secret::empty),
            grant,
            revocation_endpoint: endpoints.revocation_endpoint,
            identity,
            access_token: Some(access_token),
            expires_in,
            refresh_expires_in,
            idle_timeout_secs: settings.idle_timeout_secs,
            lifetime_secs: settings.lifetime_secs,
            replace: settings.replace,
        },
    })
}

/// Discovery, with explicit endpoints taking precedence. Discovery may fail
/// only when the token endpoint was given by hand.
async fn endpoints(http: &reqwest::Client, settings: &Settings) -> Result<Endpoints, String> {
    let mut found = if settings.discovery {
        match oauth::discover(http, &settings.issuer).await {
            Ok(found) => found,
            Err(_) if settings.explicit.token_endpoint.is_some() => Endpoints::default(),
            Err(why) => {
                return Err(format!(
                    "discovery failed: {why}; for a provider without discovery pass \
                     --no-discovery and --token-endpoint (and the flow's endpoint)"
                ))
            }
        }
    } else {
        Endpoints::default()
    };
    let explicit = settings.explicit.clone();
    found.token_endpoint = explicit.token_endpoint.or(found.token_endpoint);
    found.authorization_endpoint = explicit
        .authorization_endpoint
        .or(found.authorization_endpoint);
    found.device_authorization_endpoint = explicit
        .device_authorization_endpoint
        .or(found.device_authorization_endpoint);
    found.revocation_endpoint = explicit.revocation_endpoint.or(found.revocation_endpoint);
    found.userinfo_endpoint = settings
        .userinfo_endpoint
        .clone()
        .or(found.userinfo_endpoint);
    Ok(found)
}

/// Basic unless the provider lists only post.
fn pick_client_auth(endpoints: &Endpoints) -> ClientAuth {
    let methods = &endpoints.token_endpoint_auth_methods_supported;
    let lists = |m: &str| methods.iter().any(|x| x == m);
    if !methods.is_empty() && !lists("client_secret_basic") && lists("client_secret_post") {
        ClientAuth::Post
    } else {
        ClientAuth::Basic
    }
}

/// The scopes asked for, with offline_access added for a long-lived
/// session when the provider lists it.
fn scopes(settings: &Settings, endpoints: &Endpoints) -> Vec<String> {
    let mut scopes = settings.scopes.clone();
    let listed = endpoints
        .scopes_supported
        .iter()
        .any(|s| s == "offline_access");
    if settings.offline && listed && !scopes.iter().any(|s| s == "offline_access") {
        scopes.push("offline_access".into());
    }
    scopes
}

/// The flow asked for, else: the browser where one can open, the device
/// flow where the provider has it (SSH sessions), the browser flow with a
/// printed URL, and client credentials for a confidential client with
/// neither.
fn choose_flow(settings: &Settings, endpoints: &Endpoints) -> Result<Flow, String> {
    if let Some(flow) = settings.flow {
        return Ok(flow);
    }
    let browser = !settings.no_browser && browser::has_browser();
    let has_auth = endpoints.authorization_endpoint.is_some();
    let has_device = endpoints.device_authorization_endpoint.is_some();
    Ok(match (browser && has_auth, has_device, has_auth) {
        (true, _, _) => Flow::Browser,
        (false, true, _) => Flow::Device,
        (false, false, true) => Flow::Browser,
        _ if settings.client.client_secret.is_some() => Flow::ClientCredentials,
        _ => {
            return Err(
                "the provider offers neither a device nor an authorization endpoint; pass \
                 --device-authorization-endpoint or --authorization-endpoint"
                    .into(),
            )
        }
    })
}

/// Refuses an answer the agent could not keep alive.
fn check_tokens(tokens: &Tokens, flow: Flow, issuer: &str) -> Result<(), String> {
    if tokens.token_type != "bearer" {
        return Err(format!(
            "the provider issued a {} token; the agent serves only Bearer tokens",
            tokens.token_type
        ));
    }
    if flow != Flow::ClientCredentials && tokens.refresh_token.is_none() {
        let google = issuer.contains("accounts.google.com");
        let mut why = String::from(
            "the provider signed you in but sent no refresh token, so the agent could not keep \
             the session alive; nothing was imported.",
        );
        why.push_str(" Ask for a long-lived session: --offline (adds offline_access where listed)");
        if google {
            why.push_str(", and for Google --auth-param access_type=offline --auth-param prompt=consent (Google sends a refresh token only on first consent otherwise)");
        } else {
            why.push_str(
                "; some providers (Google) also need --auth-param access_type=offline \
                 --auth-param prompt=consent, as they send a refresh token only on first consent",
            );
        }
        return Err(why);
    }
    Ok(())
}

async fn device_flow(
    http: &reqwest::Client,
    settings: &Settings,
    endpoints: &Endpoints,
    token_endpoint: &str,
    scope: &str,
) -> Result<Tokens, String> {
    let endpoint = endpoints
        .device_authorization_endpoint
        .as_deref()
        .ok_or("the provider has no device authorization endpoint; try --flow browser")?;
    let device = oauth::device_authorization(http, endpoint, &settings.client, scope)
        .await
        .map_err(|err| format!("the provider refused the device authorization: {err}"))?;

    let complete = device
        .verification_uri_complete
        .clone()
        .unwrap_or_else(|| device.verification_uri.clone());
    eprintln!("To sign in, open {}", device.verification_uri);
    eprintln!("and enter the code: {}", device.user_code);
    if device.verification_uri_complete.is_some() {
        eprintln!("or open {complete}");
    }
    if std::io::stderr().is_terminal() {
        if let Some(qr) = qr_code(&complete) {
            eprintln!("{qr}");
        }
    }

    let spinner = Spinner::new();
    let result = oauth::poll_device(
        http,
        token_endpoint,
        &settings.client,
        &device,
        |wait, deadline| spinner.wait(wait, deadline),
    )
    .await;
    drop(spinner);
    result.map_err(|err| err.to_string())
}

async fn browser_flow(
    http: &reqwest::Client,
    settings: &Settings,
    endpoints: &Endpoints,
    token_endpoint: &str,
    scopes: &[String],
) -> Result<Tokens, String> {
    let endpoint = endpoints
        .authorization_endpoint
        .as_deref()
        .ok_or("the provider has no authorization endpoint; try --flow device")?;
    let loopback = browser::Loopback::bind().await?;
    let pkce = browser::Pkce::new();
    let state = browser::random_text();

    let mut url = url::Url::parse(endpoint)
        .map_err(|err| format!("the authorization endpoint is not a URL: {err}"))?;
    {
        let mut query = url.query_pairs_mut();
        query
            .append_pair("response_type", "code")
            .append_pair("client_id", &settings.client.client_id)
            .append_pair("redirect_uri", &loopback.redirect_uri)
            .append_pair("state", &state)
            .append_pair("code_challenge", &pkce.challenge)
            .append_pair("code_challenge_method", "S256");
        if !scopes.is_empty() {
            query.append_pair("scope", &scopes.join(" "));
        }
        if scopes.iter().any(|s| s == "openid") {
            query.append_pair("nonce", &browser::random_text());
        }
        // OpenID Connect grants offline_access only with prompt=consent.
        let has_prompt = settings.auth_params.iter().any(|(k, _)| k == "prompt");
        if scopes.iter().any(|s| s == "offline_access") && !has_prompt {
            query.append_pair("prompt", "consent");
        }
        for (key, value) in &settings.auth_params {
            query.append_pair(key, value);
        }
    }

    eprintln!("To sign in, open this URL in a browser:");
    eprintln!("{url}");
    if !settings.no_browser && browser::has_browser() && webbrowser::open(url.as_str()).is_ok() {
        eprintln!("(a browser was opened)");
    }
    eprintln!(
        "Waiting for the provider to send you back to {} ...",
        loopback.redirect_uri
    );

    let code = loopback.wait_for_code(&state, BROWSER_TIMEOUT).await?;
    let form = vec![
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", loopback.redirect_uri.as_str()),
        ("code_verifier", pkce.verifier.as_str()),
    ];
    oauth::token_request(http, token_endpoint, &settings.client, form)
        .await
        .map_err(|err| format!("the provider refused the authorization code: {err}"))
}

/// Who signed in, from the ID token or else userinfo. Display only: the ID
/// token's payload is decoded without checking its signature, which is
/// fine because nothing is decided by it; it came straight from the token
/// endpoint over the connection the tokens came on.
async fn identity(
    http: &reqwest::Client,
    tokens: &Tokens,
    endpoints: &Endpoints,
) -> Option<Identity> {
    if let Some(claims) = tokens
        .id_token
        .as_ref()
        .and_then(|t| jwt_claims(t.expose()))
    {
        let identity = identity_from(&claims);
        if !identity.is_empty() {
            return Some(identity);
        }
    }
    let endpoint = endpoints.userinfo_endpoint.as_deref()?;
    let claims = oauth::userinfo(http, endpoint, &tokens.access_token).await?;
    Some(identity_from(&claims)).filter(|i| !i.is_empty())
}

fn jwt_claims(token: &str) -> Option<Map<String, Value>> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        Value::Object(claims) => Some(claims),
        _ => None,
    }
}

fn identity_from(claims: &Map<String, Value>) -> Identity {
    Identity {
        sub: oauth::text(claims, "sub"),
        preferred_username: oauth::text(claims, "preferred_username")
            .or_else(|| oauth::text(claims, "login")),
        email: oauth::text(claims, "email"),
    }
}

fn qr_code(text: &str) -> Option<String> {
    let code = qrcode::QrCode::new(text.as_bytes()).ok()?;
    Some(
        code.render::<qrcode::render::unicode::Dense1x2>()
            .quiet_zone(true)
            .build(),
    )
}

/// The spinner with the time left while the device flow polls. Cleared when
/// dropped, so Ctrl-C leaves a clean line.
struct Spinner {
    bar: indicatif::ProgressBar,
}

impl Spinner {
    fn new() -> Spinner {
        let bar =
            indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        Spinner { bar }
    }

    fn wait(&self, wait: Duration, deadline: Instant) -> impl std::future::Future<Output = ()> {
        let bar = self.bar.clone();
        async move {
            let until = Instant::now() + wait;
            loop {
                let now = Instant::now();
                let left = deadline.saturating_duration_since(now).as_secs();
                bar.set_message(format!(
                    "waiting for the sign-in to finish ({}m {:02}s left; Ctrl-C cancels)",
                    left / 60,
                    left % 60
                ));
                bar.tick();
                if now >= until {
                    break;
                }
                tokio::time::sleep((until - now).min(Duration::from_millis(120))).await;
            }
        }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(refresh_token: Option<&str>) -> Tokens {
        Tokens {
            access_token: Secret::new("ya29.fake1"),
            token_type: "bearer".into(),
            expires_in: Some(3599),
            refresh_token: refresh_token.map(Secret::new),
            refresh_expires_in: None,
            id_token: None,
            scope: None,
        }
    }

    /// B08 at sign-in: Google sends a refresh token only on first consent;
    /// a session without one would die at the access token's expiry.
    #[test]
    fn a_first_answer_without_a_refresh_token_is_refused_with_the_fix() {
        let google = "https://accounts.google.com";
        let why = check_tokens(&answer(None), Flow::Browser, google).unwrap_err();
        assert!(why.contains("no refresh token") && why.contains("nothing was imported"));
        assert!(why.contains("access_type=offline") && why.contains("prompt=consent"));
        assert!(check_tokens(&answer(Some("rt")), Flow::Device, google).is_ok());
        // A service account has none by design.
        assert!(check_tokens(&answer(None), Flow::ClientCredentials, google).is_ok());
    }

    #[test]
    fn who_signed_in_is_read_from_the_id_token_payload() {
        let payload = URL_SAFE_NO_PAD
            .encode(r#"{"sub":"u-1","preferred_username":"alice","email":"a@example.org"}"#);
        let claims = jwt_claims(&format!("eyJhbGciOiJSUzI1NiJ9.{payload}.c2ln")).unwrap();
        let identity = identity_from(&claims);
        assert_eq!(identity.display_name(), Some("alice"));
        assert_eq!(identity.sub.as_deref(), Some("u-1"));
        assert!(jwt_claims("not-a-jwt").is_none());
    }

    #[test]
    fn offline_access_is_added_only_when_asked_for_and_listed() {
        let mut endpoints = Endpoints::default();
        let settings = |offline| Settings {
            name: "s".into(),
            issuer: "https://id.example".into(),
            client: OAuthClient {
                client_id: "c".into(),
                client_secret: None,
                client_auth: ClientAuth::None,
            },
            client_auth_given: false,
            flow: None,
            scopes: vec!["openid".into()],
            offline,
            discovery: true,
            explicit: Endpoints::default(),
            userinfo_endpoint: None,
            auth_params: Vec::new(),
            no_browser: true,
            idle_timeout_secs: None,
            lifetime_secs: None,
            replace: false,
        };
        assert_eq!(scopes(&settings(true), &endpoints), ["openid"]);
        endpoints.scopes_supported = vec!["openid".into(), "offline_access".into()];
        assert_eq!(scopes(&settings(false), &endpoints), ["openid"]);
        assert_eq!(
            scopes(&settings(true), &endpoints),
            ["openid", "offline_access"]
        );
    }
}
