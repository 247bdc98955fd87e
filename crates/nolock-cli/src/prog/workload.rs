//! The "real program" of `nolock bench alloc`: ordinary Rust code (collections, sorting, JSON through
//! serde_json, a `BTreeMap`) that allocates the way applications do. Each `prog-*` binary installs one allocator
//! as `#[global_allocator]` and runs this; the bench runs each binary as a whole child process and reports its
//! wall time, system CPU time and peak resident memory.
//!
//! Deterministic (a fixed xorshift seed): every allocator runs exactly the same program and prints the same
//! checksum.

use std::collections::{BTreeMap, HashMap, VecDeque};

/// xorshift64*: deterministic, allocation-free (testkit's generator, kept here so that the `prog-*` programs
/// link nothing but their allocator and serde_json).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn word(&mut self) -> String {
        let len = 3 + self.below(10) as usize;
        (0..len).map(|_| (b'a' + self.below(26) as u8) as char).collect()
    }
}

/// One round of every part; returns a checksum so nothing is optimised away.
fn round(rng: &mut Rng) -> u64 {
    let mut sum = 0u64;

    // Collections: strings, a hash map of word counts, a queue.
    let words: Vec<String> = (0..20_000).map(|_| rng.word()).collect();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for w in &words {
        *counts.entry(w.as_str()).or_default() += 1;
    }
    sum = sum.wrapping_add(counts.len() as u64);
    let mut queue: VecDeque<Vec<u32>> = VecDeque::new();
    for i in 0..20_000u32 {
        queue.push_back((0..(i % 17)).collect());
        if queue.len() > 500 {
            let v = queue.pop_front().unwrap_or_default();
            sum = sum.wrapping_add(v.len() as u64);
        }
    }

    // Sorting: numbers, strings, records.
    let mut nums: Vec<u64> = (0..100_000).map(|_| rng.next()).collect();
    nums.sort_unstable();
    sum = sum.wrapping_add(nums[nums.len() / 2] >> 32);
    let mut sorted = words.clone();
    sorted.sort();
    sorted.dedup();
    sum = sum.wrapping_add(sorted.len() as u64);
    let mut records: Vec<(String, u64)> = words.iter().take(10_000).map(|w| (w.to_uppercase(), rng.next())).collect();
    records.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
    sum = sum.wrapping_add(records[0].0.len() as u64);

    // JSON: build a document, print it, parse it back, walk it.
    let items: Vec<serde_json::Value> = (0..4_000)
        .map(|i| {
            let tags: Vec<serde_json::Value> = (0..rng.below(6)).map(|_| serde_json::Value::from(rng.word())).collect();
            let mut obj = serde_json::Map::new();
            obj.insert("id".into(), serde_json::Value::from(i));
            obj.insert("name".into(), serde_json::Value::from(rng.word()));
            obj.insert("score".into(), serde_json::Value::from(rng.below(1_000_000) as f64 / 7.0));
            obj.insert("tags".into(), serde_json::Value::Array(tags));
            serde_json::Value::Object(obj)
        })
        .collect();
    let text = serde_json::to_string(&serde_json::Value::Array(items)).unwrap_or_default();
    let back: serde_json::Value = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    if let Some(arr) = back.as_array() {
        for it in arr {
            sum = sum.wrapping_add(it["id"].as_u64().unwrap_or(0));
            sum = sum.wrapping_add(it["tags"].as_array().map_or(0, |t| t.len() as u64));
        }
    }

    // BTreeMap: inserts, lookups, removals, iteration.
    let mut map: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    for _ in 0..40_000 {
        let k = rng.below(200_000);
        map.insert(k, vec![k as u8; 8 + (k % 56) as usize]);
    }
    for _ in 0..20_000 {
        let k = rng.below(200_000);
        if let Some(v) = map.remove(&k) {
            sum = sum.wrapping_add(v.len() as u64);
        }
    }
    sum = sum.wrapping_add(map.range(50_000..150_000).map(|(k, v)| k ^ v.len() as u64).fold(0, u64::wrapping_add));
    let mut index: BTreeMap<String, usize> = BTreeMap::new();
    for (i, w) in words.iter().enumerate() {
        index.insert(w.clone(), i);
    }
    sum.wrapping_add(index.len() as u64)
}

/// This process's peak resident memory in KiB (`VmHWM`), or 0. Read by the process itself: the `ru_maxrss`
/// that `wait4` returns also counts the parent's memory before `exec` (the kernel keeps the larger of the two).
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Run `rounds` rounds (from the first argument, default 10) and print the checksum and the peak resident
/// memory in KiB. `init` runs first (nolock's: `nolock::init()`, which starts the background worker, as the
/// README tells programs to).
pub fn main(init: fn()) {
    init();
    let rounds: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(10);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut sum = 0u64;
    for _ in 0..rounds {
        sum = sum.wrapping_add(round(&mut rng));
    }
    println!("{sum} {}", peak_rss_kib());
}
