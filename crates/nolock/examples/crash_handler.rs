//! A crash handler that allocates: on SIGSEGV it formats a report — fault address, a symbolized backtrace,
//! the program's own context — with ordinary `String`s and `Vec`s, writes it to standard error, and lets the
//! process die of the signal as it would have.
//!
//! ```text
//! cargo run --release -p nolock-mm --example crash_handler
//! ```
//!
//! The program's global allocator is `HybridAlloc<System>`: glibc's malloc in normal context, nolock inside the
//! handler, which is installed with `nolock::hybrid::sigaction` (that marks it). So the report can allocate
//! even when the crash happened inside `malloc` with its lock held — the case that makes crash reporters
//! hang instead of reporting. To show that, the program crashes *inside a `GlobalAlloc::alloc` call* while it
//! holds the lock of a (toy) allocator that wraps System: a handler that called back into that allocator would
//! wait forever.
//!
//! The example runs the crash in a child process (itself, with an argument) and prints what the child wrote
//! and how it ended, so `cargo run` ends normally.
//!
//! In the handler: glibc `backtrace()` (primed in `main`: its first call loads libgcc), the `backtrace` crate's
//! `resolve_unsynchronized` (no lock; it allocates — from nolock — and opens and maps the executable to read
//! its debug information: system calls that are async-signal-safe), `format!`, and one `write(2)`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ffi::{c_int, c_void};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};

use nolock::hybrid::{self, HybridAlloc};

/// A toy allocator over System with a lock, standing for any allocator whose internal lock a crash can
/// interrupt. It can crash on purpose while it holds its lock.
struct Locked {
    lock: std::sync::Mutex<()>,
    crash_inside: AtomicBool,
}

// SAFETY: forwards to System under a lock.
unsafe impl GlobalAlloc for Locked {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.crash_inside.swap(false, Ordering::Relaxed) {
            crash();
        }
        // SAFETY: forwarded.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: forwarded.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: HybridAlloc<Locked> =
    HybridAlloc::new(Locked { lock: std::sync::Mutex::new(()), crash_inside: AtomicBool::new(false) });

unsafe extern "C" {
    /// glibc's `backtrace(3)`.
    fn backtrace(buffer: *mut *mut c_void, size: c_int) -> c_int;
}

/// Read a page that is mapped without access: SIGSEGV.
#[inline(never)]
fn crash() {
    // SAFETY: a fresh anonymous mapping; reading it faults, which is the point.
    unsafe {
        let p = libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0);
        std::hint::black_box(std::ptr::read_volatile(p as *const u64));
    }
}

extern "C" fn on_crash(sig: c_int, info: *mut libc::siginfo_t, _ctx: *mut c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO; si_addr is the faulting address for SIGSEGV.
    let addr = unsafe { (*info).si_addr() } as usize;
    let mut frames = [std::ptr::null_mut::<c_void>(); 64];
    // SAFETY: `frames` holds 64 pointers.
    let n = unsafe { backtrace(frames.as_mut_ptr(), 64) }.max(0) as usize;
    // Everything below allocates: String, Vec, format!, the symbolizer. HybridAlloc serves it from nolock.
    let mut report = format!("=== crash report ===\nsignal {sig} (SIGSEGV) at address {addr:#x}\nbacktrace:\n");
    let mut lines: Vec<String> = Vec::new();
    for (i, ip) in frames[..n].iter().map(|&p| p as usize).enumerate() {
        let mut name = None;
        let mut place = None;
        // SAFETY: no other thread symbolizes concurrently in this program (the unsynchronized variant takes
        // no lock, which is what a crash handler needs).
        unsafe {
            backtrace::resolve_unsynchronized(ip.saturating_sub(1) as *mut c_void, |s| {
                if let Some(nm) = s.name() {
                    name = Some(format!("{nm:#}"));
                }
                if let (Some(f), Some(l)) = (s.filename(), s.lineno()) {
                    place = Some(format!("{}:{l}", f.file_name().map(|x| x.to_string_lossy()).unwrap_or_default()));
                }
            })
        };
        lines.push(format!(
            "  #{i:<2} {ip:>#14x} {}{}",
            name.unwrap_or_else(|| "?".into()),
            place.map(|p| format!(" ({p})")).unwrap_or_default()
        ));
    }
    report.push_str(&lines.join("\n"));
    let st = A.stats();
    let _ = write!(
        report,
        "\nthe crash interrupted the program's allocator holding its lock; this report made {} allocations from \
         nolock\n=== end ===\n",
        st.handler_allocs
    );
    // SAFETY: writing our buffer to fd 2.
    unsafe { libc::write(2, report.as_ptr().cast(), report.len()) };
    // SA_RESETHAND put the default action back: returning re-runs the faulting read, and the process dies of
    // SIGSEGV as it would have without this handler (core dump and exit status included).
}

fn child() {
    // Prime the unwinder and nolock in normal context.
    let mut buf = [std::ptr::null_mut::<c_void>(); 4];
    // SAFETY: `buf` holds 4 pointers.
    unsafe { backtrace(buf.as_mut_ptr(), 4) };
    A.warm_up();
    // An alternate stack, so that a stack overflow can be reported too.
    let stack = vec![0u8; 256 << 10].leak();
    let ss = libc::stack_t { ss_sp: stack.as_mut_ptr().cast(), ss_flags: 0, ss_size: stack.len() };
    // SAFETY: a valid stack that lives forever.
    unsafe { libc::sigaltstack(&ss, std::ptr::null_mut()) };
    // SAFETY: the handler only allocates (through HybridAlloc: nolock), symbolizes and writes.
    unsafe { hybrid::sigaction(libc::SIGSEGV, on_crash, libc::SA_ONSTACK | libc::SA_RESETHAND) }.expect("sigaction");

    let work: Vec<String> = (0..10).map(|i| format!("item {i}")).collect();
    eprintln!("child: {} items ready; crashing inside the allocator's critical section", work.len());
    A.inner().crash_inside.store(true, Ordering::Relaxed);
    let _boom = Box::new(42u64);
    unreachable!("the allocation above crashes");
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("crash") {
        return child();
    }
    use std::os::unix::process::ExitStatusExt;
    let out = std::process::Command::new(std::env::current_exe().expect("current_exe"))
        .arg("crash")
        .output()
        .expect("run the child");
    print!("{}", String::from_utf8_lossy(&out.stderr));
    println!("child ended by signal {:?} (SIGSEGV is {})", out.status.signal(), libc::SIGSEGV);
}
