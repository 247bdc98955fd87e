//! `nolock compare --kernel`: the running kernel's BPF hash maps, measured the way `bpf.md` describes, with
//! neither clang nor libbpf.
//!
//! - Maps are created with the raw `bpf()` system call (x86-64 number 321), with and without
//!   `BPF_F_NO_PREALLOC` (preallocated elements vs `bpf_mem_alloc`).
//! - Small eBPF socket-filter programs are assembled here instruction by instruction and run with
//!   `BPF_PROG_TEST_RUN` and a repeat count; the kernel reports the average run time. Each program has a twin
//!   that is identical but for the map helper call (replaced by `r0 = 0`); the difference is the in-kernel time
//!   of the map operation, without system-call or test-run overhead.
//! - Memory is the kernel memory charged to this process's memory cgroup (`memory.kmem.usage_in_bytes` on
//!   cgroup v1, `memory.stat` `kernel` on v2), read around map creation and fill, beside the map's own
//!   `memlock` figure from `/proc/self/fdinfo`.
//!
//! Without the privilege (`CAP_BPF`/root, or `unprivileged_bpf_disabled`) the first `bpf()` call fails and the
//! section is skipped with a one-line reason.
//!
//! # Context
//! Normal context only: system calls, allocation, file reads.

use std::io;
use std::time::Instant;

/// `bpf()` on x86-64.
#[cfg(target_arch = "x86_64")]
const SYS_BPF: libc::c_long = 321;
#[cfg(not(target_arch = "x86_64"))]
const SYS_BPF: libc::c_long = libc::SYS_bpf;

const BPF_MAP_CREATE: u32 = 0;
const BPF_MAP_UPDATE_ELEM: u32 = 2;
const BPF_PROG_LOAD: u32 = 5;
const BPF_PROG_TEST_RUN: u32 = 10;

const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;
/// Map flag: allocate elements on demand (`bpf_mem_alloc`) instead of preallocating them.
pub const BPF_F_NO_PREALLOC: u32 = 1;

const FN_MAP_LOOKUP: i32 = 1;
const FN_MAP_UPDATE: i32 = 2;
const FN_MAP_DELETE: i32 = 3;
const FN_GET_PRANDOM_U32: i32 = 7;

/// An owned file descriptor.
#[derive(Debug)]
pub struct Fd(i32);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: an fd this process owns, closed once.
        unsafe { libc::close(self.0) };
    }
}

fn sys_bpf(cmd: u32, attr: &mut [u64]) -> io::Result<i64> {
    // SAFETY: `attr` is a writable buffer of the given size, laid out as the command's `union bpf_attr` member.
    let r = unsafe { libc::syscall(SYS_BPF, cmd as libc::c_long, attr.as_mut_ptr(), std::mem::size_of_val(attr)) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r as i64) }
}

/// Two u32 into one u64 word of the attribute (little endian: `lo` first).
fn w(lo: u32, hi: u32) -> u64 {
    lo as u64 | (hi as u64) << 32
}

/// `BPF_MAP_CREATE`.
pub fn map_create(map_type: u32, key: u32, value: u32, max_entries: u32, flags: u32) -> io::Result<Fd> {
    let mut a = [0u64; 16];
    a[0] = w(map_type, key);
    a[1] = w(value, max_entries);
    a[2] = w(flags, 0);
    sys_bpf(BPF_MAP_CREATE, &mut a).map(|fd| Fd(fd as i32))
}

/// `BPF_MAP_UPDATE_ELEM` from user space.
pub fn map_update(map: &Fd, key: &[u8], value: &[u8], flags: u64) -> io::Result<()> {
    let mut a = [0u64; 16];
    a[0] = w(map.0 as u32, 0);
    a[1] = key.as_ptr() as u64;
    a[2] = value.as_ptr() as u64;
    a[3] = flags;
    sys_bpf(BPF_MAP_UPDATE_ELEM, &mut a).map(|_| ())
}

/// One eBPF instruction.
#[derive(Clone, Copy, Debug)]
struct Insn {
    code: u8,
    dst: u8,
    src: u8,
    off: i16,
    imm: i32,
}

impl Insn {
    fn bytes(self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0] = self.code;
        b[1] = (self.src << 4) | (self.dst & 0xf);
        b[2..4].copy_from_slice(&self.off.to_le_bytes());
        b[4..8].copy_from_slice(&self.imm.to_le_bytes());
        b
    }
}

const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R4: u8 = 4;
const R10: u8 = 10;

fn i(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn { code, dst, src, off, imm }
}
fn mov_imm(dst: u8, imm: i32) -> Insn {
    i(0xb7, dst, 0, 0, imm)
}
fn mov_reg(dst: u8, src: u8) -> Insn {
    i(0xbf, dst, src, 0, 0)
}
fn add_imm(dst: u8, imm: i32) -> Insn {
    i(0x07, dst, 0, 0, imm)
}
fn st_w(dst: u8, off: i16, imm: i32) -> Insn {
    i(0x62, dst, 0, off, imm)
}
fn st_dw(dst: u8, off: i16, imm: i32) -> Insn {
    i(0x7a, dst, 0, off, imm)
}
fn stx_w(dst: u8, off: i16, src: u8) -> Insn {
    i(0x63, dst, src, off, 0)
}
fn stx_dw(dst: u8, off: i16, src: u8) -> Insn {
    i(0x7b, dst, src, off, 0)
}
fn ldx_dw(dst: u8, src: u8, off: i16) -> Insn {
    i(0x79, dst, src, off, 0)
}
fn jeq_imm(dst: u8, imm: i32, off: i16) -> Insn {
    i(0x15, dst, 0, off, imm)
}
fn call(helper: i32) -> Insn {
    i(0x85, 0, 0, 0, helper)
}
fn exit() -> Insn {
    i(0x95, 0, 0, 0, 0)
}
/// `r = map` (a 16-byte `ld_imm64` with `BPF_PSEUDO_MAP_FD`).
fn ld_map(dst: u8, map: &Fd) -> [Insn; 2] {
    [i(0x18, dst, 1, 0, map.0), i(0, 0, 0, 0, 0)]
}

/// The helper call, or in the twin program the same slot as `r0 = 0`.
fn call_or_not(helper: i32, with: bool) -> Insn {
    if with { call(helper) } else { mov_imm(R0, 0) }
}

/// A loaded program.
pub struct Prog(Fd);

fn prog_load(insns: &[Insn]) -> io::Result<Prog> {
    let code: Vec<u8> = insns.iter().flat_map(|x| x.bytes()).collect();
    let license = b"GPL\0";
    let mut log = vec![0u8; 1 << 16];
    let mut a = [0u64; 16];
    a[0] = w(BPF_PROG_TYPE_SOCKET_FILTER, insns.len() as u32);
    a[1] = code.as_ptr() as u64;
    a[2] = license.as_ptr() as u64;
    a[3] = w(1, log.len() as u32);
    a[4] = log.as_mut_ptr() as u64;
    match sys_bpf(BPF_PROG_LOAD, &mut a) {
        Ok(fd) => Ok(Prog(Fd(fd as i32))),
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(0);
            let msg = String::from_utf8_lossy(&log[..end]);
            let last = msg.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").to_string();
            Err(io::Error::new(e.kind(), format!("BPF_PROG_LOAD: {e}; verifier: {last}")))
        }
    }
}

/// `BPF_PROG_TEST_RUN` with `repeat`: the kernel's average ns per run, and the program's return value.
fn test_run(p: &Prog, repeat: u32) -> io::Result<(f64, u32)> {
    let data = [0u8; 64];
    let mut a = [0u64; 16];
    a[0] = w(p.0.0 as u32, 0);
    a[1] = w(data.len() as u32, 0);
    a[2] = data.as_ptr() as u64;
    a[3] = 0;
    a[4] = w(repeat, 0);
    sys_bpf(BPF_PROG_TEST_RUN, &mut a)?;
    let retval = a[0] >> 32;
    let duration = (a[4] >> 32) as u32;
    Ok((duration as f64, retval as u32))
}

/// Update of key 0 (value 1, `BPF_ANY`).
fn prog_update(map: &Fd, with: bool, delete_too: bool) -> io::Result<Prog> {
    let mut v = vec![st_w(R10, -4, 0), st_dw(R10, -16, 1)];
    v.extend(ld_map(R1, map));
    v.extend([mov_reg(R2, R10), add_imm(R2, -4), mov_reg(R3, R10), add_imm(R3, -16), mov_imm(R4, 0)]);
    v.push(call_or_not(FN_MAP_UPDATE, with));
    if delete_too {
        v.extend(ld_map(R1, map));
        v.extend([mov_reg(R2, R10), add_imm(R2, -4)]);
        v.push(call_or_not(FN_MAP_DELETE, with));
    }
    v.extend([mov_imm(R0, 0), exit()]);
    prog_load(&v)
}

/// Update (`BPF_ANY`) of a random key among `mask + 1` present ones; the twin keeps the random draw.
fn prog_update_random(map: &Fd, mask: i32, with: bool) -> io::Result<Prog> {
    let mut v = vec![call(FN_GET_PRANDOM_U32), i(0x57, R0, 0, 0, mask), stx_w(R10, -4, R0), st_dw(R10, -16, 1)];
    v.extend(ld_map(R1, map));
    v.extend([mov_reg(R2, R10), add_imm(R2, -4), mov_reg(R3, R10), add_imm(R3, -16), mov_imm(R4, 0)]);
    v.push(call_or_not(FN_MAP_UPDATE, with));
    v.extend([mov_imm(R0, 0), exit()]);
    prog_load(&v)
}

/// Insert of a new key per run: key = ++counter[0] (`BPF_NOEXIST`); returns the update's result.
fn prog_insert(map: &Fd, counter: &Fd, with: bool) -> io::Result<Prog> {
    let mut v = vec![st_w(R10, -4, 0)];
    v.extend(ld_map(R1, counter));
    v.extend([mov_reg(R2, R10), add_imm(R2, -4), call(FN_MAP_LOOKUP)]);
    let tail_start = v.len();
    let mut tail = vec![ldx_dw(R1, R0, 0), add_imm(R1, 1), stx_dw(R0, 0, R1), stx_w(R10, -8, R1), stx_dw(R10, -16, R1)];
    tail.extend(ld_map(R1, map));
    tail.extend([
        mov_reg(R2, R10),
        add_imm(R2, -8),
        mov_reg(R3, R10),
        add_imm(R3, -16),
        mov_imm(R4, 1),
        call_or_not(FN_MAP_UPDATE, with),
        exit(),
    ]);
    // if r0 == 0 (no counter) return 0
    v.push(jeq_imm(R0, 0, tail.len() as i16));
    let _ = tail_start;
    v.extend(tail);
    v.extend([mov_imm(R0, 0), exit()]);
    prog_load(&v)
}

/// A child memory cgroup (v1) this process moves into while it measures, so that other processes of its own
/// cgroup (builds, other benchmarks) do not move the figure; moved back and removed on drop.
struct ChildCgroup {
    dir: String,
    parent: String,
}

impl ChildCgroup {
    fn enter() -> Option<ChildCgroup> {
        let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let path = cg.lines().find_map(|l| {
            let mut p = l.splitn(3, ':');
            let (_, ctrl, path) = (p.next()?, p.next()?, p.next()?);
            ctrl.split(',').any(|c| c == "memory").then(|| path.to_string())
        })?;
        let parent = format!("/sys/fs/cgroup/memory{}", path.trim_end_matches('/'));
        let dir = format!("{parent}/nolock-compare-{}", std::process::id());
        std::fs::create_dir(&dir).ok()?;
        if std::fs::write(format!("{dir}/cgroup.procs"), std::process::id().to_string()).is_err() {
            let _ = std::fs::remove_dir(&dir);
            return None;
        }
        Some(ChildCgroup { dir, parent })
    }

    fn kmem(&self) -> Option<u64> {
        std::fs::read_to_string(format!("{}/memory.kmem.usage_in_bytes", self.dir)).ok()?.trim().parse().ok()
    }
}

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(format!("{}/cgroup.procs", self.parent), std::process::id().to_string());
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Kernel memory charged to this process's memory cgroup, in bytes.
pub fn cgroup_kmem() -> Option<u64> {
    let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in cg.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctrl, path) = (parts.next()?, parts.next()?, parts.next()?);
        if ctrl.split(',').any(|c| c == "memory") {
            let f = format!("/sys/fs/cgroup/memory{path}/memory.kmem.usage_in_bytes");
            if let Some(v) = std::fs::read_to_string(&f).ok().and_then(|s| s.trim().parse().ok()) {
                return Some(v);
            }
        }
        if ctrl.is_empty() {
            let f = format!("/sys/fs/cgroup{path}/memory.stat");
            if let Ok(s) = std::fs::read_to_string(&f) {
                for l in s.lines() {
                    if let Some(v) = l.strip_prefix("kernel ") {
                        return v.trim().parse().ok();
                    }
                }
            }
        }
    }
    None
}

fn memlock(fd: &Fd) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.0)).ok()?;
    s.lines().find_map(|l| l.strip_prefix("memlock:").and_then(|v| v.trim().parse().ok()))
}

/// Whether this process may use `bpf()`: `Err` gives the one-line reason it may not.
pub fn probe() -> Result<(), String> {
    match map_create(BPF_MAP_TYPE_HASH, 4, 8, 16, 0) {
        Ok(_) => Ok(()),
        Err(e) => Err(format!(
            "bpf(BPF_MAP_CREATE) failed: {e} (needs root or CAP_BPF; /proc/sys/kernel/unprivileged_bpf_disabled = {})",
            std::fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled")
                .map_or("?".into(), |s| s.trim().to_string())
        )),
    }
}

/// One measured figure: median over repetitions, with min and max.
#[derive(Clone, Copy, Debug)]
pub struct Fig {
    /// Median.
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

fn fig(mut v: Vec<f64>) -> Fig {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return Fig { median: f64::NAN, min: f64::NAN, max: f64::NAN };
    }
    let m = v.len() / 2;
    let median = if v.len() % 2 == 1 { v[m] } else { (v[m - 1] + v[m]) / 2.0 };
    Fig { median, min: v[0], max: v[v.len() - 1] }
}

/// In-kernel ns per operation of a program against its twin without the call.
fn ns_per_op(with: &Prog, without: &Prog, repeat: u32, reps: usize) -> io::Result<Fig> {
    let mut v = Vec::new();
    for _ in 0..reps {
        let (a, _) = test_run(with, repeat)?;
        let (b, _) = test_run(without, repeat)?;
        v.push(a - b);
    }
    Ok(fig(v))
}

/// Results of the kernel measurements.
#[derive(Clone, Debug, Default)]
pub struct KernelResults {
    /// (measure, prealloc, no-prealloc).
    pub ops: Vec<(String, Fig, Fig)>,
    /// (max_entries, prealloc ns/insert, no-prealloc ns/insert).
    pub insert: Vec<(u32, Fig, Fig)>,
    /// (occupancy %, prealloc bytes, no-prealloc bytes) charged to the memory cgroup for the map.
    pub memory: Vec<(u32, f64, f64)>,
    /// Entries of the memory map.
    pub memory_entries: u32,
    /// Which memory cgroup the memory figures come from.
    pub memory_cgroup: &'static str,
    /// memlock of the full maps (prealloc, no-prealloc).
    pub memlock: (Option<u64>, Option<u64>),
    /// Seconds taken.
    pub seconds: f64,
}

/// Runs every kernel measurement. `Err`: a `bpf()` call failed (the reason).
pub fn measure(quick: bool) -> Result<KernelResults, String> {
    let t0 = Instant::now();
    let reps = if quick { 3 } else { 5 };
    let repeat = if quick { 20_000 } else { 200_000 };
    let e = |e: io::Error| e.to_string();
    let mut out = KernelResults::default();
    // update of an existing key; update + delete.
    for (name, del) in [("update of an existing key", false), ("update + delete of a key", true)] {
        let mut figs = Vec::new();
        for flags in [0, BPF_F_NO_PREALLOC] {
            let m = map_create(BPF_MAP_TYPE_HASH, 4, 8, 8192, flags).map_err(e)?;
            map_update(&m, &0u32.to_le_bytes(), &1u64.to_le_bytes(), 0).map_err(e)?;
            let a = prog_update(&m, true, del).map_err(e)?;
            let b = prog_update(&m, false, del).map_err(e)?;
            figs.push(ns_per_op(&a, &b, repeat, reps).map_err(e)?);
        }
        out.ops.push((name.into(), figs[0], figs[1]));
    }
    {
        let n: u32 = 8192;
        let mut figs = Vec::new();
        for flags in [0, BPF_F_NO_PREALLOC] {
            let m = map_create(BPF_MAP_TYPE_HASH, 4, 8, n, flags).map_err(e)?;
            for k in 0..n {
                map_update(&m, &k.to_le_bytes(), &1u64.to_le_bytes(), 0).map_err(e)?;
            }
            let a = prog_update_random(&m, (n - 1) as i32, true).map_err(e)?;
            let b = prog_update_random(&m, (n - 1) as i32, false).map_err(e)?;
            figs.push(ns_per_op(&a, &b, repeat, reps).map_err(e)?);
        }
        out.ops.push((format!("update of a random existing key ({n} present)"), figs[0], figs[1]));
    }
    // insert until full, per size.
    let sizes: &[u32] = if quick { &[16_384] } else { &[16_384, 131_072, 1_048_576] };
    for &n in sizes {
        let mut figs = Vec::new();
        for flags in [0, BPF_F_NO_PREALLOC] {
            let mut v = Vec::new();
            for _ in 0..reps {
                let counter = map_create(BPF_MAP_TYPE_ARRAY, 4, 8, 1, 0).map_err(e)?;
                let m = map_create(BPF_MAP_TYPE_HASH, 4, 8, n, flags).map_err(e)?;
                let a = prog_insert(&m, &counter, true).map_err(e)?;
                let b = prog_insert(&m, &counter, false).map_err(e)?;
                let (with, _) = test_run(&a, n).map_err(e)?;
                map_update(&counter, &0u32.to_le_bytes(), &0u64.to_le_bytes(), 0).map_err(e)?;
                let (without, _) = test_run(&b, n).map_err(e)?;
                v.push(with - without);
            }
            figs.push(fig(v));
        }
        out.insert.push((n, figs[0], figs[1]));
    }
    // memory per occupancy.
    let n: u32 = if quick { 262_144 } else { 1_048_576 };
    out.memory_entries = n;
    let levels = [0u32, 1, 10, 25, 50, 75, 100];
    let mut pre = Vec::new();
    let mut nopre = Vec::new();
    let child = ChildCgroup::enter();
    out.memory_cgroup = if child.is_some() {
        "a child memory cgroup of this process's own (v1 memory.kmem.usage_in_bytes), created for the measurement"
    } else {
        "this process's memory cgroup, shared with whatever else runs in it (could not create a child)"
    };
    let read = || child.as_ref().map_or_else(cgroup_kmem, |c| c.kmem());
    let mut keep = Vec::new();
    for flags in [0, BPF_F_NO_PREALLOC] {
        let k0 = read().ok_or("cannot read the memory cgroup's kernel memory")?;
        let counter = map_create(BPF_MAP_TYPE_ARRAY, 4, 8, 1, 0).map_err(e)?;
        let m = map_create(BPF_MAP_TYPE_HASH, 4, 8, n, flags).map_err(e)?;
        let p = prog_insert(&m, &counter, true).map_err(e)?;
        let mut done = 0u32;
        let mut got = Vec::new();
        for &lvl in &levels {
            let want = (n as u64 * lvl as u64 / 100) as u32;
            if want > done {
                let (_, _) = test_run(&p, want - done).map_err(e)?;
                done = want;
            }
            let k = read().unwrap_or(k0);
            got.push((lvl, k.saturating_sub(k0) as f64));
        }
        if flags == 0 {
            out.memlock.0 = memlock(&m);
            pre = got;
        } else {
            out.memlock.1 = memlock(&m);
            nopre = got;
        }
        // Keep the maps until both are measured: a map's memory is uncharged some time after it is closed
        // (after a grace period, from a workqueue), which would land in the next measurement.
        keep.push((m, counter, p));
    }
    drop(keep);
    drop(child);
    out.memory = pre.iter().zip(&nopre).map(|(a, b)| (a.0, a.1, b.1)).collect();
    out.seconds = t0.elapsed().as_secs_f64();
    Ok(out)
}
