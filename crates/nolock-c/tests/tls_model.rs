//! Which TLS model the library's thread-locals use, read from the built `.so` with `readelf` and `objdump`.
//!
//! - **initial-exec**: `R_X86_64_TPOFF64` relocations, the `STATIC_TLS` dynamic flag, and no `__tls_get_addr`
//!   call on nolock's paths: a thread's first touch never enters the loader. Stable Rust cannot produce it for
//!   a `cdylib`: it needs `-Z tls-model=initial-exec` (nightly; `build-initial-exec.sh` builds it).
//! - **general-dynamic** (what stable Rust builds): `R_X86_64_DTPMOD64` relocations and `__tls_get_addr` calls
//!   on every path that touches a thread-local, including `malloc` and `free`.
//!
//! Even the nightly build keeps a few general-dynamic accesses: those inside the precompiled standard library
//! (thread spawn, panics, thread-local destructor registration), which nolock's allocation, free and RCU paths
//! never reach. This test prints what it finds. It always checks that the TLS block stays small (an
//! initial-exec build must fit glibc's static TLS surplus to be `dlopen`able), and with
//! `NOLOCK_C_EXPECT_IE=1` that the library (`NOLOCK_C_LIB` if set) is initial-exec on every nolock path.

#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

mod common;

use std::process::Command;

use common::{lib_path, need};

fn output(program: &std::path::Path, args: &[&str], lib: &std::path::Path) -> String {
    let o = Command::new(program).args(args).arg(lib).output().expect("run binutils");
    assert!(o.status.success(), "{} failed", program.display());
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn tls_model_of_the_library() {
    let (Some(readelf), Some(objdump)) = (need("readelf", "binutils"), need("objdump", "binutils")) else {
        return;
    };
    let lib = lib_path();
    let dynamic = output(&readelf, &["-dW"], &lib);
    let relocs = output(&readelf, &["-rW"], &lib);
    let segments = output(&readelf, &["-lW"], &lib);
    let static_tls = dynamic.lines().any(|l| l.contains("(FLAGS)") && l.contains("STATIC_TLS"));
    let count = |ty: &str| relocs.lines().filter(|l| l.split_whitespace().nth(2) == Some(ty)).count();
    let (dtpmod, tpoff, tlsdesc) = (count("R_X86_64_DTPMOD64"), count("R_X86_64_TPOFF64"), count("R_X86_64_TLSDESC"));
    // The TLS program header: Type Offset VirtAddr PhysAddr FileSiz MemSiz Flg Align.
    let tls_size = segments
        .lines()
        .find(|l| l.trim_start().starts_with("TLS "))
        .and_then(|l| l.split_whitespace().nth(5))
        .and_then(|s| usize::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        .unwrap_or(0);

    // Functions that call __tls_get_addr, split into the precompiled standard library and the rest.
    let disasm = output(&objdump, &["-d", "--no-show-raw-insn"], &lib);
    let mut current = String::new();
    let mut callers: Vec<String> = Vec::new();
    for l in disasm.lines() {
        if l.ends_with(">:") {
            current = l.split('<').nth(1).unwrap_or("").trim_end_matches(">:").to_string();
        } else if l.contains("call") && l.contains("__tls_get_addr") && callers.last() != Some(&current) {
            callers.push(current.clone());
        }
    }
    let is_std = |f: &str| f.contains("3std") || f.starts_with("_ZN3std") || f.contains("std..");
    let ours: Vec<&String> = callers.iter().filter(|f| !is_std(f)).collect();
    let std_count = callers.len() - ours.len();

    let model = if static_tls && ours.is_empty() { "initial-exec" } else { "general-dynamic" };
    eprintln!(
        "{}:\n  TLS model on nolock's paths: {model}\n  STATIC_TLS flag: {static_tls}; relocations: {tpoff} TPOFF64 \
         (initial-exec), {dtpmod} DTPMOD64 (general/local-dynamic), {tlsdesc} TLSDESC\n  TLS block: {tls_size} \
         bytes\n  functions calling __tls_get_addr: {} outside std, {std_count} inside std",
        lib.display(),
        ours.len()
    );
    for f in ours.iter().take(12) {
        eprintln!("    {f}");
    }
    if model == "general-dynamic" {
        eprintln!(
            "  NOTE: stable Rust builds thread-locals of a cdylib in the general-dynamic model; build with \
             crates/nolock-c/build-initial-exec.sh (nightly) for initial-exec."
        );
    }

    assert!(tls_size <= 1024, "the TLS block grew to {tls_size} bytes: keep it small (see the module docs)");
    assert!(tlsdesc == 0 || model == "initial-exec", "unexpected TLSDESC relocations");
    if std::env::var("NOLOCK_C_EXPECT_IE").as_deref() == Ok("1") {
        assert!(static_tls && tpoff > 0, "NOLOCK_C_EXPECT_IE=1 but the library is not initial-exec");
        assert!(ours.is_empty(), "NOLOCK_C_EXPECT_IE=1 but these call __tls_get_addr: {ours:?}");
    } else {
        // The two states we know: initial-exec everywhere but std, or general-dynamic (stable).
        assert!(model == "initial-exec" || dtpmod > 0, "thread-locals without any TLS relocation?");
    }
}
