//! Links the fast `tokenctl` binary statically (glibc included), where that
//! can be done safely; `tokenctl-full` and the library are left alone.
//!
//! Why: most of a `tokenctl get` process's time is the dynamic loader
//! mapping and relocating libc and libgcc_s. `get` does no DNS and no NSS
//! lookups (only a Unix socket), so a static glibc is safe for it; the login
//! path (getaddrinfo) lives in `tokenctl-full`, which stays dynamic.
//!
//! How: Cargo has no per-binary `-C target-feature=+crt-static`, and rustc
//! always asks for the system libraries as `-Bdynamic -lgcc_s ... -lm -lc`.
//! So this script writes, into OUT_DIR, small linker scripts named
//! `libgcc_s.so`, `libc.so` and `libm.so` that stand for the static archives
//! (`libgcc_eh.a`, `libc.a`, ...), puts that folder first on the tokenctl
//! link's search path (`-L` applies to every `-l`, and user folders come
//! before the compiler's own), and links it `-static-pie`. Only when the
//! target is the host's x86_64/aarch64 Linux with glibc, the linker is the
//! default `cc`, `cc` finds every archive and `rcrt1.o`, and a trial
//! program linked the same way (with `$RUSTC` and the build's own flags)
//! builds and runs; otherwise, or with `TOKENCTL_DYNAMIC=1` in the
//! environment, tokenctl is linked like any other binary (and is a little
//! slower to start), with a build warning only for the failed trial. The
//! client crate's `binaries` test runs the result.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=TOKENCTL_DYNAMIC");
    println!("cargo:rerun-if-env-changed=RUSTC_LINKER");
    let Some(folder) = static_libraries() else {
        return;
    };
    let args = [format!("-L{}", folder.display()), "-static-pie".to_string()];
    if !links_and_runs(&args) {
        println!(
            "cargo:warning=tokenctl is linked dynamically: a static trial link failed \
             (set TOKENCTL_DYNAMIC=1 to skip the trial)"
        );
        return;
    }
    for arg in args {
        println!("cargo:rustc-link-arg-bin=tokenctl={arg}");
    }
}

/// Whether a small Rust program that uses the socket and the environment,
/// as tokenctl does, links with `args` and runs.
fn links_and_runs(args: &[String]) -> bool {
    let Some(out) = std::env::var_os("OUT_DIR").map(PathBuf::from) else {
        return false;
    };
    let source = out.join("static_trial.rs");
    let program = out.join("static_trial");
    let trial = r#"
fn main() {
    let path = std::env::temp_dir().join("no-such-static-trial.sock");
    let refused = std::os::unix::net::UnixStream::connect(path).is_err();
    let exe = std::env::current_exe().is_ok();
    print!("{}", refused && exe);
}
"#;
    if std::fs::write(&source, trial).is_err() {
        return false;
    }
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let mut compile = Command::new(rustc);
    // The build's own flags (a target CPU, a linker) apply to the trial too.
    if let Ok(flags) = std::env::var("CARGO_ENCODED_RUSTFLAGS") {
        compile.args(flags.split('\x1f').filter(|flag| !flag.is_empty()));
    }
    compile
        .args(["--edition", "2021", "-o"])
        .arg(&program)
        .arg(&source);
    for arg in args {
        compile.arg(format!("-Clink-arg={arg}"));
    }
    let built = compile.output().is_ok_and(|output| output.status.success());
    built
        && Command::new(&program)
            .output()
            .is_ok_and(|output| output.status.success() && output.stdout == b"true")
}

/// The folder of stand-in linker scripts, or `None` where static linking is
/// not known to work.
fn static_libraries() -> Option<PathBuf> {
    let env = |name: &str| std::env::var(name).unwrap_or_default();
    if std::env::var_os("TOKENCTL_DYNAMIC").is_some_and(|v| !v.is_empty() && v != "0") {
        return None;
    }
    let target = env("TARGET");
    if target != env("HOST")
        || env("CARGO_CFG_TARGET_OS") != "linux"
        || env("CARGO_CFG_TARGET_ENV") != "gnu"
        || !matches!(env("CARGO_CFG_TARGET_ARCH").as_str(), "x86_64" | "aarch64")
        || std::env::var_os("RUSTC_LINKER").is_some()
    {
        return None;
    }
    // rcrt1.o is glibc's start file for static PIE executables.
    find("rcrt1.o")?;
    let gcc_eh = find("libgcc_eh.a")?;
    let gcc = find("libgcc.a")?;
    let c = find("libc.a")?;
    let m = find("libm.a")?;

    let folder = PathBuf::from(std::env::var_os("OUT_DIR")?).join("static-libs");
    std::fs::create_dir_all(&folder).ok()?;
    let scripts = [
        ("libgcc_s.so", format!("INPUT({gcc_eh} {gcc})\n")),
        ("libc.so", format!("GROUP({c} {gcc_eh} {gcc})\n")),
        ("libm.so", format!("INPUT({m})\n")),
    ];
    for (name, script) in scripts {
        std::fs::write(folder.join(name), script).ok()?;
    }
    Some(folder)
}

/// The absolute path `cc` links for `file`, if it has one. Paths with
/// characters a linker script would misread are not used.
fn find(file: &str) -> Option<String> {
    let output = Command::new("cc")
        .arg(format!("-print-file-name={file}"))
        .output()
        .ok()?;
    let path = String::from_utf8(output.stdout).ok()?.trim().to_string();
    let usable = output.status.success()
        && Path::new(&path).is_absolute()
        && Path::new(&path).is_file()
        && !path.contains(|c: char| c.is_whitespace() || "()\",".contains(c));
    usable.then_some(path)
}
