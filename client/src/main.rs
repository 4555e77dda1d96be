//! tokenctl-full: the command line for token-agent, every subcommand.
//!
//! Installed beside the small `tokenctl` (src/fast.rs), which answers the hot
//! `tokenctl get NAME` itself and execs this binary, under the name it was
//! called by, for everything else. Users call `tokenctl`; this binary behaves
//! the same when called directly.
//!
//! Exit codes, so scripts can tell the cases apart:
//! 0 done; 1 any other error; 2 bad usage; 3 no agent running;
//! 4 no such session; 5 the session needs a new sign-in;
//! 6 the provider cannot be reached (the agent keeps retrying);
//! 7 the provider refuses the client configuration; 8 the agent is locked;
//! 9 permission denied (another user, a session rule, a wrong passphrase).

mod get;
mod login;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use get::{failure, now, Failure};
use token_agent_client::proto::{
    AgentInfo, ClientAuth, ExpirySource, Grant, ImportSession, Secret, SessionState, SessionStatus,
};
use token_agent_client::{default_socket_path, Client, TokenOptions};

mod consumers;

#[derive(Parser)]
#[command(
    name = "tokenctl",
    version,
    about = "Ask token-agent for tokens and manage its sessions"
)]
struct Cli {
    /// The agent's socket [default: $TOKEN_AGENT_SOCK, else
    /// $XDG_RUNTIME_DIR/token-agent/agent.sock, else /tmp/token-agent-$UID/agent.sock]
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a current access token on standard output: alone (raw), as
    /// JSON with its expiry, or as an HTTP Authorization header line.
    Get {
        name: String,
        #[command(flatten)]
        token: TokenArgs,
        /// How to print it.
        #[arg(long, value_enum, default_value_t = Format::Raw)]
        format: Format,
    },
    /// Sign in with the provider (device flow, browser, or client
    /// credentials) and hand the new session to the agent.
    Login(login::LoginArgs),
    /// Revoke a session's refresh token at the provider, where it offers
    /// revocation, and remove the session.
    Logout { name: String },
    /// Run a command with the token in an environment variable, passing
    /// its exit code through: `tokenctl exec work -- curl ...`.
    Exec {
        name: String,
        #[command(flatten)]
        token: TokenArgs,
        /// The environment variable that carries the token.
        #[arg(long = "env", value_name = "VAR", default_value = "ACCESS_TOKEN")]
        var: String,
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<std::ffi::OsString>,
    },
    /// A kubectl exec credential plugin: print an ExecCredential
    /// (client.authentication.k8s.io/v1) with the token and its expiry.
    Kubectl {
        name: String,
        #[command(flatten)]
        token: TokenArgs,
    },
    /// A git credential helper: `git config credential.helper
    /// '!tokenctl git-credential NAME'`. Answers `get` with the token and
    /// its expiry; ignores `store` and `erase`.
    GitCredential {
        name: String,
        /// What git asks: get, store or erase.
        action: String,
        #[command(flatten)]
        token: TokenArgs,
    },
    /// Print the session's token now and each new one the moment the agent
    /// has it, until interrupted or the session is removed.
    Watch {
        name: String,
        /// raw: each token on a line of its own; json: each event as one
        /// line of JSON, failures included.
        #[arg(long, value_enum, default_value_t = WatchFormat::Raw)]
        format: WatchFormat,
    },
    /// Print a shell completion script: `tokenctl completions bash`.
    Completions {
        #[arg(value_enum)]
        shell: CompletionShell,
    },
    /// Print the manual page (roff): `tokenctl man | man -l -`.
    Man,
    /// Add a session from a refresh token obtained elsewhere. The agent
    /// refreshes at once, so a bad token or client is reported now.
    Import(ImportArgs),
    /// List the sessions.
    List,
    /// Show one session in detail, or all in brief.
    Status {
        name: Option<String>,
        /// Print JSON for scripts instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the agent's counters in Prometheus text format.
    Metrics,
    /// Forget a session and its tokens.
    Remove { name: String },
    /// Refresh a session now.
    Refresh { name: String },
    /// Check that the agent answers.
    Ping,
    /// Stop serving tokens until unlocked (refreshes go on). The passphrase
    /// is read from the terminal without echo, or from standard input.
    Lock,
    /// Serve tokens again.
    Unlock,
}

/// What the token must satisfy.
#[derive(clap::Args, Clone)]
struct TokenArgs {
    /// The token must stay valid at least this long, e.g. 30s or 5m.
    #[arg(long, default_value = "0s", value_parser = parse_seconds_or_duration)]
    min_valid: Duration,
    /// A down-scoped token for this scope (a subset of the session's);
    /// repeat for several.
    #[arg(long = "scope", value_name = "SCOPE")]
    scopes: Vec<String>,
    /// A token for this audience (an RFC 8707 resource URI, or a name).
    #[arg(long, value_name = "AUDIENCE")]
    audience: Option<String>,
}

impl TokenArgs {
    fn options(&self) -> TokenOptions {
        TokenOptions {
            min_valid: self.min_valid,
            scope: self.scopes.clone(),
            audience: self.audience.clone(),
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    /// The token alone.
    Raw,
    /// {"access_token", "token_type", "expires_at", "expires_in"}.
    Json,
    /// `Authorization: Bearer ...`.
    Header,
}

impl From<Format> for get::Format {
    fn from(format: Format) -> get::Format {
        match format {
            Format::Raw => get::Format::Raw,
            Format::Json => get::Format::Json,
            Format::Header => get::Format::Header,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum WatchFormat {
    Raw,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

#[derive(clap::Args)]
struct ImportArgs {
    name: String,
    /// The provider's issuer URL.
    #[arg(long)]
    issuer: String,
    #[arg(long)]
    client_id: String,
    /// A file holding the client secret (`-` for standard input).
    #[arg(long, value_name = "FILE")]
    client_secret_file: Option<PathBuf>,
    /// How the secret is sent [default: basic with a secret, none without].
    #[arg(long, value_enum)]
    client_auth: Option<AuthArg>,
    /// Skip discovery and use this token endpoint.
    #[arg(long, value_name = "URL")]
    token_endpoint: Option<String>,
    /// A scope to ask for on refresh; repeat for several.
    #[arg(long = "scope", value_name = "SCOPE")]
    scopes: Vec<String>,
    /// A file holding the refresh token (`-` for standard input).
    #[arg(long, value_name = "FILE")]
    refresh_token_file: PathBuf,
    /// Refresh ahead only while the session was used within this long; an
    /// idle session lapses and is refreshed on its next `get`.
    #[arg(long, value_parser = humantime::parse_duration)]
    idle_timeout: Option<Duration>,
    /// Remove the session after this long (e.g. 8h), revoking its refresh
    /// token where the provider offers revocation.
    #[arg(long, value_parser = humantime::parse_duration)]
    lifetime: Option<Duration>,
    /// Replace a session of the same name.
    #[arg(long)]
    replace: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum AuthArg {
    Basic,
    Post,
    None,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("tokenctl: {}", failure.message);
            ExitCode::from(failure.exit_code)
        }
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    let socket = match cli.socket {
        Some(path) => path,
        None => default_socket_path(),
    };
    // The hot path, shared with the fast `tokenctl`: one round trip.
    if let Command::Get {
        name,
        token,
        format,
    } = &cli.command
    {
        return get::get(&socket, name, &token.options(), (*format).into());
    }

    let mut out = std::io::stdout().lock();

    // What needs no agent.
    match &cli.command {
        Command::Completions { shell } => {
            let shell = match shell {
                CompletionShell::Bash => clap_complete::Shell::Bash,
                CompletionShell::Zsh => clap_complete::Shell::Zsh,
                CompletionShell::Fish => clap_complete::Shell::Fish,
            };
            clap_complete::generate(shell, &mut Cli::command(), "tokenctl", &mut out);
            return Ok(());
        }
        Command::Man => {
            return clap_mangen::Man::new(Cli::command())
                .render(&mut out)
                .map_err(|err| failure(format!("cannot write the output: {err}")));
        }
        Command::GitCredential { action, .. } if action != "get" => {
            // store and erase: the agent keeps the token, git keeps nothing.
            consumers::drain_stdin();
            return Ok(());
        }
        _ => {}
    }

    // Read secrets before connecting, so a typo in a path fails fast.
    let import = match &cli.command {
        Command::Import(args) => Some(import_request(args)?),
        _ => None,
    };
    let passphrase = match &cli.command {
        Command::Lock => Some(read_passphrase(true)?),
        Command::Unlock => Some(read_passphrase(false)?),
        _ => None,
    };
    let git_request = match &cli.command {
        Command::GitCredential { .. } => Some(consumers::read_git_request()?),
        _ => None,
    };
    let mut agent = Client::connect(&socket)?;

    if let Command::Login(args) = &cli.command {
        // The agent answered above, and the name is free, so the sign-in is
        // not wasted. The connection is made anew for the import: a sign-in
        // can take minutes.
        if !args.replace() && agent.status(args.name()).is_ok() {
            return Err(Failure {
                message: format!(
                    "a session named {} exists; pass --replace to sign in again over it",
                    args.name()
                ),
                exit_code: 1,
            });
        }
        drop(agent);
        let signed_in = login::sign_in(args).map_err(failure)?;
        let who = signed_in
            .import
            .identity
            .as_ref()
            .and_then(|i| i.display_name().map(String::from));
        let mut agent = Client::connect(&socket)?;
        for other in same_sign_in(&agent.list()?, &signed_in.import) {
            // B17: some providers keep one refresh token per user and client,
            // so this sign-in may end the older session's.
            eprintln!(
                "tokenctl: warning: session {other} is the same user at the same client; \
                 some providers invalidate its refresh token now"
            );
        }
        let message = agent.import(signed_in.import)?;
        let printed = match who {
            Some(who) => writeln!(out, "signed in as {who}; {message}"),
            None => writeln!(out, "signed in; {message}"),
        };
        return printed.map_err(|err| failure(format!("cannot write the output: {err}")));
    }

    let printed = match cli.command {
        Command::Get { .. } => unreachable!("answered above"),
        Command::Login(_) => unreachable!("handled above"),
        Command::Logout { name } => writeln!(out, "{}", agent.logout(&name)?),
        Command::Exec {
            name,
            token,
            var,
            command,
        } => {
            let token = agent.get_with(&name, &token.options())?;
            drop(agent);
            return Err(consumers::exec(&var, &token, &command));
        }
        Command::Kubectl { name, token } => {
            let token = agent.get_with(&name, &token.options())?;
            print_json(&mut out, &consumers::exec_credential(&token))
        }
        Command::GitCredential { name, token, .. } => {
            let token = agent.get_with(&name, &token.options())?;
            let request = git_request.expect("read above");
            write!(out, "{}", consumers::git_answer(&request, &token))
        }
        Command::Watch { name, format } => {
            drop(out);
            return consumers::watch(agent, &name, format == WatchFormat::Json);
        }
        Command::Completions { .. } | Command::Man => unreachable!("answered above"),
        Command::Import(_) => {
            let message = agent.import(import.expect("built above"))?;
            writeln!(out, "{message}")
        }
        Command::List => {
            let sessions = agent.list()?;
            print_table(&mut out, &sessions)
        }
        Command::Status {
            name: Some(name),
            json,
        } => {
            let session = agent.status(&name)?;
            if json {
                print_json(&mut out, &session)
            } else {
                print_status(&mut out, &session)
            }
        }
        Command::Status { name: None, json } => {
            let info = agent.info()?;
            let mut sessions = agent.list()?;
            // What needs a person comes first.
            sessions.sort_by_key(|s| (!needs_attention(s), s.name.clone()));
            if json {
                let both = serde_json::json!({ "agent": info, "sessions": sessions });
                print_json(&mut out, &both)
            } else {
                print_overview(&mut out, &info, &sessions)
            }
        }
        Command::Metrics => write!(out, "{}", agent.metrics()?),
        Command::Remove { name } => writeln!(out, "{}", agent.remove(&name)?),
        Command::Refresh { name } => writeln!(out, "{}", agent.refresh(&name)?),
        Command::Ping => {
            agent.ping()?;
            writeln!(out, "the agent at {} answers", socket.display())
        }
        Command::Lock => writeln!(out, "{}", agent.lock(passphrase.expect("read above"))?),
        Command::Unlock => writeln!(out, "{}", agent.unlock(passphrase.expect("read above"))?),
    };
    printed.map_err(|err| failure(format!("cannot write the output: {err}")))
}

fn import_request(args: &ImportArgs) -> Result<ImportSession, Failure> {
    let refresh_token = read_secret(&args.refresh_token_file, "refresh token")?;
    let client_secret = match &args.client_secret_file {
        Some(path) => Some(read_secret(path, "client secret")?),
        None => None,
    };
    if args.refresh_token_file.as_os_str() == "-"
        && args
            .client_secret_file
            .as_deref()
            .is_some_and(|p| p.as_os_str() == "-")
    {
        return Err(failure(
            "only one of the secrets can come from standard input".into(),
        ));
    }
    let client_auth = match (args.client_auth, &client_secret) {
        (Some(AuthArg::Basic), _) => ClientAuth::Basic,
        (Some(AuthArg::Post), _) => ClientAuth::Post,
        (Some(AuthArg::None), _) => ClientAuth::None,
        (None, Some(_)) => ClientAuth::Basic,
        (None, None) => ClientAuth::None,
    };
    Ok(ImportSession {
        name: args.name.clone(),
        issuer: args.issuer.clone(),
        token_endpoint: args.token_endpoint.clone(),
        client_id: args.client_id.clone(),
        client_secret,
        client_auth,
        scopes: args.scopes.clone(),
        refresh_token,
        grant: Default::default(),
        revocation_endpoint: None,
        identity: None,
        access_token: None,
        expires_in: None,
        refresh_expires_in: None,
        idle_timeout_secs: args.idle_timeout.map(|d| d.as_secs()),
        lifetime_secs: args.lifetime.map(|d| d.as_secs()),
        replace: args.replace,
    })
}

/// Reads a secret from a file or standard input, without the line break.
fn read_secret(path: &PathBuf, what: &str) -> Result<Secret, Failure> {
    let mut text = String::new();
    let read = if path.as_os_str() == "-" {
        std::io::stdin().read_to_string(&mut text)
    } else {
        std::fs::File::open(path).and_then(|mut f| f.read_to_string(&mut text))
    };
    read.map_err(|err| {
        failure(format!(
            "cannot read the {what} from {}: {err}",
            path.display()
        ))
    })?;
    let secret = Secret::new(text.trim());
    text.clear();
    if secret.is_empty() {
        return Err(failure(format!(
            "the {what} in {} is empty",
            path.display()
        )));
    }
    Ok(secret)
}

/// The lock passphrase: from the terminal without echo (twice when
/// locking), or one line of standard input for scripts.
fn read_passphrase(confirm: bool) -> Result<Secret, Failure> {
    use std::io::IsTerminal;

    let read_err = |err: std::io::Error| failure(format!("cannot read the passphrase: {err}"));
    let passphrase = if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Passphrase: ").map_err(read_err)?;
        if confirm {
            let again = rpassword::prompt_password("Again: ").map_err(read_err)?;
            if again != first {
                return Err(failure(
                    "the passphrases differ; nothing was changed".into(),
                ));
            }
        }
        Secret::new(first)
    } else {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map_err(read_err)?;
        let passphrase = Secret::new(line.trim_end_matches(['\r', '\n']));
        line.clear();
        passphrase
    };
    if passphrase.is_empty() {
        return Err(failure("the passphrase is empty".into()));
    }
    Ok(passphrase)
}

/// "90" (seconds), "90s", "5m", "1h 30m".
fn parse_seconds_or_duration(text: &str) -> Result<Duration, String> {
    if let Ok(seconds) = text.trim().parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    humantime::parse_duration(text)
        .map_err(|err| format!("{err}; write a duration such as 30s, 5m or 1h"))
}

/// "4m 10s", "2h 5m", "3d 4h": the two largest units.
fn human(seconds: u64) -> String {
    let units = [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)];
    let mut parts = Vec::new();
    let mut rest = seconds;
    for (unit, size) in units {
        if rest >= size || (parts.is_empty() && size == 1) {
            parts.push(format!("{}{unit}", rest / size));
            rest %= size;
        }
        if parts.len() == 2 {
            break;
        }
    }
    parts.join(" ")
}

/// "in 4m 10s" or "3m ago".
fn relative(at: u64) -> String {
    let now = now();
    match at.cmp(&now) {
        std::cmp::Ordering::Greater => format!("in {}", human(at - now)),
        std::cmp::Ordering::Equal => "just now".into(),
        std::cmp::Ordering::Less => format!("{} ago", human(now - at)),
    }
}

fn state_word(state: SessionState) -> &'static str {
    match state {
        SessionState::Fresh => "fresh",
        SessionState::Refreshing => "refreshing",
        SessionState::Retrying => "retrying",
        SessionState::NeedsSignIn => "needs sign-in",
        SessionState::ClientMisconfigured => "client misconfigured",
    }
}

fn expiry_words(session: &SessionStatus) -> String {
    match session.access_expires_at {
        Some(at) if at > now() => format!("expires {}", relative(at)),
        Some(at) => format!("expired {}", relative(at)),
        None => "no token".into(),
    }
}

fn print_json(out: &mut impl Write, value: &impl serde::Serialize) -> std::io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)
}

/// Other sessions of the same user (`sub`) at the same issuer and client.
fn same_sign_in(sessions: &[SessionStatus], import: &ImportSession) -> Vec<String> {
    let sub = |identity: Option<&token_agent_client::proto::Identity>| {
        identity.and_then(|i| i.sub.clone())
    };
    let Some(subject) = sub(import.identity.as_ref()) else {
        return Vec::new();
    };
    sessions
        .iter()
        .filter(|s| s.name != import.name)
        .filter(|s| s.issuer == import.issuer && s.client_id == import.client_id)
        .filter(|s| sub(s.identity.as_ref()).as_deref() == Some(subject.as_str()))
        .map(|s| s.name.clone())
        .collect()
}

/// How long ahead of the refresh token's own deadline `status` warns.
const SIGN_IN_WARNING_SECS: u64 = 24 * 3600;

/// The refresh token's deadline, when it comes within a day: the session
/// dies then whatever the agent does, so the user should sign in before.
fn refresh_ends_soon(session: &SessionStatus) -> Option<u64> {
    let at = session
        .refresh_expires_at
        .filter(|_| session.has_refresh_token)?;
    (at <= now() + SIGN_IN_WARNING_SECS).then_some(at)
}

fn needs_attention(session: &SessionStatus) -> bool {
    matches!(
        session.state,
        SessionState::NeedsSignIn | SessionState::ClientMisconfigured
    )
}

/// The agent, then every session needing a person, then the table.
fn print_overview(
    out: &mut impl Write,
    info: &AgentInfo,
    sessions: &[SessionStatus],
) -> std::io::Result<()> {
    let counts: Vec<String> = info
        .sessions_by_state
        .iter()
        .filter(|(_, count)| **count > 0)
        .map(|(state, count)| format!("{count} {}", state.replace('_', " ")))
        .collect();
    writeln!(
        out,
        "agent:    {} (pid {}), up {}",
        info.agent,
        info.pid,
        human(now().saturating_sub(info.started_at))
    )?;
    writeln!(out, "socket:   {}", info.socket)?;
    writeln!(out, "store:    {} ({})", info.store, info.key_source)?;
    if info.locked {
        writeln!(
            out,
            "LOCKED:   no tokens are served until `tokenctl unlock`"
        )?;
    }
    let summary = if counts.is_empty() {
        "none".to_string()
    } else {
        counts.join(", ")
    };
    writeln!(out, "sessions: {summary}")?;
    writeln!(out)?;

    for session in sessions.iter().filter(|s| needs_attention(s)) {
        let what = match session.state {
            SessionState::NeedsSignIn => "NEEDS SIGN-IN",
            _ => "CLIENT REFUSED",
        };
        writeln!(out, "!! {what}: {}", session.name)?;
        if let Some(reason) = &session.reason {
            writeln!(out, "   {reason}")?;
        }
        let fix = match session.state {
            SessionState::NeedsSignIn => format!(
                "`tokenctl login {} --replace --issuer {} --client-id {}` (or import a new refresh token)",
                session.name, session.issuer, session.client_id
            ),
            _ => format!(
                "fix the client id or secret, then `tokenctl import {} --replace ...`",
                session.name
            ),
        };
        writeln!(out, "   fix: {fix}")?;
        writeln!(out)?;
    }
    for session in sessions.iter().filter(|s| !needs_attention(s)) {
        if let Some(at) = refresh_ends_soon(session) {
            writeln!(out, "!! SIGN IN SOON: {}", session.name)?;
            writeln!(
                out,
                "   its refresh token runs out {}; then the session dies",
                relative(at)
            )?;
            writeln!(
                out,
                "   fix: `tokenctl login {} --replace` before then",
                session.name
            )?;
            writeln!(out)?;
        }
    }
    print_table(out, sessions)
}

fn print_table(out: &mut impl Write, sessions: &[SessionStatus]) -> std::io::Result<()> {
    if sessions.is_empty() {
        return writeln!(out, "no sessions; add one with `tokenctl import`");
    }
    let width = sessions
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    writeln!(
        out,
        "{:width$}  {:20}  {:22}  NEXT REFRESH",
        "NAME", "STATE", "TOKEN"
    )?;
    for session in sessions {
        let next = session
            .next_refresh_at
            .map(relative)
            .unwrap_or_else(|| "-".into());
        writeln!(
            out,
            "{:width$}  {:20}  {:22}  {next}",
            session.name,
            state_word(session.state),
            expiry_words(session),
        )?;
    }
    Ok(())
}

fn print_status(out: &mut impl Write, s: &SessionStatus) -> std::io::Result<()> {
    let source = match s.expiry_source {
        Some(ExpirySource::Provider) | None => "",
        Some(ExpirySource::PreviousLifetime) => " (estimated: the provider's previous lifetime)",
        Some(ExpirySource::Jwt) => " (estimated: from the token's own exp - iat)",
        Some(ExpirySource::Default) => " (estimated: the agent's default lifetime)",
    };
    writeln!(out, "session:        {}", s.name)?;
    writeln!(out, "issuer:         {}", s.issuer)?;
    writeln!(out, "client:         {}", s.client_id)?;
    writeln!(out, "token endpoint: {}", s.token_endpoint)?;
    if let Some(who) = s.identity.as_ref().and_then(|i| i.display_name()) {
        writeln!(out, "signed in as:   {who}")?;
    }
    if !s.scopes.is_empty() {
        writeln!(out, "scopes:         {}", s.scopes.join(" "))?;
    }
    writeln!(
        out,
        "state:          {} since {}",
        state_word(s.state),
        relative(s.state_since)
    )?;
    if let Some(reason) = &s.reason {
        writeln!(out, "reason:         {reason}")?;
    }
    writeln!(out, "access token:   {}{source}", expiry_words(s))?;
    let refresh = match (s.has_refresh_token, s.refresh_expires_at) {
        (false, _) if s.grant == Grant::ClientCredentials => {
            "none: a service account, renewed with its client credentials".to_string()
        }
        (false, _) => "none: sign in again".to_string(),
        (true, Some(at)) => format!("held, expires {}", relative(at)),
        (true, None) => "held, no stated expiry".to_string(),
    };
    writeln!(out, "refresh token:  {refresh}")?;
    if refresh_ends_soon(s).is_some() {
        writeln!(
            out,
            "warning:        the refresh token runs out soon; sign in again before then \
             (`tokenctl login {} --replace`)",
            s.name
        )?;
    }
    if let Some(at) = s.last_refresh_at {
        writeln!(out, "last refresh:   {}", relative(at))?;
    }
    match s.next_refresh_at {
        Some(at) => writeln!(out, "next refresh:   {}", relative(at))?,
        None => writeln!(out, "next refresh:   none scheduled")?,
    }
    if let Some(at) = s.remove_at {
        writeln!(out, "removed:        {} (its lifetime ends)", relative(at))?;
    }
    if let Some(idle) = s.idle_timeout_secs {
        writeln!(
            out,
            "idle timeout:   {} (refreshed ahead only while in use)",
            human(idle)
        )?;
    }
    if s.consecutive_failures > 0 {
        writeln!(out, "failures:       {} in a row", s.consecutive_failures)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_valid_takes_bare_seconds_or_a_duration() {
        assert_eq!(parse_seconds_or_duration("15"), Ok(Duration::from_secs(15)));
        assert_eq!(
            parse_seconds_or_duration("2m"),
            Ok(Duration::from_secs(120))
        );
        assert!(parse_seconds_or_duration("banana")
            .unwrap_err()
            .contains("30s"));
    }

    #[test]
    fn durations_read_as_people_say_them() {
        assert_eq!(human(0), "0s");
        assert_eq!(human(59), "59s");
        assert_eq!(human(250), "4m 10s");
        assert_eq!(human(3_600), "1h");
        assert_eq!(human(7_500), "2h 5m");
        assert_eq!(human(273_600), "3d 4h");
    }
}
