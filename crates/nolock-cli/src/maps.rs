//! `nolock bench maps`: the kernel's BPF hash-map benchmarks, ported, with the baselines in the same run.
//!
//! Contenders (a map = element backend + bucket locking, see `nolock_bpf::htab`):
//! - `prealloc` (rqspin): the kernel's default map since v6.15 (all elements allocated at creation);
//! - `bpf_ma` (rqspin): `BPF_F_NO_PREALLOC` since v6.15 (a faithful `bpf_mem_alloc`, refill at region end);
//! - `nolock-D` (rqspin): an exact-size `TYPESAFE_BY_SRCU_FAST` nolock cache, immediate type-safe reuse, same
//!   bucket lock as the kernel: the backend change alone;
//! - `nolock-D/lf`: the same backend with lock-free buckets (removed elements reused after an RCU grace period);
//! - `nolock-B/lf` (full runs only): `kfree_rcu_nolock` with lock-free buckets.
//!
//! Sections:
//! 1. **htab-mem** (`bench_htab_mem.c`): key 4 B, `max_entries = max(8192, 64 × threads)`, each producer
//!    thread loops over "programs" of 64 element operations; each element operation is one IRQs-off region
//!    (a BPF program runs with interrupts on, so the kernel's refill `irq_work` runs right after the operation
//!    that raised it). `overwrite`: 64 updates of the thread's existing keys = 1 op;
//!    `batch_add_batch_del`: 64 adds then 64 deletes = 2 ops; `add_del_on_diff_cpu`: threads in pairs, one adds
//!    64 keys, the other deletes them (no synchronisation, as the kernel's) = 1 op each. Ops/s over all
//!    producers; memory = what the backend holds from the allocator below it, sampled every millisecond (the
//!    preallocated array; the bytes `bpf_mem_alloc` took from `kmalloc`, which its accounting group is charged;
//!    the nolock cache's slabs), average and peak, in MiB.
//! 2. **full-update** (`bpf-hashmap-full-update`): a full 1000-entry map, updates of absent keys (the `-E2BIG`
//!    path), ns per update.
//! 3. **occupancy sweep**: a map of N entries filled to 0/1/10/50/100 %: memory measured and by the kernel's
//!    `htab_map_mem_usage` formula, per backend, and as a ratio to prealloc.
//! 4. **insert-until-full**: ns per insert filling an empty map of N entries.
//! 5. **burst**: 64 inserts in one region into a fresh map whose refill comes late (5 ms): failures.
//! 6. **signal storms** (20k and 80k signals/s over 2 threads): threads update random keys while handlers update
//!    the same key, a random key, or a key of another map; ops/s and errors per 10^6 operations by kind.
//!
//! Every cell is the median of at least 5 repetitions with [min–max]; contenders take turns inside every
//! repetition; every figure is also given as a ratio to prealloc and to bpf_ma of the same run.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use nolock_bpf::cpu::IrqRegion;
use nolock_bpf::htab::{Backend, Error, HashMap, HtabAttr, LockMode, NolockReuse, Stats, UpdateFlags};
use nolock_bpf::memalloc::RefillMode;
use testkit::storm::{self, Storm, StormSlot};

use crate::bench::{BenchArgs, Summary, conditions, print_rows, summarize};

#[derive(Clone, Copy)]
struct Contender {
    name: &'static str,
    backend: Backend,
    lock: LockMode,
}

fn contenders(quick: bool) -> Vec<Contender> {
    let mut v = vec![
        Contender { name: "prealloc", backend: Backend::Prealloc, lock: LockMode::Rqspin },
        Contender { name: "bpf_ma", backend: Backend::BpfMemAlloc(RefillMode::AtRegionEnd), lock: LockMode::Rqspin },
        Contender {
            name: "nolock-D",
            backend: Backend::Nolock(NolockReuse::TypesafeImmediate),
            lock: LockMode::Rqspin,
        },
        Contender {
            name: "nolock-D/lf",
            backend: Backend::Nolock(NolockReuse::TypesafeImmediate),
            lock: LockMode::LockFree,
        },
    ];
    if !quick {
        v.push(Contender {
            name: "nolock-B/lf",
            backend: Backend::Nolock(NolockReuse::AfterRcu),
            lock: LockMode::LockFree,
        });
    }
    v
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Case {
    Overwrite,
    BatchAddBatchDel,
    AddDelOnDiffCpu,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::Overwrite => "overwrite",
            Case::BatchAddBatchDel => "batch_add_batch_del",
            Case::AddDelOnDiffCpu => "add_del_on_diff_cpu",
        }
    }
}

/// One measured cell.
#[derive(Clone, Copy, Default)]
struct Cell {
    ops_per_s: f64,
    mem_avg: f64,
    mem_peak: f64,
    elem_ops: u64,
    errors: [u64; 8],
}

fn add_errors(acc: &mut [u64; 8], s: &Stats) {
    for (a, e) in acc.iter_mut().zip(s.errors) {
        *a += e;
    }
}

fn mib(b: f64) -> f64 {
    b / (1024.0 * 1024.0)
}

fn key(k: u32) -> [u8; 4] {
    k.to_ne_bytes()
}

/// One htab-mem cell: a fresh map, `threads` producers for `dur`.
fn htab_cell(c: &Contender, case: Case, value: usize, threads: usize, dur: Duration) -> Cell {
    let max = 8192.max(64 * threads);
    let m = Arc::new(HashMap::new(HtabAttr::new(4, value, max).backend(c.backend).lock(c.lock)).expect("map"));
    let val = vec![0x5au8; value];
    if case == Case::Overwrite {
        for k in 0..(64 * threads) as u32 {
            m.update(&key(k), &val, UpdateFlags::Any).expect("prefill");
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (m, stop, start, val) = (m.clone(), stop.clone(), start.clone(), val.clone());
            std::thread::spawn(move || {
                let base = match case {
                    Case::AddDelOnDiffCpu => (t / 2 * 64) as u32,
                    _ => (t * 64) as u32,
                };
                let adder = t % 2 == 0;
                let mut ops = 0u64;
                let mut elem = 0u64;
                start.wait();
                while !stop.load(Ordering::Relaxed) {
                    match case {
                        Case::Overwrite => {
                            for j in 0..64 {
                                let _ = m.update(&key(base + j), &val, UpdateFlags::Any);
                            }
                            ops += 1;
                            elem += 64;
                        }
                        Case::BatchAddBatchDel => {
                            for j in 0..64 {
                                let _ = m.update(&key(base + j), &val, UpdateFlags::Any);
                            }
                            for j in 0..64 {
                                let _ = m.delete(&key(base + j));
                            }
                            ops += 2;
                            elem += 128;
                        }
                        Case::AddDelOnDiffCpu => {
                            for j in 0..64 {
                                if adder {
                                    let _ = m.update(&key(base + j), &val, UpdateFlags::Any);
                                } else {
                                    let _ = m.delete(&key(base + j));
                                }
                            }
                            ops += 1;
                            elem += 64;
                        }
                    }
                }
                (ops, elem)
            })
        })
        .collect();
    start.wait();
    let t0 = Instant::now();
    let (mut sum, mut n, mut peak) = (0.0f64, 0u64, 0.0f64);
    while t0.elapsed() < dur {
        std::thread::sleep(Duration::from_millis(1));
        let b = m.mem_measured() as f64;
        sum += b;
        n += 1;
        peak = peak.max(b);
    }
    stop.store(true, Ordering::Relaxed);
    let el = t0.elapsed().as_secs_f64();
    let (mut ops, mut elem) = (0u64, 0u64);
    for h in handles {
        let (o, e) = h.join().expect("producer");
        ops += o;
        elem += e;
    }
    let mut errors = [0; 8];
    add_errors(&mut errors, &m.stats());
    Cell { ops_per_s: ops as f64 / el, mem_avg: sum / n.max(1) as f64, mem_peak: peak, elem_ops: elem, errors }
}

/// Medians over repetitions for each contender of a row.
struct Row {
    ops: Vec<Summary>,
    mem_avg: Vec<Summary>,
    mem_peak: Vec<Summary>,
    err_per_m: Vec<[f64; 8]>,
}

fn run_row(cs: &[Contender], reps: usize, mut f: impl FnMut(&Contender) -> Cell) -> Row {
    let mut samples: Vec<Vec<Cell>> = vec![Vec::new(); cs.len()];
    for r in 0..reps {
        for i in 0..cs.len() {
            let ci = (i + r) % cs.len();
            samples[ci].push(f(&cs[ci]));
        }
        nolock::trim();
    }
    let sm = |g: &dyn Fn(&Cell) -> f64, s: &Vec<Cell>| summarize(&s.iter().map(g).collect::<Vec<_>>());
    Row {
        ops: samples.iter().map(|s| sm(&|c| c.ops_per_s, s)).collect(),
        mem_avg: samples.iter().map(|s| sm(&|c| c.mem_avg, s)).collect(),
        mem_peak: samples.iter().map(|s| sm(&|c| c.mem_peak, s)).collect(),
        err_per_m: samples
            .iter()
            .map(|s| {
                let tot: u64 = s.iter().map(|c| c.elem_ops).sum::<u64>().max(1);
                let mut e = [0.0; 8];
                for c in s {
                    for (k, x) in c.errors.iter().enumerate() {
                        e[k] += *x as f64;
                    }
                }
                e.map(|x| x * 1e6 / tot as f64)
            })
            .collect(),
    }
}

fn spread(s: &Summary, scale: f64, digits: usize) -> String {
    format!("{:.d$} [{:.d$}–{:.d$}]", s.median / scale, s.min / scale, s.max / scale, d = digits)
}

fn errs(e: &[f64; 8]) -> String {
    // Full, NoMem, Busy, Deadlock, TimedOut per 10^6 element operations (Exists/NotFound are answers).
    let idx = [0usize, 1, 4, 5, 6];
    let names = ["E2BIG", "ENOMEM", "EBUSY", "EDEADLK", "ETIMEDOUT"];
    let parts: Vec<String> =
        idx.iter().zip(names).filter(|(i, _)| e[**i] > 0.0).map(|(i, n)| format!("{n} {:.0}", e[*i])).collect();
    if parts.is_empty() { "0".into() } else { parts.join(", ") }
}

struct Targets {
    lines: Vec<String>,
}

fn section_htab_mem(args: &BenchArgs, cs: &[Contender], t: &mut Targets) {
    let quick = args.quick;
    let reps = args.reps();
    let dur = Duration::from_millis(if quick { 40 } else { 200 });
    let values: &[usize] = if quick { &[8, 4096] } else { &[8, 256, 4096] };
    let threads: &[usize] = if quick { &[2] } else { &[1, 2, 4] };
    println!("\n## htab-mem (k-ops/s over all producers, 1 op = 64 element operations; memory MiB avg / peak)\n");
    let mut rows = vec![vec![
        "case".to_string(),
        "value".into(),
        "thr".into(),
        "map".into(),
        "k-ops/s".into(),
        "×prealloc".into(),
        "×bpf_ma".into(),
        "mem avg MiB".into(),
        "mem peak".into(),
        "avg ×bpf_ma".into(),
        "errors/1e6".into(),
    ]];
    for case in [Case::Overwrite, Case::BatchAddBatchDel, Case::AddDelOnDiffCpu] {
        for &v in values {
            for &th in threads {
                if case == Case::AddDelOnDiffCpu && th % 2 == 1 {
                    continue;
                }
                let row = run_row(cs, reps, |c| htab_cell(c, case, v, th, dur));
                for (i, c) in cs.iter().enumerate() {
                    let o = row.ops[i].median;
                    rows.push(vec![
                        case.name().into(),
                        v.to_string(),
                        th.to_string(),
                        c.name.into(),
                        spread(&row.ops[i], 1e3, 1),
                        format!("{:.2}", o / row.ops[0].median),
                        format!("{:.2}", o / row.ops[1].median),
                        spread(&row.mem_avg[i], 1024.0 * 1024.0, 2),
                        format!("{:.2}", mib(row.mem_peak[i].median)),
                        format!("{:.2}", row.mem_avg[i].median / row.mem_avg[1].median),
                        errs(&row.err_per_m[i]),
                    ]);
                    if c.name.starts_with("nolock-D") {
                        let x_ma = o / row.ops[1].median;
                        let x_pre = o / row.ops[0].median;
                        let mem = row.mem_avg[i].median / row.mem_avg[1].median;
                        let line = match case {
                            Case::AddDelOnDiffCpu => format!(
                                "{} {} v{} t{}: {:.2}× bpf_ma (target ≥ 1.5: {}), avg memory {:.2}× bpf_ma (target ≤ 0.25: {})",
                                c.name,
                                case.name(),
                                v,
                                th,
                                x_ma,
                                met(x_ma >= 1.5),
                                mem,
                                met(mem <= 0.25)
                            ),
                            _ => format!(
                                "{} {} v{} t{}: {:.2}× bpf_ma (target ≥ 1.25: {}), {:.2}× prealloc (target ≥ 0.9: {})",
                                c.name,
                                case.name(),
                                v,
                                th,
                                x_ma,
                                met(x_ma >= 1.25),
                                x_pre,
                                met(x_pre >= 0.9)
                            ),
                        };
                        t.lines.push(line);
                    }
                    if c.name.starts_with("nolock") && row.err_per_m[i][1] > 0.0 {
                        t.lines.push(format!(
                            "{} {} v{} t{}: NoMem seen (target: zero): NOT MET",
                            c.name,
                            case.name(),
                            v,
                            th
                        ));
                    }
                }
                {
                    t.lines.push(format!(
                        "prealloc : bpf_ma throughput {} v{} t{}: {:.2} (kernel 6.18 anchor in bpf.md)",
                        case.name(),
                        v,
                        th,
                        row.ops[0].median / row.ops[1].median
                    ));
                }
            }
        }
    }
    print_rows(&rows);
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT MET" }
}

fn section_full_update(args: &BenchArgs, cs: &[Contender]) {
    println!("\n## bpf-hashmap-full-update (full 1000-entry map, updates of absent keys: the E2BIG path; ns/update)\n");
    let n = if args.quick { 20_000 } else { 200_000 };
    let row = run_row(cs, args.reps(), |c| {
        let m = HashMap::new(HtabAttr::new(4, 8, 1000).backend(c.backend).lock(c.lock)).expect("map");
        for k in 0..1000u32 {
            m.update(&key(k), &[1; 8], UpdateFlags::Any).expect("fill");
        }
        let t0 = Instant::now();
        for i in 0..n {
            let r = m.update(&key(1000 + (i % 5000)), &[2; 8], UpdateFlags::Any);
            debug_assert_eq!(r, Err(Error::Full));
        }
        let ns = t0.elapsed().as_nanos() as f64 / n as f64;
        let mut errors = [0; 8];
        add_errors(&mut errors, &m.stats());
        Cell { ops_per_s: ns, errors, elem_ops: n as u64, ..Default::default() }
    });
    let mut rows = vec![vec!["map".to_string(), "ns/update".into(), "×prealloc".into(), "×bpf_ma".into()]];
    for (i, c) in cs.iter().enumerate() {
        rows.push(vec![
            c.name.into(),
            spread(&row.ops[i], 1.0, 1),
            format!("{:.2}", row.ops[i].median / row.ops[0].median),
            format!("{:.2}", row.ops[i].median / row.ops[1].median),
        ]);
    }
    print_rows(&rows);
}

fn section_occupancy(args: &BenchArgs, cs: &[Contender], t: &mut Targets) {
    let n = if args.quick { 16_384 } else { 131_072 };
    println!(
        "\n## occupancy sweep ({n} entries, key 4 B; memory KiB measured / by the kernel's formula; ratio = measured ÷ prealloc measured)\n"
    );
    let mut rows = vec![vec!["value".to_string(), "fill %".into()]];
    for c in cs {
        rows[0].push(format!("{} meas / formula", c.name));
        rows[0].push("×pre".into());
    }
    for value in [8usize, 64, 256] {
        for pct in [0usize, 1, 10, 50, 100] {
            let mut r = vec![value.to_string(), pct.to_string()];
            let mut pre = 0.0;
            for (i, c) in cs.iter().enumerate() {
                let m = HashMap::new(HtabAttr::new(4, value, n).backend(c.backend).lock(c.lock)).expect("map");
                let fill = n * pct / 100;
                let val = vec![7u8; value];
                for k in 0..fill as u32 {
                    m.update(&key(k), &val, UpdateFlags::NoExist).expect("fill");
                }
                let meas = m.mem_measured() as f64;
                let form = m.mem_usage() as f64;
                if i == 0 {
                    pre = meas;
                }
                r.push(format!("{:.0} / {:.0}", meas / 1024.0, form / 1024.0));
                r.push(format!("{:.3}", meas / pre));
                if pct == 10 && c.name.starts_with("nolock") {
                    let lim = if value < 64 { 0.2 } else { 0.15 };
                    t.lines.push(format!(
                        "{} memory at 10 % occupancy, value {value}: {:.3}× prealloc (target ≤ {lim}: {})",
                        c.name,
                        meas / pre,
                        met(meas / pre <= lim)
                    ));
                }
                drop(m);
            }
            rows.push(r);
        }
    }
    nolock::trim();
    print_rows(&rows);
}

fn section_insert_until_full(args: &BenchArgs, cs: &[Contender]) {
    let n = if args.quick { 16_384 } else { 131_072 };
    println!("\n## insert-until-full ({n} entries, key 4 B, value 8 B; ns per insert)\n");
    let row = run_row(cs, args.reps(), |c| {
        let m = HashMap::new(HtabAttr::new(4, 8, n).backend(c.backend).lock(c.lock)).expect("map");
        let t0 = Instant::now();
        for k in 0..n as u32 {
            let _ = m.update(&key(k), &[1; 8], UpdateFlags::NoExist);
        }
        let ns = t0.elapsed().as_nanos() as f64 / n as f64;
        let mut errors = [0; 8];
        add_errors(&mut errors, &m.stats());
        Cell { ops_per_s: ns, errors, elem_ops: n as u64, ..Default::default() }
    });
    let mut rows =
        vec![vec!["map".to_string(), "ns/insert".into(), "×prealloc".into(), "×bpf_ma".into(), "errors/1e6".into()]];
    for (i, c) in cs.iter().enumerate() {
        rows.push(vec![
            c.name.into(),
            spread(&row.ops[i], 1.0, 1),
            format!("{:.2}", row.ops[i].median / row.ops[0].median),
            format!("{:.2}", row.ops[i].median / row.ops[1].median),
            errs(&row.err_per_m[i]),
        ]);
    }
    print_rows(&rows);
}

fn section_burst(cs: &[Contender], t: &mut Targets) {
    println!("\n## burst (64 inserts in one region into a fresh map, refill late by 5 ms)\n");
    let mut rows = vec![vec!["map".to_string(), "ok".into(), "failed".into(), "first failure".into()]];
    for c in cs {
        let backend = match c.backend {
            Backend::BpfMemAlloc(_) => Backend::BpfMemAlloc(RefillMode::Late(Duration::from_millis(5))),
            b => b,
        };
        let m = HashMap::new(HtabAttr::new(4, 8, 1024).backend(backend).lock(c.lock)).expect("map");
        let res: Vec<_> = {
            let _r = IrqRegion::enter();
            (0..64u32).map(|k| m.update(&key(k), &[1; 8], UpdateFlags::NoExist)).collect()
        };
        let ok = res.iter().filter(|r| r.is_ok()).count();
        let first = res.iter().position(|r| r.is_err()).map_or("-".to_string(), |i| format!("#{} {:?}", i + 1, res[i]));
        if c.name.starts_with("nolock") {
            t.lines.push(format!(
                "{} burst: {} of 64 inserts failed (target: zero NoMem: {})",
                c.name,
                64 - ok,
                met(ok == 64)
            ));
        }
        rows.push(vec![c.name.into(), ok.to_string(), (64 - ok).to_string(), first]);
    }
    print_rows(&rows);
}

// ---------------------------------------------------------------------------------------------------------
// Signal storms

#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    SameKey,
    RandomKey,
    OtherMap,
}

struct StormWorker {
    slot: Arc<StormSlot>,
    main: Arc<HashMap>,
    other: Arc<HashMap>,
    target: Target,
    rng: AtomicU64,
    ops: AtomicU64,
}

impl StormWorker {
    fn next(&self) -> u64 {
        testkit::rand::splitmix64(self.rng.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed))
    }
}

extern "C" fn on_storm(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the storm timers carry a `StormWorker` that outlives them.
    unsafe {
        storm::dispatch_timer_signal::<StormWorker>(info, |w, overrun| {
            w.slot.count(overrun);
            let (m, k) = match w.target {
                Target::SameKey => (&w.main, 0),
                Target::RandomKey => (&w.main, (w.next() % 1024) as u32),
                Target::OtherMap => (&w.other, (w.next() % 1024) as u32),
            };
            let _ = m.update(&key(k), &[3; 8], UpdateFlags::Any);
            w.ops.fetch_add(1, Ordering::Relaxed);
        })
    };
}

fn storm_cell(c: &Contender, target: Target, rate: u64, dur: Duration) -> Cell {
    let attr = HtabAttr::new(4, 8, 2048).backend(c.backend).lock(c.lock);
    let main = Arc::new(HashMap::new(attr.clone()).expect("map"));
    let other = Arc::new(HashMap::new(attr).expect("map"));
    // MapLocked would deadlock AB-BA through handlers on two threads; the contenders here use rqspin or no lock.
    let threads = 2;
    let nominal = storm::nominal_interval_ns(rate, threads).unwrap_or(1_000_000);
    let workers: Vec<Arc<StormWorker>> = (0..threads)
        .map(|i| {
            Arc::new(StormWorker {
                slot: Arc::new(StormSlot::new()),
                main: main.clone(),
                other: other.clone(),
                target,
                rng: AtomicU64::new(i as u64 * 31 + 7),
                ops: AtomicU64::new(0),
            })
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = workers
        .iter()
        .map(|w| {
            let (w, stop) = (w.clone(), stop.clone());
            std::thread::spawn(move || {
                let timers = w.slot.start(Arc::as_ptr(&w) as *mut libc::c_void, nominal).expect("storm timers");
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..64 {
                        let k = (w.next() % 1024) as u32;
                        if k.is_multiple_of(4) {
                            let _ = w.main.delete(&key(k));
                        } else {
                            let _ = w.main.update(&key(k), &[1; 8], UpdateFlags::Any);
                        }
                    }
                    w.ops.fetch_add(64, Ordering::Relaxed);
                }
                drop(timers);
            })
        })
        .collect();
    let slots: Vec<Arc<StormSlot>> = workers.iter().map(|w| w.slot.clone()).collect();
    let t0 = Instant::now();
    Storm::new(rate, threads, nominal).hold(&slots, dur, Duration::from_millis(50));
    stop.store(true, Ordering::Relaxed);
    let el = t0.elapsed().as_secs_f64();
    for h in handles {
        h.join().expect("storm thread");
    }
    let ops: u64 = workers.iter().map(|w| w.ops.load(Ordering::Relaxed)).sum();
    let signals: u64 = slots.iter().map(|s| s.signals()).sum();
    let mut errors = [0; 8];
    add_errors(&mut errors, &main.stats());
    add_errors(&mut errors, &other.stats());
    // A storm cell has no memory figure: `mem_avg` carries the delivered signal rate.
    Cell { ops_per_s: ops as f64 / el, mem_avg: signals as f64 / el, mem_peak: 0.0, elem_ops: ops, errors }
}

fn section_storms(args: &BenchArgs, cs: &[Contender], t: &mut Targets) {
    println!(
        "\n## signal storms (2 threads update/delete random keys; handlers update: same key / random key / another map)\n"
    );
    let _sa = match storm::install_handler(on_storm) {
        Ok(s) => s,
        Err(e) => {
            println!("(skipped: cannot install the storm handler: {e})");
            return;
        }
    };
    let dur = Duration::from_millis(if args.quick { 150 } else { 500 });
    let mut rows = vec![vec![
        "handler".to_string(),
        "rate/s".into(),
        "map".into(),
        "signals/s".into(),
        "k-ops/s".into(),
        "×prealloc".into(),
        "errors/1e6".into(),
    ]];
    for (tname, target) in
        [("same key", Target::SameKey), ("random key", Target::RandomKey), ("other map", Target::OtherMap)]
    {
        for rate in [20_000u64, 80_000] {
            let row = run_row(cs, args.reps(), |c| storm_cell(c, target, rate, dur));
            for (i, c) in cs.iter().enumerate() {
                rows.push(vec![
                    tname.into(),
                    rate.to_string(),
                    c.name.into(),
                    format!("{:.0}", row.mem_avg[i].median),
                    spread(&row.ops[i], 1e3, 0),
                    format!("{:.2}", row.ops[i].median / row.ops[0].median),
                    errs(&row.err_per_m[i]),
                ]);
                if c.lock == LockMode::LockFree {
                    let e = &row.err_per_m[i];
                    t.lines.push(format!(
                        "{} storm {tname} {rate}/s: Busy+Deadlock {:.0}/1e6, NoMem {:.0}/1e6 (target zero: {})",
                        c.name,
                        e[4] + e[5],
                        e[1],
                        met(e[4] + e[5] + e[1] == 0.0)
                    ));
                }
            }
        }
    }
    print_rows(&rows);
}

/// `nolock bench maps`.
pub fn run(args: &BenchArgs) -> ExitCode {
    nolock::init();
    let cs = contenders(args.quick);
    println!("# nolock bench maps{}", if args.quick { " --quick" } else { "" });
    println!("{}; {} repetitions per cell (median [min–max])", conditions(), args.reps());
    let mut t = Targets { lines: Vec::new() };
    let t0 = Instant::now();
    section_htab_mem(args, &cs, &mut t);
    section_full_update(args, &cs);
    section_occupancy(args, &cs, &mut t);
    section_insert_until_full(args, &cs);
    section_burst(&cs, &mut t);
    section_storms(args, &cs, &mut t);
    println!("\n## targets\n");
    for l in &t.lines {
        println!("- {l}");
    }
    println!("\n(total {:.1} s)", t0.elapsed().as_secs_f64());
    if args.json.is_some() {
        eprintln!("nolock bench maps: --json is not supported yet (tables only)");
    }
    ExitCode::SUCCESS
}
