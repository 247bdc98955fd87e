//! x86-64 single-stepping for the "a signal at every instruction" tests: [`set_trap_flag`] makes the CPU raise
//! SIGTRAP after every following instruction; the SIGTRAP handler calls [`clear_trap_flag`] on the interrupted
//! context to stop. The kernel clears the flag while a handler runs, so the handler itself is not stepped.

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
