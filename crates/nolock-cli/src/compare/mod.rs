//! `nolock compare`: every benchmark family in one run, one self-contained report.
//!
//! Sections: the allocator, reclamation and type-safe-cache benchmarks (each `nolock bench …` run as a child
//! process, see [`benches`]), BPF maps (empty until `nolock bench maps` is part of this build; with `--kernel`
//! the running kernel's hash maps, see [`crate::kernel_bpf`]) and task local storage ([`storage`]). Written to
//! `--out` (default `compare-report/`): `report.html` (tables and inline SVG charts, nothing fetched),
//! `report.md` (the tables), `report.json` (the data, laid out as `schema.json`, which is written beside it),
//! plus each child benchmark's own JSON and text output.
//!
//! Exit status: non-zero when a section failed, when the lock-free storage mode showed a spurious failure, or
//! when the report could not be written. Targets that are not met are reported, not fatal (timing figures on
//! shared machines are noisy).

pub mod benches;
pub mod report;
pub mod storage;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use report::{Cell, Chart, ChartKind, Env, Report, Section, Series, Status, Table, Target};

use crate::kernel_bpf;

/// What the user asked for.
#[derive(Debug, Clone)]
pub struct CompareArgs {
    /// Smoke run (< 1 minute).
    pub quick: bool,
    /// Also measure the running kernel's BPF hash maps.
    pub kernel: bool,
    /// Output directory.
    pub out: PathBuf,
    /// Only these sections (ids), if given.
    pub only: Option<Vec<String>>,
}

fn first_line_of(cmd: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(cmd).args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout).lines().next().map(|s| s.trim().to_string())
}

fn env(quick: bool, kernel: bool) -> Env {
    let commit = std::env::var("NOLOCK_COMMIT")
        .ok()
        .or_else(|| first_line_of("git", &["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel_version = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    Env {
        commit,
        cpu_model,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        kernel_version,
        load_average: crate::bench::load_average(),
        mode: if quick { "quick" } else { "full" },
        started_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        kernel_requested: kernel,
    }
}

fn fig_cell(f: &kernel_bpf::Fig) -> Cell {
    if f.median.is_finite() { Cell::t(format!("{:.0} [{:.0}–{:.0}]", f.median, f.min, f.max)) } else { Cell::Empty }
}

/// The maps section: the kernel's figures (with `--kernel`), and ours when available.
fn maps_section(kernel: bool, quick: bool) -> (Section, Option<f64>) {
    let t0 = Instant::now();
    let ours = "Our BPF hash map (`HashMap` with Prealloc / BpfMemAlloc / Nolock backends) and its benchmarks \
                (`nolock bench maps`) are being built on another branch (bpf-htab) and are not part of this build: \
                the nolock columns of this section are empty, and no map ratio to the kernel is computed.";
    if !kernel {
        return (
            Section::skipped(
                "maps",
                "BPF hash maps",
                format!("{ours} Run with --kernel to measure the running kernel's hash maps."),
            ),
            None,
        );
    }
    if let Err(why) = kernel_bpf::probe() {
        println!("kernel: skipped: {why}");
        return (
            Section::skipped("maps", "BPF hash maps (running kernel)", format!("{ours} Kernel part skipped: {why}")),
            None,
        );
    }
    let r = match kernel_bpf::measure(quick) {
        Ok(r) => r,
        Err(e) => {
            return (
                Section {
                    id: "maps".into(),
                    title: "BPF hash maps (running kernel)".into(),
                    status: Status::Failed,
                    summary: format!("{ours} Kernel measurement failed: {e}"),
                    tables: Vec::new(),
                    charts: Vec::new(),
                    seconds: t0.elapsed().as_secs_f64(),
                },
                None,
            );
        }
    };
    let mut ops_rows = Vec::new();
    for (name, p, n) in &r.ops {
        ops_rows.push(vec![Cell::t(name), fig_cell(p), fig_cell(n), Cell::n(n.median / p.median, 2), Cell::Empty]);
    }
    for (n, p, q) in &r.insert {
        ops_rows.push(vec![
            Cell::t(format!("insert until full, {n} entries (per insert)")),
            fig_cell(p),
            fig_cell(q),
            Cell::n(q.median / p.median, 2),
            Cell::Empty,
        ]);
    }
    let mut mem_rows = Vec::new();
    let mut pre_pts = Vec::new();
    let mut no_pts = Vec::new();
    let mut crossover: Option<f64> = None;
    let mut prev: Option<(u32, f64, f64)> = None;
    let q0 = r.memory.first().map_or(0.0, |m| m.2);
    for &(lvl, p, q) in &r.memory {
        let present = r.memory_entries as f64 * lvl as f64 / 100.0;
        mem_rows.push(vec![
            Cell::n(lvl as f64, 0),
            Cell::n(p / 1048576.0, 2),
            Cell::n(q / 1048576.0, 2),
            if present > 0.0 { Cell::n((q - q0) / present, 0) } else { Cell::Empty },
            Cell::Empty,
        ]);
        pre_pts.push((lvl as f64, p / 1048576.0));
        no_pts.push((lvl as f64, q / 1048576.0));
        if crossover.is_none() && lvl > 0 && q >= p {
            // Interpolate between this level and the one before it.
            crossover = Some(match prev {
                Some((l0, p0, q0)) if (q - q0) - (p - p0) > 0.0 => {
                    l0 as f64 + (p0 - q0) / ((q - q0) - (p - p0)) * (lvl - l0) as f64
                }
                _ => lvl as f64,
            });
        }
        prev = Some((lvl, p, q));
    }
    let ratio = r.ops.first().map(|(_, p, n)| n.median / p.median);
    let section = Section {
        id: "maps".into(),
        title: "BPF hash maps (running kernel)".into(),
        status: Status::Ok,
        summary: format!(
            "{ours} The kernel columns are measured live: hash maps created with the raw bpf() system call, with and \
             without BPF_F_NO_PREALLOC (preallocated elements vs bpf_mem_alloc), eBPF socket-filter programs \
             assembled in code and run with BPF_PROG_TEST_RUN and a repeat count, minus a twin program without the \
             map call: in-kernel ns per operation. Key 4 B, value 8 B. Memory: kernel memory charged around map \
             creation and fill, read from {}. Took {:.1} s.",
            r.memory_cgroup, r.seconds
        ),
        tables: vec![
            Table {
                id: "kernel_map_ops".into(),
                title: "Map operations, in-kernel ns per operation (median [min–max])".into(),
                columns: vec![
                    "measure".into(),
                    "kernel prealloc".into(),
                    "kernel no-prealloc (bpf_mem_alloc)".into(),
                    "no-prealloc / prealloc".into(),
                    "nolock (not in this build)".into(),
                ],
                rows: ops_rows,
                note:
                    "Reference (bpf.md, Linux 6.18, 2 vCPU): update of an existing key 82-97 ns prealloc vs 144-167 ns \
                       bpf_ma; update + delete 160-191 vs 181-205; insert until full 120-420 vs 500-1456 ns."
                        .into(),
            },
            Table {
                id: "kernel_map_memory".into(),
                title: format!(
                    "Memory per occupancy: {} entries, key 4 B, value 8 B (MiB charged to the memory cgroup)",
                    r.memory_entries
                ),
                columns: vec![
                    "occupancy %".into(),
                    "kernel prealloc MiB".into(),
                    "kernel no-prealloc MiB".into(),
                    "no-prealloc bytes per element present, above the empty map".into(),
                    "nolock (not in this build)".into(),
                ],
                rows: mem_rows,
                note: format!(
                    "memlock from fdinfo of the full maps: prealloc {} B, no-prealloc {} B (computed from counts, not \
                     measured). No-prealloc costs as much as prealloc from {} % occupancy. Reference (bpf.md): 80 MiB at \
                     any occupancy for 1M entries prealloc, 104 B per element present no-prealloc, crossover 60-88 %.",
                    r.memlock.0.map_or("?".into(), |v| v.to_string()),
                    r.memlock.1.map_or("?".into(), |v| v.to_string()),
                    crossover.map_or("(never, up to 100)".into(), |c| format!("about {c:.0}"))
                ),
            },
        ],
        charts: vec![
            Chart {
                id: "kernel_map_ops".into(),
                title: "Kernel hash map: in-kernel ns per operation (lower is better)".into(),
                kind: ChartKind::Bar,
                x_label: "measure".into(),
                y_label: "ns per operation".into(),
                categories: r
                    .ops
                    .iter()
                    .map(|o| {
                        if o.0.contains("delete") {
                            "update+delete".to_string()
                        } else if o.0.contains("random") {
                            "update (random key)".to_string()
                        } else {
                            "update".to_string()
                        }
                    })
                    .chain(r.insert.iter().map(|i| format!("insert ({}k)", i.0 / 1024)))
                    .collect(),
                series: vec![
                    Series {
                        name: "kernel prealloc".into(),
                        points: r
                            .ops
                            .iter()
                            .map(|o| o.1.median)
                            .chain(r.insert.iter().map(|i| i.1.median))
                            .enumerate()
                            .map(|(i, y)| (i as f64, y))
                            .collect(),
                    },
                    Series {
                        name: "kernel bpf_mem_alloc".into(),
                        points: r
                            .ops
                            .iter()
                            .map(|o| o.2.median)
                            .chain(r.insert.iter().map(|i| i.2.median))
                            .enumerate()
                            .map(|(i, y)| (i as f64, y))
                            .collect(),
                    },
                ],
            },
            Chart {
                id: "kernel_map_occupancy".into(),
                title: "Kernel hash map: memory by occupancy".into(),
                kind: ChartKind::Line,
                x_label: "occupancy %".into(),
                y_label: "MiB charged".into(),
                categories: Vec::new(),
                series: vec![
                    Series { name: "kernel prealloc".into(), points: pre_pts },
                    Series { name: "kernel bpf_mem_alloc".into(), points: no_pts },
                ],
            },
        ],
        seconds: t0.elapsed().as_secs_f64(),
    };
    (section, ratio)
}

fn wanted(only: &Option<Vec<String>>, id: &str) -> bool {
    only.as_ref().is_none_or(|v| v.iter().any(|x| x == id))
}

/// Writes the four files.
fn write_all(dir: &Path, r: &Report) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let json = r.to_json();
    std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(&json).unwrap_or_default())?;
    std::fs::write(dir.join("schema.json"), report::SCHEMA)?;
    std::fs::write(dir.join("report.md"), r.to_markdown())?;
    std::fs::write(dir.join("report.html"), r.to_html())?;
    Ok(())
}

/// `nolock compare`.
pub fn run(args: &CompareArgs) -> ExitCode {
    let t0 = Instant::now();
    if let Err(e) = std::fs::create_dir_all(&args.out) {
        eprintln!("nolock compare: cannot create {}: {e}", args.out.display());
        return ExitCode::FAILURE;
    }
    let env = env(args.quick, args.kernel);
    println!(
        "nolock compare ({}): {} × {}, kernel {}, commit {}; writing to {}",
        env.mode,
        env.cpus,
        env.cpu_model,
        env.kernel_version,
        env.commit,
        args.out.display()
    );
    let mut sections = Vec::new();
    for what in ["alloc", "rcu", "typesafe"] {
        if wanted(&args.only, what) {
            println!("{what}: running `nolock bench {what}`…");
            let s = benches::run(what, args.quick, &args.out);
            println!("{what}: {} ({:.1} s)", status_word(&s), s.seconds);
            sections.push(s);
        }
    }
    let mut map_ratio = None;
    if wanted(&args.only, "maps") || wanted(&args.only, "kernel") {
        let (s, r) = maps_section(args.kernel, args.quick);
        println!("maps: {} ({:.1} s)", status_word(&s), s.seconds);
        map_ratio = r;
        sections.push(s);
    }
    let mut figures = storage::StorageFigures::default();
    if wanted(&args.only, "storage") {
        println!("storage: local-storage-create, occupancy, storm…");
        let reps = if args.quick { 3 } else { 5 };
        let (s, f) = storage::run(args.quick, reps);
        println!("storage: {} ({:.1} s)", status_word(&s), s.seconds);
        sections.push(s);
        figures = f;
    }
    if sections.is_empty() {
        eprintln!("nolock compare: no section selected");
        return ExitCode::from(2);
    }
    let targets = vec![
        Target {
            id: "storage_create_ratio".into(),
            description: "SrcuFast storage: creations/s ÷ BpfMemAlloc variant, same run".into(),
            measured: figures.create_ratio,
            op: ">=",
            threshold: 1.1,
        },
        Target {
            id: "storage_memory_ratio".into(),
            description: "SrcuFast storage: memory per live storage ÷ BpfMemAlloc variant".into(),
            measured: figures.mem_ratio,
            op: "<=",
            threshold: 1.0,
        },
        Target {
            id: "storage_nolock_spurious".into(),
            description: "SrcuFast + lock-free: spurious failures under the get(CREATE) storm".into(),
            measured: figures.nolock_spurious.map(|n| n as f64),
            op: "==",
            threshold: 0.0,
        },
        Target {
            id: "storage_busy_spurious".into(),
            description: "PerCpuBusy: spurious failures under the same storm (the old kernel's NULL / -EBUSY)".into(),
            measured: figures.busy_spurious.map(|n| n as f64),
            op: ">",
            threshold: 0.0,
        },
        Target {
            id: "kernel_noprealloc_over_prealloc_update".into(),
            description:
                "Kernel: no-prealloc ÷ prealloc update time (reference 144-167 / 82-97 ns ≈ 1.5-2.0; shown, not a goal)"
                    .into(),
            measured: map_ratio,
            op: ">=",
            threshold: 1.0,
        },
    ];
    let failed = sections.iter().any(|s| s.status == Status::Failed);
    let report = Report { env, sections, targets, seconds: t0.elapsed().as_secs_f64() };
    if let Err(e) = write_all(&args.out, &report) {
        eprintln!("nolock compare: cannot write the report: {e}");
        return ExitCode::FAILURE;
    }
    for t in &report.targets {
        println!(
            "target: {}: {} (wanted {} {}) {}",
            t.description,
            t.measured.map_or("not measured".into(), |m| format!("{m:.3}")),
            t.op,
            t.threshold,
            match t.met() {
                Some(true) => "met",
                Some(false) => "NOT met",
                None => "",
            }
        );
    }
    println!("report: {} (took {:.0} s)", args.out.join("report.html").display(), report.seconds);
    let spurious = figures.nolock_spurious.unwrap_or(0) > 0;
    if spurious {
        println!("FAIL: the lock-free storage mode had spurious failures");
    }
    if failed {
        println!("FAIL: a section failed (see the report)");
    }
    if failed || spurious { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

fn status_word(s: &Section) -> String {
    match s.status {
        Status::Ok => "ok".into(),
        Status::Skipped => format!("skipped: {}", s.summary.lines().next().unwrap_or("")),
        Status::Failed => format!("FAILED: {}", s.summary),
    }
}
