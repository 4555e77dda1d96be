//! Who is on the other end of a connection, and whether they may connect or
//! take a session's token.
//!
//! The kernel vouches for the uid, gid and pid (`SO_PEERCRED`); the
//! executable path and systemd unit are read from `/proc` for that pid, at
//! connection time when the policy has session rules, else only when a rule
//! added since (a configuration reload) first asks for them: most agents have
//! no rules, and two `/proc` reads per connection are a measurable part of a
//! one-shot `tokenctl get`. The
//! uid check is a boundary between users. The executable and unit rules are
//! not a boundary against a hostile process of the same user (it can run a
//! listed executable, or ptrace one); they narrow mistakes and casual misuse.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use tokio::net::UnixStream;

use crate::config::{AccessConfig, SessionRules};

/// A connected client.
#[derive(Debug, Clone)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// Read from `/proc` once, on first use (see [`Caller::exe`]).
    exe: OnceLock<Option<PathBuf>>,
    unit: OnceLock<Option<String>>,
}

impl Caller {
    /// Reads the peer's credentials from a connected stream. With `identify`,
    /// its executable and unit are read now; otherwise on first use.
    pub fn of(stream: &UnixStream, identify: bool) -> std::io::Result<Caller> {
        let cred = stream.peer_cred()?;
        let caller = Caller {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
            exe: OnceLock::new(),
            unit: OnceLock::new(),
        };
        if identify {
            caller.exe();
            caller.unit();
        }
        Ok(caller)
    }

    /// The peer's executable (`/proc/PID/exe`), when it can be read.
    pub fn exe(&self) -> Option<&Path> {
        self.exe
            .get_or_init(|| {
                self.pid
                    .and_then(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).ok())
            })
            .as_deref()
    }

    /// The innermost systemd service or scope the peer runs in.
    pub fn unit(&self) -> Option<&str> {
        self.unit
            .get_or_init(|| self.pid.and_then(systemd_unit))
            .as_deref()
    }
}

pub fn own_uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

/// The innermost systemd service or scope in the process's cgroup path.
fn systemd_unit(pid: i32) -> Option<String> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    unit_from_cgroups(&cgroups)
}

fn unit_from_cgroups(cgroups: &str) -> Option<String> {
    // cgroup v2 has one line, "0::/path"; v1 has several, the systemd
    // hierarchy named "name=systemd".
    let path = cgroups
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .or_else(|| {
            cgroups
                .lines()
                .find_map(|line| line.split_once(":name=systemd:").map(|(_, path)| path))
        })?;
    path.rsplit('/')
        .find(|part| part.ends_with(".service") || part.ends_with(".scope"))
        .map(str::to_string)
}

/// The access rules in force.
#[derive(Debug, Clone)]
pub struct AccessPolicy {
    own_uid: u32,
    allow_uids: Vec<u32>,
    allow_gids: Vec<u32>,
    sessions: BTreeMap<String, SessionRules>,
}

impl AccessPolicy {
    pub fn new(access: &AccessConfig, sessions: &BTreeMap<String, SessionRules>) -> AccessPolicy {
        AccessPolicy {
            own_uid: own_uid(),
            allow_uids: access.allow_uids.clone(),
            allow_gids: access.allow_gids.clone(),
            sessions: sessions.clone(),
        }
    }

    /// Whether any session lists executables or units, so that callers
    /// need identifying.
    pub fn has_session_rules(&self) -> bool {
        self.sessions
            .values()
            .any(|rules| !rules.allowed_executables.is_empty() || !rules.allowed_units.is_empty())
    }

    /// The agent's own uid and root always; others when listed.
    pub fn may_connect(&self, caller: &Caller) -> bool {
        caller.uid == self.own_uid
            || caller.uid == 0
            || self.allow_uids.contains(&caller.uid)
            || self.allow_gids.contains(&caller.gid)
    }

    /// Whether `caller` may be served the token of session `name`.
    pub fn may_take(&self, name: &str, caller: &Caller) -> Result<(), String> {
        let Some(rules) = self.sessions.get(name) else {
            return Ok(());
        };
        // A section that only configures a token file restricts nobody.
        if rules.allowed_executables.is_empty() && rules.allowed_units.is_empty() {
            return Ok(());
        }
        let exe_listed = caller.exe().is_some_and(|exe| {
            rules
                .allowed_executables
                .iter()
                .any(|allowed| allowed == exe)
        });
        let unit_listed = caller
            .unit()
            .is_some_and(|unit| rules.allowed_units.iter().any(|allowed| allowed == unit));
        if exe_listed || unit_listed {
            return Ok(());
        }
        Err(format!(
            "session {name} is not served to {} (unit {}); the configuration's [sessions.{name}] \
             lists who may take it",
            caller
                .exe()
                .map_or("an unknown executable".into(), |exe| exe
                    .display()
                    .to_string()),
            caller.unit().unwrap_or("none"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(uid: u32, gid: u32, exe: &str, unit: Option<&str>) -> Caller {
        Caller {
            uid,
            gid,
            pid: Some(1),
            exe: OnceLock::from(Some(PathBuf::from(exe))),
            unit: OnceLock::from(unit.map(str::to_string)),
        }
    }

    #[test]
    fn the_owner_and_root_may_connect_others_only_when_listed() {
        let me = own_uid();
        let other = if me == 4242 { 4243 } else { 4242 };
        let policy = AccessPolicy::new(&AccessConfig::default(), &BTreeMap::new());
        assert!(policy.may_connect(&caller(me, 0, "/bin/x", None)));
        assert!(policy.may_connect(&caller(0, 0, "/bin/x", None)));
        assert!(!policy.may_connect(&caller(other, 4242, "/bin/x", None)));

        let listed = AccessPolicy::new(
            &AccessConfig {
                allow_uids: vec![other],
                allow_gids: vec![777],
            },
            &BTreeMap::new(),
        );
        assert!(listed.may_connect(&caller(other, 1, "/bin/x", None)));
        assert!(listed.may_connect(&caller(9999, 777, "/bin/x", None)));
        assert!(!listed.may_connect(&caller(9999, 1, "/bin/x", None)));
    }

    #[test]
    fn session_rules_admit_listed_executables_and_units_only() {
        let mut sessions = BTreeMap::new();
        sessions.insert(
            "work".to_string(),
            SessionRules {
                allowed_executables: vec!["/usr/bin/curl".into()],
                allowed_units: vec!["backup.service".into()],
                ..SessionRules::default()
            },
        );
        let policy = AccessPolicy::new(&AccessConfig::default(), &sessions);
        assert!(policy
            .may_take("work", &caller(0, 0, "/usr/bin/curl", None))
            .is_ok());
        assert!(policy
            .may_take("work", &caller(0, 0, "/bin/sh", Some("backup.service")))
            .is_ok());
        assert!(policy
            .may_take("work", &caller(0, 0, "/bin/sh", None))
            .is_err());
        assert!(policy
            .may_take("home", &caller(0, 0, "/bin/sh", None))
            .is_ok());
    }

    #[test]
    fn the_unit_is_read_from_cgroup_v2_and_v1() {
        let v2 = "0::/user.slice/user-1000.slice/user@1000.service/app.slice/backup.service\n";
        assert_eq!(unit_from_cgroups(v2).as_deref(), Some("backup.service"));
        let v1 = "12:pids:/x\n1:name=systemd:/system.slice/cron.service\n";
        assert_eq!(unit_from_cgroups(v1).as_deref(), Some("cron.service"));
        assert_eq!(unit_from_cgroups("0::/\n"), None);
    }
}
