//! The allocator, reclamation and type-safe-cache benchmarks (`nolock bench alloc|rcu|typesafe`), each run in
//! a child process of this same binary with `--json`, and their JSON turned into report tables and charts.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use serde_json::Value;

use super::report::{Cell, Chart, ChartKind, Section, Series, Status, Table};

fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(x)) => x.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

fn f(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

fn mmm(v: &Value) -> String {
    let (m, lo, hi) = (f(v, "median"), f(v, "min"), f(v, "max"));
    let d = if m.abs() >= 100.0 {
        0
    } else if m.abs() >= 1.0 {
        2
    } else {
        4
    };
    format!("{m:.d$} [{lo:.d$}–{hi:.d$}]")
}

/// Runs `nolock bench <what>` in a child process; returns its JSON or the reason it failed.
fn run_child(what: &str, quick: bool, dir: &Path) -> Result<Value, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let json = dir.join(format!("bench-{what}.json"));
    let mut cmd = Command::new(exe);
    cmd.arg("bench").arg(what).arg("--json").arg(&json);
    if quick {
        cmd.arg("--quick");
    }
    let out = cmd.output().map_err(|e| format!("cannot run nolock bench {what}: {e}"))?;
    let _ = std::fs::write(dir.join(format!("bench-{what}.txt")), &out.stdout);
    if !out.status.success() {
        let tail: String = String::from_utf8_lossy(&out.stdout).lines().rev().take(3).collect::<Vec<_>>().join(" / ");
        return Err(format!("nolock bench {what} failed ({}): {tail}", out.status));
    }
    let text = std::fs::read_to_string(&json).map_err(|e| format!("no JSON from nolock bench {what}: {e}"))?;
    serde_json::from_str(&text).map_err(|e| format!("bad JSON from nolock bench {what}: {e}"))
}

fn short(name: &str) -> String {
    let n: String = name.chars().take(18).collect();
    if name.chars().count() > 18 { format!("{n}…") } else { n }
}

fn alloc_section(v: &Value) -> (Vec<Table>, Vec<Chart>) {
    let res = v["results"].as_array().cloned().unwrap_or_default();
    let mut workloads: Vec<String> = Vec::new();
    let mut allocs: Vec<String> = Vec::new();
    for r in &res {
        let (wl, a) = (s(r, "workload"), s(r, "allocator"));
        if !workloads.contains(&wl) {
            workloads.push(wl);
        }
        if !allocs.contains(&a) {
            allocs.push(a);
        }
    }
    let unit = res.first().map(|r| s(r, "unit")).unwrap_or_default();
    let find = |wl: &str, a: &str| res.iter().find(|r| s(r, "workload") == wl && s(r, "allocator") == a);
    let mut rows = Vec::new();
    for wl in &workloads {
        let mut row = vec![Cell::t(wl)];
        for a in &allocs {
            row.push(find(wl, a).map_or(Cell::Empty, |r| Cell::t(mmm(r))));
        }
        let base = find(wl, "glibc").map(|r| f(r, "median"));
        let me = find(wl, "nolock").map(|r| f(r, "median"));
        row.push(match (me, base) {
            (Some(m), Some(b)) => Cell::n(m / b, 3),
            _ => Cell::Empty,
        });
        rows.push(row);
    }
    let mut columns = vec!["workload".to_string()];
    columns.extend(allocs.iter().map(|a| format!("{a} ({unit})")));
    columns.push("nolock / glibc (lower is faster)".into());
    let series = allocs
        .iter()
        .map(|a| Series {
            name: a.clone(),
            points: workloads
                .iter()
                .enumerate()
                .filter_map(|(i, wl)| find(wl, a).map(|r| (i as f64, f(r, "median"))))
                .collect(),
        })
        .collect();
    (
        vec![Table {
            id: "alloc".into(),
            title: "Allocator workloads: time per operation".into(),
            columns,
            rows,
            note: "From `nolock bench alloc`: pair = allocate then free one object of the size; batch1000 = 1000 \
                   allocations then 1000 frees; xthread = allocated on one thread, freed on another. The baselines \
                   (glibc, mimalloc, jemalloc) are called through GlobalAlloc in the same process and take turns with \
                   nolock inside every repetition."
                .into(),
        }],
        vec![Chart {
            id: "alloc".into(),
            title: "Allocator: ns per operation (lower is better)".into(),
            kind: ChartKind::Bar,
            x_label: "workload".into(),
            y_label: unit,
            categories: workloads,
            series,
        }],
    )
}

fn rcu_section(v: &Value) -> (Vec<Table>, Vec<Chart>) {
    let res = v["results"].as_array().cloned().unwrap_or_default();
    let rows: Vec<Vec<Cell>> = res
        .iter()
        .map(|r| {
            vec![
                Cell::t(s(r, "group")),
                Cell::t(s(r, "contender")),
                Cell::t(s(r, "metric")),
                Cell::t(mmm(r)),
                Cell::t(s(r, "unit")),
            ]
        })
        .collect();
    let mut ratio_rows = Vec::new();
    if let Some(m) = v["ratios"].as_object() {
        for (k, x) in m {
            ratio_rows.push(vec![Cell::t(k), x.as_f64().map_or(Cell::Empty, |x| Cell::n(x, 3))]);
        }
    }
    let read: Vec<&Value> = res.iter().filter(|r| s(r, "group") == "read").collect();
    let chart = Chart {
        id: "rcu_read".into(),
        title: "Read-side section: ns per lock + unlock (lower is better)".into(),
        kind: ChartKind::Bar,
        x_label: "contender".into(),
        y_label: "ns".into(),
        categories: read.iter().map(|r| short(&s(r, "contender"))).collect(),
        series: vec![Series {
            name: "median".into(),
            points: read.iter().enumerate().map(|(i, r)| (i as f64, f(r, "median"))).collect(),
        }],
    };
    (
        vec![
            Table {
                id: "rcu".into(),
                title: "Reclamation: readers, grace periods, callbacks, retire-and-free".into(),
                columns: vec![
                    "group".into(),
                    "contender".into(),
                    "metric".into(),
                    "median [min–max]".into(),
                    "unit".into(),
                ],
                rows,
                note:
                    "From `nolock bench rcu`: nolock's RCU, SRCU-fast and Tasks Trace against crossbeam-epoch, seize \
                       and membarrier (liburcu when built with it)."
                        .into(),
            },
            Table {
                id: "rcu_ratios".into(),
                title: "Reclamation: nolock / baseline, same run".into(),
                columns: vec!["ratio".into(), "value".into()],
                rows: ratio_rows,
                note: "Each ratio divides nolock's median by the named baseline's (time: lower is better for nolock; \
                       empty: one side not measured)."
                    .into(),
            },
        ],
        vec![chart],
    )
}

fn typesafe_section(v: &Value) -> (Vec<Table>, Vec<Chart>) {
    let res = v["results"].as_array().cloned().unwrap_or_default();
    let mut routes: Vec<String> = Vec::new();
    let mut threads: Vec<String> = Vec::new();
    let mut metrics: Vec<String> = Vec::new();
    for r in &res {
        for (list, val) in
            [(&mut routes, s(r, "route")), (&mut threads, s(r, "threads")), (&mut metrics, s(r, "metric"))]
        {
            if !list.contains(&val) {
                list.push(val);
            }
        }
    }
    let find = |route: &str, t: &str, m: &str| {
        res.iter().find(|r| s(r, "route") == route && s(r, "threads") == t && s(r, "metric") == m)
    };
    let mut rows = Vec::new();
    for m in &metrics {
        for route in &routes {
            let mut row = vec![Cell::t(m), Cell::t(route)];
            for t in &threads {
                row.push(find(route, t, m).map_or(Cell::Empty, |r| Cell::t(mmm(r))));
            }
            rows.push(row);
        }
    }
    let mut columns = vec!["metric".to_string(), "route".to_string()];
    columns.extend(threads.iter().map(|t| format!("{t} writer(s)")));
    let mut ratio_rows = Vec::new();
    if let Some(a) = v["ratios_median_per_repetition"].as_array() {
        for r in a {
            if let Some(o) = r.as_object() {
                for (k, x) in o {
                    if k != "threads" {
                        ratio_rows.push(vec![
                            Cell::t(s(r, "threads")),
                            Cell::t(k),
                            x.as_f64().map_or(Cell::Empty, |x| Cell::n(x, 3)),
                        ]);
                    }
                }
            }
        }
    }
    let line = |metric: &str, title: &str, y: &str| Chart {
        id: format!("typesafe_{metric}"),
        title: title.into(),
        kind: ChartKind::Line,
        x_label: "writer threads".into(),
        y_label: y.into(),
        categories: Vec::new(),
        series: routes
            .iter()
            .map(|route| Series {
                name: route.clone(),
                points: threads
                    .iter()
                    .filter_map(|t| find(route, t, metric).map(|r| (t.parse::<f64>().unwrap_or(0.0), f(r, "median"))))
                    .collect(),
            })
            .collect(),
    };
    (
        vec![
            Table {
                id: "typesafe".into(),
                title: "Type-safe cache vs kfree_rcu_nolock vs kfree_nolock: add-then-delete".into(),
                columns,
                rows,
                note:
                    "From `nolock bench typesafe`: allocate a 96 B element, publish it, look it up, unpublish, free. \
                       typesafe = KmemCache TYPESAFE_BY_SRCU_FAST (immediate type-safe reuse); kfree_rcu = every free \
                       waits for a grace period; kfree = immediate free (the speed floor, no reader may touch it). \
                       objects_* is the occupancy: objects allocated and not yet freed."
                        .into(),
            },
            Table {
                id: "typesafe_ratios".into(),
                title: "Type-safe cache: ratios per repetition, same run".into(),
                columns: vec!["writers".into(), "ratio".into(), "median".into()],
                rows: ratio_rows,
                note: String::new(),
            },
        ],
        vec![
            line("throughput", "Add-then-delete throughput by writer threads (higher is better)", "M add+delete/s"),
            line("objects_steady", "Occupancy: objects not yet freed, steady state (lower is better)", "objects"),
        ],
    )
}

/// Runs one of `alloc`, `rcu`, `typesafe` into a section.
pub fn run(what: &str, quick: bool, dir: &Path) -> Section {
    let t0 = Instant::now();
    let (title, summary) = match what {
        "alloc" => (
            "Allocator",
            "kmalloc_nolock / kfree_nolock against glibc, mimalloc and jemalloc, in the same process and run. nolock \
             pays for being callable from any context (signal handlers that interrupted it included); this shows the price.",
        ),
        "rcu" => (
            "Reclamation (RCU, SRCU-fast, Tasks Trace)",
            "Read-side sections, grace periods, callbacks and retire-then-free, nolock against crossbeam-epoch, seize \
             and membarrier.",
        ),
        _ => (
            "Type-safe caches",
            "The add-then-delete pattern of BPF maps through a type-safe cache (reuse at once, type preserved), \
             kfree_rcu_nolock (reuse after a grace period) and kfree_nolock (reuse at once, unsafe for lockless \
             readers): throughput and memory held (occupancy).",
        ),
    };
    match run_child(what, quick, dir) {
        Ok(v) => {
            let (tables, charts) = match what {
                "alloc" => alloc_section(&v),
                "rcu" => rcu_section(&v),
                _ => typesafe_section(&v),
            };
            Section {
                id: what.into(),
                title: title.into(),
                status: Status::Ok,
                summary: summary.into(),
                tables,
                charts,
                seconds: t0.elapsed().as_secs_f64(),
            }
        }
        Err(e) => Section {
            id: what.into(),
            title: title.into(),
            // A build without the C baselines cannot run the allocator comparison: not a failure.
            status: if e.contains("c-baselines") { Status::Skipped } else { Status::Failed },
            summary: e,
            tables: Vec::new(),
            charts: Vec::new(),
            seconds: t0.elapsed().as_secs_f64(),
        },
    }
}
