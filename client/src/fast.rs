//! tokenctl: the command line for token-agent, started fast.
//!
//! `tokenctl get NAME` runs once per API call in scripts and credential
//! helpers, so its whole process, from exec to exit, must cost little more
//! than `/bin/true`. This binary answers `get` itself, with its arguments
//! matched by hand, and links no clap, HTTP client, TLS or async runtime (and
//! is linked statically where build.rs can do so; see there). Every other
//! command, and any `get` whose arguments it does not fully recognise (help,
//! a duration such as `1h 30m`, a repeated option, a typo), is handed to
//! `tokenctl-full` beside it by exec, under the name it was called by, so
//! the full command line parses, answers and exits exactly as it always
//! did. Both binaries share `get.rs`, so a `get` prints and fails alike
//! whichever answers it.
//!
//! It also skips Rust's own start-up (`no_main`): before `main`, the
//! standard runtime polls the three standard descriptors, reads
//! `/proc/self/maps` to find the main thread's stack guard and sets up an
//! alternate signal stack, about 70 µs of a 700 µs process here. Of that,
//! `main` below keeps what a `get` depends on: SIGPIPE ignored (a closed
//! pipe or socket is an error to report, not a silent death), stdout
//! flushed at the end, and a panic turned into exit status 101.
#![cfg_attr(not(test), no_main)]

mod get;

use std::ffi::{OsStr, OsString};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::Duration;

use token_agent_client::{default_socket_path, TokenOptions};

/// The binary that answers everything, installed beside this one.
const FULL: &str = "tokenctl-full";

/// The C entry point, called by libc's start-up with the arguments that
/// `std::env::args_os` reads on its own.
#[cfg(not(test))]
#[no_mangle]
pub extern "C" fn main(_argc: libc::c_int, _argv: *const *const libc::c_char) -> libc::c_int {
    // SAFETY: setting a signal's disposition to "ignore" before any other
    // thread exists; what the standard runtime does before its main.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }

    let status = std::panic::catch_unwind(run).unwrap_or(101);
    let _ = std::io::Write::flush(&mut std::io::stdout());
    status.into()
}

/// The whole of a run; its exit status. (Unused by the unit tests, whose
/// harness brings its own `main`.)
#[cfg_attr(test, allow(dead_code))]
fn run() -> u8 {
    let args: Vec<OsString> = std::env::args_os().collect();
    let Some(get) = args.get(1..).and_then(parse_get) else {
        return hand_over(&args);
    };
    let socket = get.socket.unwrap_or_else(default_socket_path);
    match get::get(&socket, &get.name, &get.options, get.format) {
        Ok(()) => 0,
        Err(failure) => {
            eprintln!("tokenctl: {}", failure.message);
            failure.exit_code
        }
    }
}

/// Execs `tokenctl-full` with the same arguments, `argv[0]` included (clap
/// names the program in its messages after it). It is looked for beside
/// this binary's real file (symbolic links resolved), else on `PATH` when
/// that file cannot be known (no `/proc`).
fn hand_over(args: &[OsString]) -> u8 {
    let full = match std::env::current_exe() {
        Ok(exe) => exe.with_file_name(FULL),
        Err(_) => PathBuf::from(FULL),
    };
    let mut command = std::process::Command::new(&full);
    if let Some((name, rest)) = args.split_first() {
        command.arg0(name).args(rest);
    }
    let err = command.exec();
    eprintln!(
        "tokenctl: cannot run {}: {err}; it answers every command but `get` and is \
         installed beside tokenctl (`cargo install --path client` installs both)",
        full.display()
    );
    1
}

/// A `get` this binary answers itself.
#[derive(Debug, PartialEq)]
struct GetArgs {
    socket: Option<PathBuf>,
    name: String,
    options: TokenOptions,
    format: get::Format,
}

/// `[--socket PATH] get NAME [--min-valid D] [--scope S]... [--audience A]
/// [--format raw|json|header] [--socket PATH]`, options as `--opt value` or
/// `--opt=value`, in any order after `get`. Anything else is `None`, for
/// tokenctl-full to answer: its clap parser is the reference, and this one
/// only takes what it is sure clap reads the same way.
fn parse_get(args: &[OsString]) -> Option<GetArgs> {
    let mut socket: Option<PathBuf> = None;
    let mut name: Option<String> = None;
    let mut min_valid: Option<Duration> = None;
    let mut scope = Vec::new();
    let mut audience: Option<String> = None;
    let mut format: Option<get::Format> = None;
    let mut seen_get = false;

    let mut args = args.iter();
    while let Some(arg) = args.next() {
        // Non-UTF-8 is for clap to judge (only a socket path may be so).
        let arg = arg.to_str()?;
        if let Some(option) = arg.strip_prefix("--") {
            let (option, value) = match option.split_once('=') {
                Some((option, value)) => (option, OsStr::new(value)),
                None => (option, args.next()?.as_os_str()),
            };
            // Clap would refuse an empty path, and take a value that looks
            // like an option as the next option: leave such cases to it.
            if value.is_empty() || value.as_encoded_bytes().starts_with(b"-") {
                return None;
            }
            match option {
                "socket" => set_once(&mut socket, PathBuf::from(value))?,
                _ if !seen_get => return None,
                "min-valid" => set_once(&mut min_valid, seconds(value.to_str()?)?)?,
                "scope" => scope.push(value.to_str()?.to_string()),
                "audience" => set_once(&mut audience, value.to_str()?.to_string())?,
                "format" => set_once(
                    &mut format,
                    match value.to_str()? {
                        "raw" => get::Format::Raw,
                        "json" => get::Format::Json,
                        "header" => get::Format::Header,
                        _ => return None,
                    },
                )?,
                _ => return None,
            }
        } else if arg.is_empty() || arg.starts_with('-') {
            // Short options, `-`, `--` and empty words.
            return None;
        } else if !seen_get {
            if arg != "get" {
                return None;
            }
            seen_get = true;
        } else {
            set_once(&mut name, arg.to_string())?;
        }
    }
    Some(GetArgs {
        socket,
        name: name?,
        options: TokenOptions {
            min_valid: min_valid.unwrap_or_default(),
            scope,
            audience,
        },
        format: format.unwrap_or(get::Format::Raw),
    })
}

/// Clap refuses an option given twice.
fn set_once<T>(slot: &mut Option<T>, value: T) -> Option<()> {
    match slot {
        Some(_) => None,
        None => {
            *slot = Some(value);
            Some(())
        }
    }
}

/// `--min-valid`: plain seconds, or a number with `s`, `m` or `h`, which
/// humantime reads the same way. Any other duration goes to tokenctl-full.
fn seconds(text: &str) -> Option<Duration> {
    let (digits, unit) = match text.as_bytes().last()? {
        b's' => (&text[..text.len() - 1], 1),
        b'm' => (&text[..text.len() - 1], 60),
        b'h' => (&text[..text.len() - 1], 3600),
        _ => (text, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let value: u64 = digits.parse().ok()?;
    value.checked_mul(unit).map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Option<GetArgs> {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        parse_get(&args)
    }

    #[test]
    fn plain_gets_are_answered_here() {
        let plain = parse(&["get", "work"]).unwrap();
        assert_eq!(plain.name, "work");
        assert_eq!(plain.socket, None);
        assert_eq!(plain.options, TokenOptions::default());
        assert_eq!(plain.format, get::Format::Raw);

        let all = parse(&[
            "--socket",
            "/run/a.sock",
            "get",
            "--format=json",
            "work",
            "--min-valid",
            "5m",
            "--scope",
            "read",
            "--scope=write",
            "--audience",
            "https://api.example.com",
        ])
        .unwrap();
        assert_eq!(all.socket, Some(PathBuf::from("/run/a.sock")));
        assert_eq!(all.name, "work");
        assert_eq!(all.format, get::Format::Json);
        assert_eq!(
            all.options,
            TokenOptions::new()
                .min_valid(Duration::from_secs(300))
                .scope("read")
                .scope("write")
                .audience("https://api.example.com")
        );
        let late_socket = parse(&["get", "work", "--socket=/x", "--format", "header"]).unwrap();
        assert_eq!(late_socket.socket, Some(PathBuf::from("/x")));
        assert_eq!(late_socket.format, get::Format::Header);
    }

    #[test]
    fn anything_unusual_goes_to_the_full_command_line() {
        for args in [
            &[][..],
            &["--version"],
            &["list"],
            &["get"],
            &["get", "--help"],
            &["get", "-h"],
            &["help", "get"],
            &["get", "a", "b"],
            &["get", "--", "work"],
            &["get", "-", "work"],
            &["get", ""],
            &["get", "work", "--min-valid", "1h 30m"],
            &["get", "work", "--min-valid", "1500ms"],
            &["get", "work", "--min-valid", "+5"],
            &["get", "work", "--min-valid", " 5"],
            &["get", "work", "--min-valid", "99999999999999999999"],
            &["get", "work", "--min-valid", "9999999999999999999h"],
            &["get", "work", "--min-valid=1", "--min-valid=2"],
            &["get", "work", "--format", "JSON"],
            &["get", "work", "--format", "yaml"],
            &["get", "work", "--format"],
            &["get", "work", "--audience", "a", "--audience", "b"],
            &["get", "work", "--audience", "-x"],
            &["get", "work", "--scope="],
            &["get", "work", "--socket", ""],
            &["--socket=/a", "get", "work", "--socket=/b"],
            &["get", "work", "--min"],
            &["--format", "json", "get", "work"],
            &["GET", "work"],
            &["exec", "work", "--", "get"],
        ] {
            assert!(parse(args).is_none(), "{args:?} should be handed over");
        }
    }

    #[test]
    fn durations_read_as_humantime_does() {
        assert_eq!(seconds("0"), Some(Duration::ZERO));
        assert_eq!(seconds("90"), Some(Duration::from_secs(90)));
        assert_eq!(seconds("30s"), Some(Duration::from_secs(30)));
        assert_eq!(seconds("5m"), Some(Duration::from_secs(300)));
        assert_eq!(seconds("2h"), Some(Duration::from_secs(7200)));
        for text in ["", "s", "5x", "5 m", "1.5h", "5min"] {
            assert_eq!(seconds(text), None, "{text:?}");
        }
    }
}
