//! Shared by the tests: where the built library is, compiling the C sources, running a program with and
//! without `LD_PRELOAD` and measuring it (through the `measure` helper: the program's own wall time and peak
//! RSS).

#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The library under test: `NOLOCK_C_LIB` if set (relative to the workspace root, e.g. the initial-exec build
/// `target/initial-exec/release/libnolock_c.so`), else the build next to the test binaries
/// (`target/<profile>/deps`, where `cargo test` builds it before them).
pub fn lib_path() -> PathBuf {
    if let Some(p) = std::env::var_os("NOLOCK_C_LIB") {
        let p = crate_dir().join("../..").join(p);
        assert!(p.exists(), "NOLOCK_C_LIB={} does not exist", p.display());
        return p;
    }
    // `cargo test` builds the library (all its crate types: it has an rlib) next to the test binaries in
    // `target/<profile>/deps`; `cargo build` puts it one level up. Prefer the one the tests were built with.
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("deps dir");
    [deps.join("libnolock_c.so"), deps.parent().expect("target dir").join("libnolock_c.so")]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!("libnolock_c.so not built next to {} (cargo test -p nolock-c builds it)", exe.display())
        })
}

/// `crates/nolock-c`.
pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("nolock-c").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// The program `name` on `PATH` (or at an absolute path), if installed. Prefers `/usr/bin` (the Debian package
/// the CI installs) over wrappers earlier on `PATH` (pyenv shims are shell scripts).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let usr = Path::new("/usr/bin").join(name);
    if usr.is_file() {
        return Some(usr);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// The program, or `None` after a loud message. With `NOLOCK_C_REQUIRE_PROGRAMS=1` (set by `.ci/run`, where
/// apt installs them) a missing program fails the test instead.
pub fn need(name: &str, debian_package: &str) -> Option<PathBuf> {
    if let Some(p) = find_program(name) {
        return Some(p);
    }
    let msg = format!(
        "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
         !!! SKIPPED: `{name}` is not installed (Debian package `{debian_package}`; .ci/run installs it).\n\
         !!! This test proves nothing on this machine.\n\
         !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
    );
    if std::env::var("NOLOCK_C_REQUIRE_PROGRAMS").as_deref() == Ok("1") {
        panic!("{msg}(NOLOCK_C_REQUIRE_PROGRAMS=1: missing programs are failures)");
    }
    eprintln!("{msg}");
    None
}

/// Compile `tests/c/<src>` into `out` with the system C compiler (`cc`), plus `extra` arguments.
pub fn compile_c(src: &str, out: &Path, extra: &[&str]) {
    let cc = find_program("cc").or_else(|| find_program("gcc")).expect("a C compiler (cc) is needed for these tests");
    let st = Command::new(cc)
        .args(["-O2", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(out)
        .arg(crate_dir().join("tests/c").join(src))
        .arg("-I")
        .arg(crate_dir().join("include"))
        .args(extra)
        .status()
        .expect("run cc");
    assert!(st.success(), "compiling {src} failed");
}

/// What one run gave.
#[derive(Debug)]
pub struct Run {
    /// Exit status (`wait` status word).
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub wall: Duration,
    /// User plus system CPU time of the program and its waited-for children (less sensitive than the wall time
    /// to other load on the machine).
    pub cpu: Duration,
    /// Peak resident set size of the program (largest of it and the children it waited for), bytes; 0 when it
    /// timed out.
    pub max_rss: u64,
    /// Killed at the time limit.
    pub timed_out: bool,
}

impl Run {
    pub fn success(&self) -> bool {
        !self.timed_out && libc::WIFEXITED(self.status) && libc::WEXITSTATUS(self.status) == 0
    }

    pub fn describe(&self) -> String {
        if self.timed_out {
            "timed out".into()
        } else if libc::WIFSIGNALED(self.status) {
            format!("killed by signal {}", libc::WTERMSIG(self.status))
        } else {
            format!("exit {}", libc::WEXITSTATUS(self.status))
        }
    }
}

/// The `tests/c/measure.c` helper, compiled once per test process.
fn measure_helper() -> &'static Path {
    static HELPER: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    HELPER.get_or_init(|| {
        let d =
            PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("nolock-c").join(format!("measure-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("helper dir");
        let exe = d.join("measure");
        compile_c("measure.c", &exe, &[]);
        exe
    })
}

/// Run `cmd` (stdin from `stdin` or /dev/null), with `LD_PRELOAD` of the library when `preload`, killing it
/// (its whole process group) after `limit`. Output goes through files in `dir`. The program is started by the
/// `measure` helper (`tests/c/measure.c`), which reports its wall time and its own peak RSS.
pub fn run(cmd: Command, preload: bool, stdin: Option<&Path>, dir: &Path, limit: Duration) -> Run {
    let tag = if preload { "preload" } else { "glibc" };
    let out_path = dir.join(format!("stdout.{tag}"));
    let err_path = dir.join(format!("stderr.{tag}"));
    let m_path = dir.join(format!("measure.{tag}"));
    let _ = std::fs::remove_file(&m_path);
    let mut m = Command::new(measure_helper());
    m.arg(&m_path);
    if preload {
        m.arg(lib_path());
    } else {
        m.arg("-");
    }
    m.arg(cmd.get_program()).args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => m.env(k, v),
            None => m.env_remove(k),
        };
    }
    if let Some(d) = cmd.get_current_dir() {
        m.current_dir(d);
    }
    m.env_remove("LD_PRELOAD");
    m.stdout(File::create(&out_path).expect("stdout file"));
    m.stderr(File::create(&err_path).expect("stderr file"));
    m.stdin(match stdin {
        Some(p) => Stdio::from(File::open(p).expect("stdin file")),
        None => Stdio::null(),
    });
    m.process_group(0);
    let t0 = Instant::now();
    let child = m.spawn().unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()));
    let pid = child.id() as libc::pid_t;
    let (helper_status, timed_out) = wait_with_limit(pid, limit);
    let mut wall = t0.elapsed();
    drop(child);
    let mut status = helper_status;
    let mut max_rss = 0;
    let mut cpu = Duration::ZERO;
    if !timed_out {
        let report = std::fs::read_to_string(&m_path).unwrap_or_default();
        let f: Vec<i64> = report.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        assert!(
            f.len() == 4,
            "the measure helper failed ({helper_status:#x}): {}",
            String::from_utf8_lossy(&std::fs::read(&err_path).unwrap_or_default())
        );
        status = f[0] as i32;
        wall = Duration::from_nanos(f[1] as u64);
        max_rss = f[2] as u64 * 1024;
        cpu = Duration::from_nanos(f[3] as u64);
    }
    Run {
        status,
        stdout: std::fs::read(&out_path).unwrap_or_default(),
        stderr: std::fs::read(&err_path).unwrap_or_default(),
        wall,
        cpu,
        max_rss,
        timed_out,
    }
}

/// `wait4` the child, killing its process group at `limit`.
fn wait_with_limit(pid: libc::pid_t, limit: Duration) -> (i32, bool) {
    let deadline = Instant::now() + limit;
    let mut timed_out = false;
    loop {
        let mut status = 0;
        // SAFETY: waits for our own child; the out-parameter is valid.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return (status, timed_out);
        }
        assert!(r == 0, "wait4: {}", std::io::Error::last_os_error());
        if !timed_out && Instant::now() >= deadline {
            timed_out = true;
            // SAFETY: kill the child's process group (it is its own group leader).
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A command for `program` with `args`.
pub fn command<S: AsRef<OsStr>>(program: &Path, args: &[S]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

/// Median of durations / values.
pub fn median<T: Copy + Ord>(v: &mut [T]) -> T {
    v.sort();
    v[v.len() / 2]
}

/// A deterministic pseudo-random generator (xorshift), for generated inputs.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
