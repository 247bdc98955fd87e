//! Statistics as JSON: `Snapshot::to_json` parses as JSON (with serde_json), holds every cache with its
//! counters, escapes odd cache names, and equals what the `serde` feature's `Serialize` produces.

use std::alloc::Layout;

use nolock::KmemCache;

#[test]
fn snapshot_json_is_valid_and_matches_serde() {
    let _reports = testkit::NoReports::new();
    let cache = KmemCache::new("json \"quoted\"\\\n", Layout::new::<[u8; 48]>()).unwrap();
    let p = cache.alloc_nolock(nolock::Gfp::NONE).unwrap();
    let k = nolock::kmalloc_nolock(1000, nolock::Gfp::NONE).unwrap();
    let snap = nolock::stats::snapshot();
    let text = snap.to_json();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("invalid JSON ({e}): {text}"));
    let caches = v["caches"].as_array().expect("caches array");
    assert_eq!(caches.len(), snap.caches.len());
    let mine = caches.iter().find(|c| c["name"] == "json \"quoted\"\\\n").expect("the odd name round-trips");
    assert_eq!(mine["allocs"], 1);
    assert_eq!(mine["object_size"], 48);
    assert!(v["pages"]["used_pages"].as_u64().unwrap() > 0);
    assert!(v["large"]["allocs"].is_u64());
    assert!(v["resident_bytes"].is_u64() || v["resident_bytes"].is_null());
    assert!(v["reports"].is_u64());
    // The serde feature gives the same document.
    let via_serde: serde_json::Value = serde_json::to_value(&snap).unwrap();
    assert_eq!(via_serde, v);
    // SAFETY: ours, freed once.
    unsafe {
        cache.free_nolock(p);
        nolock::kfree_nolock(k.as_ptr());
    }
}
