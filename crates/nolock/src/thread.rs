//! Per-thread identity: *slots*, the userspace stand-in for the kernel's CPU number.
//!
//! A slot is an index below [`MAX_THREADS`] that one thread owns at a time. Each layer that keeps per-thread
//! state keeps it in a table of its own, indexed by slot (the kernel's per-CPU data: every subsystem has its
//! own): RCU's reader words and callback lists in `rcu`, the object lists and `kfree_rcu` pointer-block slots
//! in `slab`. This module knows nothing of what those tables hold, and imports nothing above `sync`, `sys` and
//! `hooks`. The slot table is a `static` (zeroed memory is a table of free slots), so claiming a slot needs no
//! `mmap` and no arena: it works from the very first instruction of a process, in a signal handler, and when
//! nothing else could be mapped.
//!
//! # Life cycle
//!
//! - **claim** ([`current`]): a thread's first call takes a slot from the free stack or a fresh one (lock-free),
//!   advances the slot's claim generation, and publishes it in the thread-local `CURRENT` with a CAS, so a
//!   signal handler that raced the claim on the same thread wins and the interrupted claim gives its slot back
//!   instead of overwriting (and leaking) the handler's. It also sets a pthread key for the thread (glibc's
//!   first 32 keys need no allocation, so this is async-signal-safe there). Every layer finds the slot's entry
//!   of its table zeroed, or as the slot's previous owner's exit (or `reset`) left it: empty.
//! - **exit**: the key's destructor marks the thread as exited (later calls on it, from other thread-local
//!   destructors or from a signal handler that lands in the destructor, get no slot and take the layers' shared
//!   paths), then calls every layer's `exit` hook (`SlotHooks`): each hands back what the thread keeps in it
//!   (the slab layer drains the thread's object lists and pointer blocks) and says whether the slot may be
//!   handed out again (RCU says no while a read-side section was never closed). The slot is released, or kept
//!   out of circulation until an orphan sweep or a fork finds its thread gone.
//! - **orphans** (`sweep_orphans`): a slot whose thread died without its destructor (glibc gave no
//!   first-level key), or that was kept out of circulation at exit, is found by `tgkill(pid, tid, 0)` failing
//!   with `ESRCH`; the sweep claims it with a CAS on the state word that includes the generation, so it can
//!   never take a slot that was released and claimed again while it looked (ABA), calls every layer's `reset`
//!   hook and releases it.
//! - **fork** (`after_fork_child`): in the child only the forking thread exists. Every other owned slot is
//!   handed to every layer's `reset` hook (they clear what the dead threads left: reader words, counter
//!   imbalances, object lists) and made free.
//!
//! The hooks are registered by the composition root (`process`) before `main`; this module calls them in the
//! order they were registered.
//!
//! # Ordering
//!
//! `Slot::state` carries the state in its low byte and the claim generation above it. The claimer's `Release`
//! store of the new state pairs with the `Acquire` load of a sweeper, which then reads this owner's
//! `owner_tid`. The free stack is a [`TaggedStack`] (ABA-safe, its own Release/Acquire pairs).

use core::sync::atomic::{AtomicI32, AtomicPtr, AtomicU32, Ordering};

use crate::sync::tagged::TaggedStack;

/// Maximum number of threads with a slot at once; further threads take each layer's shared path.
pub const MAX_THREADS: usize = 1024;

const STATE_FREE: u32 = 0;
const STATE_OWNED: u32 = 1;
const STATE_LEAKED: u32 = 2;
const STATE_SWEEPING: u32 = 3;
const STATE_MASK: u32 = 0xff;
const GENERATION_ONE: u32 = 1 << 8;

fn with_state(w: u32, state: u32) -> u32 {
    (w & !STATE_MASK) | state
}

/// One slot of the table. Zeroed memory is a free slot.
#[derive(Debug)]
struct Slot {
    /// `STATE_*` in the low byte, the claim generation above.
    state: AtomicU32,
    /// Kernel thread id of the owner (0: none).
    owner_tid: AtomicI32,
    /// Link in the free stack.
    next: AtomicU32,
}

static SLOTS: [Slot; MAX_THREADS] =
    [const { Slot { state: AtomicU32::new(STATE_FREE), owner_tid: AtomicI32::new(0), next: AtomicU32::new(0) } };
        MAX_THREADS];
/// Slots never handed out yet start here.
static NEXT: AtomicU32 = AtomicU32::new(0);
/// Slots given back.
static FREE: TaggedStack = TaggedStack::new();

thread_local! {
    /// This thread's slot + 1; 0 before the first claim, `EXITED` after the exit destructor ran.
    static CURRENT: AtomicU32 = const { AtomicU32::new(0) };
}

const EXITED: u32 = u32::MAX;

/// The calling thread's slot, claiming one on first use. `None`: the thread is past its exit destructor, or
/// every slot is taken.
///
/// # Context
/// Any context: async-signal-safe and reentrant; lock-free. The first call on a thread may call
/// `pthread_key_create` (lock-free in glibc) and `pthread_setspecific` (no allocation for glibc's first 32
/// keys); no `mmap`.
#[inline(always)]
pub fn current() -> Option<u32> {
    let c = CURRENT.with(|c| c.load(Ordering::Relaxed));
    if c.wrapping_sub(1) < EXITED - 1 {
        return Some(c - 1);
    }
    if c == 0 { claim() } else { None }
}

/// The calling thread's slot if it has one (never claims).
///
/// # Context
/// Any context (one thread-local load).
#[inline]
pub fn current_if_any() -> Option<u32> {
    let c = CURRENT.with(|c| c.load(Ordering::Relaxed));
    (c.wrapping_sub(1) < EXITED - 1).then(|| c - 1)
}

/// Slots handed out so far: every slot id in use is below this (an upper bound for scans).
#[inline]
pub fn count() -> u32 {
    // Acquire: pairs with the AcqRel `fetch_add` in `claim`, so a scanner that counts slot `i` also sees the
    // zeroed-or-reset per-slot state of every layer as of that claim.
    NEXT.load(Ordering::Acquire).min(MAX_THREADS as u32)
}

#[cold]
#[inline(never)]
fn claim() -> Option<u32> {
    let id = match FREE.pop(|i| &SLOTS[i as usize].next) {
        Some(i) => i,
        None => {
            if NEXT.load(Ordering::Relaxed) as usize >= MAX_THREADS {
                return None;
            }
            // AcqRel: pairs with the Acquire in `count`.
            let i = NEXT.fetch_add(1, Ordering::AcqRel);
            if i as usize >= MAX_THREADS {
                return None;
            }
            i
        }
    };
    let s = &SLOTS[id as usize];
    s.owner_tid.store(crate::sys::gettid(), Ordering::Relaxed);
    // A free slot is ours alone (popped or fresh): a plain update. Release: pairs with the Acquire load in
    // `sweep_orphans`, which then reads this owner's tid.
    let w = s.state.load(Ordering::Relaxed);
    s.state.store(with_state(w.wrapping_add(GENERATION_ONE), STATE_OWNED), Ordering::Release);
    crate::hooks::point(crate::hooks::Point::ThreadClaim);
    // An atomic RMW on our own thread-local word: a signal handler that claimed meanwhile wins, and we give ours
    // back instead of overwriting (and leaking) theirs.
    match CURRENT.with(|c| c.compare_exchange(0, id + 1, Ordering::Relaxed, Ordering::Relaxed)) {
        Ok(_) => {
            register_exit(id);
            Some(id)
        }
        Err(other) => {
            release(id);
            (other.wrapping_sub(1) < EXITED - 1).then(|| other - 1)
        }
    }
}

fn release(id: u32) {
    let s = &SLOTS[id as usize];
    s.owner_tid.store(0, Ordering::Relaxed);
    let w = s.state.load(Ordering::Relaxed);
    // Release: pairs with the Acquire load in `sweep_orphans` and `is_in_use`; the slot is free from here on.
    s.state.store(with_state(w, STATE_FREE), Ordering::Release);
    FREE.push(id, &s.next);
}

// -------------------------------------------------------------------------------------------------------------
// Layer hooks: what each layer does with its per-thread state when a slot's thread goes away
// -------------------------------------------------------------------------------------------------------------

/// What a layer does with the state it keeps for a slot when the slot's thread goes away. Each layer that keeps
/// per-thread state registers one with [`register_layer`]; the composition root (`process`) does so before any
/// nolock path runs. This module calls them and knows nothing of what they clear.
#[derive(Debug)]
pub(crate) struct SlotHooks {
    /// Called on the exiting thread, from its exit destructor, after the thread stopped counting as having a
    /// slot (its later calls, and a signal handler that lands inside this hook, take the layers' shared paths):
    /// hand back what the thread keeps in the layer. Returns whether the slot may be handed out again now; false
    /// keeps it out of circulation until an orphan sweep or a fork finds the thread gone and calls `reset`.
    pub exit: fn(u32) -> bool,
    /// The slot's thread no longer exists (orphan sweep, fork child): clear what it left, whatever state it
    /// stopped in. When every layer's `reset` has returned, the slot is free for a new thread.
    pub reset: fn(u32),
}

const MAX_LAYERS: usize = 4;
static LAYERS: [AtomicPtr<SlotHooks>; MAX_LAYERS] = [const { AtomicPtr::new(core::ptr::null_mut()) }; MAX_LAYERS];

/// Register a layer's slot hooks (idempotent). Layers are called in the order they registered.
///
/// # Context
/// Any context; meant for process initialisation (`process`), before any thread exits.
pub(crate) fn register_layer(hooks: &'static SlotHooks) {
    let h = hooks as *const SlotHooks as *mut SlotHooks;
    for l in &LAYERS {
        // AcqRel: publishes the hooks to the Acquire loads in `for_each_layer`.
        match l.compare_exchange(core::ptr::null_mut(), h, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return,
            Err(cur) if cur == h => return,
            Err(_) => {}
        }
    }
    crate::sys::write_stderr(b"nolock: too many layers registered slot hooks\n");
}

fn for_each_layer(mut f: impl FnMut(&'static SlotHooks)) {
    for l in &LAYERS {
        // Acquire: pairs with the AcqRel CAS in `register_layer` that published the hooks.
        let h = l.load(Ordering::Acquire);
        if !h.is_null() {
            // SAFETY: only `&'static SlotHooks` are stored, by `register_layer`.
            f(unsafe { &*h });
        }
    }
}

/// Every layer's `exit` hook, all of them (none is skipped because another said no); whether all agree that the
/// slot may be handed out again.
fn exit_layers(id: u32) -> bool {
    let mut ok = true;
    for_each_layer(|h| ok &= (h.exit)(id));
    ok
}

/// Every layer's `reset` hook.
fn reset_layers(id: u32) {
    for_each_layer(|h| (h.reset)(id));
}

// -------------------------------------------------------------------------------------------------------------
// Thread exit: a pthread key destructor
// -------------------------------------------------------------------------------------------------------------

/// pthread key + 1 (0: not created).
static EXIT_KEY: AtomicU32 = AtomicU32::new(0);

/// glibc keeps the values of its first 32 keys inside the thread descriptor; setting them never allocates.
const KEY_FIRST_LEVEL: u32 = 32;

/// Create the exit key if needed (lock-free in glibc).
///
/// # Context
/// Any context in glibc (the key table is claimed with atomic operations); normal context elsewhere.
pub fn ensure_exit_key() -> Option<u32> {
    let k = EXIT_KEY.load(Ordering::Acquire);
    if k != 0 {
        return Some(k - 1);
    }
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: `key` is a valid out-pointer; `slot_exit` has the destructor signature.
    if unsafe { libc::pthread_key_create(&mut key, Some(slot_exit)) } != 0 {
        return None;
    }
    // AcqRel: publish the key; a loser deletes its own.
    match EXIT_KEY.compare_exchange(0, key + 1, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => Some(key),
        Err(winner) => {
            // SAFETY: `key` was created above and never used.
            unsafe { libc::pthread_key_delete(key) };
            Some(winner - 1)
        }
    }
}

fn register_exit(id: u32) {
    let Some(key) = ensure_exit_key() else { return };
    if cfg!(target_env = "gnu") && key >= KEY_FIRST_LEVEL {
        // Setting this key could allocate: leave the slot to the orphan sweep instead.
        return;
    }
    // SAFETY: `key` is a live key; the value is non-null (slot + 1), so the destructor runs.
    unsafe { libc::pthread_setspecific(key, (id as usize + 1) as *const libc::c_void) };
}

extern "C" fn slot_exit(p: *mut libc::c_void) {
    CURRENT.with(|c| c.store(EXITED, Ordering::Relaxed));
    crate::sync::signal_fence();
    let id = p as usize as u32 - 1;
    if exit_layers(id) {
        release(id);
    } else {
        let s = &SLOTS[id as usize];
        let w = s.state.load(Ordering::Relaxed);
        // Release: pairs with the Acquire load in `sweep_orphans`, which may reclaim the slot once the thread is gone.
        s.state.store(with_state(w, STATE_LEAKED), Ordering::Release);
    }
}

// -------------------------------------------------------------------------------------------------------------
// Orphans and fork
// -------------------------------------------------------------------------------------------------------------

/// Give back the slots whose owner thread no longer exists (or was kept out of circulation at exit and is now
/// dead): every layer's `reset` first clears what the dead thread left. Returns how many.
///
/// # Context
/// Normal context: one `tgkill(pid, tid, 0)` per owned slot; the layers' `reset` hooks may take bounded time
/// (the slab layer hands the dead thread's cached objects back).
pub(crate) fn sweep_orphans() -> usize {
    let mut n = 0;
    for id in 0..count() {
        let s = &SLOTS[id as usize];
        // Acquire: pairs with the Release in `claim`, so `owner_tid` below is this generation's owner (or a
        // later one's, which the CAS then refuses).
        let w = s.state.load(Ordering::Acquire);
        let state = w & STATE_MASK;
        if state != STATE_OWNED && state != STATE_LEAKED {
            continue;
        }
        let tid = s.owner_tid.load(Ordering::Relaxed);
        if tid == 0 || crate::sys::thread_alive(tid) {
            continue;
        }
        // The owner of generation `w` is gone for good (ESRCH): nobody else can touch the slot. Take it, unless
        // it was released and claimed again meanwhile (the generation moved on).
        if s.state.compare_exchange(w, with_state(w, STATE_SWEEPING), Ordering::AcqRel, Ordering::Acquire).is_ok() {
            reset_layers(id);
            release(id);
            n += 1;
        }
    }
    n
}

/// In a fork child: every slot but the calling thread's belongs to a thread that does not exist here. Call
/// every layer's `reset` for each (the layers clear what those threads left) and make them free.
///
/// # Context
/// The atfork child handler (the process has one thread).
pub(crate) fn after_fork_child() {
    let me = current_if_any();
    if let Some(me) = me {
        SLOTS[me as usize].owner_tid.store(crate::sys::gettid(), Ordering::Relaxed);
    }
    // The free stack may have been mid-operation in a thread that is gone; rebuild it from the states.
    while FREE.take_all().is_some() {}
    for id in (0..count()).rev() {
        if Some(id) == me {
            continue;
        }
        let s = &SLOTS[id as usize];
        if s.state.load(Ordering::Relaxed) & STATE_MASK != STATE_FREE {
            reset_layers(id);
        }
        release(id);
    }
}

/// Whether slot `id` is owned by a live thread or kept out of circulation (for tests and statistics).
pub fn is_in_use(id: u32) -> bool {
    SLOTS[id as usize].state.load(Ordering::Acquire) & STATE_MASK != STATE_FREE
}

/// Whether the calling thread has a slot (it has not exited and the table was not full).
///
/// # Context
/// Any context (one thread-local load).
pub fn has_slot() -> bool {
    current_if_any().is_some()
}
