//! `nolock bench rseq`: the experiment issue 11 asked for — would per-CPU free lists guarded by restartable
//! sequences (`rseq`) make the small-object fast path cheaper than nolock's per-thread lists guarded by a busy
//! flag?
//!
//! # What is compared
//!
//! Three LIFO lists of 64-byte blocks, each popped and pushed back once per *pair* behind non-inlined calls
//! (as `examples/pair_loop.rs` calls the allocators), in the same run, taking turns in every repetition:
//!
//! - **rseq per-CPU**: one list head per CPU. A pop or push is an rseq critical section: read this thread's
//!   `cpu_id` from the `struct rseq` glibc registered, index the heads, and commit with one store. The kernel
//!   restarts the section (at its abort handler) if the thread is preempted, migrated or *signalled* inside it,
//!   so a signal handler may use the same lists: the property the nolock contract needs, without a flag.
//! - **busy flag per thread**: nolock's own discipline, with nolock's own `LocalTryLock` (the userspace
//!   `local_trylock_t`: busy byte set, claim checked, busy cleared) and the deferred-free check after the
//!   unlock, exactly the steps `ThreadCache::try_pop` / `try_push` add around the list.
//! - **plain per thread**: the list with no guard at all (not signal-safe): the floor both are measured against.
//!
//! For scale the run also times the real allocators' 64 B pairs: `kmalloc_nolock`/`kfree_nolock` and mimalloc.
//!
//! # Progress: rseq is obstruction-free against signals
//!
//! A critical section that is interrupted restarts from the top. Signals that arrive faster than the section
//! runs (the outside checks' "a trap after every instruction") restart it forever; the sections here give up
//! after [`RSEQ_TRIES`] restarts and report it, and an allocator built on them must then take another path
//! (the per-thread list this project has). `tests::single_step_starves_rseq_but_not_the_busy_flag` shows both
//! sides of that on the same lists.
//!
//! The critical sections follow the kernel's ABI (`include/uapi/linux/rseq.h`): a 32-byte-aligned descriptor
//! `{version, flags, start_ip, post_commit_offset, abort_ip}` in section `__rseq_cs`, its address stored in
//! `rseq->rseq_cs` right before the start label (so no instruction lies between the store and the section),
//! the commit as the section's last instruction, and the abort handler preceded by glibc's x86-64 signature
//! `0x53053053`. The kernel clears `rseq_cs` when it aborts a section, so the handler stores it again before
//! the restart.

use std::cell::UnsafeCell;
use std::hint::black_box;
use std::process::ExitCode;
use std::time::Instant;

use nolock::sync::local_lock::{LocalTryLock, TryLock};

use super::{BenchArgs, Summary, cell, conditions, print_rows, summarize};

/// Restarts a critical section may take before it gives up (and its caller takes another path).
pub const RSEQ_TRIES: u32 = 64;

/// Restarts of every critical section so far (added when a section restarted at least once).
pub static RESTARTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Count `tries` restarts (off the common path: a section that committed at once adds nothing).
#[inline(always)]
fn count_restarts(tries: u32) {
    if tries != 0 {
        RESTARTS.fetch_add(u64::from(tries), std::sync::atomic::Ordering::Relaxed);
    }
}

/// Blocks per list.
const BLOCKS: usize = 64;

/// The offset of `rseq_cs` in `struct rseq` (after `cpu_id_start` and `cpu_id`).
const RSEQ_CS_OFFSET: usize = 8;

unsafe extern "C" {
    /// glibc 2.35+: offset of this thread's registered `struct rseq` from the thread pointer.
    static __rseq_offset: isize;
    /// glibc 2.35+: size of the registered area; 0 when glibc did not register rseq (old kernel, a tunable,
    /// or a sandbox that refuses the system call).
    static __rseq_size: u32;
}

/// This thread's `struct rseq` as glibc registered it, or `None` when rseq is not available.
///
/// # Context
/// Any context (reads the thread pointer and two read-only glibc variables).
pub fn rseq_area() -> Option<*mut u8> {
    // SAFETY: plain reads of variables glibc sets once, before `main`.
    let (offset, size) = unsafe { (__rseq_offset, __rseq_size) };
    if size == 0 {
        return None;
    }
    let tp: usize;
    // SAFETY: reads the thread pointer (`fs:0` holds the TCB's own address on x86-64 glibc).
    unsafe { core::arch::asm!("mov {}, qword ptr fs:0", out(reg) tp, options(nostack, readonly, preserves_flags)) };
    let area = (tp as isize + offset) as *mut u8;
    // SAFETY: `area` is this thread's registered `struct rseq`; `cpu_id` (offset 4) is negative until the
    // kernel accepted the registration.
    let cpu = unsafe { core::ptr::read_volatile(area.add(4) as *const i32) };
    (cpu >= 0).then_some(area)
}

/// One list head, alone on its cache line.
#[repr(C, align(64))]
pub struct Head(UnsafeCell<usize>);

/// The per-CPU heads of one rseq list.
pub struct PerCpu {
    heads: Vec<Head>,
}

// SAFETY: each head is edited only inside rseq critical sections of the CPU that owns it, which the kernel
// serializes (a section that is preempted, migrated or signalled restarts).
unsafe impl Sync for PerCpu {}

impl PerCpu {
    /// Heads for every CPU the system may bring online, all empty.
    ///
    /// # Context
    /// Normal context: allocates (one head per configured CPU).
    pub fn new() -> PerCpu {
        // SAFETY: sysconf has no preconditions.
        let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }.max(1) as usize;
        PerCpu { heads: (0..n).map(|_| Head(UnsafeCell::new(0))).collect() }
    }

    /// Every block on every CPU's list (for checks; the caller makes sure no section runs meanwhile).
    ///
    /// # Context
    /// Normal context: allocates the result; no section on these lists may run meanwhile.
    pub fn collect(&self) -> Vec<usize> {
        let mut out = Vec::new();
        for h in &self.heads {
            // SAFETY: no section runs (caller); the lists hold blocks linked through their first word.
            let mut p = unsafe { *h.0.get() };
            while p != 0 && out.len() <= 1 << 20 {
                out.push(p);
                // SAFETY: as above.
                p = unsafe { *(p as *const usize) };
            }
        }
        out
    }
}

impl Default for PerCpu {
    fn default() -> Self {
        Self::new()
    }
}

/// Outcome of an rseq critical section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rseq {
    /// Committed; for a pop, the block (0: the list was empty).
    Done(usize),
    /// Restarted [`RSEQ_TRIES`] times without committing: the caller takes another path.
    GaveUp,
}

/// One rseq critical section on the calling CPU's list head: the kernel ABI's scaffolding around `$body`,
/// which starts with `{cpu}` holding the address of this CPU's head and must end with its commit store (or
/// leave early with `jmp 6f`). Label 3 is the descriptor, 4..5 the section, 7 the abort handler after the
/// signature: it re-arms `rseq_cs` (the kernel cleared it) and restarts, or gives up after `RSEQ_TRIES`
/// restarts. `{tries}` counts the restarts. The caller's operands follow the `;`.
macro_rules! rseq_section {
    ($($body:literal),+ ; $($operands:tt)+) => {
        core::arch::asm!(
            "xor {tries:e}, {tries:e}",
            "2:",
            "lea {tmp}, [rip + 3f]",
            "mov qword ptr [{area} + {cs}], {tmp}",
            "4:",
            "mov {cpu:e}, dword ptr [{area} + 4]",
            "shl {cpu}, 6",
            "add {cpu}, {heads}",
            $($body),+,
            "5:",
            "jmp 6f",
            ".pushsection __rseq_cs, \"aw\"",
            ".balign 32",
            "3:",
            ".long 0, 0",
            ".quad 4b, 5b - 4b, 7f",
            ".popsection",
            ".pushsection __rseq_failure, \"ax\"",
            ".byte 0x0f, 0xb9, 0x3d",
            ".long 0x53053053",
            "7:",
            "inc {tries:e}",
            "cmp {tries:e}, {limit}",
            "jb 2b",
            "jmp 6f",
            ".popsection",
            "6:",
            cs = const RSEQ_CS_OFFSET,
            limit = const RSEQ_TRIES,
            cpu = out(reg) _,
            tmp = out(reg) _,
            $($operands)+
        )
    };
}

/// Pop the first block of the calling CPU's list.
///
/// # Safety
/// `area` is this thread's [`rseq_area`]; `lists` holds only blocks linked through their first word.
///
/// # Context
/// Any context, signal handlers included: an interrupted section restarts.
#[inline(never)]
pub unsafe fn rseq_pop(area: *mut u8, lists: &PerCpu) -> Rseq {
    let obj: usize;
    let tries: u32;
    // SAFETY: a critical section per the kernel's rseq ABI (`rseq_section!`): it reads the head and its link
    // and commits the new head with its last instruction; `obj` is meaningful only if it did not give up.
    unsafe {
        rseq_section!(
            "mov {obj}, qword ptr [{cpu}]",
            "test {obj}, {obj}",
            "jz 6f",
            "mov {tmp}, qword ptr [{obj}]",
            "mov qword ptr [{cpu}], {tmp}";
            area = in(reg) area,
            heads = in(reg) lists.heads.as_ptr(),
            tries = out(reg) tries,
            obj = out(reg) obj,
            options(nostack),
        );
    }
    count_restarts(tries);
    if tries >= RSEQ_TRIES { Rseq::GaveUp } else { Rseq::Done(obj) }
}

/// Push `obj` on the calling CPU's list.
///
/// # Safety
/// As [`rseq_pop`]; `obj` is a block the caller owns, 8-aligned, at least 8 bytes.
///
/// # Context
/// Any context, signal handlers included: an interrupted section restarts.
#[inline(never)]
pub unsafe fn rseq_push(area: *mut u8, lists: &PerCpu, obj: usize) -> Rseq {
    let tries: u32;
    // SAFETY: as in `rseq_pop`; the link store into `obj` is inside the section (a restart rewrites it) and
    // the head store is its last instruction.
    unsafe {
        rseq_section!(
            "mov {tmp}, qword ptr [{cpu}]",
            "mov qword ptr [{obj}], {tmp}",
            "mov qword ptr [{cpu}], {obj}";
            area = in(reg) area,
            heads = in(reg) lists.heads.as_ptr(),
            obj = in(reg) obj,
            tries = out(reg) tries,
            options(nostack),
        );
    }
    count_restarts(tries);
    if tries >= RSEQ_TRIES { Rseq::GaveUp } else { Rseq::Done(0) }
}

/// A per-thread list guarded as nolock guards its lists: `LocalTryLock` around every edit, then the check for
/// frees a nested context deferred (`ThreadCache::try_pop` / `try_push` without the count and statistics).
#[repr(C, align(64))]
#[derive(Default)]
pub struct BusyList {
    lock: LocalTryLock,
    head: UnsafeCell<usize>,
    /// Blocks a nested context pushed while `lock` was held (this experiment's handlers never defer: the
    /// field is here so that the fast path pays for the check as nolock's does).
    deferred: std::sync::atomic::AtomicUsize,
}

// SAFETY: used by one thread and its signal handlers; `lock` keeps a handler off a list its thread is editing.
unsafe impl Sync for BusyList {}

impl BusyList {
    /// Pop: `Some(block)` (0: empty), `None` when a context this one interrupted holds the list.
    ///
    /// # Context
    /// The owning thread and its signal handlers.
    #[inline(never)]
    pub fn pop(&self) -> Option<usize> {
        if self.lock.try_lock() != TryLock::Locked {
            return None;
        }
        // SAFETY: the lock is held: no nested context touches `head` or the blocks on the list.
        let obj = unsafe { *self.head.get() };
        if obj != 0 {
            // SAFETY: as above; blocks are linked through their first word.
            unsafe { *self.head.get() = *(obj as *const usize) };
        }
        self.lock.unlock();
        if self.deferred.load(std::sync::atomic::Ordering::Relaxed) != 0 {
            black_box(());
        }
        Some(obj)
    }

    /// Push `obj`; false when a context this one interrupted holds the list.
    ///
    /// # Context
    /// The owning thread and its signal handlers.
    #[inline(never)]
    pub fn push(&self, obj: usize) -> bool {
        if self.lock.try_lock() != TryLock::Locked {
            return false;
        }
        // SAFETY: the lock is held; `obj` is a block the caller owns.
        unsafe {
            *(obj as *mut usize) = *self.head.get();
            *self.head.get() = obj;
        }
        self.lock.unlock();
        if self.deferred.load(std::sync::atomic::Ordering::Relaxed) != 0 {
            black_box(());
        }
        true
    }
}

/// The unguarded list (not signal-safe): the floor.
#[derive(Default)]
pub struct PlainList(UnsafeCell<usize>);

impl PlainList {
    /// Pop (0: empty).
    ///
    /// # Context
    /// The one thread that uses the list, no signal handler (unguarded).
    #[inline(never)]
    pub fn pop(&self) -> usize {
        // SAFETY: one thread, no handler uses it; blocks are linked through their first word.
        unsafe {
            let obj = *self.0.get();
            if obj != 0 {
                *self.0.get() = *(obj as *const usize);
            }
            obj
        }
    }

    /// Push `obj`.
    ///
    /// # Context
    /// As [`pop`](Self::pop).
    #[inline(never)]
    pub fn push(&self, obj: usize) {
        // SAFETY: as above; `obj` is a block the caller owns.
        unsafe {
            *(obj as *mut usize) = *self.0.get();
            *self.0.get() = obj;
        }
    }
}

/// `BLOCKS` 64-byte blocks (leaked: they live as long as the lists).
fn blocks() -> Vec<usize> {
    let mem: &'static mut [[u64; 8]] = Vec::leak(vec![[0u64; 8]; BLOCKS]);
    mem.iter_mut().map(|b| b.as_mut_ptr() as usize).collect()
}

/// Nanoseconds per pop+push pair of each contender, `n` pairs each.
fn one_rep(area: *mut u8, rs: &PerCpu, busy: &BusyList, plain: &PlainList, n: u64) -> [f64; 5] {
    let per = |t: Instant| t.elapsed().as_secs_f64() * 1e9 / n as f64;
    let t = Instant::now();
    for _ in 0..n {
        // SAFETY: `area` is this thread's rseq area and the lists hold blocks only.
        let Rseq::Done(p) = (unsafe { rseq_pop(area, rs) }) else { panic!("rseq pop gave up without signals") };
        assert_ne!(p, 0, "the list was filled");
        // SAFETY: as above; `p` was just popped.
        let _ = unsafe { rseq_push(area, rs, black_box(p)) };
    }
    let rseq = per(t);
    let t = Instant::now();
    for _ in 0..n {
        let p = busy.pop().unwrap_or(0);
        assert_ne!(p, 0, "the list was filled");
        busy.push(black_box(p));
    }
    let busy_ns = per(t);
    let t = Instant::now();
    for _ in 0..n {
        let p = plain.pop();
        assert_ne!(p, 0, "the list was filled");
        plain.push(black_box(p));
    }
    let plain_ns = per(t);
    let t = Instant::now();
    for _ in 0..n {
        let p = nolock::kmalloc_nolock(64, nolock::Gfp::NONE).expect("out of memory");
        // SAFETY: `p` was just allocated and is freed once.
        unsafe { nolock::kfree_nolock(black_box(p.as_ptr())) };
    }
    let kmalloc = per(t);
    let t = Instant::now();
    let mimalloc = mimalloc_pairs(n).map_or(f64::NAN, |()| per(t));
    [rseq, busy_ns, plain_ns, kmalloc, mimalloc]
}

/// mimalloc 64 B pairs (`n`), for scale; `None` when built without the C baselines.
#[cfg(feature = "c-baselines")]
fn mimalloc_pairs(n: u64) -> Option<()> {
    use std::alloc::{GlobalAlloc, Layout};
    let l = Layout::from_size_align(64, 8).ok()?;
    for _ in 0..n {
        // SAFETY: a non-zero layout; the block is freed once with the same layout.
        unsafe {
            let p = mimalloc::MiMalloc.alloc(l);
            assert!(!p.is_null(), "out of memory");
            mimalloc::MiMalloc.dealloc(black_box(p), l);
        }
    }
    Some(())
}

#[cfg(not(feature = "c-baselines"))]
fn mimalloc_pairs(_n: u64) -> Option<()> {
    None
}

/// `nolock bench rseq`.
///
/// # Context
/// Normal context: prints, allocates, runs for seconds.
pub fn run(args: &BenchArgs) -> ExitCode {
    let Some(area) = rseq_area() else {
        eprintln!(
            "nolock bench rseq: glibc did not register rseq on this system (__rseq_size is 0): nothing to measure"
        );
        return ExitCode::FAILURE;
    };
    let reps = args.reps();
    let n: u64 = if args.quick { 2_000_000 } else { 20_000_000 };
    let rs = PerCpu::new();
    let busy = BusyList::default();
    let plain = PlainList::default();
    // Fill every list. The rseq list is filled on whatever CPU this thread runs on; a migration later moves
    // the thread to an empty list, which a pop reports (the run then stops: pin it with taskset to avoid that).
    for b in blocks() {
        // SAFETY: `area` is this thread's rseq area; `b` is a fresh block.
        let _ = unsafe { rseq_push(area, &rs, b) };
    }
    for b in blocks() {
        busy.push(b);
    }
    for b in blocks() {
        plain.push(b);
    }
    println!("nolock bench rseq: {} pairs × {reps} repetitions; {}", n, conditions());
    println!("(pin it to one CPU, e.g. `taskset -c 0`, so that a migration does not leave the rseq list empty)");
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); 5];
    for _ in 0..reps {
        let r = one_rep(area, &rs, &busy, &plain, n);
        for (s, v) in samples.iter_mut().zip(r) {
            s.push(v);
        }
    }
    let kept = rs.collect().len();
    if kept != BLOCKS {
        eprintln!("nolock bench rseq: the rseq lists hold {kept} blocks, not {BLOCKS}");
        return ExitCode::FAILURE;
    }
    let names = [
        "list pop+push, rseq per-CPU",
        "list pop+push, busy flag per thread (nolock's)",
        "list pop+push, unguarded (floor)",
        "kmalloc_nolock + kfree_nolock, 64 B",
        "mimalloc pair, 64 B",
    ];
    let sums: Vec<Summary> = samples.iter().map(|s| summarize(s)).collect();
    let mut rows = vec![vec!["ns per pair, median [min–max]".to_string(), "ns".into(), "÷ busy flag".into()]];
    for (i, name) in names.iter().enumerate() {
        let ratio: Vec<f64> = samples[i].iter().zip(&samples[1]).map(|(a, b)| a / b).collect();
        rows.push(vec![name.to_string(), cell(&sums[i], 2), cell(&summarize(&ratio), 2)]);
    }
    print_rows(&rows);
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
    use std::time::Duration;

    use testkit::signal::install_handler;
    use testkit::timer::ThreadTimer;

    /// The lists the signal handlers of these tests use (null: none).
    static LISTS: AtomicPtr<PerCpu> = AtomicPtr::new(core::ptr::null_mut());
    static BUSY: AtomicPtr<BusyList> = AtomicPtr::new(core::ptr::null_mut());
    /// Handlers that ran, rseq sections that gave up in a handler, busy-flag lists a handler found held.
    static HANDLED: AtomicU64 = AtomicU64::new(0);
    static GAVE_UP: AtomicU64 = AtomicU64::new(0);
    static BUSY_SEEN: AtomicU64 = AtomicU64::new(0);
    /// Traps taken in a stepped section.
    static TRAPS: AtomicU64 = AtomicU64::new(0);

    /// A block a handler popped and keeps until the next handler pushes it back (so that a handler changes
    /// the list under the code it interrupted: a pop and push of the same block would leave the head as it
    /// was, and a section that committed on stale data would go unseen). One for each kind of list.
    static STASH: AtomicUsize = AtomicUsize::new(0);
    static BUSY_STASH: AtomicUsize = AtomicUsize::new(0);

    /// What every handler does: on the calling CPU's rseq list, pop a block into `STASH` or push the stashed
    /// one back (alternately); the same on the busy-flag list unless the interrupted code holds it.
    fn use_lists() {
        HANDLED.fetch_add(1, Ordering::Relaxed);
        let lists = LISTS.load(Ordering::Acquire);
        if !lists.is_null()
            && let Some(area) = rseq_area()
        {
            // SAFETY: the lists are leaked by the tests (they outlive every handler).
            let lists = unsafe { &*lists };
            let held = STASH.swap(0, Ordering::Relaxed);
            // SAFETY: this thread's area; the lists hold blocks only; `held` was popped by a handler.
            let r = unsafe { if held == 0 { rseq_pop(area, lists) } else { rseq_push(area, lists, held) } };
            match r {
                Rseq::Done(p) if held == 0 => STASH.store(p, Ordering::Relaxed),
                Rseq::Done(_) => {}
                Rseq::GaveUp => {
                    GAVE_UP.fetch_add(1, Ordering::Relaxed);
                    STASH.store(held, Ordering::Relaxed);
                }
            }
        }
        let busy = BUSY.load(Ordering::Acquire);
        if !busy.is_null() {
            // SAFETY: as for LISTS.
            let busy = unsafe { &*busy };
            let held = BUSY_STASH.swap(0, Ordering::Relaxed);
            if held == 0 {
                match busy.pop() {
                    None => {
                        BUSY_SEEN.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(p) => BUSY_STASH.store(p, Ordering::Relaxed),
                }
            } else if !busy.push(held) {
                BUSY_SEEN.fetch_add(1, Ordering::Relaxed);
                BUSY_STASH.store(held, Ordering::Relaxed);
            }
        }
    }

    /// Put back what the handlers stashed (no handler runs any more).
    fn unstash(area: *mut u8, lists: &PerCpu, busy: Option<&BusyList>) {
        let held = STASH.swap(0, Ordering::Relaxed);
        if held != 0 {
            // SAFETY: this thread's area; `held` was popped from `lists` by a handler.
            assert_eq!(unsafe { rseq_push(area, lists, held) }, Rseq::Done(0));
        }
        let held = BUSY_STASH.swap(0, Ordering::Relaxed);
        if let Some(b) = busy
            && held != 0
        {
            assert!(b.push(held));
        }
    }

    extern "C" fn on_timer(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
        use_lists();
    }

    extern "C" fn on_trap(_: libc::c_int, _: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
        // SAFETY: `ctx` is this handler's interrupted context.
        if !unsafe { testkit::step::still_stepping(ctx) } {
            return;
        }
        TRAPS.fetch_add(1, Ordering::Relaxed);
        use_lists();
    }

    /// Step the calling thread through `f` (a trap after each of its instructions), then stop stepping.
    fn stepped<R>(f: impl FnOnce() -> R) -> (R, u64) {
        TRAPS.store(0, Ordering::Relaxed);
        testkit::step::start();
        let r = f();
        testkit::step::stop();
        (r, TRAPS.load(Ordering::Relaxed))
    }

    /// The rseq lists under a storm of timer signals (every 20 µs, to this thread) whose handler pops and
    /// pushes the same lists: every block is still there exactly once, and sections were interrupted and
    /// restarted meanwhile (the restart counter moved), so the abort path ran.
    #[test]
    fn rseq_lists_survive_a_signal_storm() {
        let Some(area) = rseq_area() else {
            eprintln!("rseq not registered by glibc here: nothing to test");
            return;
        };
        let _serial = super::super::TEST_SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let lists: &'static PerCpu = Box::leak(Box::default());
        let all = blocks();
        for &b in &all {
            // SAFETY: this thread's area; fresh blocks.
            assert_eq!(unsafe { rseq_push(area, lists, b) }, Rseq::Done(0));
        }
        LISTS.store(lists as *const PerCpu as *mut PerCpu, Ordering::Release);
        let (handled0, restarts0) = (HANDLED.load(Ordering::Relaxed), RESTARTS.load(Ordering::Relaxed));
        install_handler(libc::SIGUSR2, on_timer, 0);
        let timer = ThreadTimer::for_current_thread(libc::SIGUSR2, Duration::from_micros(20));
        let t = Instant::now();
        let mut held = Vec::with_capacity(BLOCKS);
        while t.elapsed() < Duration::from_millis(1500) {
            for _ in 0..4 {
                // SAFETY: as above.
                match unsafe { rseq_pop(area, lists) } {
                    Rseq::Done(0) => break,
                    Rseq::Done(p) => held.push(p),
                    Rseq::GaveUp => panic!("a 20 µs timer starved a section"),
                }
            }
            while let Some(p) = held.pop() {
                // SAFETY: as above; `p` was popped by this loop.
                assert_eq!(unsafe { rseq_push(area, lists, p) }, Rseq::Done(0));
            }
        }
        drop(timer);
        LISTS.store(core::ptr::null_mut(), Ordering::Release);
        unstash(area, lists, None);
        let mut got = lists.collect();
        got.sort_unstable();
        let mut want = all.clone();
        want.sort_unstable();
        assert_eq!(got, want, "every block exactly once across the per-CPU lists");
        let handled = HANDLED.load(Ordering::Relaxed) - handled0;
        let restarts = RESTARTS.load(Ordering::Relaxed) - restarts0;
        eprintln!("{handled} handlers, {restarts} restarts");
        assert!(handled > 1000, "the storm ran ({handled} handlers)");
        assert!(restarts > 0, "some signal landed inside a section ({handled} handlers)");
    }

    /// A trap after every instruction: an rseq section restarts at each one and never commits (it gives up
    /// after `RSEQ_TRIES` restarts), while the handler's own sections, which run with the flag off, commit; the
    /// busy-flag list makes progress under the same stepping, and its handler keeps off while the owner holds
    /// it. Then every block is still there, once.
    #[test]
    fn single_step_starves_rseq_but_not_the_busy_flag() {
        let Some(area) = rseq_area() else {
            eprintln!("rseq not registered by glibc here: nothing to test");
            return;
        };
        let _serial = super::super::TEST_SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let lists: &'static PerCpu = Box::leak(Box::default());
        let busy: &'static BusyList = Box::leak(Box::default());
        let mut all = blocks();
        for &b in &all {
            // SAFETY: this thread's area; fresh blocks.
            assert_eq!(unsafe { rseq_push(area, lists, b) }, Rseq::Done(0));
        }
        let others = blocks();
        for &b in &others {
            assert!(busy.push(b));
        }
        LISTS.store(lists as *const PerCpu as *mut PerCpu, Ordering::Release);
        BUSY.store(busy as *const BusyList as *mut BusyList, Ordering::Release);
        install_handler(libc::SIGTRAP, on_trap, 0);
        GAVE_UP.store(0, Ordering::Relaxed);

        // SAFETY: this thread's area; the lists hold blocks only.
        let (r, traps) = stepped(|| unsafe { rseq_pop(area, lists) });
        assert_eq!(r, Rseq::GaveUp, "a section restarted at every instruction cannot commit");
        assert!(traps >= u64::from(RSEQ_TRIES), "each restart was a trap ({traps} traps)");
        assert_eq!(GAVE_UP.load(Ordering::Relaxed), 0, "the handlers' sections committed");

        BUSY_SEEN.store(0, Ordering::Relaxed);
        let (p, _) = stepped(|| busy.pop());
        let p = p.expect("the owner's pop took the lock");
        assert_ne!(p, 0, "and found a block");
        let (pushed, _) = stepped(|| busy.push(p));
        assert!(pushed, "the owner's push took the lock");
        assert!(BUSY_SEEN.load(Ordering::Relaxed) > 0, "the handler found the list held and kept off");

        LISTS.store(core::ptr::null_mut(), Ordering::Release);
        BUSY.store(core::ptr::null_mut(), Ordering::Release);
        unstash(area, lists, Some(busy));
        let mut got = lists.collect();
        got.sort_unstable();
        all.sort_unstable();
        assert_eq!(got, all, "the rseq lists hold every block once");
        let mut rest = Vec::new();
        while let Some(x) = busy.pop().filter(|&x| x != 0) {
            rest.push(x);
            assert!(rest.len() <= BLOCKS, "no block twice");
        }
        rest.sort_unstable();
        let mut others = others;
        others.sort_unstable();
        assert_eq!(rest, others, "the busy-flag list holds every block once");
    }
}
