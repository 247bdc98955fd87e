//! The report's data model and its three renderings: JSON (the data, with a schema), Markdown (the tables) and a
//! self-contained HTML page (the tables plus inline SVG charts; no script, no style sheet or font fetched).

use std::fmt::Write as _;

use serde_json::{Value, json};

/// Version of the JSON layout (`schema.json`); bump on any incompatible change.
pub const SCHEMA_VERSION: u64 = 1;

/// The JSON schema of the report, written beside it.
pub const SCHEMA: &str = include_str!("schema.json");

/// One table cell.
#[derive(Clone, Debug)]
pub enum Cell {
    /// Text.
    Text(String),
    /// A number, shown with `digits` decimals.
    Num(f64, usize),
    /// Nothing measured.
    Empty,
}

impl Cell {
    /// A text cell.
    pub fn t(s: impl Into<String>) -> Cell {
        Cell::Text(s.into())
    }

    /// A number cell (non-finite numbers become empty cells).
    pub fn n(x: f64, digits: usize) -> Cell {
        if x.is_finite() { Cell::Num(x, digits) } else { Cell::Empty }
    }

    fn show(&self) -> String {
        match self {
            Cell::Text(s) => s.clone(),
            Cell::Num(x, d) => format!("{x:.d$}", d = *d),
            Cell::Empty => "–".into(),
        }
    }

    fn json(&self) -> Value {
        match self {
            Cell::Text(s) => json!(s),
            Cell::Num(x, _) => json!(x),
            Cell::Empty => Value::Null,
        }
    }
}

/// A table.
#[derive(Clone, Debug, Default)]
pub struct Table {
    /// Stable identifier.
    pub id: String,
    /// Title shown above it.
    pub title: String,
    /// Column headers.
    pub columns: Vec<String>,
    /// Rows (as many cells as columns).
    pub rows: Vec<Vec<Cell>>,
    /// How to read it.
    pub note: String,
}

/// Bar (categories on x) or line (numeric x) chart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChartKind {
    /// Grouped bars.
    Bar,
    /// Lines with markers.
    Line,
}

/// One series of a chart.
#[derive(Clone, Debug)]
pub struct Series {
    /// Legend name.
    pub name: String,
    /// (x, y); for bar charts x is the category index.
    pub points: Vec<(f64, f64)>,
}

/// A chart.
#[derive(Clone, Debug)]
pub struct Chart {
    /// Stable identifier.
    pub id: String,
    /// Title.
    pub title: String,
    /// Kind.
    pub kind: ChartKind,
    /// x axis label.
    pub x_label: String,
    /// y axis label.
    pub y_label: String,
    /// Category names (bar charts).
    pub categories: Vec<String>,
    /// Series.
    pub series: Vec<Series>,
}

/// Whether a section ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Measured.
    Ok,
    /// Not run, with a reason (no privilege, not available).
    Skipped,
    /// Ran and failed.
    Failed,
}

impl Status {
    fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Skipped => "skipped",
            Status::Failed => "failed",
        }
    }
}

/// A section of the report: one benchmark family.
#[derive(Clone, Debug)]
pub struct Section {
    /// Stable identifier.
    pub id: String,
    /// Heading.
    pub title: String,
    /// Status.
    pub status: Status,
    /// What it measures and how to read it (for a newcomer), or why it was skipped.
    pub summary: String,
    /// Tables.
    pub tables: Vec<Table>,
    /// Charts.
    pub charts: Vec<Chart>,
    /// Seconds it took.
    pub seconds: f64,
}

/// A target of the issue with its measured figure.
#[derive(Clone, Debug)]
pub struct Target {
    /// Stable identifier.
    pub id: String,
    /// What is wanted.
    pub description: String,
    /// Measured value (None: not measured in this run).
    pub measured: Option<f64>,
    /// `>=`, `<=`, `==` or `>`.
    pub op: &'static str,
    /// Threshold.
    pub threshold: f64,
}

impl Target {
    /// Whether it is met (None: not measured).
    pub fn met(&self) -> Option<bool> {
        let m = self.measured?;
        Some(match self.op {
            ">=" => m >= self.threshold,
            "<=" => m <= self.threshold,
            ">" => m > self.threshold,
            _ => m == self.threshold,
        })
    }
}

/// The run's conditions.
#[derive(Clone, Debug)]
pub struct Env {
    /// `git` commit of the source (or "unknown").
    pub commit: String,
    /// CPU model name.
    pub cpu_model: String,
    /// CPUs online.
    pub cpus: usize,
    /// `uname -r`.
    pub kernel_version: String,
    /// 1-minute load average at the start.
    pub load_average: String,
    /// quick or full.
    pub mode: &'static str,
    /// Unix time of the start.
    pub started_unix: u64,
    /// Whether `--kernel` was asked for.
    pub kernel_requested: bool,
}

/// The whole report.
#[derive(Clone, Debug)]
pub struct Report {
    /// Conditions.
    pub env: Env,
    /// Sections in order.
    pub sections: Vec<Section>,
    /// Targets.
    pub targets: Vec<Target>,
    /// Total seconds.
    pub seconds: f64,
}

fn chart_json(c: &Chart) -> Value {
    json!({
        "id": c.id,
        "title": c.title,
        "kind": if c.kind == ChartKind::Bar { "bar" } else { "line" },
        "x_label": c.x_label,
        "y_label": c.y_label,
        "categories": c.categories,
        "series": c.series.iter().map(|s| json!({
            "name": s.name,
            "points": s.points.iter().map(|&(x, y)| json!([x, if y.is_finite() { json!(y) } else { Value::Null }])).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn table_json(t: &Table) -> Value {
    json!({
        "id": t.id,
        "title": t.title,
        "columns": t.columns,
        "rows": t.rows.iter().map(|r| r.iter().map(Cell::json).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "note": t.note,
    })
}

impl Report {
    /// The JSON document.
    pub fn to_json(&self) -> Value {
        let e = &self.env;
        json!({
            "schema_version": SCHEMA_VERSION,
            "tool": "nolock compare",
            "mode": e.mode,
            "commit": e.commit,
            "cpu_model": e.cpu_model,
            "cpus": e.cpus,
            "kernel_version": e.kernel_version,
            "load_average": e.load_average,
            "started_unix": e.started_unix,
            "kernel_requested": e.kernel_requested,
            "seconds": self.seconds,
            "targets": self.targets.iter().map(|t| json!({
                "id": t.id,
                "description": t.description,
                "measured": t.measured.filter(|m| m.is_finite()),
                "op": t.op,
                "threshold": t.threshold,
                "met": t.met(),
            })).collect::<Vec<_>>(),
            "sections": self.sections.iter().map(|s| json!({
                "id": s.id,
                "title": s.title,
                "status": s.status.name(),
                "summary": s.summary,
                "seconds": s.seconds,
                "tables": s.tables.iter().map(table_json).collect::<Vec<_>>(),
                "charts": s.charts.iter().map(chart_json).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    }

    fn env_lines(&self) -> Vec<(String, String)> {
        let e = &self.env;
        vec![
            ("mode".into(), format!("{} ({:.0} s)", e.mode, self.seconds)),
            ("commit".into(), e.commit.clone()),
            ("CPU".into(), format!("{} × {}", e.cpus, e.cpu_model)),
            ("kernel".into(), e.kernel_version.clone()),
            ("load average at start".into(), e.load_average.clone()),
            ("started (unix time)".into(), e.started_unix.to_string()),
        ]
    }

    /// The Markdown rendering (tables only).
    pub fn to_markdown(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "# nolock compare\n");
        for (k, v) in self.env_lines() {
            let _ = writeln!(o, "- **{k}**: {v}");
        }
        let _ = writeln!(o, "\n## Targets\n");
        let _ = writeln!(o, "| target | measured | wanted | met |\n|---|---:|---|---|");
        for t in &self.targets {
            let _ = writeln!(
                o,
                "| {} | {} | {} {} | {} |",
                t.description,
                t.measured.map_or("not measured".into(), |m| format!("{m:.3}")),
                t.op,
                t.threshold,
                match t.met() {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "–",
                }
            );
        }
        for s in &self.sections {
            let _ = writeln!(o, "\n## {} ({})\n\n{}\n", s.title, s.status.name(), s.summary);
            for t in &s.tables {
                let _ = writeln!(o, "### {}\n", t.title);
                let _ = writeln!(o, "| {} |", t.columns.join(" | "));
                let _ = writeln!(o, "|{}", "---|".repeat(t.columns.len()));
                for r in &t.rows {
                    let _ = writeln!(
                        o,
                        "| {} |",
                        r.iter().map(|c| c.show().replace('|', "\\|")).collect::<Vec<_>>().join(" | ")
                    );
                }
                if !t.note.is_empty() {
                    let _ = writeln!(o, "\n{}\n", t.note);
                }
                o.push('\n');
            }
        }
        o
    }

    /// The HTML page.
    pub fn to_html(&self) -> String {
        let mut o = String::new();
        o.push_str(
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n<title>nolock compare</title>\n",
        );
        o.push_str("<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}\
table{border-collapse:collapse;margin:.5em 0 1.2em;font-size:.9em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}\
td:first-child,th:first-child{text-align:left}th{background:#f2f2f2}.ok{color:#0a6b0a;font-weight:600}.no{color:#b00;font-weight:600}\
.skipped{background:#fff6dd;border-left:4px solid #e0a800;padding:.5em 1em}.failed{background:#fde;border-left:4px solid #b00;padding:.5em 1em}\
.note{color:#555;font-size:.85em}td.l{text-align:left}.env td{text-align:left}svg{display:block;margin:.5em 0}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}\
.explain{background:#f5f8ff;border-left:4px solid #4a78c2;padding:.6em 1em}</style></head><body>\n");
        o.push_str("<h1>nolock compare</h1>\n");
        o.push_str("<p class=\"explain\">What this page is: nolock re-creates the Linux kernel's any-context memory allocator \
(<code>kmalloc_nolock</code>), its reclamation (RCU, SRCU-fast, Tasks Trace, <code>kfree_rcu_nolock</code>), type-safe caches and \
two of their users, BPF hash maps and task local storage, in userspace. Each section below runs one benchmark family and measures \
nolock beside a <b>baseline measured in the same run</b>: other allocators (glibc, mimalloc, jemalloc), other reclamation \
libraries, or a faithful re-creation of what the kernel did before (<code>bpf_mem_alloc</code>, per-CPU busy counters); with \
<code>--kernel</code> also the running kernel's own BPF maps. These machines are noisy: compare figures only within one run, \
through the ratios. Cells read <i>median [min–max]</i> over repetitions unless the table says otherwise. The same tables are in \
<code>report.md</code> and, with the charts' data, in <code>report.json</code> (layout: <code>schema.json</code>).</p>\n");
        o.push_str("<table class=\"env\">");
        for (k, v) in self.env_lines() {
            let _ = write!(o, "<tr><th>{}</th><td>{}</td></tr>", esc(&k), esc(&v));
        }
        o.push_str(
            "</table>\n<h2>Targets</h2>\n<table><tr><th>target</th><th>measured</th><th>wanted</th><th>met</th></tr>",
        );
        for t in &self.targets {
            let (cls, met) = match t.met() {
                Some(true) => ("ok", "yes"),
                Some(false) => ("no", "no"),
                None => ("", "not measured"),
            };
            let _ = write!(
                o,
                "<tr><td>{}</td><td>{}</td><td>{} {}</td><td class=\"{cls}\">{met}</td></tr>",
                esc(&t.description),
                t.measured.map_or("–".into(), |m| format!("{m:.3}")),
                esc(t.op),
                t.threshold
            );
        }
        o.push_str("</table>\n<p>Sections: ");
        for s in &self.sections {
            let _ = write!(o, "<a href=\"#{}\">{}</a> ({}) &nbsp; ", esc(&s.id), esc(&s.title), s.status.name());
        }
        o.push_str("</p>\n");
        for s in &self.sections {
            let _ = writeln!(o, "<h2 id=\"{}\">{}</h2>", esc(&s.id), esc(&s.title));
            let cls = match s.status {
                Status::Ok => "",
                Status::Skipped => "skipped",
                Status::Failed => "failed",
            };
            let _ = writeln!(o, "<p class=\"{cls}\">{}</p>", inline(&s.summary));
            for c in &s.charts {
                o.push_str(&svg(c));
            }
            for t in &s.tables {
                let _ = write!(o, "<h3>{}</h3>\n<table><tr>", esc(&t.title));
                for c in &t.columns {
                    let _ = write!(o, "<th>{}</th>", esc(c));
                }
                o.push_str("</tr>\n");
                for r in &t.rows {
                    o.push_str("<tr>");
                    for c in r {
                        // Words read left-aligned, figures right-aligned.
                        let words = matches!(c, Cell::Text(t) if !t.starts_with(|ch: char| ch.is_ascii_digit()));
                        let _ = write!(o, "<td{}>{}</td>", if words { " class=\"l\"" } else { "" }, esc(&c.show()));
                    }
                    o.push_str("</tr>\n");
                }
                o.push_str("</table>\n");
                if !t.note.is_empty() {
                    let _ = writeln!(o, "<p class=\"note\">{}</p>", inline(&t.note));
                }
            }
            if s.seconds > 0.0 {
                let _ = writeln!(o, "<p class=\"note\">section took {:.1} s</p>", s.seconds);
            }
        }
        o.push_str("</body></html>\n");
        o
    }
}

/// Escaped text with `code` spans shown as code.
fn inline(s: &str) -> String {
    let mut out = String::new();
    for (i, part) in esc(s).split('`').enumerate() {
        if i % 2 == 1 {
            out.push_str("<code>");
            out.push_str(part);
            out.push_str("</code>");
        } else {
            out.push_str(part);
        }
    }
    out
}

/// HTML/XML escape.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

const COLORS: [&str; 8] = ["#4a78c2", "#e07b39", "#3a9a5b", "#b8446b", "#7d5fb2", "#8c8c3c", "#3aa3a3", "#888888"];

/// A "nice" upper bound and step for an axis from 0 to `max`.
fn nice_axis(max: f64) -> (f64, f64) {
    if !(max.is_finite() && max > 0.0) {
        return (1.0, 0.25);
    }
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag);
    ((max / step).ceil() * step, step)
}

fn fmt_tick(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v.abs() >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v.abs() >= 10.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// An inline SVG for a chart.
pub fn svg(c: &Chart) -> String {
    let (w, l, r, t) = (860.0, 70.0, 250.0, 30.0);
    let pw = w - l - r;
    // Bar labels wider than their group are drawn slanted, which needs more room below.
    let gw = pw / c.categories.len().max(1) as f64;
    let slant = c.kind == ChartKind::Bar && c.categories.iter().any(|cat| cat.chars().count() as f64 * 6.2 > gw);
    let b = if slant { 95.0 } else { 55.0 };
    let h = 260.0 + b;
    let ph = h - t - b;
    let ymax = c.series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).filter(|y| y.is_finite()).fold(0.0, f64::max);
    let (top, step) = nice_axis(ymax);
    let mut o = String::new();
    let _ = write!(
        o,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\" \
         aria-label=\"{}\" font-family=\"sans-serif\" font-size=\"11\">",
        esc(&c.title)
    );
    let _ = write!(o, "<rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>");
    let _ = write!(o, "<text x=\"{}\" y=\"18\" font-size=\"13\" font-weight=\"bold\">{}</text>", l, esc(&c.title));
    let y_of = |v: f64| t + ph - (v / top) * ph;
    let mut v = 0.0;
    while v <= top + step / 2.0 {
        let y = y_of(v);
        let _ = write!(o, "<line x1=\"{l}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#e4e4e4\"/>", l + pw);
        let _ = write!(o, "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>", l - 6.0, y + 4.0, fmt_tick(v));
        v += step;
    }
    let _ = write!(o, "<line x1=\"{l}\" y1=\"{t}\" x2=\"{l}\" y2=\"{}\" stroke=\"#444\"/>", t + ph);
    let _ = write!(o, "<line x1=\"{l}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#444\"/>", t + ph, l + pw, t + ph);
    let _ = write!(
        o,
        "<text transform=\"translate(14,{:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        t + ph / 2.0,
        esc(&c.y_label)
    );
    let _ = write!(
        o,
        "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
        l + pw / 2.0,
        h - 8.0,
        esc(&c.x_label)
    );
    match c.kind {
        ChartKind::Bar => {
            let ns = c.series.len().max(1) as f64;
            let bw = (gw * 0.8) / ns;
            for (ci, cat) in c.categories.iter().enumerate() {
                let x0 = l + gw * ci as f64 + gw * 0.1;
                let cx = l + gw * (ci as f64 + 0.5);
                if slant {
                    let _ = write!(
                        o,
                        "<text transform=\"translate({cx:.1},{:.1}) rotate(-20)\" text-anchor=\"end\" font-size=\"10\">{}</text>",
                        t + ph + 12.0,
                        esc(cat)
                    );
                } else {
                    let _ = write!(
                        o,
                        "<text x=\"{cx:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
                        t + ph + 16.0,
                        esc(cat)
                    );
                }
                for (si, s) in c.series.iter().enumerate() {
                    if let Some(&(_, y)) = s.points.iter().find(|p| p.0 as usize == ci)
                        && y.is_finite()
                    {
                        let yy = y_of(y);
                        let _ = write!(
                            o,
                            "<rect x=\"{:.1}\" y=\"{yy:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{}: {}</title></rect>",
                            x0 + bw * si as f64,
                            bw.max(1.0) - 1.0,
                            (t + ph - yy).max(0.0),
                            COLORS[si % COLORS.len()],
                            esc(&s.name),
                            fmt_tick(y)
                        );
                        // The value over the bar where it fits, and always a zero (often the point).
                        if bw >= 24.0 || y == 0.0 {
                            let _ = write!(
                                o,
                                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"9\">{}</text>",
                                x0 + bw * si as f64 + bw / 2.0,
                                yy - 3.0,
                                fmt_tick(y)
                            );
                        }
                    }
                }
            }
        }
        ChartKind::Line => {
            let xs = c.series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
            let (xmin, xmax) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
            let (xmin, xmax) = if xmin.is_finite() && xmax > xmin { (xmin, xmax) } else { (0.0, 1.0) };
            let x_of = |x: f64| l + (x - xmin) / (xmax - xmin) * pw;
            let (xtop, xstep) = nice_axis(xmax - xmin);
            let mut xv = 0.0;
            while xv <= xtop + xstep / 2.0 && xmin + xv <= xmax * 1.0001 {
                let x = x_of(xmin + xv);
                let _ = write!(
                    o,
                    "<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
                    t + ph + 16.0,
                    fmt_tick(xmin + xv)
                );
                xv += xstep;
            }
            for (si, s) in c.series.iter().enumerate() {
                let col = COLORS[si % COLORS.len()];
                let pts: Vec<String> = s
                    .points
                    .iter()
                    .filter(|p| p.1.is_finite())
                    .map(|&(x, y)| format!("{:.1},{:.1}", x_of(x), y_of(y)))
                    .collect();
                let _ = write!(
                    o,
                    "<polyline fill=\"none\" stroke=\"{col}\" stroke-width=\"2\" points=\"{}\"/>",
                    pts.join(" ")
                );
                for &(x, y) in s.points.iter().filter(|p| p.1.is_finite()) {
                    let _ = write!(
                        o,
                        "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{col}\"><title>{}: ({}, {})</title></circle>",
                        x_of(x),
                        y_of(y),
                        esc(&s.name),
                        fmt_tick(x),
                        fmt_tick(y)
                    );
                }
            }
        }
    }
    for (si, s) in c.series.iter().enumerate() {
        let y = t + 10.0 + 18.0 * si as f64;
        let _ = write!(
            o,
            "<rect x=\"{}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"{:.1}\" font-size=\"10.5\">{}</text>",
            l + pw + 12.0,
            y - 10.0,
            COLORS[si % COLORS.len()],
            l + pw + 30.0,
            y,
            esc(&s.name)
        );
    }
    o.push_str("</svg>\n");
    o
}
