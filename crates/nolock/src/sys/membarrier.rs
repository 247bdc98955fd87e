//! Asymmetric memory barriers: `membarrier(2)` and its fallbacks.
//!
//! nolock's fast paths (an RCU or SRCU-fast reader, the owner of a per-thread cache marking it busy) order their
//! plain stores and loads with a *compiler* fence only. The rare side (a grace-period computation, a thread that
//! takes over another thread's cache) calls [`heavy_barrier`], which makes every running thread of the process
//! execute a full memory barrier before it returns. Together they form an asymmetric Dekker pair: for a fast
//! side that does `store A; compiler_fence; load B` and a slow side that does `store B; heavy_barrier(); load A`,
//! at least one of the two loads sees the other side's store.
//!
//! Mechanisms, best first:
//! 1. `MEMBARRIER_CMD_PRIVATE_EXPEDITED` (Linux 4.14+): IPIs only the CPUs running this process; about 1 µs.
//!    Needs a one-time `MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED`, done by [`register`].
//! 2. `MEMBARRIER_CMD_GLOBAL` (Linux 4.3+): waits for a scheduler grace period; milliseconds, but correct.
//! 3. On x86-64 only, `mprotect` of a private page that this thread touched: the TLB shoot-down IPIs every CPU
//!    that runs this address space, and an interrupt drains the store buffer.
//!
//! The environment variable `NOLOCK_MEMBARRIER=global|mprotect` forces a fallback (for tests).

use core::sync::atomic::{AtomicU8, Ordering};

const MEMBARRIER_CMD_QUERY: libc::c_int = 0;
const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;
const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;

/// Which mechanism [`heavy_barrier`] uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    /// `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`.
    PrivateExpedited,
    /// `membarrier(MEMBARRIER_CMD_GLOBAL)`.
    Global,
    /// The `mprotect` TLB shoot-down trick (x86-64 only).
    Mprotect,
}

const UNKNOWN: u8 = 0;
static MECHANISM: AtomicU8 = AtomicU8::new(UNKNOWN);

fn membarrier(cmd: libc::c_int) -> libc::c_long {
    // SAFETY: membarrier takes two integer arguments and touches no user memory.
    unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0 as libc::c_int) }
}

fn encode(m: Mechanism) -> u8 {
    match m {
        Mechanism::PrivateExpedited => 1,
        Mechanism::Global => 2,
        Mechanism::Mprotect => 3,
    }
}

fn decode(v: u8) -> Option<Mechanism> {
    match v {
        1 => Some(Mechanism::PrivateExpedited),
        2 => Some(Mechanism::Global),
        3 => Some(Mechanism::Mprotect),
        _ => None,
    }
}

/// Pick and register the best mechanism. Idempotent; safe to call from several threads at once.
///
/// # Context
/// Normal context: may make several system calls; does not block for long and takes no lock.
pub fn register() -> Mechanism {
    if let Some(m) = decode(MECHANISM.load(Ordering::Acquire)) {
        return m;
    }
    let forced = super::getenv(c"NOLOCK_MEMBARRIER");
    let supported = membarrier(MEMBARRIER_CMD_QUERY);
    let has = |cmd: libc::c_int| supported >= 0 && (supported & libc::c_long::from(cmd)) != 0;
    let m = match forced {
        Some(b"mprotect") if cfg!(target_arch = "x86_64") => Mechanism::Mprotect,
        Some(b"global") if has(MEMBARRIER_CMD_GLOBAL) => Mechanism::Global,
        _ if has(MEMBARRIER_CMD_PRIVATE_EXPEDITED) && membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) == 0 => {
            Mechanism::PrivateExpedited
        }
        _ if has(MEMBARRIER_CMD_GLOBAL) => Mechanism::Global,
        _ if cfg!(target_arch = "x86_64") => Mechanism::Mprotect,
        _ => {
            super::write_stderr(b"nolock: no asymmetric memory barrier available (membarrier(2) is missing)\n");
            std::process::abort();
        }
    };
    // Release pairs with the Acquire load above in other callers: registration happened before publication.
    MECHANISM.store(encode(m), Ordering::Release);
    m
}

/// Make every thread of this process that is running right now execute a full memory barrier, and order this
/// thread's earlier accesses before its later ones as a `SeqCst` fence would.
///
/// # Context
/// Normal context only: a system call that waits for inter-processor interrupts (about a microsecond), or for a
/// scheduler grace period with the `Global` fallback (milliseconds). Not async-signal-safe in the fallback
/// modes; never called on a `*_nolock` path.
pub fn heavy_barrier() {
    core::sync::atomic::fence(Ordering::SeqCst);
    loop {
        let ok = match register() {
            Mechanism::PrivateExpedited => membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) == 0,
            Mechanism::Global => membarrier(MEMBARRIER_CMD_GLOBAL) == 0,
            Mechanism::Mprotect => mprotect_barrier(),
        };
        if ok {
            break;
        }
        // The mechanism stopped working (a seccomp filter, a sandbox): fall back to the next one instead of
        // failing, and never panic here — a grace period may be driven from any thread.
        fall_back();
    }
    core::sync::atomic::fence(Ordering::SeqCst);
}

fn global_supported() -> bool {
    let q = membarrier(MEMBARRIER_CMD_QUERY);
    q >= 0 && q & libc::c_long::from(MEMBARRIER_CMD_GLOBAL) != 0
}

/// Switch [`heavy_barrier`] to the next mechanism after a failure; abort (with a raw message, no allocation)
/// when none is left, since a grace period without a barrier could free memory that readers still use.
#[cold]
fn fall_back() {
    let next = match decode(MECHANISM.load(Ordering::Acquire)) {
        Some(Mechanism::PrivateExpedited) if global_supported() => Mechanism::Global,
        Some(Mechanism::PrivateExpedited | Mechanism::Global) if cfg!(target_arch = "x86_64") => Mechanism::Mprotect,
        _ => {
            super::write_stderr(
                b"nolock: no asymmetric memory barrier works any more (membarrier and mprotect failed); aborting\n",
            );
            std::process::abort();
        }
    };
    super::write_stderr(b"nolock: membarrier failed; falling back to a slower asymmetric barrier\n");
    // Release: pairs with the Acquire load in `register`.
    MECHANISM.store(encode(next), Ordering::Release);
}

/// The x86-64 TLB shoot-down barrier; false if the system calls failed.
fn mprotect_barrier() -> bool {
    let len = super::PAGE_SIZE;
    let Some(page) = super::mmap_reserve(len) else { return false };
    // SAFETY: `page` is a fresh private page of `len` bytes that only this function uses. Writing makes it present
    // in this CPU's TLB; downgrading it then forces a TLB shoot-down on every CPU running this address space, and
    // unmapping it returns it.
    let r = unsafe {
        page.write_volatile(1);
        let r = libc::mprotect(page.cast(), len, libc::PROT_READ);
        super::munmap(page, len);
        r
    };
    r == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn barrier_runs() {
        let m = register();
        heavy_barrier();
        assert_eq!(register(), m);
        assert!(mprotect_barrier());
    }
}
