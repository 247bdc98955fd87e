//! `NolockAlloc` as the `#[global_allocator]` of a real std program: collections, strings, formatting, threads
//! (spawned and scoped), channels — every allocation of this binary, the test harness's included, comes from
//! nolock. Also: `NolockAlloc::with_config` configures it (`Config::apply` cannot, and says so); `realloc` to
//! a smaller size gives the memory back; and when the arena cannot be reserved the process says why, naming
//! `NOLOCK_ARENA_SIZE`, before Rust's allocation-failure abort.

use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use nolock::{Config, ConfigError, NolockAlloc};

/// No background worker (so nothing purges behind the tests' backs); the arena size comes from the
/// environment, so that the child processes below can set it.
#[global_allocator]
static A: NolockAlloc = NolockAlloc::with_config(Config::new().background(false));

const MIB: usize = 1 << 20;

/// Whether `p` is the start of a live nolock allocation.
fn from_nolock<T>(p: *const T) -> bool {
    nolock::ksize(p.cast()) > 0
}

#[test]
fn collections_and_strings() {
    let v: Vec<u64> = (0..1_000_000).collect();
    assert!(from_nolock(v.as_ptr()));
    assert_eq!(v.iter().sum::<u64>(), 999_999 * 1_000_000 / 2);

    let mut m: HashMap<String, usize> = HashMap::new();
    for i in 0..100_000 {
        m.insert(format!("key-{i}"), i);
    }
    assert_eq!(m.len(), 100_000);
    assert!((0..100_000).step_by(997).all(|i| m[&format!("key-{i}")] == i));
    m.retain(|_, v| *v % 2 == 0);
    assert_eq!(m.len(), 50_000);

    let b: BTreeMap<u32, Vec<u8>> = (0..10_000u32).map(|i| (i, vec![i as u8; (i % 300) as usize])).collect();
    assert_eq!(b.range(100..200).map(|(_, v)| v.len()).sum::<usize>(), (100..200).sum::<usize>());

    let mut q: VecDeque<Box<str>> = VecDeque::new();
    for i in 0..50_000 {
        q.push_back(i.to_string().into_boxed_str());
        if i % 3 == 0 {
            q.pop_front();
        }
    }
    assert_eq!(q.len(), 50_000 - 16_667);

    let heap: BinaryHeap<i64> = (0..20_000).map(|i| (i * 7919) % 20_011).collect();
    let sorted = heap.into_sorted_vec();
    assert!(sorted.windows(2).all(|w| w[0] <= w[1]));

    let set: HashSet<Vec<u16>> = (0..5_000u16).map(|i| vec![i; (i % 17) as usize + 1]).collect();
    assert_eq!(set.len(), 5_000);

    let mut s = String::new();
    for i in 0..20_000 {
        write!(s, "{i:>6}|{:x};", i * 31).unwrap();
    }
    assert!(s.starts_with("     0|0;     1|1f;"));
    let upper = s.to_uppercase();
    assert_eq!(upper.split(';').count(), 20_001);
    let joined = upper.split('|').rev().collect::<Vec<_>>().join("/");
    assert_eq!(joined.len(), upper.len());
    let dynbox: Vec<Box<dyn Fn(u32) -> u32>> =
        (0..100u32).map(|k| Box::new(move |x| x + k) as Box<dyn Fn(u32) -> u32>).collect();
    assert_eq!(dynbox.iter().map(|f| f(1)).sum::<u32>(), 100 + (0..100).sum::<u32>());
}

#[test]
fn threads_channels_and_scopes() {
    // Spawned threads build their own maps and return them (freed on this thread).
    let handles: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                let m: HashMap<u32, String> = (0..20_000).map(|i| (i, format!("{t}:{i}"))).collect();
                m
            })
        })
        .collect();
    for (t, h) in handles.into_iter().enumerate() {
        let m = h.join().unwrap();
        assert_eq!(m.len(), 20_000);
        assert_eq!(m[&123], format!("{t}:123"));
    }

    // A channel carries allocations across threads (allocated there, freed here).
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let producers: Vec<_> = (0..3)
        .map(|t| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for i in 0..10_000usize {
                    tx.send(vec![t as u8; i % 500 + 1]).unwrap();
                }
            })
        })
        .collect();
    drop(tx);
    let mut total = 0usize;
    for v in rx {
        assert!(v.iter().all(|&b| b == v[0]));
        total += v.len();
    }
    for p in producers {
        p.join().unwrap();
    }
    assert_eq!(total, 3 * (0..10_000usize).map(|i| i % 500 + 1).sum::<usize>());

    // Scoped threads borrow, mutate disjoint chunks, and share a Mutex-protected Vec.
    let mut data: Vec<u64> = (0..400_000).collect();
    let shared = Mutex::new(Vec::new());
    let count = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for (k, chunk) in data.chunks_mut(100_000).enumerate() {
            let shared = &shared;
            let count = &count;
            s.spawn(move || {
                for x in chunk.iter_mut() {
                    *x *= 2;
                }
                let words: Vec<String> = chunk.iter().step_by(1000).map(|x| x.to_string()).collect();
                shared.lock().unwrap().push((k, words.join(",")));
                count.fetch_add(1, Ordering::Relaxed);
            });
        }
    });
    assert_eq!(count.load(Ordering::Relaxed), 4);
    assert_eq!(data.iter().sum::<u64>(), 2 * (0..400_000u64).sum::<u64>());
    let mut parts = shared.into_inner().unwrap();
    parts.sort();
    assert_eq!(parts.len(), 4);
    assert!(parts[1].1.starts_with("200000,"));

    // Arc'd state dropped on whichever thread lets go last.
    let arc = Arc::new((0..1000).map(|i| i.to_string()).collect::<Vec<_>>());
    let hs: Vec<_> = (0..4)
        .map(|_| {
            let a = arc.clone();
            std::thread::spawn(move || a.iter().map(|s| s.len()).sum::<usize>())
        })
        .collect();
    drop(arc);
    for h in hs {
        assert_eq!(h.join().unwrap(), (0..1000).map(|i: i32| i.to_string().len()).sum::<usize>());
    }
}

#[test]
fn configured_by_with_config_not_apply() {
    nolock::init();
    assert!(!nolock::worker_running(), "Config::background(false) from with_config is in effect");
    let e = Config::new().arena_size(1 << 30).apply().unwrap_err();
    assert_eq!(e, ConfigError::AlreadyInitialized);
    assert!(e.to_string().contains("NolockAlloc::with_config"), "{e}");
}

/// Run the ignored test `name` of this binary alone in a child process, with `NOLOCK_STD_CHILD` set.
fn run_child(name: &str) -> String {
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", name, "--include-ignored", "--test-threads", "1", "--nocapture"])
        .env("NOLOCK_STD_CHILD", "1")
        .output()
        .expect("run the child");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "child {name} failed:\n{text}");
    assert!(text.contains("1 passed"), "the child ran its test:\n{text}");
    text
}

#[test]
fn realloc_shrink_gives_memory_back() {
    // Alone in a process, so that the page counts and the resident set are this test's own.
    eprintln!("{}", run_child("realloc_shrink_child"));
}

/// Resident set size from `/proc/self/statm`.
fn rss() -> usize {
    let s = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    s.split_whitespace().nth(1).unwrap().parse::<usize>().unwrap() * 4096
}

#[test]
#[ignore = "run in a child process by realloc_shrink_gives_memory_back"]
fn realloc_shrink_child() {
    if std::env::var_os("NOLOCK_STD_CHILD").is_none() {
        return;
    }
    // Page runs: eight 32 MiB vectors, written in full, shrunk to 16 bytes.
    let pages = || nolock::stats::snapshot().pages.used_pages * 4096;
    let (before, rss_before) = (pages(), rss());
    let mut vs: Vec<Vec<u8>> = (0..8u8)
        .map(|i| {
            let mut v = vec![i; 32 * MIB];
            v[32 * MIB - 1] = i.wrapping_add(1);
            v
        })
        .collect();
    let (grown, rss_grown) = (pages(), rss());
    assert!(grown >= before + 8 * 32 * MIB, "{} -> {} MiB", before / MIB, grown / MIB);
    for v in &mut vs {
        v.truncate(16);
        v.shrink_to_fit();
    }
    let shrunk = pages();
    nolock::trim();
    let rss_after = rss();
    println!(
        "page allocator: {} MiB before, {} MiB with the vectors, {} MiB after shrinking; resident {} -> {} -> {} MiB",
        before / MIB,
        grown / MIB,
        shrunk / MIB,
        rss_before / MIB,
        rss_grown / MIB,
        rss_after / MIB
    );
    assert!(shrunk < before + MIB, "shrinking gave the pages back");
    assert!(rss_after + 200 * MIB < rss_grown, "and trim returned them to the OS");
    for (i, v) in vs.iter().enumerate() {
        assert_eq!(v.len(), 16);
        assert!(v.iter().all(|&b| b == i as u8), "contents kept");
        assert_eq!(nolock::ksize(v.as_ptr()), 16, "moved to the 16-byte class");
    }

    // Slab objects move to a smaller class.
    let mut s = String::with_capacity(4000);
    s.push_str("kept");
    assert_eq!(nolock::ksize(s.as_ptr()), 4096);
    s.shrink_to_fit();
    assert_eq!(s, "kept");
    assert_eq!(nolock::ksize(s.as_ptr()), 8, "4 bytes live in the 8-byte class");

    // Page runs that stay large free their tail in place.
    let large_before = nolock::slab::kmalloc::large_stats().pages as usize;
    let mut v: Vec<u8> = vec![3; 10 * MIB];
    let p = v.as_ptr();
    v.truncate(MIB + 1);
    let before_tail = pages();
    v.shrink_to_fit();
    assert_eq!(v.as_ptr(), p, "shrunk in place");
    assert_eq!(nolock::ksize(v.as_ptr()), MIB + 4096);
    assert_eq!(pages() + 9 * MIB - 4096, before_tail, "the tail pages are free");
    assert!(v.iter().all(|&b| b == 3));
    let l = nolock::slab::kmalloc::large_stats();
    assert_eq!(l.pages as usize - large_before, (MIB + 4096) / 4096, "large-object accounting follows ({l:?})");
}

#[test]
fn unreservable_arena_says_why() {
    // An address-space limit below the arena: nolock cannot reserve it at the first allocation (the Rust
    // runtime's, before main).
    let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
    cmd.args(["--exact", "unreservable_child", "--include-ignored"]).env_remove("NOLOCK_ARENA_SIZE");
    // SAFETY: the closure runs in the forked child before exec and only calls setrlimit, which is
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: 1 << 30, rlim_max: 1 << 30 };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("run the child");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the child cannot allocate:\n{err}");
    assert!(err.contains("nolock: cannot reserve its arena"), "the cause is named:\n{err}");
    assert!(err.contains("RLIMIT_AS"), "the limit is named:\n{err}");
    assert!(err.contains("NOLOCK_ARENA_SIZE"), "the setting is named:\n{err}");
    assert!(err.contains("memory allocation of"), "then Rust's allocation-failure message:\n{err}");

    // Following the advice works: a 256 MiB arena fits under the same limit.
    cmd.env("NOLOCK_ARENA_SIZE", "256M").env("NOLOCK_UNRESERVABLE_CHILD", "1");
    let out = cmd.output().expect("run the child");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "with NOLOCK_ARENA_SIZE=256M the child runs:\n{text}");
    assert!(text.contains("1 passed"), "{text}");
}

#[test]
fn exhausted_arena_says_why() {
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "exhausted_child", "--include-ignored", "--test-threads", "1"])
        .env("NOLOCK_ARENA_SIZE", "16M")
        .env("NOLOCK_STD_CHILD", "1")
        .output()
        .expect("run the child");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the child runs out of memory:\n{err}");
    assert!(err.contains("NolockAlloc found no room for 67108864 bytes"), "the cause is named:\n{err}");
    assert!(err.contains("arena of 16 MiB"), "{err}");
    assert!(err.contains("NOLOCK_ARENA_SIZE"), "the setting is named:\n{err}");
    assert!(err.contains("memory allocation of 67108864 bytes failed"), "then Rust's message:\n{err}");
}

#[test]
#[ignore = "run in a child process by exhausted_arena_says_why"]
fn exhausted_child() {
    if std::env::var_os("NOLOCK_STD_CHILD").is_none() {
        return;
    }
    let v = vec![1u8; 64 * MIB];
    assert_eq!(v.len(), 64 * MIB, "a 16 MiB arena cannot hold this");
}

#[test]
#[ignore = "run in a child process by unreservable_arena_says_why"]
fn unreservable_child() {
    if std::env::var_os("NOLOCK_UNRESERVABLE_CHILD").is_none() {
        return;
    }
    let v: Vec<String> = (0..10_000).map(|i| i.to_string()).collect();
    assert!(from_nolock(v.as_ptr()));
    assert_eq!(nolock::stats::snapshot().pages.arena_pages * 4096, 256 * MIB);
}
