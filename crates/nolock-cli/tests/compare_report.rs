//! `nolock compare --quick` (with `--kernel` as root) writes a report whose JSON validates against its own
//! schema (`schema.json`, written beside it), whose HTML fetches nothing, and whose Markdown carries the same
//! tables. The validator is a small
//! interpreter of the JSON Schema keywords the schema uses (type, enum, required, properties,
//! additionalProperties, items, minItems, maxItems, minimum); it is checked to reject broken documents too.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn type_ok(t: &str, v: &Value) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        _ => false,
    }
}

/// Errors of `v` against `schema`, with JSON-pointer-like paths.
fn validate(schema: &Value, v: &Value, path: &str, errs: &mut Vec<String>) {
    let known = [
        "$schema",
        "$id",
        "title",
        "type",
        "enum",
        "required",
        "properties",
        "additionalProperties",
        "items",
        "minItems",
        "maxItems",
        "minimum",
    ];
    if let Some(o) = schema.as_object() {
        for k in o.keys() {
            assert!(known.contains(&k.as_str()), "schema keyword {k} at {path} not understood by this validator");
        }
    }
    match &schema["type"] {
        Value::String(t) if !type_ok(t, v) => errs.push(format!("{path}: not {t}")),
        Value::Array(ts) if !ts.iter().any(|t| t.as_str().is_some_and(|t| type_ok(t, v))) => {
            errs.push(format!("{path}: none of {ts:?}"))
        }
        _ => {}
    }
    if let Some(e) = schema["enum"].as_array()
        && !e.contains(v)
    {
        errs.push(format!("{path}: {v} not in {e:?}"));
    }
    if let (Some(min), Some(x)) = (schema["minimum"].as_f64(), v.as_f64())
        && x < min
    {
        errs.push(format!("{path}: {x} < {min}"));
    }
    if let Some(o) = v.as_object() {
        if let Some(req) = schema["required"].as_array() {
            for r in req {
                if !o.contains_key(r.as_str().unwrap_or("")) {
                    errs.push(format!("{path}: missing {r}"));
                }
            }
        }
        let props = schema["properties"].as_object();
        for (k, x) in o {
            match props.and_then(|p| p.get(k)) {
                Some(s) => validate(s, x, &format!("{path}/{k}"), errs),
                None if schema["additionalProperties"] == Value::Bool(false) => {
                    errs.push(format!("{path}: unexpected property {k}"))
                }
                None => {}
            }
        }
    }
    if let Some(a) = v.as_array() {
        if let Some(n) = schema["minItems"].as_u64()
            && (a.len() as u64) < n
        {
            errs.push(format!("{path}: fewer than {n} items"));
        }
        if let Some(n) = schema["maxItems"].as_u64()
            && (a.len() as u64) > n
        {
            errs.push(format!("{path}: more than {n} items"));
        }
        if schema["items"].is_object() {
            for (i, x) in a.iter().enumerate() {
                validate(&schema["items"], x, &format!("{path}/{i}"), errs);
            }
        }
    }
}

fn out_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nolock-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn quick_report_validates_against_its_schema() {
    let dir = out_dir("compare");
    // As root (CI on these machines) the kernel part runs too.
    // SAFETY: getuid is always safe.
    let root = unsafe { libc::getuid() } == 0;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nolock"));
    cmd.args(["compare", "--quick", "--out"]).arg(&dir);
    if root {
        cmd.arg("--kernel");
    }
    let out = cmd.output().expect("run nolock compare");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "nolock compare --quick failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("schema.json")).unwrap()).unwrap();
    let mut errs = Vec::new();
    validate(&schema, &report, "", &mut errs);
    assert!(errs.is_empty(), "report.json does not follow schema.json: {errs:#?}");
    for id in ["alloc", "rcu", "typesafe", "maps", "storage"] {
        assert!(report["sections"].as_array().unwrap().iter().any(|s| s["id"] == id), "section {id} is in the report");
    }
    assert_eq!(report["schema_version"], 1);
    let maps = report["sections"].as_array().unwrap().iter().find(|s| s["id"] == "maps").unwrap();
    let summary = maps["summary"].as_str().unwrap();
    if root {
        // Either measured, or skipped with the reason (a root without CAP_BPF, e.g. in a locked-down container).
        assert!(
            summary.contains("Kernel columns measured live") || summary.contains("kernel part skipped: bpf("),
            "{summary}"
        );
        eprintln!("kernel part: {}", if summary.contains("measured live") { "measured" } else { "skipped" });
    }
    assert!(report["kernel_version"].as_str().is_some_and(|s| !s.is_empty()));

    // The validator is not vacuous: broken copies are rejected.
    let mut bad = report.clone();
    bad.as_object_mut().unwrap().remove("commit");
    let mut e = Vec::new();
    validate(&schema, &bad, "", &mut e);
    assert!(!e.is_empty(), "a report without its commit is rejected");
    let mut bad = report.clone();
    bad["sections"][0]["status"] = Value::from("maybe");
    let mut e = Vec::new();
    validate(&schema, &bad, "", &mut e);
    assert!(!e.is_empty(), "an unknown section status is rejected");
    let mut bad = report.clone();
    bad["sections"][0]["tables"] = Value::from(vec![serde_json::json!({"id": 1})]);
    let mut e = Vec::new();
    validate(&schema, &bad, "", &mut e);
    assert!(!e.is_empty(), "a malformed table is rejected");

    // The page is self-contained: no script, nothing fetched.
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert!(html.contains("<svg"), "the page has inline charts");
    for bad in ["<script", " src=", "href=\"http", "@import", "url("] {
        assert!(!html.contains(bad), "the page contains {bad}");
    }
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    for s in report["sections"].as_array().unwrap() {
        for t in s["tables"].as_array().unwrap() {
            assert!(md.contains(t["title"].as_str().unwrap()), "Markdown has table {}", t["title"]);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
