//! The BPF hash map and task storage under a signal at *every instruction*: x86-64 single-stepping (the trap
//! flag raises SIGTRAP after each instruction of the stepped code) with a handler that runs map operations on
//! the same maps at every trap (and, in the every-third passes, at every third trap, from each phase), as a
//! BPF program attached to a tracepoint interrupts another one on the same CPU. The handler runs with the trap
//! flag clear, so its own operations are not stepped.
//!
//! # Hash map
//!
//! The stepped code updates (`Any`, `NoExist`, `Exist`), looks up (`lookup_copy`, `lookup`), deletes and looks
//! up and deletes "main" keys, most of them in four hot buckets of a 256-bucket map; the handler owns a
//! disjoint set of keys in the same four buckets. Both sides keep a shadow model (the handler's in static
//! atomics), so every result of either side is predicted exactly; values are `f(key, version)` and checked on
//! every read (no torn value, no value of another key or version). The handler also looks up main keys: it
//! must see the model's value or, for the key of the interrupted operation, a value that operation may leave
//! (before or after it). And in three operations of five it runs one operation of its own on the interrupted
//! key itself, at a random instruction (racing removers and writers: claims, helping): then one order of the
//! two operations must explain both results, what each read, and the value left.
//!
//! Lock-free updates are lock-free, not wait-free: a handler that changes the head of the interrupted
//! operation's bucket at *every* instruction fails the interrupted insert's head compare-and-swap every time,
//! and it retries for ever (the system makes progress — the handler's operations — but that one operation does
//! not). So in the interrupted operation's bucket the handler does, at every trap, only what leaves the head
//! as it was: lookups, updates that fail (`Exists`, `NotFound`), replacements of its persistent keys (which lie
//! below every other element, so they are never the head while another key is in the bucket), and an insert
//! followed by the delete of a transient key (the head comes back to the same value); and, at two random
//! instructions of each operation, a write that does change the head (an insert, delete or replacement of a
//! key at the top of the bucket). In the other hot buckets it updates and deletes freely.
//!
//! `LockFree` promises no `Busy`/`Deadlock`, no `NoMem` while memory is available, and exactly-once updates:
//! every result must be the model's, the element count must match after every operation, and at the end the
//! map holds exactly the model (each key once) and its error counters are the two sides' errors. The baselines
//! (`MapLocked` of v6.14 and earlier, `Rqspin` of v6.15+) fail nested operations by design (`Busy`,
//! `Deadlock`): there the handler's failures are counted (a failed operation must change nothing), and the
//! rest is checked as above.
//!
//! # Task storage
//!
//! On a fresh thread, the stepped code runs `get(CREATE)`, `get` and `delete` for itself on three maps while
//! the handler runs `get` on the same maps at every trap (a `get(CREATE)` on the interrupted operation's map
//! from a random instruction on, so that the two creations race there) and `get`/`get(CREATE)` on two maps of
//! its own (where, at two random instructions of each stepped operation, it deletes or re-creates its element:
//! an insertion at the head of the thread's owner list, bounded for the same reason as above). Both sides
//! share one model: the element of (this thread, map), or none. Exactly one element per (thread, map) at all
//! times (the maps' iterators see it after each operation), every `get` returns that element (or the one the
//! interrupted operation is creating, or a new one once it deleted the old), values are intact, and with
//! `Recursion::Nolock` nothing fails. The `PerCpuBusy` baseline fails the handler's calls by design: counted,
//! not required zero.
//!
//! Creation is also stepped once per instruction position with the handler's `get(CREATE)` exactly there (and
//! nowhere else): a thread's first creation (which builds and publishes its storage), then a creation in the
//! existing storage, each racing a handler creation in the same map or another one.

#![cfg(target_arch = "x86_64")]

use std::cell::Cell;
use std::collections::HashMap as StdHashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU8, AtomicU64, AtomicUsize, Ordering, compiler_fence};

use nolock_bpf::htab::hooks::{self, Point};
use nolock_bpf::htab::{Backend, Error, HashMap, HtabAttr, LockMode, NolockReuse, UpdateFlags};
use nolock_bpf::task_storage::{
    self, GetFlags, Recursion, StorageAlloc, StorageConfig, StorageError, Task, TaskStorage,
};
use testkit::splitmix64;

// -------------------------------------------------------------------------------------------------------------
// Single-stepping
// -------------------------------------------------------------------------------------------------------------

static TRAPS: AtomicU64 = AtomicU64::new(0);
/// The handler acts at trap numbers `PHASE (mod EVERY)` (modes `HTAB` and `TS`).
static EVERY: AtomicU64 = AtomicU64::new(1);
static PHASE: AtomicU64 = AtomicU64::new(0);
/// Mode `TS_ONCE`: the one trap number at which the handler acts (then stepping stops).
static ACT_AT: AtomicU64 = AtomicU64::new(u64::MAX);
static ACTED: AtomicU64 = AtomicU64::new(0);
/// What the handler does.
static MODE: AtomicU8 = AtomicU8::new(IDLE);
const IDLE: u8 = 0;
const HTAB: u8 = 1;
const TS: u8 = 2;
const TS_ONCE: u8 = 3;

/// Tests here take turns: the trap handler and its state are process-wide.
static TURN: Mutex<()> = Mutex::new(());

extern "C" fn on_trap(_: libc::c_int, _: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: an SA_SIGINFO handler's third argument is the interrupted context.
    if !unsafe { testkit::step::still_stepping(ctx) } {
        return;
    }
    let _errno = testkit::ErrnoGuard::new();
    let n = TRAPS.fetch_add(1, Ordering::Relaxed);
    match MODE.load(Ordering::Relaxed) {
        TS_ONCE => {
            if n == ACT_AT.load(Ordering::Relaxed) {
                ACTED.fetch_add(1, Ordering::Relaxed);
                ts_once_act();
                // The rest of the round runs at full speed.
                // SAFETY: the handler's own context.
                unsafe { testkit::step::stop_in_handler(ctx) };
            }
        }
        mode => {
            let every = EVERY.load(Ordering::Relaxed);
            if n % every != PHASE.load(Ordering::Relaxed) {
                return;
            }
            ACTED.fetch_add(1, Ordering::Relaxed);
            match mode {
                HTAB => htab_act(n, n / every),
                TS => ts_act(n, n / every),
                _ => {}
            }
        }
    }
}

/// Failures the handler found: the count, and the first one (what, key or map, expected, got).
static BAD: AtomicU64 = AtomicU64::new(0);
static BAD_INFO: [AtomicU64; 5] = [const { AtomicU64::new(0) }; 5];

fn bad(what: u64, a: u64, b: u64, c: u64, d: u64) {
    if BAD.fetch_add(1, Ordering::Relaxed) == 0 {
        for (s, v) in BAD_INFO.iter().zip([what, a, b, c, d]) {
            s.store(v, Ordering::Relaxed);
        }
    }
}

#[track_caller]
fn assert_handler_ok(ctx: &str) {
    let n = BAD.load(Ordering::Relaxed);
    if n != 0 {
        let i: Vec<u64> = BAD_INFO.iter().map(|v| v.load(Ordering::Relaxed)).collect();
        panic!(
            "{ctx}: the handler found {n} wrong result(s); first: kind {} (1 result, 2 value, 3 main key seen, \
             4 storage element, 5 storage value, 6 storage error), key/map {:#x}, op {}, expected {:#x}, got {:#x}",
            i[0], i[1], i[2], i[3], i[4]
        );
    }
}

fn reset_common(mode: u8, every: u64, phase: u64) {
    EVERY.store(every, Ordering::SeqCst);
    PHASE.store(phase, Ordering::SeqCst);
    BAD.store(0, Ordering::SeqCst);
    MODE.store(mode, Ordering::SeqCst);
}

// -------------------------------------------------------------------------------------------------------------
// Hash map: keys, values, the model
// -------------------------------------------------------------------------------------------------------------

/// Hot buckets, main keys in each and main keys spread over the other buckets.
const HOT: usize = 4;
const M_PER_HOT: usize = 28;
const M_SPREAD: usize = 40;
const NM: usize = HOT * M_PER_HOT + M_SPREAD;
/// Handler keys per hot bucket: `P_KEYS` persistent (always present, inserted before every other key), then
/// `T_KEYS` transient (absent between handler runs), then free ones.
const H_PER_HOT: usize = 11;
const P_KEYS: usize = 3;
const T_KEYS: usize = 2;
const NH: usize = HOT * H_PER_HOT;
const NONE: usize = usize::MAX;
const VSIZE: usize = 32;
const MAX_ENTRIES: usize = 256;

static HMAP: AtomicPtr<HashMap> = AtomicPtr::new(std::ptr::null_mut());
static H_LOCKFREE: AtomicBool = AtomicBool::new(true);
/// Main keys and their versions (0: absent). Main key `i` is in hot bucket `i / M_PER_HOT`, or spread.
static M_KEY: [AtomicU64; NM] = [const { AtomicU64::new(0) }; NM];
static M_VER: [AtomicU64; NM] = [const { AtomicU64::new(0) }; NM];
/// Handler keys (`i / H_PER_HOT` is the hot bucket) and their versions, written by the handler only.
static H_KEY: [AtomicU64; NH] = [const { AtomicU64::new(0) }; NH];
static H_VER: [AtomicU64; NH] = [const { AtomicU64::new(0) }; NH];
static H_NEXT_VER: AtomicU64 = AtomicU64::new(1 << 40);
/// The main key whose operation is in flight (`NONE`: none), and that operation: its version before, its code
/// (in `OPS`) and the version it writes.
static INF: AtomicUsize = AtomicUsize::new(NONE);
static INF_PRE: AtomicU64 = AtomicU64::new(0);
static INF_OP: AtomicUsize = AtomicUsize::new(0);
static INF_NV: AtomicU64 = AtomicU64::new(0);
/// The handler's one operation on the in-flight key itself (a remover or writer racing the interrupted one):
/// from which trap, which (code in `OPS`), and, once done (`CONF_DONE`), the version it wrote, its result and
/// the version it read.
static CONF_AT: AtomicU64 = AtomicU64::new(u64::MAX);
static CONF_OP: AtomicUsize = AtomicUsize::new(0);
static CONF_DONE: AtomicBool = AtomicBool::new(false);
static CONF_NV: AtomicU64 = AtomicU64::new(0);
static CONF_RES: AtomicU64 = AtomicU64::new(0);
static CONF_READ: AtomicU64 = AtomicU64::new(0);
/// A targeted conflict: the interrupted operation's hook point (index in `POINTS`; `NONE`: uniform) after
/// which the handler's operation comes, and how many instructions after it. The windows between a walk and
/// its claim or compare-and-swap are a few instructions long: a uniform position rarely lands in them.
static CONF_POINT: AtomicUsize = AtomicUsize::new(NONE);
static CONF_OFFSET: AtomicU64 = AtomicU64::new(0);
/// Set while the handler runs (its own operations reach the hook points too).
static IN_HANDLER: AtomicBool = AtomicBool::new(false);

const POINTS: [Point; 6] =
    [Point::Locked, Point::AfterSeek, Point::BeforeInsert, Point::AfterClaim, Point::AfterFreeze, Point::BeforeRetire];

/// The map hook: arms the targeted conflict when the interrupted operation reaches its point.
fn conf_hook(p: Point) {
    if IN_HANDLER.load(Ordering::Relaxed) {
        return;
    }
    let want = CONF_POINT.load(Ordering::Relaxed);
    if want != NONE && POINTS[want] == p {
        CONF_POINT.store(NONE, Ordering::Relaxed);
        CONF_AT.store(TRAPS.load(Ordering::Relaxed) + CONF_OFFSET.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}
/// Trap numbers from which the handler may make a head-changing write in the in-flight bucket, and how many
/// it made during this operation.
static FREE_AT: [AtomicU64; 2] = [const { AtomicU64::new(u64::MAX) }; 2];
static FREE_USED: AtomicUsize = AtomicUsize::new(2);
/// The handler's operations, its `Busy`/`Deadlock` results (baselines), its errors by kind (as
/// `Error::ALL`), and its head-changing writes in the in-flight bucket.
static H_OPS: AtomicU64 = AtomicU64::new(0);
static H_BUSY: AtomicU64 = AtomicU64::new(0);
static H_ERRS: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];
static H_FREE_WRITES: AtomicU64 = AtomicU64::new(0);

fn m_hot(i: usize) -> usize {
    if i < HOT * M_PER_HOT { i / M_PER_HOT } else { HOT }
}

fn err_index(e: Error) -> usize {
    Error::ALL.iter().position(|&x| x == e).unwrap()
}

fn res_code(r: Result<(), Error>) -> u64 {
    r.map_or_else(|e| 1 + err_index(e) as u64, |_| 0)
}

fn mix(key: u64, ver: u64) -> u64 {
    splitmix64(key ^ ver.rotate_left(29) ^ 0xa5a5_5a5a)
}

/// The value of `key` at version `ver`.
fn encode(key: u64, ver: u64) -> [u8; VSIZE] {
    let m = mix(key, ver);
    let mut v = [0u8; VSIZE];
    for (c, w) in v.chunks_exact_mut(8).zip([key, ver, m, !m]) {
        c.copy_from_slice(&w.to_ne_bytes());
    }
    v
}

/// The version of a value of `key`, if it is one (not torn, not another key's).
fn decode(v: &[u8; VSIZE], key: u64) -> Option<u64> {
    let w = |i: usize| u64::from_ne_bytes(v[i * 8..i * 8 + 8].try_into().unwrap());
    let m = mix(key, w(1));
    (w(0) == key && w(2) == m && w(3) == !m && w(1) != 0).then_some(w(1))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
enum HOp {
    Any,
    NoExist,
    Exist,
    Delete,
    LookupDelete,
    /// `lookup_copy`.
    Lookup,
    /// `lookup` (the value in place, copied under the guard); lock-free maps only.
    LookupRef,
}

const OPS: [HOp; 7] = [HOp::Any, HOp::NoExist, HOp::Exist, HOp::Delete, HOp::LookupDelete, HOp::Lookup, HOp::LookupRef];

/// The model: the result of `op` on a key at version `ver` (0: absent) and its version after. An operation
/// that reads a value (on success) reads version `ver`.
fn model(op: HOp, ver: u64, new_ver: u64) -> (Result<(), Error>, u64) {
    let present = ver != 0;
    match op {
        HOp::Any => (Ok(()), new_ver),
        HOp::NoExist if present => (Err(Error::Exists), ver),
        HOp::NoExist => (Ok(()), new_ver),
        HOp::Exist if present => (Ok(()), new_ver),
        HOp::Delete | HOp::LookupDelete if present => (Ok(()), 0),
        HOp::Lookup | HOp::LookupRef if present => (Ok(()), ver),
        HOp::Exist | HOp::Delete | HOp::LookupDelete | HOp::Lookup | HOp::LookupRef => (Err(Error::NotFound), 0),
    }
}

/// Run `op` on `key` (new value: version `new_ver`); the value read, for the ops that read one.
#[inline(always)]
fn run_op(m: &HashMap, key: u64, op: HOp, new_ver: u64) -> (Result<(), Error>, Option<[u8; VSIZE]>) {
    let k = key.to_ne_bytes();
    let mut out = [0u8; VSIZE];
    match op {
        HOp::Any => (m.update(&k, &encode(key, new_ver), UpdateFlags::Any), None),
        HOp::NoExist => (m.update(&k, &encode(key, new_ver), UpdateFlags::NoExist), None),
        HOp::Exist => (m.update(&k, &encode(key, new_ver), UpdateFlags::Exist), None),
        HOp::Delete => (m.delete(&k), None),
        HOp::LookupDelete => {
            let r = m.lookup_and_delete(&k, &mut out);
            (r, r.is_ok().then_some(out))
        }
        HOp::Lookup => {
            let r = m.lookup_copy(&k, &mut out);
            (r, r.is_ok().then_some(out))
        }
        HOp::LookupRef => match m.lookup(&k) {
            Some(v) => {
                v.copy_to(&mut out);
                (Ok(()), Some(out))
            }
            None => (Err(Error::NotFound), None),
        },
    }
}

// -------------------------------------------------------------------------------------------------------------
// Hash map: the handler
// -------------------------------------------------------------------------------------------------------------

/// One operation on handler key `hi`, checked against the handler's model.
fn h_do(m: &HashMap, hi: usize, op: HOp) {
    let key = H_KEY[hi].load(Ordering::Relaxed);
    let ver = H_VER[hi].load(Ordering::Relaxed);
    let nv = H_NEXT_VER.fetch_add(1, Ordering::Relaxed);
    let (want, after) = model(op, ver, nv);
    let (got, val) = run_op(m, key, op, nv);
    H_OPS.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = got
        && op != HOp::LookupRef
    {
        H_ERRS[err_index(e)].fetch_add(1, Ordering::Relaxed);
    }
    if matches!(got, Err(Error::Busy | Error::Deadlock)) && !H_LOCKFREE.load(Ordering::Relaxed) {
        // The baselines' nested failure: nothing was done.
        H_BUSY.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if got != want {
        bad(1, key, op as u64, res_code(want), res_code(got));
        return;
    }
    if let Some(v) = val
        && decode(&v, key) != Some(ver)
    {
        bad(2, key, op as u64, ver, decode(&v, key).unwrap_or(u64::MAX));
    }
    H_VER[hi].store(after, Ordering::Relaxed);
}

fn present(hi: usize) -> bool {
    H_VER[hi].load(Ordering::Relaxed) != 0
}

/// Whether the head of hot bucket `b` is some other element than a persistent key (so replacing one of those
/// leaves the head alone): a main key other than the in-flight one, or a free handler key, is present.
fn p_covered(b: usize, inf: usize) -> bool {
    (b * M_PER_HOT..(b + 1) * M_PER_HOT).any(|i| i != inf && M_VER[i].load(Ordering::Relaxed) != 0)
        || (b * H_PER_HOT + P_KEYS + T_KEYS..(b + 1) * H_PER_HOT).any(present)
}

/// The versions (0: absent) the in-flight key may have while the handler runs: before or after the
/// interrupted operation, or, once the handler's own operation on the key is done, what either order of the
/// two leaves (the handler's alone, or both).
fn inf_allowed(v: u64) -> bool {
    let pre = INF_PRE.load(Ordering::Relaxed);
    let mop = OPS[INF_OP.load(Ordering::Relaxed)];
    let nv = INF_NV.load(Ordering::Relaxed);
    let after_m = model(mop, pre, nv).1;
    if !CONF_DONE.load(Ordering::Relaxed) {
        return v == pre || v == after_m;
    }
    let cop = OPS[CONF_OP.load(Ordering::Relaxed)];
    let cnv = CONF_NV.load(Ordering::Relaxed);
    let after_h = model(cop, pre, cnv).1;
    v == after_h || v == model(mop, after_h, nv).1 || v == model(cop, after_m, cnv).1
}

/// The handler's operation on the in-flight key: recorded for the stepped code, which checks that one order
/// of the two operations explains both results and the final value.
fn conflict_act(m: &HashMap, inf: usize) {
    let key = M_KEY[inf].load(Ordering::Relaxed);
    let op = OPS[CONF_OP.load(Ordering::Relaxed)];
    let nv = H_NEXT_VER.fetch_add(1, Ordering::Relaxed);
    let (got, val) = run_op(m, key, op, nv);
    H_OPS.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = got {
        H_ERRS[err_index(e)].fetch_add(1, Ordering::Relaxed);
    }
    if matches!(got, Err(Error::Busy | Error::Deadlock)) && !H_LOCKFREE.load(Ordering::Relaxed) {
        H_BUSY.fetch_add(1, Ordering::Relaxed);
        return;
    }
    CONF_NV.store(nv, Ordering::Relaxed);
    CONF_RES.store(res_code(got), Ordering::Relaxed);
    CONF_READ.store(val.map_or(0, |v| decode(&v, key).unwrap_or(u64::MAX)), Ordering::Relaxed);
    CONF_DONE.store(true, Ordering::Relaxed);
}

fn pick(r: u64, ops: &[HOp]) -> HOp {
    ops[(r % ops.len() as u64) as usize]
}

fn htab_act(n: u64, t: u64) {
    let m = HMAP.load(Ordering::Acquire);
    if m.is_null() {
        return;
    }
    // SAFETY: the pass keeps the map alive while it is published.
    let m = unsafe { &*m };
    IN_HANDLER.store(true, Ordering::Relaxed);
    htab_ops(m, n, t);
    IN_HANDLER.store(false, Ordering::Relaxed);
}

fn htab_ops(m: &HashMap, n: u64, t: u64) {
    let lockfree = H_LOCKFREE.load(Ordering::Relaxed);
    let r = splitmix64(t ^ 0x5eed_4a5b);
    let inf = INF.load(Ordering::Relaxed);
    let inf_hot = if inf == NONE { HOT } else { m_hot(inf) };
    if inf != NONE && n >= CONF_AT.load(Ordering::Relaxed) {
        CONF_AT.store(u64::MAX, Ordering::Relaxed);
        conflict_act(m, inf);
    }
    let used = FREE_USED.load(Ordering::Relaxed);
    let free = used < 2 && n >= FREE_AT[used].load(Ordering::Relaxed);
    if free {
        FREE_USED.store(used + 1, Ordering::Relaxed);
    }

    // A: the in-flight operation's bucket (or any hot one).
    let a = if inf_hot < HOT { inf_hot } else { (r % HOT as u64) as usize };
    let restricted = inf_hot < HOT && !free;
    let look: &[HOp] = if lockfree { &[HOp::Lookup, HOp::LookupRef] } else { &[HOp::Lookup] };
    if free {
        // A head-changing write: insert, delete or replace a free key (at the top of the bucket).
        let hi = a * H_PER_HOT + P_KEYS + T_KEYS + ((r >> 8) % (H_PER_HOT - P_KEYS - T_KEYS) as u64) as usize;
        let op = if present(hi) {
            pick(r >> 16, &[HOp::Delete, HOp::LookupDelete, HOp::Any, HOp::Exist])
        } else {
            pick(r >> 16, &[HOp::Any, HOp::NoExist])
        };
        if inf_hot < HOT {
            H_FREE_WRITES.fetch_add(1, Ordering::Relaxed);
        }
        h_do(m, hi, op);
    } else {
        let j = ((r >> 8) % H_PER_HOT as u64) as usize;
        let hi = a * H_PER_HOT + j;
        if j < P_KEYS {
            if !restricted || p_covered(a, inf) {
                h_do(m, hi, pick(r >> 16, &[HOp::Any, HOp::Exist, HOp::NoExist, HOp::Lookup]));
            } else {
                h_do(m, hi, pick(r >> 16, &[HOp::NoExist, HOp::Lookup]));
            }
        } else if j < P_KEYS + T_KEYS {
            match (r >> 16) % 6 {
                c @ (0 | 1) if !present(hi) => {
                    // Insert and delete again: the head comes back to what it was.
                    let (ins, del) = if c == 0 { (HOp::NoExist, HOp::Delete) } else { (HOp::Any, HOp::LookupDelete) };
                    h_do(m, hi, ins);
                    if present(hi) {
                        h_do(m, hi, del);
                    }
                }
                2 => h_do(m, hi, if present(hi) { HOp::NoExist } else { HOp::Exist }),
                3 if !present(hi) => h_do(m, hi, HOp::Delete),
                4 if !present(hi) => h_do(m, hi, HOp::LookupDelete),
                // A transient key left present by a baseline's Busy: remove it when the bucket is free.
                _ if present(hi) && !restricted => h_do(m, hi, HOp::Delete),
                _ => h_do(m, hi, pick(r >> 24, look)),
            }
        } else if restricted {
            let op = if present(hi) {
                pick(r >> 16, &[HOp::NoExist, HOp::Lookup, HOp::Lookup])
            } else {
                pick(r >> 16, &[HOp::Exist, HOp::Delete, HOp::LookupDelete, HOp::Lookup])
            };
            h_do(m, hi, op);
        } else {
            h_do(
                m,
                hi,
                pick(r >> 16, &[HOp::Any, HOp::NoExist, HOp::Exist, HOp::Delete, HOp::LookupDelete, HOp::Lookup]),
            );
        }
    }

    // B: another hot bucket, free keys, any operation.
    let b = (a + 1 + ((r >> 32) % (HOT as u64 - 1)) as usize) % HOT;
    let hi = b * H_PER_HOT + P_KEYS + T_KEYS + ((r >> 36) % (H_PER_HOT - P_KEYS - T_KEYS) as u64) as usize;
    h_do(
        m,
        hi,
        pick(r >> 40, &[HOp::Any, HOp::NoExist, HOp::Exist, HOp::Delete, HOp::LookupDelete, HOp::Lookup, HOp::Any]),
    );

    // C: a main key: the in-flight one, one of its bucket, or any.
    let mi = match (r >> 48) % 4 {
        0 | 1 if inf != NONE => inf,
        2 if inf_hot < HOT => inf_hot * M_PER_HOT + ((r >> 52) % M_PER_HOT as u64) as usize,
        _ => ((r >> 52) % NM as u64) as usize,
    };
    let key = M_KEY[mi].load(Ordering::Relaxed);
    let ver = M_VER[mi].load(Ordering::Relaxed);
    let allowed = |v: u64| if mi == inf { inf_allowed(v) } else { v == ver };
    let op = if lockfree && (r >> 60) & 1 == 1 { HOp::LookupRef } else { HOp::Lookup };
    let (got, val) = run_op(m, key, op, 0);
    H_OPS.fetch_add(1, Ordering::Relaxed);
    match (got, val) {
        (Ok(()), Some(v)) => {
            let seen = decode(&v, key);
            if !seen.is_some_and(allowed) {
                bad(3, key, op as u64, ver, seen.unwrap_or(u64::MAX));
            }
        }
        (Err(Error::NotFound), _) => {
            if op == HOp::Lookup {
                H_ERRS[err_index(Error::NotFound)].fetch_add(1, Ordering::Relaxed);
            }
            if !allowed(0) {
                bad(3, key, op as u64, ver, 0);
            }
        }
        (g, _) => bad(3, key, op as u64, ver, res_code(g)),
    }
}

// -------------------------------------------------------------------------------------------------------------
// Hash map: a stepped pass
// -------------------------------------------------------------------------------------------------------------

/// Keys of the pass: main keys (hot buckets first, then spread) and handler keys, chosen by their buckets.
fn choose_keys(m: &HashMap) {
    let mask = m.n_buckets() as u32 - 1;
    let bucket = |k: u64| (m.debug_hash(&k.to_ne_bytes()) & mask) as usize;
    let mut hot: Vec<usize> = Vec::new();
    for k in 0u64.. {
        let b = bucket(0x1_0000_0000 + k);
        if !hot.contains(&b) {
            hot.push(b);
        }
        if hot.len() == HOT {
            break;
        }
    }
    let mut fill = [0usize; HOT];
    let mut spread = 0;
    for k in 0u64.. {
        let key = 0x1_0000_0000 + k;
        match hot.iter().position(|&h| h == bucket(key)) {
            Some(h) if fill[h] < M_PER_HOT => {
                M_KEY[h * M_PER_HOT + fill[h]].store(key, Ordering::Relaxed);
                fill[h] += 1;
            }
            None if spread < M_SPREAD => {
                M_KEY[HOT * M_PER_HOT + spread].store(key, Ordering::Relaxed);
                spread += 1;
            }
            _ => {}
        }
        if spread == M_SPREAD && fill.iter().all(|&f| f == M_PER_HOT) {
            break;
        }
    }
    let mut fill = [0usize; HOT];
    for k in 0u64.. {
        let key = 0x2_0000_0000 + k;
        if let Some(h) = hot.iter().position(|&h| h == bucket(key))
            && fill[h] < H_PER_HOT
        {
            H_KEY[h * H_PER_HOT + fill[h]].store(key, Ordering::Relaxed);
            fill[h] += 1;
        }
        if fill.iter().all(|&f| f == H_PER_HOT) {
            break;
        }
    }
}

/// Whether one order of the interrupted operation `(op, version written, result, version read)` and the
/// handler's on a key at version `pre` explains both results, what each read and the final version `fin`.
fn one_order_explains(
    pre: u64,
    (mop, mnv, mres, mread): (HOp, u64, u64, Option<u64>),
    (cop, cnv, cres, cread): (HOp, u64, u64, Option<u64>),
    fin: u64,
) -> bool {
    let reads = |op: HOp| matches!(op, HOp::LookupDelete | HOp::Lookup | HOp::LookupRef);
    // Did `op` on a key at version `at` give `res` and read `read`? Then the version after it.
    let step = |op: HOp, nv: u64, at: u64, res: u64, read: Option<u64>| {
        let (r, after) = model(op, at, nv);
        let want_read = (reads(op) && r.is_ok()).then_some(at);
        (res_code(r) == res && read == want_read).then_some(after)
    };
    let handler_first = step(cop, cnv, pre, cres, cread).and_then(|s| step(mop, mnv, s, mres, mread));
    let main_first = step(mop, mnv, pre, mres, mread).and_then(|s| step(cop, cnv, s, cres, cread));
    handler_first == Some(fin) || main_first == Some(fin)
}

fn counts_of(errs: &[AtomicU64; 8]) -> [u64; 8] {
    core::array::from_fn(|i| errs[i].load(Ordering::Relaxed))
}

/// One pass: `ops` stepped operations on a fresh map, the handler acting at traps `phase (mod every)`.
#[allow(clippy::too_many_arguments)]
fn htab_pass(name: &str, backend: Backend, lock: LockMode, every: u64, phase: u64, ops: usize, seed: u64) {
    let lockfree = lock == LockMode::LockFree;
    let m = HashMap::new(HtabAttr::new(8, VSIZE, MAX_ENTRIES).backend(backend).lock(lock)).unwrap();
    choose_keys(&m);
    for v in M_VER.iter().chain(&H_VER) {
        v.store(0, Ordering::Relaxed);
    }
    for e in &H_ERRS {
        e.store(0, Ordering::Relaxed);
    }
    for c in [&H_OPS, &H_BUSY, &H_FREE_WRITES] {
        c.store(0, Ordering::Relaxed);
    }
    let mut rng = testkit::Rng::new(seed);
    let mut next_ver = 1u64;
    // Persistent handler keys first (they stay at the bottom of their buckets), then half the main keys and
    // half the free handler keys.
    for hi in 0..NH {
        if hi % H_PER_HOT < P_KEYS {
            let (key, v) = (H_KEY[hi].load(Ordering::Relaxed), H_NEXT_VER.fetch_add(1, Ordering::Relaxed));
            m.update(&key.to_ne_bytes(), &encode(key, v), UpdateFlags::NoExist).unwrap();
            H_VER[hi].store(v, Ordering::Relaxed);
        }
    }
    for i in 0..NM {
        if rng.below(2) == 0 {
            let key = M_KEY[i].load(Ordering::Relaxed);
            m.update(&key.to_ne_bytes(), &encode(key, next_ver), UpdateFlags::NoExist).unwrap();
            M_VER[i].store(next_ver, Ordering::Relaxed);
            next_ver += 1;
        }
    }
    for hi in 0..NH {
        if hi % H_PER_HOT >= P_KEYS + T_KEYS && rng.below(2) == 0 {
            let key = H_KEY[hi].load(Ordering::Relaxed);
            let v = H_NEXT_VER.fetch_add(1, Ordering::Relaxed);
            m.update(&key.to_ne_bytes(), &encode(key, v), UpdateFlags::NoExist).unwrap();
            H_VER[hi].store(v, Ordering::Relaxed);
        }
    }
    let stats0 = m.stats();
    let mut m_errs = [0u64; 8];

    H_LOCKFREE.store(lockfree, Ordering::Relaxed);
    INF.store(NONE, Ordering::Relaxed);
    FREE_USED.store(2, Ordering::Relaxed);
    HMAP.store(std::ptr::from_ref(&m).cast_mut(), Ordering::Release);
    hooks::set_hook(Some(conf_hook));
    reset_common(HTAB, every, phase);
    let (t0, a0) = (TRAPS.load(Ordering::Relaxed), ACTED.load(Ordering::Relaxed));
    let mut per_op_max = 0;
    let mut conflicts = 0;
    for step in 0..ops {
        let i = if rng.below(10) < 7 {
            rng.below((HOT * M_PER_HOT) as u64)
        } else {
            (HOT * M_PER_HOT) as u64 + rng.below(M_SPREAD as u64)
        } as usize;
        let key = M_KEY[i].load(Ordering::Relaxed);
        let ver = M_VER[i].load(Ordering::Relaxed);
        let mut w = |weights: [u64; 7]| {
            let total: u64 = weights.iter().sum();
            let mut x = rng.below(total);
            let all = [HOp::Any, HOp::NoExist, HOp::Exist, HOp::Lookup, HOp::Delete, HOp::LookupDelete, HOp::LookupRef];
            for (k, &wt) in weights.iter().enumerate() {
                if x < wt {
                    return all[k];
                }
                x -= wt;
            }
            unreachable!()
        };
        let lr = u64::from(lockfree);
        let op = if ver != 0 { w([2, 1, 2, 2, 2, 1, lr]) } else { w([2, 3, 1, 1, 1, 1, lr]) };
        let nv = next_ver;
        next_ver += 1;
        let (want, after) = model(op, ver, nv);
        // The handler's head-changing writes in this bucket: at two random instructions of the operation; and,
        // for most operations, one operation of its own on this very key.
        let base = TRAPS.load(Ordering::Relaxed);
        let (x, y) = (rng.below(500), rng.below(500));
        FREE_AT[0].store(base + x.min(y), Ordering::Relaxed);
        FREE_AT[1].store(base + x.max(y), Ordering::Relaxed);
        FREE_USED.store(0, Ordering::Relaxed);
        // Uniform over the operation, or a few instructions after one of its hook points, or none.
        let (at, point) = match rng.below(5) {
            0 | 1 => (base + rng.below(900), NONE),
            2 | 3 => (u64::MAX, rng.below(POINTS.len() as u64) as usize),
            _ => (u64::MAX, NONE),
        };
        CONF_AT.store(at, Ordering::Relaxed);
        CONF_POINT.store(point, Ordering::Relaxed);
        CONF_OFFSET.store(rng.below(24), Ordering::Relaxed);
        CONF_OP.store(rng.below(5) as usize, Ordering::Relaxed);
        CONF_DONE.store(false, Ordering::Relaxed);
        INF_PRE.store(ver, Ordering::Relaxed);
        INF_OP.store(op as usize, Ordering::Relaxed);
        INF_NV.store(nv, Ordering::Relaxed);
        INF.store(i, Ordering::Relaxed);
        compiler_fence(Ordering::SeqCst);
        testkit::step::start();
        let (got, val) = run_op(&m, key, op, nv);
        testkit::step::stop();
        compiler_fence(Ordering::SeqCst);
        per_op_max = per_op_max.max(TRAPS.load(Ordering::Relaxed) - base);
        let ctx = format!("{name}: step {step}: {op:?} of main key {key:#x} (version {ver})");
        if let Err(e) = got
            && op != HOp::LookupRef
        {
            m_errs[err_index(e)] += 1;
        }
        let after = if CONF_DONE.load(Ordering::Relaxed) {
            // Two operations on the key: one order of them explains both results, what each read, and the
            // value now.
            let mut out = [0u8; VSIZE];
            let fin = match m.lookup_copy(&key.to_ne_bytes(), &mut out) {
                Ok(()) => decode(&out, key).unwrap_or(u64::MAX),
                Err(Error::NotFound) => {
                    m_errs[err_index(Error::NotFound)] += 1;
                    0
                }
                Err(e) => panic!("{ctx}: lookup_copy failed: {e:?}"),
            };
            let cop = OPS[CONF_OP.load(Ordering::Relaxed)];
            let cread = CONF_READ.load(Ordering::Relaxed);
            let mread = val.map(|v| decode(&v, key).unwrap_or(u64::MAX));
            let (cres, cnv) = (CONF_RES.load(Ordering::Relaxed), CONF_NV.load(Ordering::Relaxed));
            assert!(
                one_order_explains(
                    ver,
                    (op, nv, res_code(got), mread),
                    (cop, cnv, cres, (cread != 0).then_some(cread)),
                    fin
                ),
                "{ctx}: with the handler's {cop:?} (version {cnv}) on the same key, no order of the two explains \
                 the results: {got:?} read {mread:?}, handler {cres} read {cread}, final version {fin}"
            );
            conflicts += 1;
            fin
        } else {
            assert_eq!(got, want, "{ctx}: the result is not the model's");
            if let Some(v) = val {
                assert_eq!(decode(&v, key), Some(ver), "{ctx}: the value read is not the key's current one");
            }
            after
        };
        M_VER[i].store(after, Ordering::Relaxed);
        compiler_fence(Ordering::SeqCst);
        INF.store(NONE, Ordering::Relaxed);
        FREE_USED.store(2, Ordering::Relaxed);
        CONF_AT.store(u64::MAX, Ordering::Relaxed);
        CONF_POINT.store(NONE, Ordering::Relaxed);
        assert_handler_ok(&ctx);
        let live = M_VER.iter().chain(&H_VER).filter(|v| v.load(Ordering::Relaxed) != 0).count();
        assert_eq!(m.len(), live, "{ctx}: element count (exactly-once inserts and deletes)");
    }
    MODE.store(IDLE, Ordering::SeqCst);
    hooks::set_hook(None);
    HMAP.store(std::ptr::null_mut(), Ordering::Release);
    let traps = TRAPS.load(Ordering::Relaxed) - t0;
    let acted = ACTED.load(Ordering::Relaxed) - a0;
    let (h_ops, h_busy, h_free) =
        (H_OPS.load(Ordering::Relaxed), H_BUSY.load(Ordering::Relaxed), H_FREE_WRITES.load(Ordering::Relaxed));
    eprintln!(
        "{name}: {ops} ops, {traps} traps (longest op {per_op_max}), handler acted {acted} times: {h_ops} map \
         operations ({h_free} head-changing in the interrupted bucket, {conflicts} on the interrupted key, \
         {h_busy} Busy/Deadlock)"
    );
    assert!(traps > (ops as u64) * 100, "{name}: single-stepping ran ({traps} traps)");
    assert!(acted * every >= traps - every, "{name}: the handler acted at every {every}th trap ({acted} of {traps})");
    assert!(h_free > ops as u64 / 2, "{name}: head-changing writes in the interrupted bucket ({h_free})");
    // (The baselines fail many of them with Busy/Deadlock.)
    let min_conflicts = if lockfree { ops / 4 } else { ops / 20 };
    assert!(conflicts > min_conflicts, "{name}: operations on the interrupted key ({conflicts})");

    // Reconcile: the map's error counters are the two sides' errors; LockFree has no Busy/Deadlock and no
    // side saw NoMem or Full.
    let s = m.stats();
    let h_errs = counts_of(&H_ERRS);
    for (k, e) in Error::ALL.iter().enumerate() {
        assert_eq!(
            s.errors[k] - stats0.errors[k],
            m_errs[k] + h_errs[k],
            "{name}: {e:?} errors: the map counted what the two sides saw"
        );
    }
    assert_eq!(s.error(Error::NoMem) + s.error(Error::Full), 0, "{name}: NoMem/Full with memory available");
    if lockfree {
        assert_eq!(s.error(Error::Busy) + s.error(Error::Deadlock), 0, "{name}: LockFree: no Busy/Deadlock");
        assert_eq!(h_busy, 0);
    } else {
        assert_eq!(s.error(Error::Busy) + s.error(Error::Deadlock), h_busy, "{name}: only the handler fails");
    }

    // The map holds exactly the model: every key once, with its value.
    let mut want: StdHashMap<u64, u64> = StdHashMap::new();
    for (k, v) in M_KEY.iter().zip(&M_VER).chain(H_KEY.iter().zip(&H_VER)) {
        let (k, v) = (k.load(Ordering::Relaxed), v.load(Ordering::Relaxed));
        if v != 0 {
            want.insert(k, v);
        }
        let copies = m.debug_key_copies(&k.to_ne_bytes());
        assert_eq!(copies, usize::from(v != 0), "{name}: key {k:#x}: {copies} live copies, model version {v}");
    }
    let mut seen: StdHashMap<u64, u64> = StdHashMap::new();
    m.for_each(|k, v| {
        let key = u64::from_ne_bytes(k.try_into().unwrap());
        let ver = decode(v.try_into().unwrap(), key).unwrap_or(u64::MAX);
        assert!(seen.insert(key, ver).is_none(), "{name}: key {key:#x} seen twice");
    });
    assert_eq!(seen, want, "{name}: the map's contents are the model's");
    assert_eq!(m.len(), want.len(), "{name}: element count");
    drop(m);
}

fn htab_run(passes: &[(&str, Backend, LockMode, u64, u64, usize)]) {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let _reports = testkit::NoReports::new();
    testkit::install_handler(libc::SIGTRAP, on_trap, 0);
    nolock::init();
    for (n, &(name, b, l, every, phase, ops)) in passes.iter().enumerate() {
        htab_pass(name, b, l, every, phase, ops, 0x5eed_0000 + n as u64);
    }
    nolock::rcu_barrier();
}

static SRCU: nolock::SrcuFast = nolock::SrcuFast::new();

/// Type-safe immediate reuse (D, `TYPESAFE_BY_SRCU_FAST`) and `kfree_rcu` (B), lock-free, the handler at every
/// instruction.
#[test]
fn htab_lockfree_at_every_instruction() {
    htab_run(&[
        (
            "lock-free D, every instruction",
            Backend::Nolock(NolockReuse::TypesafeImmediate),
            LockMode::LockFree,
            1,
            0,
            140,
        ),
        ("lock-free B, every instruction", Backend::Nolock(NolockReuse::AfterRcu), LockMode::LockFree, 1, 0, 70),
    ]);
}

/// `kfree_srcu_fast` (C, sleepable readers) and D, lock-free, the handler at every third instruction from each
/// phase.
#[test]
fn htab_lockfree_at_every_third_instruction() {
    let c = Backend::Nolock(NolockReuse::AfterSrcu(&SRCU));
    let d = Backend::Nolock(NolockReuse::TypesafeImmediate);
    htab_run(&[
        ("lock-free C, every third from 0", c, LockMode::LockFree, 3, 0, 60),
        ("lock-free C, every third from 1", c, LockMode::LockFree, 3, 1, 60),
        ("lock-free D, every third from 2", d, LockMode::LockFree, 3, 2, 60),
    ]);
}

/// The baselines: nested operations fail by design (`Busy` on a `map_locked` slot, `Deadlock` on the same
/// bucket); nothing is corrupted or lost.
#[test]
fn htab_locked_baselines_at_every_instruction() {
    let d = Backend::Nolock(NolockReuse::TypesafeImmediate);
    htab_run(&[
        ("MapLocked D, every instruction", d, LockMode::MapLocked, 1, 0, 70),
        ("Rqspin D, every instruction", d, LockMode::Rqspin, 1, 0, 40),
    ]);
}

// -------------------------------------------------------------------------------------------------------------
// Task storage
// -------------------------------------------------------------------------------------------------------------

/// A stored value: its map's tag, a serial unique to its creation, and a check word.
struct Val {
    tag: AtomicU64,
    serial: AtomicU64,
    check: AtomicU64,
}

type TsMap = TaskStorage<Val>;

const TAG: u64 = 0x7a5c_0000;
/// Maps 0..3: the stepped code's (the handler uses them too); 3..5: the handler's own.
const NMAPS: usize = 5;
const MAIN_MAPS: usize = 3;

static SERIAL: AtomicU64 = AtomicU64::new(0);
static TS_MAPS: [AtomicPtr<TsMap>; NMAPS] = [const { AtomicPtr::new(std::ptr::null_mut()) }; NMAPS];
static TS_NOLOCK: AtomicBool = AtomicBool::new(true);
/// The model: the value address of this thread's element in each map (0: none).
static TS_CUR: [AtomicUsize; NMAPS] = [const { AtomicUsize::new(0) }; NMAPS];
/// The in-flight stepped operation: its map (`NONE`: none), the element it deletes (0: a `get`), the serial of
/// the element its `init` built (0: none), and whether the handler saw the delete done.
static TS_INF: AtomicUsize = AtomicUsize::new(NONE);
static TS_INF_DEL: AtomicUsize = AtomicUsize::new(0);
static TS_MAIN_SERIAL: AtomicU64 = AtomicU64::new(0);
static TS_DEL_DONE: AtomicBool = AtomicBool::new(false);
/// From which trap the handler's `get` on the in-flight map may create: before it (and on the stepped code's
/// other maps) it only looks up, so that the stepped creation runs (a handler creating at the operation's first
/// instruction would always win) and the two creations race at a random instruction.
static TS_CREATE_AT: AtomicU64 = AtomicU64::new(0);
/// The handler's operations, Busy results (baseline), NotFound results, deletes and creations on its maps.
static TS_H_OPS: AtomicU64 = AtomicU64::new(0);
static TS_H_BUSY: AtomicU64 = AtomicU64::new(0);
static TS_H_NOTFOUND: AtomicU64 = AtomicU64::new(0);
static TS_H_CHURN: AtomicU64 = AtomicU64::new(0);

fn make(map: usize) -> Val {
    let serial = SERIAL.fetch_add(1, Ordering::Relaxed) + 1;
    let tag = TAG + map as u64;
    Val { tag: AtomicU64::new(tag), serial: AtomicU64::new(serial), check: AtomicU64::new(splitmix64(tag ^ serial)) }
}

fn intact(v: &Val, map: usize) -> bool {
    let (tag, serial) = (v.tag.load(Ordering::Relaxed), v.serial.load(Ordering::Relaxed));
    tag == TAG + map as u64 && v.check.load(Ordering::Relaxed) == splitmix64(tag ^ serial)
}

fn ts_map(j: usize) -> &'static TsMap {
    // SAFETY: the pass publishes live maps and clears the pointers before it drops them.
    unsafe { &*TS_MAPS[j].load(Ordering::Acquire) }
}

fn ts_err_code(e: StorageError) -> u64 {
    StorageError::ALL.iter().position(|&x| x == e).unwrap() as u64
}

/// The handler's `get` on map `j`, checked against the model.
fn ts_h_get(j: usize, create: bool) {
    let map = ts_map(j);
    let created = Cell::new(false);
    let r = if create {
        map.get_current(GetFlags::CREATE, || {
            created.set(true);
            make(j)
        })
    } else {
        map.get_current(GetFlags::NONE, || make(j))
    };
    TS_H_OPS.fetch_add(1, Ordering::Relaxed);
    let cur = TS_CUR[j].load(Ordering::Relaxed);
    let inf = TS_INF.load(Ordering::Relaxed) == j;
    let deleting = inf && cur != 0 && TS_INF_DEL.load(Ordering::Relaxed) == cur;
    match r {
        Err(StorageError::Busy) if !TS_NOLOCK.load(Ordering::Relaxed) => {
            TS_H_BUSY.fetch_add(1, Ordering::Relaxed);
        }
        Err(StorageError::NotFound) if !create => {
            TS_H_NOTFOUND.fetch_add(1, Ordering::Relaxed);
            if deleting {
                TS_DEL_DONE.store(true, Ordering::Relaxed);
            } else if cur != 0 {
                bad(4, j as u64, 0, cur as u64, 0);
            }
        }
        Err(e) => bad(6, j as u64, u64::from(create), 0, ts_err_code(e)),
        Ok(v) => {
            let p = &*v as *const Val as usize;
            if !intact(&v, j) {
                bad(5, j as u64, u64::from(create), cur as u64, p as u64);
            }
            let serial = v.serial.load(Ordering::Relaxed);
            let main_new = inf
                && cur == 0
                && TS_INF_DEL.load(Ordering::Relaxed) == 0
                && serial == TS_MAIN_SERIAL.load(Ordering::Relaxed);
            let ok = if cur != 0 {
                (p == cur && !created.get() && !(deleting && TS_DEL_DONE.load(Ordering::Relaxed)))
                    || (deleting && created.get() && p != cur)
            } else {
                created.get() || main_new
            };
            if !ok {
                bad(4, j as u64, u64::from(create) | u64::from(created.get()) << 1, cur as u64, p as u64);
            } else if p != cur {
                TS_CUR[j].store(p, Ordering::Relaxed);
            }
        }
    }
}

fn ts_act(n: u64, t: u64) {
    if TS_MAPS[NMAPS - 1].load(Ordering::Acquire).is_null() {
        return;
    }
    let r = splitmix64(t ^ 0x75_7e9);
    let inf = TS_INF.load(Ordering::Relaxed);
    // A: a stepped code's map (the in-flight one every other time).
    let j = if inf != NONE && r & 1 == 0 { inf } else { ((r >> 8) % MAIN_MAPS as u64) as usize };
    ts_h_get(j, j == inf && n >= TS_CREATE_AT.load(Ordering::Relaxed) && (r >> 16) % 4 != 3);
    // B: a map of the handler's own: its element deleted or created again at two instructions of each stepped
    // operation (insertions into the thread's owner list), else looked up.
    let k = MAIN_MAPS + ((r >> 24) % (NMAPS - MAIN_MAPS) as u64) as usize;
    let used = FREE_USED.load(Ordering::Relaxed);
    let churn = used < 2 && n >= FREE_AT[used].load(Ordering::Relaxed);
    let cur = TS_CUR[k].load(Ordering::Relaxed);
    if churn {
        FREE_USED.store(used + 1, Ordering::Relaxed);
        TS_H_CHURN.fetch_add(1, Ordering::Relaxed);
    }
    if churn && cur != 0 {
        let Some(task) = Task::current() else {
            bad(6, k as u64, 2, 0, u64::MAX);
            return;
        };
        TS_H_OPS.fetch_add(1, Ordering::Relaxed);
        match ts_map(k).delete(&task) {
            Ok(()) => TS_CUR[k].store(0, Ordering::Relaxed),
            Err(StorageError::Busy) if !TS_NOLOCK.load(Ordering::Relaxed) => {
                TS_H_BUSY.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => bad(6, k as u64, 2, cur as u64, ts_err_code(e)),
        }
    } else {
        ts_h_get(k, churn || cur != 0);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TsOp {
    GetCreate,
    Get,
    Delete,
}

/// Check every map's elements of `task` against the model: exactly the model's element, intact.
#[track_caller]
fn ts_check_maps(task: &Task, ctx: &str) {
    for (j, cur) in TS_CUR.iter().enumerate() {
        let mut mine = Vec::new();
        ts_map(j).for_each(|id, v| {
            if id == task.id() {
                mine.push((v as *const Val as usize, intact(v, j)));
            }
        });
        let cur = cur.load(Ordering::Relaxed);
        let want: Vec<(usize, bool)> = if cur == 0 { vec![] } else { vec![(cur, true)] };
        assert_eq!(mine, want, "{ctx}: map {j}: this thread's elements (exactly one per map, intact)");
    }
}

/// One pass on a fresh thread: `steps` stepped operations, the handler acting at traps `phase (mod every)`.
fn ts_pass(alloc: StorageAlloc, rec: Recursion, every: u64, phase: u64, steps: usize, seed: u64) {
    let name = format!("{alloc:?}/{rec:?}, every {every} from {phase}");
    let nolock_mode = rec == Recursion::Nolock;
    let maps: Vec<TsMap> = (0..NMAPS)
        .map(|_| TsMap::new(StorageConfig { alloc, recursion: rec, ..Default::default() }).unwrap())
        .collect();
    for (j, m) in maps.iter().enumerate() {
        TS_MAPS[j].store(std::ptr::from_ref(m).cast_mut(), Ordering::Release);
        TS_CUR[j].store(0, Ordering::Relaxed);
    }
    TS_NOLOCK.store(nolock_mode, Ordering::Relaxed);
    for c in [&TS_H_OPS, &TS_H_BUSY, &TS_H_NOTFOUND, &TS_H_CHURN] {
        c.store(0, Ordering::Relaxed);
    }
    TS_INF.store(NONE, Ordering::Relaxed);
    FREE_USED.store(2, Ordering::Relaxed);
    let storages0: u64 = maps.iter().map(|m| m.stats().storages_created).sum();
    let (t0, a0) = (TRAPS.load(Ordering::Relaxed), ACTED.load(Ordering::Relaxed));
    let (m_notfound, won, lost) = std::thread::scope(|s| {
        s.spawn(|| {
            // Warm up: this thread's task record (its exit key), its nolock slot and the size classes.
            let task = Task::current().unwrap();
            for size in [maps[0].elem_size(), task_storage::storage_size()] {
                let p = nolock::kmalloc_nolock(size, nolock::Gfp::NONE).unwrap();
                // SAFETY: just allocated.
                unsafe { nolock::kfree_nolock(p.as_ptr()) };
            }
            let mut rng = testkit::Rng::new(seed);
            let mut m_notfound = 0u64;
            // Stepped creations whose element became the one, and those that lost to the handler's.
            let (mut won, mut lost) = (0u64, 0u64);
            reset_common(TS, every, phase);
            for step in 0..steps {
                let j = if step == 0 { 0 } else { rng.below(MAIN_MAPS as u64) as usize };
                let map = &maps[j];
                let cur = TS_CUR[j].load(Ordering::Relaxed);
                let op = match rng.below(6) {
                    0..=2 if cur != 0 => TsOp::Delete,
                    3 => TsOp::Get,
                    _ => TsOp::GetCreate,
                };
                let base = TRAPS.load(Ordering::Relaxed);
                let (x, y) = (rng.below(600), rng.below(600));
                FREE_AT[0].store(base + x.min(y), Ordering::Relaxed);
                FREE_AT[1].store(base + x.max(y), Ordering::Relaxed);
                FREE_USED.store(0, Ordering::Relaxed);
                TS_MAIN_SERIAL.store(0, Ordering::Relaxed);
                TS_DEL_DONE.store(false, Ordering::Relaxed);
                // The handler's creation races the stepped creations, and one delete in four.
                let race = op == TsOp::GetCreate || (op == TsOp::Delete && rng.below(4) == 0);
                TS_CREATE_AT.store(if race { base + rng.below(800) } else { u64::MAX }, Ordering::Relaxed);
                TS_INF_DEL.store(if op == TsOp::Delete { cur } else { 0 }, Ordering::Relaxed);
                TS_INF.store(j, Ordering::Relaxed);
                compiler_fence(Ordering::SeqCst);
                testkit::step::start();
                let r = match op {
                    TsOp::GetCreate => map
                        .get(&task, GetFlags::CREATE, || {
                            let v = make(j);
                            TS_MAIN_SERIAL.store(v.serial.load(Ordering::Relaxed), Ordering::Relaxed);
                            v
                        })
                        .map(|v| (&*v as *const Val as usize, intact(&v, j), v.serial.load(Ordering::Relaxed))),
                    TsOp::Get => map
                        .get(&task, GetFlags::NONE, || make(j))
                        .map(|v| (&*v as *const Val as usize, intact(&v, j), v.serial.load(Ordering::Relaxed))),
                    TsOp::Delete => map.delete(&task).map(|()| (0, true, 0)),
                };
                testkit::step::stop();
                compiler_fence(Ordering::SeqCst);
                let ctx = format!("{name}: step {step}: {op:?} on map {j} (element {cur:#x})");
                assert_handler_ok(&ctx);
                let now = TS_CUR[j].load(Ordering::Relaxed);
                let main_serial = TS_MAIN_SERIAL.load(Ordering::Relaxed);
                match (op, r) {
                    (TsOp::Delete, Ok(_)) => {
                        if now == cur {
                            TS_CUR[j].store(0, Ordering::Relaxed);
                        }
                    }
                    (TsOp::Get, Err(StorageError::NotFound)) => {
                        m_notfound += 1;
                        assert_eq!(cur, 0, "{ctx}: get found nothing although the element exists");
                    }
                    (TsOp::Get | TsOp::GetCreate, Ok((p, ok, serial))) => {
                        assert!(ok, "{ctx}: the value is not intact");
                        if main_serial != 0 {
                            if serial == main_serial {
                                won += 1;
                            } else {
                                lost += 1;
                            }
                        }
                        if now != 0 {
                            assert_eq!(p, now, "{ctx}: not the thread's one element of this map");
                        } else {
                            assert!(
                                op == TsOp::GetCreate && serial == main_serial && main_serial != 0,
                                "{ctx}: an element nobody created now"
                            );
                            TS_CUR[j].store(p, Ordering::Relaxed);
                        }
                        if cur != 0 {
                            assert_eq!(main_serial, 0, "{ctx}: created although the element existed");
                        }
                    }
                    (_, Err(e)) => panic!("{ctx}: failed with {e:?}"),
                }
                compiler_fence(Ordering::SeqCst);
                TS_INF.store(NONE, Ordering::Relaxed);
                FREE_USED.store(2, Ordering::Relaxed);
                ts_check_maps(&task, &ctx);
            }
            MODE.store(IDLE, Ordering::SeqCst);
            assert_handler_ok(&name);
            ts_check_maps(&task, &name);
            (m_notfound, won, lost)
        })
        .join()
        .unwrap()
    });
    for m in &TS_MAPS {
        m.store(std::ptr::null_mut(), Ordering::Release);
    }
    let traps = TRAPS.load(Ordering::Relaxed) - t0;
    let acted = ACTED.load(Ordering::Relaxed) - a0;
    let (h_ops, h_busy, h_nf, h_churn) = (
        TS_H_OPS.load(Ordering::Relaxed),
        TS_H_BUSY.load(Ordering::Relaxed),
        TS_H_NOTFOUND.load(Ordering::Relaxed),
        TS_H_CHURN.load(Ordering::Relaxed),
    );
    eprintln!(
        "{name}: {steps} ops, {traps} traps, handler acted {acted} times: {h_ops} storage calls ({h_churn} \
         deletes/creations on its maps, {h_busy} Busy); stepped creations: {won} won, {lost} lost to the handler's"
    );
    assert!(won > 0 && won + lost > steps as u64 / 20, "{name}: the stepped code created elements ({won}, {lost})");
    assert!(traps > steps as u64 * 50, "{name}: single-stepping ran ({traps} traps)");
    assert!(acted * every >= traps - every, "{name}: the handler acted at every {every}th trap");
    // Reconcile: the thread exited, so every element is gone; one storage for the thread; the only failures
    // are the lookups that found nothing and, in the baseline, the handler's Busy.
    let storages: u64 = maps.iter().map(|m| m.stats().storages_created).sum();
    assert_eq!(storages - storages0, 1, "{name}: one storage for the thread");
    let mut errors = [0u64; 7];
    for (j, m) in maps.iter().enumerate() {
        let st = m.stats();
        assert_eq!(st.live(), 0, "{name}: map {j}: the thread's exit deleted its element ({st:?})");
        for (e, c) in errors.iter_mut().zip(st.errors) {
            *e += c;
        }
    }
    let mut want = [0u64; 7];
    want[ts_err_code(StorageError::NotFound) as usize] = m_notfound + h_nf;
    want[ts_err_code(StorageError::Busy) as usize] = h_busy;
    assert_eq!(errors, want, "{name}: failures by kind ({:?})", StorageError::ALL);
    if nolock_mode {
        assert_eq!(h_busy, 0);
    }
    drop(maps);
}

fn ts_run(passes: &[(StorageAlloc, Recursion, u64, u64, usize)]) {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let _reports = testkit::NoReports::new();
    testkit::install_handler(libc::SIGTRAP, on_trap, 0);
    nolock::init();
    for (n, &(alloc, rec, every, phase, steps)) in passes.iter().enumerate() {
        ts_pass(alloc, rec, every, phase, steps, 0x75_0000 + n as u64);
    }
}

/// `kfree_srcu_fast_nolock` storage, lock-free recursion, the handler at every instruction.
#[test]
fn task_storage_nolock_at_every_instruction() {
    ts_run(&[(StorageAlloc::SrcuFast, Recursion::Nolock, 1, 0, 100)]);
}

/// `kmalloc_nolock` + Tasks Trace callbacks and `kfree_srcu_fast_nolock`, lock-free recursion, the handler at
/// every third instruction from each phase.
#[test]
fn task_storage_nolock_at_every_third_instruction() {
    ts_run(&[
        (StorageAlloc::KmallocNolock, Recursion::Nolock, 3, 0, 50),
        (StorageAlloc::KmallocNolock, Recursion::Nolock, 3, 1, 50),
        (StorageAlloc::SrcuFast, Recursion::Nolock, 3, 2, 50),
    ]);
}

/// The per-CPU busy counter (before ~v7.0): the handler's calls fail with Busy by design; counted, and nothing
/// is lost or duplicated.
#[test]
fn task_storage_percpu_busy_baseline_at_every_instruction() {
    ts_run(&[(StorageAlloc::KmallocNolock, Recursion::PerCpuBusy, 1, 0, 60)]);
}

// -------------------------------------------------------------------------------------------------------------
// Task storage: the first creation, the handler at one instruction
// -------------------------------------------------------------------------------------------------------------

/// Which map the handler's `get(CREATE)` uses in this round, and what it got.
static ONCE_MAP: AtomicUsize = AtomicUsize::new(0);
static ONCE_PTR: AtomicUsize = AtomicUsize::new(0);
static ONCE_OK: AtomicBool = AtomicBool::new(false);
static ONCE_CREATED: AtomicBool = AtomicBool::new(false);
static ONCE_ERR: AtomicU64 = AtomicU64::new(u64::MAX);

fn ts_once_act() {
    let j = ONCE_MAP.load(Ordering::Relaxed);
    let created = Cell::new(false);
    match ts_map(j).get_current(GetFlags::CREATE, || {
        created.set(true);
        make(j)
    }) {
        Ok(v) => {
            ONCE_PTR.store(&*v as *const Val as usize, Ordering::Relaxed);
            ONCE_OK.store(intact(&v, j), Ordering::Relaxed);
            ONCE_CREATED.store(created.get(), Ordering::Relaxed);
        }
        Err(e) => ONCE_ERR.store(ts_err_code(e), Ordering::Relaxed),
    }
}

/// Step `maps[mj].get(CREATE)` for the calling thread, with the handler's `get(CREATE)` on `maps[hj]` at its
/// `n`-th instruction. Returns the element it got, and whether the handler acted, what it got and whether it
/// created it.
fn once_round(maps: &[TsMap], task: &Task, mj: usize, hj: usize, n: u64, ctx: &str) -> (usize, bool, usize, bool) {
    ONCE_MAP.store(hj, Ordering::Relaxed);
    ONCE_PTR.store(0, Ordering::Relaxed);
    ONCE_CREATED.store(false, Ordering::Relaxed);
    ONCE_ERR.store(u64::MAX, Ordering::Relaxed);
    ACTED.store(0, Ordering::Relaxed);
    ACT_AT.store(TRAPS.load(Ordering::Relaxed) + n, Ordering::Relaxed);
    MODE.store(TS_ONCE, Ordering::SeqCst);
    testkit::step::start();
    let r = maps[mj].get(task, GetFlags::CREATE, || make(mj)).map(|v| (&*v as *const Val as usize, intact(&v, mj)));
    testkit::step::stop();
    MODE.store(IDLE, Ordering::SeqCst);
    let acted = ACTED.load(Ordering::Relaxed) != 0;
    let (p, ok) = r.unwrap_or_else(|e| panic!("{ctx}: get(CREATE) on map {mj} failed: {e:?}"));
    assert!(ok, "{ctx}: map {mj}: value not intact");
    if acted {
        let err = ONCE_ERR.load(Ordering::Relaxed);
        assert_eq!(err, u64::MAX, "{ctx}: the handler's get(CREATE) on map {hj} failed (error {err})");
        assert!(ONCE_OK.load(Ordering::Relaxed), "{ctx}: the handler's value in map {hj} is not intact");
    }
    (p, acted, ONCE_PTR.load(Ordering::Relaxed), ONCE_CREATED.load(Ordering::Relaxed))
}

/// Creation stepped once per instruction position, on a fresh thread each round, with the handler's
/// `get(CREATE)` exactly at that instruction. First a thread's first `get(CREATE)` (it builds and publishes the
/// thread's storage), then a creation in the existing storage (`create_in`, linking into the owner list). The
/// handler uses the same map (the two creations race: one element, the same for both) or another (it publishes
/// the storage, or links its element at the head of the owner list: the interrupted creation must use that
/// storage and list, and not fail with the kernel's `-EAGAIN`).
#[test]
fn task_storage_creation_at_each_instruction() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let _reports = testkit::NoReports::new();
    testkit::install_handler(libc::SIGTRAP, on_trap, 0);
    nolock::init();
    let cfg = StorageConfig { alloc: StorageAlloc::SrcuFast, recursion: Recursion::Nolock, ..Default::default() };
    let maps: Vec<TsMap> = (0..4).map(|_| TsMap::new(cfg.clone()).unwrap()).collect();
    for (j, m) in maps.iter().enumerate() {
        TS_MAPS[j].store(std::ptr::from_ref(m).cast_mut(), Ordering::Release);
    }
    let mut rounds = 0u64;
    // Rounds where the handler's creation on the same map won, for the first creation and in the storage.
    let mut handler_won = [0u64; 2];
    let t0 = TRAPS.load(Ordering::Relaxed);
    // Whether the second creation still has instructions left to try (it is shorter than the first).
    let mut second = true;
    for n in 0u64.. {
        let acted = std::thread::scope(|s| {
            s.spawn(|| {
                let task = Task::current().unwrap();
                for size in [maps[0].elem_size(), task_storage::storage_size()] {
                    let p = nolock::kmalloc_nolock(size, nolock::Gfp::NONE).unwrap();
                    // SAFETY: just allocated.
                    unsafe { nolock::kfree_nolock(p.as_ptr()) };
                }
                let mut acted = [false; 2];
                let mut won = [false; 2];
                let mut got = [0usize; 4];
                let mut handler = [None; 4];
                for (k, mj) in [0usize, 2].into_iter().enumerate().take(1 + usize::from(second)) {
                    let hj = mj + (n % 2) as usize;
                    let ctx = format!("round {n}: creation {k} on map {mj}, handler on map {hj}");
                    let (p, a, hp, created) = once_round(&maps, &task, mj, hj, n, &ctx);
                    got[mj] = p;
                    acted[k] = a;
                    if a {
                        if hj == mj {
                            assert_eq!(hp, p, "{ctx}: the two creations got different elements");
                            won[k] = created;
                        } else {
                            handler[hj] = Some(hp);
                        }
                    }
                }
                let ctx = format!("round {n}");
                for (j, m) in maps.iter().enumerate() {
                    let mut mine = Vec::new();
                    m.for_each(|id, v| {
                        if id == task.id() {
                            mine.push(v as *const Val as usize);
                        }
                    });
                    let want = if j % 2 == 0 { (got[j] != 0).then_some(got[j]) } else { handler[j] };
                    assert_eq!(mine, want.into_iter().collect::<Vec<_>>(), "{ctx}: this thread's elements of map {j}");
                }
                (acted, won)
            })
            .join()
            .unwrap()
        });
        rounds += 1;
        for (w, won) in handler_won.iter_mut().zip(acted.1) {
            *w += u64::from(won);
        }
        second &= acted.0[1];
        if !acted.0[0] && !second {
            break;
        }
    }
    for m in &TS_MAPS {
        m.store(std::ptr::null_mut(), Ordering::Release);
    }
    let traps = TRAPS.load(Ordering::Relaxed) - t0;
    eprintln!(
        "creation: {rounds} rounds, {traps} traps; the handler's creation on the same map won {} first creations \
         and {} in the storage",
        handler_won[0], handler_won[1]
    );
    assert!(rounds > 100, "single-stepping ran ({rounds} instructions)");
    assert!(handler_won.iter().all(|&w| w > 10), "the handler won the creation race in some rounds");
    let storages: u64 = maps.iter().map(|m| m.stats().storages_created).sum();
    assert_eq!(storages, rounds, "one storage per thread");
    for (j, m) in maps.iter().enumerate() {
        let st = m.stats();
        assert_eq!(st.live(), 0, "map {j}: every thread's exit deleted its element");
        assert_eq!(st.errors, [0; 7], "map {j}: no failure ({st:?})");
    }
    drop(maps);
}
