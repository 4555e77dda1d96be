//! What /proc says about a process: CPU time, memory, context switches.

use std::fs;
use std::time::Duration;

/// User plus system CPU time of the whole process, exited threads included.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces and parentheses: fields count from
    // the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow::anyhow!("unreadable /proc/{pid}/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime 14 and stime 15 (1-based).
    let utime: u64 = fields.get(11).unwrap_or(&"0").parse()?;
    let stime: u64 = fields.get(12).unwrap_or(&"0").parse()?;
    let ticks = utime + stime;
    Ok(Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64))
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as u64
    } else {
        100
    }
}

/// A `kB` line of /proc/PID/status (VmRSS, VmHWM, ...), in bytes.
pub fn status_bytes(pid: u32, key: &str) -> anyhow::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix(key).and_then(|r| r.strip_prefix(':')) {
            let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse()?;
            return Ok(kb * 1024);
        }
    }
    anyhow::bail!("no {key} in /proc/{pid}/status")
}

pub fn threads(pid: u32) -> u64 {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

/// Context switches summed over the live threads: how often the process
/// woke up.
pub fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    let mut total = 0;
    for task in tasks.flatten() {
        let Ok(status) = fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        for line in status.lines() {
            for key in ["voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:"] {
                if let Some(n) = line.strip_prefix(key) {
                    total += n.trim().parse::<u64>().unwrap_or(0);
                }
            }
        }
    }
    total
}

/// Apparent size and allocated size of everything under `dir`, in bytes.
pub fn disk_usage(dir: &std::path::Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut apparent = 0;
    let mut allocated = 0;
    let Ok(entries) = fs::read_dir(dir) else {
        return (0, 0);
    };
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            let (a, b) = disk_usage(&entry.path());
            apparent += a;
            allocated += b;
        } else {
            apparent += meta.len();
            allocated += meta.blocks() * 512;
        }
    }
    (apparent, allocated)
}

/// The machine's 1-minute load average.
pub fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// Names of compilers running now: measurements taken beside a build are
/// marked as such.
pub fn busy_compilers() -> Vec<String> {
    let mut found = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return found;
    };
    for entry in procs.flatten() {
        let Ok(comm) = fs::read_to_string(entry.path().join("comm")) else {
            continue;
        };
        let comm = comm.trim();
        if matches!(comm, "rustc" | "cargo" | "cc1" | "cc1plus" | "ld")
            && !found.iter().any(|f| f == comm)
        {
            found.push(comm.to_string());
        }
    }
    found
}

/// Puts every thread of `pid` on `cpus` (threads started later inherit it
/// from the thread that starts them).
pub fn pin_process(pid: u32, cpus: &[usize]) -> anyhow::Result<()> {
    for task in fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
        if let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<i32>().ok())
        {
            set_affinity(tid, cpus)?;
        }
    }
    Ok(())
}

/// Puts the calling thread on `cpus`.
pub fn pin_this_thread(cpus: &[usize]) -> anyhow::Result<()> {
    set_affinity(0, cpus)
}

fn set_affinity(tid: i32, cpus: &[usize]) -> anyhow::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write into it,
    // and sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        for &cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        if libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            let err = std::io::Error::last_os_error();
            // A thread that has just exited is no error.
            if err.raw_os_error() != Some(libc::ESRCH) {
                return Err(err.into());
            }
        }
    }
    Ok(())
}

/// Every CPU this process may run on.
pub fn all_cpus() -> Vec<usize> {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
    (0..n).collect()
}

/// CPU time of each live thread of `pid`, in nanoseconds, from
/// /proc/PID/task/TID/schedstat: finer than the 10 ms ticks of
/// /proc/PID/stat, for short idle windows.
pub fn thread_cpu_ns(pid: u32) -> std::collections::HashMap<u32, u64> {
    let mut by_thread = std::collections::HashMap::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return by_thread;
    };
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        if let Some(ns) = fs::read_to_string(task.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse().ok()))
        {
            by_thread.insert(tid, ns);
        }
    }
    by_thread
}

/// CPU the threads of `pid` used since `before` (threads started since
/// count from zero; threads that ended since are not counted).
pub fn cpu_since(pid: u32, before: &std::collections::HashMap<u32, u64>) -> Duration {
    let ns: u64 = thread_cpu_ns(pid)
        .iter()
        .map(|(tid, now)| now.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum();
    Duration::from_nanos(ns)
}
