//! The workload of `hybrid_real` and `hybrid_real_jemalloc` (included by both with `#[path]`).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::Instant;

fn one_thread(t: u64) -> usize {
    let mut total = 0;
    for round in 0..24u64 {
        let mut m: HashMap<String, Vec<u32>> = HashMap::new();
        for i in 0..40_000u64 {
            let key = format!("k{t}-{round}-{}", i % 9_000);
            m.entry(key).or_default().push(i as u32);
        }
        let mut b: BTreeMap<u64, String> = BTreeMap::new();
        for (k, v) in &m {
            let mut s = String::new();
            for x in v.iter().take(4) {
                let _ = write!(s, "{x},");
            }
            b.insert(k.len() as u64 * 1_000_003 + v.len() as u64 + b.len() as u64, s);
        }
        let mut words: Vec<String> = b.values().cloned().collect();
        words.sort();
        words.dedup();
        total += words.len() + m.len();
    }
    total
}

/// Run the workload on two threads plus a channel, print the wall time.
pub fn run(name: &str) {
    let start = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let producer = std::thread::spawn(move || {
        for i in 0..200_000usize {
            tx.send(vec![i as u8; i % 200 + 1]).unwrap();
        }
    });
    let worker = std::thread::spawn(|| one_thread(1));
    let mine = one_thread(0);
    let bytes: usize = rx.iter().map(|v| v.len()).sum();
    producer.join().unwrap();
    let theirs = worker.join().unwrap();
    // SAFETY: an all-zero rusage is valid for getrusage to fill in.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF reports the whole process into `ru`.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let cpu = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    println!(
        "{name}: {:.3} s wall, {:.3} s cpu ({mine} {theirs} {bytes})",
        start.elapsed().as_secs_f64(),
        cpu(ru.ru_utime) + cpu(ru.ru_stime)
    );
}
