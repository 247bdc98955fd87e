//! x86-64 single-stepping for the "a signal at every instruction" tests: [`set_trap_flag`] makes the CPU raise
//! SIGTRAP after every following instruction; the SIGTRAP handler calls [`clear_trap_flag`] on the interrupted
//! context to stop. The kernel clears the flag while a handler runs, so the handler itself is not stepped.
//!
//! The protocol every stepping test uses: [`start`] a stepped section, [`stop`] it; the SIGTRAP handler begins
//! with [`still_stepping`], which clears the flag at the first trap after `stop` (the next instruction), and
//! may end stepping early itself with [`stop_in_handler`]. One section at a time per process (each test binary
//! serialises its stepping tests).

use core::sync::atomic::{AtomicBool, Ordering};

/// Whether a stepped section runs (between [`start`] and [`stop`] or [`stop_in_handler`]).
static STEPPING: AtomicBool = AtomicBool::new(false);

/// Start a stepped section: from here the calling thread takes a SIGTRAP after every instruction.
///
/// # Context
/// Normal context, with a SIGTRAP handler installed that calls [`still_stepping`].
#[inline(never)]
pub fn start() {
    STEPPING.store(true, Ordering::SeqCst);
    set_trap_flag();
}

/// End the stepped section: the next trap (the next instruction) sees it and clears the flag.
///
/// # Context
/// The stepped thread, after [`start`].
#[inline(never)]
pub fn stop() {
    STEPPING.store(false, Ordering::SeqCst);
    core::hint::black_box(());
}

/// For the SIGTRAP handler, first: whether the stepped section still runs. If not, the trap flag is cleared in
/// `ctx` (stepping ends when the handler returns) and the handler should return.
///
/// # Safety
/// `ctx` is the `ucontext_t` pointer an `SA_SIGINFO` handler received.
///
/// # Context
/// Inside that signal handler: async-signal-safe.
pub unsafe fn still_stepping(ctx: *mut libc::c_void) -> bool {
    if STEPPING.load(Ordering::Relaxed) {
        return true;
    }
    // SAFETY: per the caller.
    unsafe { clear_trap_flag(ctx) };
    false
}

/// From the SIGTRAP handler: end the stepped section now (the rest of it runs at full speed).
///
/// # Safety
/// As [`still_stepping`].
///
/// # Context
/// Inside that signal handler: async-signal-safe.
pub unsafe fn stop_in_handler(ctx: *mut libc::c_void) {
    STEPPING.store(false, Ordering::Relaxed);
    // SAFETY: per the caller.
    unsafe { clear_trap_flag(ctx) };
}

/// The trap flag in RFLAGS.
pub const TF: i64 = 0x100;

/// Set the trap flag: a SIGTRAP after every following instruction of this thread until a SIGTRAP handler
/// clears it with [`clear_trap_flag`]. Inlined, so stepping starts in the caller.
///
/// # Context
/// Normal context, with a SIGTRAP handler installed (otherwise the first trap kills the process).
#[inline(always)]
pub fn set_trap_flag() {
    // SAFETY: sets the trap flag in RFLAGS; touches only the stack slot it pushes and pops.
    unsafe { core::arch::asm!("pushfq", "or qword ptr [rsp], 0x100", "popfq") };
}

/// Clear the trap flag in the context a SIGTRAP handler interrupted (`ctx`, its third argument): stepping stops
/// when the handler returns.
///
/// # Safety
/// `ctx` is the `ucontext_t` pointer an `SA_SIGINFO` handler received.
///
/// # Context
/// Inside that signal handler: async-signal-safe.
pub unsafe fn clear_trap_flag(ctx: *mut libc::c_void) {
    // SAFETY: per the caller, `ctx` is the interrupted context.
    let uc = unsafe { &mut *(ctx as *mut libc::ucontext_t) };
    uc.uc_mcontext.gregs[libc::REG_EFL as usize] &= !TF;
}
