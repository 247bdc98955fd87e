//! Real programs that no one here wrote, run with and without `LD_PRELOAD=libnolock_c.so`: their output (and
//! the files they write) must be byte-identical. Python (JSON and regular expressions), GNU `sort` of a large
//! generated file, `git` on a generated repository, `sqlite3` running a script, `gcc` compiling and linking a
//! generated C file (the object, the binary and its output are compared).
//!
//! A program that is not installed is skipped with a loud message (`.ci/run` installs them from Debian and sets
//! `NOLOCK_C_REQUIRE_PROGRAMS=1`, which turns a missing program into a failure).
//!
//! Each test also prints its wall time and peak RSS under both allocators (one run: informative only, nothing
//! is asserted on it). `cargo test --release -p nolock-c --test real_programs -- --ignored --nocapture
//! bench_table` runs every workload `NOLOCK_C_BENCH_RUNS` times (default 5) on each allocator, alternating, and
//! prints the medians as a table; `NOLOCK_C_BENCH_SCALE` (default 2) multiplies the input sizes.

mod common;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Rng, Run, median, need, run, scratch};

const LIMIT: Duration = Duration::from_secs(300);

/// One workload: how to start it in a fresh run directory, and which files it writes that must match.
struct Workload {
    name: &'static str,
    /// Builds the command for a run directory.
    cmd: Box<dyn Fn(&Path) -> Command>,
    stdin: Option<PathBuf>,
    outputs: Vec<&'static str>,
}

fn base_env(c: &mut Command, run_dir: &Path) {
    c.current_dir(run_dir)
        .env("LC_ALL", "C")
        .env("HOME", run_dir)
        .env("TMPDIR", run_dir)
        .env("PYTHONHASHSEED", "0")
        .env("PYTHONDONTWRITEBYTECODE", "1");
}

const WORDS: &[&str] = &[
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima",
    "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey", "xray",
    "yankee", "zulu", "nolock", "kmalloc", "slab", "rcu", "grace", "period",
];

fn python(dir: &Path, scale: usize) -> Option<Workload> {
    let py = need("python3", "python3")?;
    let script = dir.join("work.py");
    std::fs::write(
        &script,
        format!(
            r#"import hashlib, json, re
N = {n}
words = {words:?}
state = 12345
def rnd():
    global state
    state = (state * 1103515245 + 12345) & 0x7fffffff
    return state
records = []
for i in range(N):
    name = " ".join(words[rnd() % len(words)] for _ in range(6))
    records.append({{"id": i, "name": name, "tags": [words[rnd() % len(words)] for _ in range(rnd() % 5)],
                    "score": (rnd() % 100000) / 7.0, "nested": {{"a": [rnd() % 97, None, True], "b": str(i) * 3}}}})
s = json.dumps(records, sort_keys=True, indent=1)
back = json.loads(s)
assert back == records
print(len(s), hashlib.sha256(s.encode()).hexdigest())
text = "\n".join(r["name"] + " " + " ".join(r["tags"]) for r in back)
alliter = re.compile(r"\b(\w)\w*\s+\1\w*")
print("alliterations", len(alliter.findall(text)))
counts = {{}}
for w in re.findall(r"[a-z]+", text):
    counts[w] = counts.get(w, 0) + 1
print(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:8])
sub = re.sub(r"([aeiou])([a-z])", lambda m: m.group(2).upper() + m.group(1), text)
print(hashlib.sha256(sub.encode()).hexdigest())
print(sub[:300])
parts = [p for p in re.split(r"\s+(?=[xyz])", text) if p]
print(len(parts), max(len(p) for p in parts))
"#,
            n = 20_000 * scale,
            words = WORDS
        ),
    )
    .ok()?;
    Some(Workload {
        name: "python3 (JSON + re)",
        cmd: Box::new(move |d| {
            let mut c = Command::new(&py);
            c.arg(&script);
            base_env(&mut c, d);
            c
        }),
        stdin: None,
        outputs: vec![],
    })
}

fn sort(dir: &Path, scale: usize) -> Option<Workload> {
    let sort = need("sort", "coreutils")?;
    let input = dir.join("input.txt");
    let mut s = String::new();
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    for i in 0..200_000 * scale {
        let w1 = WORDS[(r.next() % WORDS.len() as u64) as usize];
        let w2 = WORDS[(r.next() % WORDS.len() as u64) as usize];
        let _ = writeln!(s, "{w1}-{:x} {} {w2} line{i}", r.next() % 100_000, r.next() % 1_000_000);
    }
    std::fs::write(&input, s).ok()?;
    Some(Workload {
        name: "sort (large file)",
        cmd: Box::new(move |d| {
            let mut c = Command::new(&sort);
            c.args(["-k2,2n", "-k1,1", "-s"]).arg(&input);
            base_env(&mut c, d);
            c
        }),
        stdin: None,
        outputs: vec![],
    })
}

fn git(dir: &Path, scale: usize) -> Option<Workload> {
    let git = need("git", "git")?;
    let sh = need("sh", "dash")?;
    let tree = dir.join("tree");
    let mut r = Rng(42);
    for i in 0..100 * scale {
        let sub = tree.join(format!("dir{}", i % 10));
        std::fs::create_dir_all(&sub).ok()?;
        let mut body = String::new();
        for j in 0..(50 + r.next() % 200) {
            let _ = writeln!(body, "{} {} {j}", WORDS[(r.next() % 32) as usize], r.next());
        }
        std::fs::write(sub.join(format!("file{i}.txt")), body).ok()?;
    }
    let script = format!(
        r#"set -e
cp -r {tree} repo
cd repo
git init -q -b main .
git add -A
git commit -q -m "generated tree"
for f in dir1/*.txt; do sed -i 's/alpha/ALPHA/g' "$f"; done
git rm -q dir2/file2.txt
git commit -q -a -m "second: shout alpha, drop a file"
git log --stat --format='%H %an %ad %s'
git diff --stat HEAD~1
git rev-list --all --objects | sort
git gc -q
git count-objects -v | grep -v size
git fsck --no-progress
"#,
        tree = tree.display()
    );
    Some(Workload {
        name: "git (init, add, commit, log)",
        cmd: Box::new(move |d| {
            let mut c = Command::new(&sh);
            c.args(["-c", &script]);
            base_env(&mut c, d);
            c.env("GIT_CONFIG_NOSYSTEM", "1")
                .env("GIT_CONFIG_GLOBAL", "/dev/null")
                .env("PATH", git.parent().map(|p| format!("{}:/usr/bin:/bin", p.display())).unwrap_or_default());
            for (k, v) in [
                ("GIT_AUTHOR_NAME", "Nolock Tester"),
                ("GIT_AUTHOR_EMAIL", "tester@example.invalid"),
                ("GIT_AUTHOR_DATE", "2026-01-02T03:04:05Z"),
                ("GIT_COMMITTER_NAME", "Nolock Tester"),
                ("GIT_COMMITTER_EMAIL", "tester@example.invalid"),
                ("GIT_COMMITTER_DATE", "2026-01-02T03:04:05Z"),
            ] {
                c.env(k, v);
            }
            c
        }),
        stdin: None,
        outputs: vec![],
    })
}

fn sqlite(dir: &Path, scale: usize) -> Option<Workload> {
    let sqlite = need("sqlite3", "sqlite3")?;
    let script = dir.join("script.sql");
    std::fs::write(
        &script,
        format!(
            r#"PRAGMA journal_mode=OFF;
CREATE TABLE t(id INTEGER PRIMARY KEY, k INTEGER, name TEXT, v REAL);
WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {n})
INSERT INTO t SELECT x, (x * 7919) % 1000, printf('name-%d-%s', x % 97, hex(x * 31)), (x % 113) / 7.0 FROM c;
CREATE INDEX t_k ON t(k);
CREATE TABLE u AS SELECT k, count(*) AS n, sum(v) AS s, group_concat(id % 10, '') AS g FROM t GROUP BY k;
SELECT count(*), sum(k), printf('%.3f', avg(v)) FROM t;
SELECT k, n, printf('%.2f', s), length(g) FROM u ORDER BY n DESC, k LIMIT 10;
SELECT t.name, u.n FROM t JOIN u USING(k) WHERE t.id % 5000 = 1 ORDER BY t.id;
SELECT substr(name, 1, 8) AS p, count(*) FROM t GROUP BY p ORDER BY 2 DESC, 1 LIMIT 5;
UPDATE t SET name = upper(name) WHERE k < 100;
DELETE FROM t WHERE k % 3 = 0;
SELECT count(*), max(name), min(name) FROM t;
SELECT group_concat(name, ',') FROM (SELECT name FROM t ORDER BY name DESC LIMIT 20);
"#,
            n = 100_000 * scale
        ),
    )
    .ok()?;
    Some(Workload {
        name: "sqlite3 (script)",
        cmd: Box::new(move |d| {
            let mut c = Command::new(&sqlite);
            c.arg(d.join("db.sqlite"));
            base_env(&mut c, d);
            c
        }),
        stdin: Some(script),
        outputs: vec![],
    })
}

fn gcc(dir: &Path, scale: usize) -> Option<Workload> {
    let gcc = need("gcc", "gcc")?;
    let sh = need("sh", "dash")?;
    let src = dir.join("prog.c");
    let mut s = String::from("#include <stdio.h>\n#include <string.h>\n");
    let nf = 300 * scale;
    for i in 0..nf {
        let _ = write!(
            s,
            "static unsigned long f{i}(unsigned long x) {{\n  unsigned long a[16];\n  for (int j = 0; j < 16; j++) \
             a[j] = x * {m} + j;\n  switch (x % 5) {{ case 0: x ^= a[3]; break; case 1: x += a[7] >> 2; break; \
             case 2: x = (x << 3) | (a[{i} % 16] & 7); break; default: x -= {i}; }}\n  for (int j = 0; j < 16; \
             j++) x = x * 31 + a[j];\n  return x;\n}}\n",
            m = 2 * i + 1
        );
    }
    s.push_str("int main(void) {\n  unsigned long x = 1;\n  char buf[64];\n");
    for i in 0..nf {
        let _ = writeln!(s, "  x = f{i}(x);");
    }
    s.push_str("  snprintf(buf, sizeof buf, \"%lu\", x);\n  printf(\"checksum %s (%zu digits)\\n\", buf, strlen(buf));\n  return 0;\n}\n");
    std::fs::write(&src, s).ok()?;
    let script = format!(
        "set -e\n{gcc} -O2 -frandom-seed=nolock -c {src} -o prog.o\n{gcc} -o prog prog.o\n./prog\n",
        gcc = gcc.display(),
        src = src.display()
    );
    Some(Workload {
        name: "gcc -O2 (compile, link, run)",
        cmd: Box::new(move |d| {
            let mut c = Command::new(&sh);
            c.args(["-c", &script]);
            base_env(&mut c, d);
            c
        }),
        stdin: None,
        outputs: vec!["prog.o", "prog"],
    })
}

/// Run `w` once on `preload` in a fresh directory.
fn run_once(w: &Workload, root: &Path, preload: bool, i: usize) -> (Run, Vec<(String, Vec<u8>)>) {
    let d = root.join(format!("run-{}-{i}", if preload { "nolock" } else { "glibc" }));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("run dir");
    let r = run((w.cmd)(&d), preload, w.stdin.as_deref(), &d, LIMIT);
    let files = w
        .outputs
        .iter()
        .map(|f| (f.to_string(), std::fs::read(d.join(f)).unwrap_or_else(|e| panic!("{}: {f}: {e}", w.name))))
        .collect();
    let _ = std::fs::remove_dir_all(&d);
    (r, files)
}

fn first_difference(a: &[u8], b: &[u8]) -> String {
    let i = a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len()));
    let ctx = |v: &[u8]| String::from_utf8_lossy(&v[i.saturating_sub(80)..(i + 80).min(v.len())]).into_owned();
    format!(
        "lengths {} vs {}, first difference at byte {i}:\n--- glibc:\n{}\n--- nolock:\n{}",
        a.len(),
        b.len(),
        ctx(a),
        ctx(b)
    )
}

/// Builds a workload's inputs in a directory at a scale (`None`: its program is not installed).
type MakeWorkload = fn(&Path, usize) -> Option<Workload>;

/// Run `w` on glibc and on the preload and require identical results.
fn check(make: MakeWorkload, tag: &str) {
    let root = scratch(tag);
    let Some(w) = make(&root, 1) else { return };
    let (g, gf) = run_once(&w, &root, false, 0);
    assert!(g.success(), "{} failed under glibc ({}): {}", w.name, g.describe(), String::from_utf8_lossy(&g.stderr));
    let (n, nf) = run_once(&w, &root, true, 0);
    assert!(
        n.success(),
        "{} failed under the preload ({}): {}",
        w.name,
        n.describe(),
        String::from_utf8_lossy(&n.stderr)
    );
    assert!(!g.stdout.is_empty(), "{}: no output to compare", w.name);
    assert!(g.stdout == n.stdout, "{}: stdout differs: {}", w.name, first_difference(&g.stdout, &n.stdout));
    assert!(g.stderr == n.stderr, "{}: stderr differs: {}", w.name, first_difference(&g.stderr, &n.stderr));
    for ((name, a), (_, b)) in gf.iter().zip(&nf) {
        assert!(a == b, "{}: output file {name} differs: {}", w.name, first_difference(a, b));
    }
    eprintln!(
        "{}: identical ({} bytes of output{}); one run, glibc {:?} / {} KiB, nolock {:?} / {} KiB",
        w.name,
        g.stdout.len(),
        if gf.is_empty() { String::new() } else { format!(", files {:?}", w.outputs) },
        g.wall,
        g.max_rss / 1024,
        n.wall,
        n.max_rss / 1024
    );
}

#[test]
fn python_json_regex_identical() {
    check(python, "python");
}

#[test]
fn sort_large_file_identical() {
    check(sort, "sort");
}

#[test]
fn git_generated_repository_identical() {
    check(git, "git");
}

#[test]
fn sqlite3_script_identical() {
    check(sqlite, "sqlite3");
}

#[test]
fn gcc_compile_identical() {
    check(gcc, "gcc");
}

/// Medians of wall time, CPU time and peak RSS of every workload, glibc against the preload (runs alternate, so both see
/// the same machine load). Prints a Markdown table. Informative: nothing is asserted on the figures.
#[test]
#[ignore = "a measurement, not a test: run with --ignored --nocapture"]
fn bench_table() {
    let runs: usize = std::env::var("NOLOCK_C_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let scale: usize = std::env::var("NOLOCK_C_BENCH_SCALE").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let makers: [(&str, MakeWorkload); 5] =
        [("python", python), ("sort", sort), ("git", git), ("sqlite3", sqlite), ("gcc", gcc)];
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| program | glibc wall | nolock wall | ratio | glibc CPU | nolock CPU | ratio | glibc peak RSS | nolock peak RSS | ratio |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for (tag, make) in makers {
        let root = scratch(&format!("bench-{tag}"));
        let Some(w) = make(&root, scale) else { continue };
        let (mut gw, mut nw, mut gc, mut nc, mut gr, mut nr) = (vec![], vec![], vec![], vec![], vec![], vec![]);
        for i in 0..runs {
            for preload in [false, true] {
                let (r, _) = run_once(&w, &root, preload, i);
                assert!(r.success(), "{} ({}) failed: {}", w.name, r.describe(), String::from_utf8_lossy(&r.stderr));
                let (wv, cv, rv) = if preload { (&mut nw, &mut nc, &mut nr) } else { (&mut gw, &mut gc, &mut gr) };
                wv.push(r.wall);
                cv.push(r.cpu);
                rv.push(r.max_rss);
            }
        }
        let (gw, nw, gr, nr) = (median(&mut gw), median(&mut nw), median(&mut gr), median(&mut nr));
        let (gc, nc) = (median(&mut gc), median(&mut nc));
        let _ = writeln!(
            table,
            "| {} | {:.3} s | {:.3} s | {:.2}x | {:.3} s | {:.3} s | {:.2}x | {:.1} MiB | {:.1} MiB | {:.2}x |",
            w.name,
            gw.as_secs_f64(),
            nw.as_secs_f64(),
            nw.as_secs_f64() / gw.as_secs_f64(),
            gc.as_secs_f64(),
            nc.as_secs_f64(),
            nc.as_secs_f64() / gc.as_secs_f64(),
            gr as f64 / 1048576.0,
            nr as f64 / 1048576.0,
            nr as f64 / gr as f64
        );
    }
    eprintln!("\nmedians of {runs} runs each, scale {scale}:\n{table}");
}
