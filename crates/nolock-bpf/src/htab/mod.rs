//! `HashMap`: a byte-oriented BPF hash map (`BPF_MAP_TYPE_HASH`), with the kernel's element layout, nulls
//! buckets, selectable element backends and bucket locking.
//!
//! ```
//! use nolock_bpf::htab::{Backend, HashMap, HtabAttr, LockMode, NolockReuse, UpdateFlags};
//!
//! let attr = HtabAttr::new(4, 8, 1024).backend(Backend::Nolock(NolockReuse::TypesafeImmediate));
//! let map = HashMap::new(attr).unwrap();
//! map.update(&7u32.to_ne_bytes(), &1u64.to_ne_bytes(), UpdateFlags::NoExist).unwrap();
//! let v = map.lookup(&7u32.to_ne_bytes()).unwrap();
//! assert_eq!(v.atomic_u64(0).fetch_add(1, core::sync::atomic::Ordering::Relaxed), 1);
//! drop(v);
//! let mut out = [0u8; 8];
//! map.lookup_and_delete(&7u32.to_ne_bytes(), &mut out).unwrap();
//! assert_eq!(u64::from_ne_bytes(out), 2);
//! ```
//!
//! - Layout: `elem` (the 48-byte `htab_elem` header, then `rup8(key)`, then `rup8(value)`); 16-byte buckets
//!   (list head and lock; 8 bytes in lock-free mode, which has no lock), `n_buckets =
//!   roundup_pow_of_two(max_entries)`.
//! - Buckets: `list` (nulls lists; lockless lookups restart on a nulls mismatch; claim-and-help removal).
//! - Locking: `lock` ([`LockMode`]: `MapLocked` = v6.14 and earlier, `Rqspin` = v6.15+, `LockFree` = none).
//! - Backends: `backend` ([`Backend`]: `Prealloc` = the default since v3.19, `BpfMemAlloc` =
//!   `BPF_F_NO_PREALLOC` since v6.1, `Nolock` = the seed's migration).
//! - [`TypedHashMap`]: the typed wrapper.
//!
//! An update is what the kernel's `htab_map_update_elem` does: find the key, check the flags, take an element
//! (a new one counts against `max_entries`: `Full` = `-E2BIG`), link it at the head (new key) or in place of the
//! old one (existing key), and retire the old one. Where removed elements are reused at once (the locked modes
//! with Prealloc, bpf_mem_alloc or type-safe reuse) a replacement is linked at the head and the old element
//! removed after, as in the kernel (`list::update_at_head`: in place, a reused element would carry lockless
//! readers past keys). Every map operation is one IRQs-off region ([`crate::cpu::IrqRegion`]).
//!
//! # Context
//! As the crate: every operation may run in a signal handler that interrupted any operation of the same map on
//! the same thread. In `MapLocked` and `Rqspin` mode an operation may spin while another thread holds its bucket
//! (as the kernel's spinlocks; `Rqspin` for at most 250 ms, reading the clock). Creation and drop are normal
//! context.

pub mod backend;
pub mod elem;
pub mod hooks;
pub mod list;
pub mod lock;
mod typed;

use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::Arc;

use nolock::memcg::MemGroup;

use nolock::rcu::srcu::{SrcuFast, SrcuFastGuard};
use nolock::{RcuHead, RcuReadGuard};

use crate::memalloc::{BpfMaConfig, BpfMemAlloc};
pub use backend::{Backend, NolockReuse, possible_cpus};
use backend::{NolockPool, PreallocPool};
use elem::{Elem, HDR, rup8};
use hooks::{Point, point};
use list::{DEL, Nodes, UNSET, WalkStats};
pub use lock::LockMode;
use lock::{BucketLock, MapLockedCounters};
pub use typed::{Pod, TypedHashMap};

/// Times a walk of one bucket for `get_next_key` starts again (it was carried into another bucket by a reused
/// element) before it settles for what it found.
const SCAN_RETRIES: u32 = 64;

/// Compare the key bytes at `k` (element memory, read volatile: a writer may be reusing the element; the
/// caller validates with the element's version) with `key`, in byte order.
fn key_cmp(k: *const u8, key: &[u8]) -> core::cmp::Ordering {
    for (i, &b) in key.iter().enumerate() {
        // SAFETY: inside the key area of element memory (the caller's read-side section keeps it mapped).
        let a = unsafe { core::ptr::read_volatile(k.add(i)) };
        if a != b {
            return a.cmp(&b);
        }
    }
    core::cmp::Ordering::Equal
}

/// Errors of map operations, as the kernel's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Error {
    /// `-E2BIG`: the map holds `max_entries` elements (or, preallocated, no free element is left).
    Full,
    /// `-ENOMEM`: the element allocator returned nothing.
    NoMem,
    /// `-EEXIST`: `NoExist` and the key is present.
    Exists,
    /// `-ENOENT`: the key is absent (`Exist`, delete, lookup-and-delete, end of iteration).
    NotFound,
    /// `-EBUSY`: `MapLocked` mode, a nested operation on a busy `map_locked` slot.
    Busy,
    /// `-EDEADLK`: `Rqspin` mode, the thread already holds this bucket's lock.
    Deadlock,
    /// `-ETIMEDOUT`: `Rqspin` mode, the bucket stayed locked for 250 ms.
    TimedOut,
    /// `-EINVAL`: a key or value of the wrong length.
    Invalid,
}

impl Error {
    /// The kernel's errno for this error (positive).
    pub fn errno(self) -> i32 {
        match self {
            Error::Full => libc::E2BIG,
            Error::NoMem => libc::ENOMEM,
            Error::Exists => libc::EEXIST,
            Error::NotFound => libc::ENOENT,
            Error::Busy => libc::EBUSY,
            Error::Deadlock => libc::EDEADLK,
            Error::TimedOut => libc::ETIMEDOUT,
            Error::Invalid => libc::EINVAL,
        }
    }

    /// Every kind, in `Stats::errors` order.
    pub const ALL: [Error; 8] = [
        Error::Full,
        Error::NoMem,
        Error::Exists,
        Error::NotFound,
        Error::Busy,
        Error::Deadlock,
        Error::TimedOut,
        Error::Invalid,
    ];

    fn index(self) -> usize {
        Error::ALL.iter().position(|&e| e == self).unwrap_or(0)
    }
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Error::Full => "map full (E2BIG)",
            Error::NoMem => "out of memory (ENOMEM)",
            Error::Exists => "key exists (EEXIST)",
            Error::NotFound => "key not found (ENOENT)",
            Error::Busy => "map_locked slot busy (EBUSY)",
            Error::Deadlock => "bucket lock held by this thread (EDEADLK)",
            Error::TimedOut => "bucket lock timed out (ETIMEDOUT)",
            Error::Invalid => "key or value of the wrong size (EINVAL)",
        })
    }
}

impl std::error::Error for Error {}

/// The flags of an update (`BPF_ANY`, `BPF_NOEXIST`, `BPF_EXIST`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UpdateFlags {
    /// Create or replace.
    Any,
    /// Create only: `Exists` if present.
    NoExist,
    /// Replace only: `NotFound` if absent.
    Exist,
}

/// Why a map could not be created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CreateError {
    /// Key size 0, value size 0, `max_entries` 0, or sizes too large.
    BadAttr,
    /// The element allocator (`BpfMemAlloc`) could not be created.
    MemAlloc(crate::memalloc::BpfMaError),
    /// The accounting group's limit refused the preallocated memory.
    Limit,
    /// The element cache could not be created.
    Cache(nolock::CacheError),
    /// The preallocated array could not be allocated.
    NoMem,
}

impl core::fmt::Display for CreateError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            CreateError::BadAttr => f.write_str("key size, value size and max_entries must be positive and small"),
            CreateError::Cache(e) => write!(f, "element cache: {e}"),
            CreateError::NoMem => f.write_str("cannot allocate the preallocated elements"),
            CreateError::MemAlloc(e) => write!(f, "element allocator: {e}"),
            CreateError::Limit => f.write_str("the accounting group's limit refused the map's memory"),
        }
    }
}

impl std::error::Error for CreateError {}

/// Map attributes (the kernel's `bpf_attr` for `BPF_MAP_CREATE`).
#[derive(Clone, Debug)]
pub struct HtabAttr {
    /// Key size in bytes.
    pub key_size: usize,
    /// Value size in bytes.
    pub value_size: usize,
    /// Maximum number of elements.
    pub max_entries: usize,
    /// Element backend (`Prealloc` is the kernel's default; `BPF_F_NO_PREALLOC` picks another).
    pub backend: Backend,
    /// Bucket locking.
    pub lock: LockMode,
    /// Hash seed (the kernel's random `hashrnd`; `BPF_F_ZERO_SEED` is 0).
    pub seed: u32,
    /// The accounting group the map's memory is charged to (the memory cgroup it was created in): the
    /// preallocated array and buckets at creation; each element of a nolock cache (its object size) while it
    /// is allocated (grace-period classes uncharge when the element is retired); a `BpfMemAlloc` charges what
    /// it takes from `kmalloc`.
    pub group: Option<Arc<MemGroup>>,
}

impl HtabAttr {
    /// A preallocated, lock-free map with seed 0.
    pub fn new(key_size: usize, value_size: usize, max_entries: usize) -> Self {
        HtabAttr {
            key_size,
            value_size,
            max_entries,
            backend: Backend::Prealloc,
            lock: LockMode::LockFree,
            seed: 0,
            group: None,
        }
    }
    /// Charge the map's memory to `g`.
    pub fn group(mut self, g: Arc<MemGroup>) -> Self {
        self.group = Some(g);
        self
    }
    /// Set the backend.
    pub fn backend(mut self, b: Backend) -> Self {
        self.backend = b;
        self
    }
    /// Set the lock mode.
    pub fn lock(mut self, l: LockMode) -> Self {
        self.lock = l;
        self
    }
    /// Set the hash seed.
    pub fn seed(mut self, s: u32) -> Self {
        self.seed = s;
        self
    }
}

/// Counters of a map: errors by kind and the slow events of bucket walks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Errors returned, indexed as [`Error::ALL`].
    pub errors: [u64; 8],
    /// Walks restarted because they ended in another bucket's nulls marker.
    pub nulls_restarts: u64,
    /// Lookups restarted because the element's version changed under them (type-safe reuse).
    pub version_restarts: u64,
    /// Removals (deletes and replaces) whose final unlink a writer's walk did, its own or one it met on the way.
    pub completions: u64,
    /// Walks restarted because a completion CAS or an insert CAS lost.
    pub cas_restarts: u64,
    /// Elements in the map now.
    pub count: u64,
}

impl Stats {
    /// Errors of one kind.
    pub fn error(&self, e: Error) -> u64 {
        self.errors[e.index()]
    }
    /// All errors.
    pub fn total_errors(&self) -> u64 {
        self.errors.iter().sum()
    }
}

#[derive(Default)]
struct Counters {
    errors: [AtomicU64; 8],
    nulls_restarts: AtomicU64,
    version_restarts: AtomicU64,
    completions: AtomicU64,
    cas_restarts: AtomicU64,
}

/// How removed elements become reusable, decided at creation from the backend and the lock mode.
#[derive(Clone, Copy)]
enum Retire {
    /// Back to the pool at once (locked modes with Prealloc / type-safe / bpf_mem_alloc: the kernel's way).
    Immediate,
    /// Back to the pool after an RCU grace period (lock-free mode with an immediate-reuse backend).
    PoolAfterRcu,
    /// `kfree_rcu_nolock`.
    KfreeRcu,
    /// `kfree_srcu_fast_nolock` on the domain.
    KfreeSrcu(&'static SrcuFast),
}

enum Pool {
    Prealloc(PreallocPool),
    BpfMa(BpfMemAlloc),
    Nolock(NolockPool),
}

struct Inner {
    key_size: usize,
    value_size: usize,
    key_rup: usize,
    value_rup: usize,
    elem_size: usize,
    max_entries: usize,
    mask: usize,
    seed: u32,
    lock: LockMode,
    /// Bucket list heads.
    heads: Box<[AtomicUsize]>,
    /// Bucket locks (locked modes; empty in lock-free mode).
    locks: Box<[BucketLock]>,
    /// Bytes per bucket: 16 (head and lock, as the kernel's) or 8 (lock-free: head only).
    bucket_size: usize,
    map_locked: Option<MapLockedCounters>,
    pool: Pool,
    retire: Retire,
    /// Lookups revalidate the key with the element's version (type-safe immediate reuse).
    validate: bool,
    srcu: Option<&'static SrcuFast>,
    count: AtomicUsize,
    counters: Counters,
    group: Option<Arc<MemGroup>>,
    /// Bytes charged at creation.
    fixed_charge: usize,
    /// Bytes charged per allocated element (nolock caches).
    elem_charge: usize,
}

struct ElemNodes;

impl Nodes for ElemNodes {
    #[inline]
    unsafe fn next(&self, e: usize) -> &AtomicUsize {
        Elem(e).next()
    }
    #[inline]
    unsafe fn repl(&self, e: usize) -> &AtomicUsize {
        Elem(e).repl()
    }
}

/// A read-side section of the map's readers' domain.
enum ReadGuard<'a> {
    Rcu(#[allow(dead_code)] RcuReadGuard),
    Srcu(#[allow(dead_code)] SrcuFastGuard<'a>),
}

/// Elements one operation unlinked, retired when it ends (after the bucket lock is released).
struct Unlinked {
    items: [usize; 4],
    n: usize,
}

impl Unlinked {
    /// Keep `e` for retirement at the end of the operation, or retire it now when full.
    #[inline]
    fn push(&mut self, m: &Inner, e: usize) {
        if self.n < self.items.len() {
            self.items[self.n] = e;
            self.n += 1;
        } else {
            m.retire(e);
        }
    }
}

/// A BPF hash map. See the [module documentation](self).
pub struct HashMap {
    inner: Box<Inner>,
}

// SAFETY: all shared state is atomics, the element pool (Sync) and immutable configuration.
unsafe impl Send for HashMap {}
// SAFETY: as above.
unsafe impl Sync for HashMap {}

/// A looked-up value, valid while the guard (a read-side section) lives.
///
/// As in the kernel, the value is the element's memory: with an immediate-reuse backend (Prealloc,
/// bpf_mem_alloc, or type-safe reuse) the element may be deleted and reused for another key while the guard
/// lives; with a grace-period backend (Nolock B/C, or any backend in `LockFree` mode) it stays this key's
/// element (possibly deleted) until the guard is dropped.
pub struct ValueRef<'a> {
    _guard: ReadGuard<'a>,
    ptr: *mut u8,
    len: usize,
}

impl ValueRef<'_> {
    /// The value's address (8-aligned; `rup8(value_size)` bytes may be accessed).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }
    /// The value size.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the value size is 0 (never: maps have positive value sizes).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The 8-byte word `i` of the value as an atomic (for counters updated in place, like BPF programs'
    /// `__sync_fetch_and_add`). Panics if the word is outside the value.
    pub fn atomic_u64(&self, i: usize) -> &AtomicU64 {
        assert!((i + 1) * 8 <= rup8(self.len), "word {i} is outside a {}-byte value", self.len);
        // SAFETY: inside the value area, 8-aligned; element memory stays mapped while the guard lives.
        unsafe { &*(self.ptr.add(i * 8) as *const AtomicU64) }
    }
    /// Copy the value (volatile reads: it may change concurrently).
    pub fn copy_to(&self, out: &mut [u8]) {
        let n = out.len().min(self.len);
        // `ptr` is the value itself, not an element: `Elem(ptr).copy_value(0, ..)` read 48 bytes (a header)
        // further on, past the element's end (tests/single_step_maps.rs found it).
        // SAFETY: `ptr` is the 8-aligned value of an element, `n <= len` bytes, mapped while the guard lives.
        unsafe { elem::copy_value_at(self.ptr, &mut out[..n]) };
    }
}

impl HashMap {
    /// Create a map.
    ///
    /// # Context
    /// Normal context: allocates (buckets, the preallocated array) and may create a cache.
    pub fn new(attr: HtabAttr) -> Result<Self, CreateError> {
        if attr.key_size == 0
            || attr.value_size == 0
            || attr.max_entries == 0
            || attr.key_size > 512
            || attr.value_size > (1 << 20)
            || attr.max_entries > (1 << 28)
        {
            return Err(CreateError::BadAttr);
        }
        let key_rup = rup8(attr.key_size);
        let value_rup = rup8(attr.value_size);
        let elem_size = HDR + key_rup + value_rup;
        let n_buckets = attr.max_entries.next_power_of_two();
        let heads: Box<[AtomicUsize]> = (0..n_buckets).map(|i| AtomicUsize::new(list::nulls(i))).collect();
        let locks: Box<[BucketLock]> = if attr.lock == LockMode::LockFree {
            Box::new([])
        } else {
            (0..n_buckets).map(|_| BucketLock::default()).collect()
        };
        let bucket_size = if attr.lock == LockMode::LockFree { 8 } else { 16 };
        let lockfree = attr.lock == LockMode::LockFree;
        let (pool, retire, validate, srcu) = match attr.backend {
            Backend::Prealloc => {
                let mut p = PreallocPool::new(elem_size, attr.max_entries).ok_or(CreateError::NoMem)?;
                if lockfree {
                    p.overflow = Some(
                        NolockPool::new("bpf_htab_overflow", elem_size, NolockReuse::AfterRcu)
                            .map_err(CreateError::Cache)?,
                    );
                }
                (Pool::Prealloc(p), if lockfree { Retire::PoolAfterRcu } else { Retire::Immediate }, false, None)
            }
            Backend::BpfMemAlloc(refill) => {
                let cfg = BpfMaConfig { refill, percpu: false, group: attr.group.clone() };
                let a = BpfMemAlloc::new(Some(elem_size), cfg).map_err(CreateError::MemAlloc)?;
                (Pool::BpfMa(a), if lockfree { Retire::PoolAfterRcu } else { Retire::Immediate }, false, None)
            }
            Backend::Nolock(reuse) => {
                let p = NolockPool::new("bpf_htab_elem", elem_size, reuse).map_err(CreateError::Cache)?;
                match reuse {
                    NolockReuse::TypesafeImmediate => {
                        (Pool::Nolock(p), if lockfree { Retire::PoolAfterRcu } else { Retire::Immediate }, true, None)
                    }
                    NolockReuse::AfterRcu => (Pool::Nolock(p), Retire::KfreeRcu, false, None),
                    NolockReuse::AfterSrcu(d) => (Pool::Nolock(p), Retire::KfreeSrcu(d), false, Some(d)),
                }
            }
        };
        let map_locked = (attr.lock == LockMode::MapLocked).then(|| MapLockedCounters::new(n_buckets));
        let fixed = core::mem::size_of::<Inner>()
            + bucket_size * n_buckets
            + match &pool {
                Pool::Prealloc(p) => p.bytes(),
                _ => 0,
            };
        if let Some(g) = &attr.group {
            g.try_charge(fixed).map_err(|_| CreateError::Limit)?;
        }
        let elem_charge = match &pool {
            Pool::Nolock(p) => p.cache.as_ref().map_or(0, |c| c.object_size()),
            _ => 0,
        };
        let inner = Box::new(Inner {
            key_size: attr.key_size,
            value_size: attr.value_size,
            key_rup,
            value_rup,
            elem_size,
            max_entries: attr.max_entries,
            mask: n_buckets - 1,
            seed: attr.seed,
            lock: attr.lock,
            heads,
            locks,
            bucket_size,
            map_locked,
            pool,
            retire,
            validate,
            srcu,
            count: AtomicUsize::new(0),
            counters: Counters::default(),
            group: attr.group,
            fixed_charge: fixed,
            elem_charge,
        });
        Ok(HashMap { inner })
    }

    /// Key size.
    pub fn key_size(&self) -> usize {
        self.inner.key_size
    }
    /// Value size.
    pub fn value_size(&self) -> usize {
        self.inner.value_size
    }
    /// `max_entries`.
    pub fn max_entries(&self) -> usize {
        self.inner.max_entries
    }
    /// Number of buckets.
    pub fn n_buckets(&self) -> usize {
        self.inner.mask + 1
    }
    /// Element size (`48 + rup8(key) + rup8(value)`).
    pub fn elem_size(&self) -> usize {
        self.inner.elem_size
    }
    /// Elements in the map now.
    pub fn len(&self) -> usize {
        self.inner.count.load(Ordering::Relaxed)
    }
    /// Whether the map is empty now.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The lock mode.
    pub fn lock_mode(&self) -> LockMode {
        self.inner.lock
    }

    /// Insert or replace `key`'s value (`bpf_map_update_elem`).
    pub fn update(&self, key: &[u8], value: &[u8], flags: UpdateFlags) -> Result<(), Error> {
        let m = &*self.inner;
        if key.len() != m.key_size || value.len() != m.value_size {
            return m.fail(Error::Invalid);
        }
        let r = m.locked_op(key, |m, b, idx, hash, un, ws| m.update_in(b, idx, hash, key, value, flags, un, ws));
        r.or_else(|e| m.fail(e))
    }

    /// Delete `key` (`bpf_map_delete_elem`).
    pub fn delete(&self, key: &[u8]) -> Result<(), Error> {
        let m = &*self.inner;
        if key.len() != m.key_size {
            return m.fail(Error::Invalid);
        }
        let r = m.locked_op(key, |m, b, idx, hash, un, ws| m.delete_in(b, idx, hash, key, None, un, ws));
        r.or_else(|e| m.fail(e))
    }

    /// Delete `key` and copy its value to `out` (`bpf_map_lookup_and_delete_elem`).
    pub fn lookup_and_delete(&self, key: &[u8], out: &mut [u8]) -> Result<(), Error> {
        let m = &*self.inner;
        if key.len() != m.key_size || out.len() != m.value_size {
            return m.fail(Error::Invalid);
        }
        let r = m.locked_op(key, |m, b, idx, hash, un, ws| m.delete_in(b, idx, hash, key, Some(&mut *out), un, ws));
        r.or_else(|e| m.fail(e))
    }

    /// Look `key` up (`bpf_map_lookup_elem`): the value, in place, under a read-side section.
    pub fn lookup(&self, key: &[u8]) -> Option<ValueRef<'_>> {
        let m = &*self.inner;
        if key.len() != m.key_size {
            let _ = m.fail::<()>(Error::Invalid);
            return None;
        }
        let g = m.read_lock();
        let e = m.find_reader(key)?;
        Some(ValueRef { _guard: g, ptr: Elem(e).value_ptr(m.key_rup), len: m.value_size })
    }

    /// Look `key` up and copy its value to `out`, consistently: the key is checked under the element's
    /// version, and the copy is retried if the element was reinitialised meanwhile (no false key match, no
    /// value of another key; in-place writers of the value itself, e.g. atomic counters, are not excluded).
    pub fn lookup_copy(&self, key: &[u8], out: &mut [u8]) -> Result<(), Error> {
        let m = &*self.inner;
        if key.len() != m.key_size || out.len() != m.value_size {
            return m.fail(Error::Invalid);
        }
        let _g = m.read_lock();
        let hash = m.hash(key);
        loop {
            let Some(e) = m.find_reader_validated(key, hash) else {
                return m.fail(Error::NotFound);
            };
            let el = Elem(e);
            // Acquire: pairs with the Release store of the even version in `end_init`.
            let s0 = el.seq().load(Ordering::Acquire);
            if s0 & 1 == 0 && el.key_matches(hash, key) {
                el.copy_value(m.key_rup, out);
                // Acquire fence: the copy happens before the version re-read (pairs with the Release fence in
                // `begin_init`).
                fence(Ordering::Acquire);
                if el.seq().load(Ordering::Relaxed) == s0 {
                    return Ok(());
                }
            }
            m.counters.version_restarts.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The key after `prev` in the map's order, copied to `next`; the first key when `prev` is `None`
    /// (`bpf_map_get_next_key`). `NotFound` after the last key.
    ///
    /// The order is bucket by bucket and, inside a bucket, by the keys' bytes: each call returns the least key
    /// of `prev`'s bucket greater than `prev`, else the least key of the next non-empty bucket. So an iteration
    /// that calls it with the key it got last always moves forward — it ends, however the map changes — and
    /// it returns every key present throughout, whether or not `prev` was deleted meanwhile. (The kernel's
    /// walks the bucket's list from `prev`'s element and starts again at the first bucket when `prev` is gone;
    /// with elements reused at once a walk can be carried into another bucket and skip keys, and under churn
    /// an iteration can go round without end.)
    ///
    /// # Context
    /// Any context: lock-free (a read-side section), no allocation.
    pub fn get_next_key(&self, prev: Option<&[u8]>, next: &mut [u8]) -> Result<(), Error> {
        let m = &*self.inner;
        if next.len() != m.key_size || prev.is_some_and(|p| p.len() != m.key_size) {
            return m.fail(Error::Invalid);
        }
        let _g = m.read_lock();
        let mut start = 0;
        if let Some(p) = prev {
            let bucket = m.hash(p) as usize & m.mask;
            if m.least_key_after(bucket, Some(p), next) {
                return Ok(());
            }
            start = bucket + 1;
        }
        for idx in start..=m.mask {
            // Acquire: pairs with the Release CAS that linked the first element.
            if !list::is_nulls(m.heads[idx].load(Ordering::Acquire)) && m.least_key_after(idx, None, next) {
                return Ok(());
            }
        }
        m.fail(Error::NotFound)
    }

    /// Call `f(key, value)` for every element, bucket by bucket, inside one read-side section. Elements
    /// inserted or deleted meanwhile may or may not be seen; a key present throughout (replaced or not) is seen
    /// exactly once: a walk meets either the old or the new element of a replace, never both, and a bucket
    /// whose walk ended in another bucket's nulls marker is walked again before its elements are reported.
    ///
    /// # Context
    /// Normal context: allocates buffers through the global allocator.
    pub fn for_each(&self, mut f: impl FnMut(&[u8], &[u8])) {
        let m = &*self.inner;
        let _g = m.read_lock();
        let (ks, vs) = (m.key_size, m.value_size);
        let mut buf: Vec<u8> = Vec::new();
        for (idx, b) in m.heads.iter().enumerate() {
            'restart: loop {
                buf.clear();
                // Acquire: as in `get_next_key`.
                let first = b.load(Ordering::Acquire);
                let mut cur = first;
                let mut seen = 0usize;
                let mut skipped = false;
                while !list::is_nulls(cur) {
                    seen += 1;
                    if cur == UNSET || seen > m.max_entries * 2 + 16 {
                        // Stood on an element being reused, or followed recycled elements around: walk the
                        // bucket again.
                        continue 'restart;
                    }
                    let el = Elem(cur);
                    // Acquire: pairs with the claim CAS (AcqRel in `list::claim`).
                    if el.repl().load(Ordering::Acquire) == list::REPLACED {
                        // Its replacement is (or will be, if the head changes) at the head (`update_at_head`).
                        skipped = true;
                        // Acquire: as below.
                        cur = el.next().load(Ordering::Acquire) & !list::MARK;
                        continue;
                    }
                    let at = buf.len();
                    buf.resize(at + ks + vs, 0);
                    m.copy_key(cur, &mut buf[at..at + ks]);
                    el.copy_value(m.key_rup, &mut buf[at + ks..at + ks + vs]);
                    // Acquire: pairs with the Release CAS that linked the successor.
                    cur = el.next().load(Ordering::Acquire) & !list::MARK;
                }
                if list::nulls_index(cur) != idx {
                    m.counters.nulls_restarts.fetch_add(1, Ordering::Relaxed);
                    continue 'restart;
                }
                // Acquire: as above. A replacement linked at the head after we passed it: walk again.
                if skipped && b.load(Ordering::Acquire) != first {
                    continue 'restart;
                }
                break;
            }
            for kv in buf.chunks_exact(ks + vs) {
                f(&kv[..ks], &kv[ks..]);
            }
        }
    }

    /// Memory by the kernel's `htab_map_mem_usage` formula: the map struct, 16 B per bucket (8 B in lock-free
    /// mode, which has no bucket locks), the
    /// `map_locked` counters (MapLocked only, `4 * 8 * CPUs`), and the elements: preallocated
    /// `elem_size * (max_entries + CPUs)`, otherwise `elem_size * count` (the kernel adds 8 B per element for
    /// bpf_mem_alloc's header; an exact-size nolock cache has none).
    pub fn mem_usage(&self) -> usize {
        let m = &*self.inner;
        let ncpu = possible_cpus();
        let mut u = core::mem::size_of::<Inner>() + m.bucket_size * (m.mask + 1);
        if m.map_locked.is_some() {
            u += MapLockedCounters::formula_bytes(ncpu);
        }
        u += match &m.pool {
            Pool::Prealloc(_) => m.elem_size * (m.max_entries + ncpu),
            Pool::BpfMa(_) => (m.elem_size + crate::memalloc::LLIST_NODE_SZ) * m.count.load(Ordering::Relaxed),
            Pool::Nolock(_) => m.elem_size * m.count.load(Ordering::Relaxed),
        };
        u
    }

    /// Memory held now, measured: the map struct and buckets, plus the preallocated array or the slabs of
    /// the element cache (which include free objects cached per thread and, for grace-period backends,
    /// elements waiting for their grace period), or the bytes `BpfMemAlloc` took from `kmalloc`.
    ///
    /// # Context
    /// Any context; reads the cache's per-thread counters (O(threads)).
    pub fn mem_measured(&self) -> usize {
        let m = &*self.inner;
        let mut u = core::mem::size_of::<Inner>() + m.bucket_size * (m.mask + 1);
        u += match &m.pool {
            Pool::Prealloc(p) => p.bytes(),
            Pool::BpfMa(a) => a.mem_usage(),
            Pool::Nolock(p) => p.bytes(),
        };
        u
    }

    /// The element allocator of a `BpfMemAlloc` map (for its statistics).
    pub fn bpf_mem_alloc(&self) -> Option<&BpfMemAlloc> {
        match &self.inner.pool {
            Pool::BpfMa(a) => Some(a),
            _ => None,
        }
    }

    /// The accounting group, if any.
    pub fn group(&self) -> Option<&Arc<MemGroup>> {
        self.inner.group.as_ref()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let c = &self.inner.counters;
        let mut s = Stats::default();
        for (i, e) in c.errors.iter().enumerate() {
            s.errors[i] = e.load(Ordering::Relaxed);
        }
        s.nulls_restarts = c.nulls_restarts.load(Ordering::Relaxed);
        s.version_restarts = c.version_restarts.load(Ordering::Relaxed);
        s.completions = c.completions.load(Ordering::Relaxed);
        s.cas_restarts = c.cas_restarts.load(Ordering::Relaxed);
        s.count = self.len() as u64;
        s
    }

    /// The hash of `key` (tests: to pick keys that share a bucket or a `map_locked` slot).
    #[doc(hidden)]
    pub fn debug_hash(&self, key: &[u8]) -> u32 {
        self.inner.hash(key)
    }

    /// Count the elements reachable in the bucket of `key` that have `key` (tests: at most one unclaimed).
    #[doc(hidden)]
    pub fn debug_key_copies(&self, key: &[u8]) -> usize {
        let m = &*self.inner;
        let _g = m.read_lock();
        let hash = m.hash(key);
        let idx = hash as usize & m.mask;
        // Acquire: as in `get_next_key`.
        let mut cur = m.heads[idx].load(Ordering::Acquire);
        let mut n = 0;
        while !list::is_nulls(cur) && cur != UNSET {
            let el = Elem(cur);
            // Acquire: pairs with the claim CAS (AcqRel in `list::claim`).
            if el.repl().load(Ordering::Acquire) == 0 && el.key_matches(hash, key) {
                n += 1;
            }
            // Acquire: pairs with the Release CAS that linked the successor.
            cur = el.next().load(Ordering::Acquire) & !list::MARK;
        }
        n
    }
}

impl Inner {
    #[cold]
    fn fail<T>(&self, e: Error) -> Result<T, Error> {
        self.counters.errors[e.index()].fetch_add(1, Ordering::Relaxed);
        Err(e)
    }

    /// The key's hash (a 64-bit multiply-rotate over 8-byte words, folded to 32 bits).
    #[inline]
    fn hash(&self, key: &[u8]) -> u32 {
        let mut h = 0x9E37_79B9_7F4A_7C15u64 ^ (u64::from(self.seed) << 32) ^ key.len() as u64;
        let mut chunks = key.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_ne_bytes(c.try_into().unwrap());
            h = (h ^ w).wrapping_mul(0xff51_afd7_ed55_8ccd).rotate_left(31);
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            b[..rest.len()].copy_from_slice(rest);
            h = (h ^ u64::from_ne_bytes(b)).wrapping_mul(0xff51_afd7_ed55_8ccd).rotate_left(31);
        }
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^= h >> 29;
        h as u32
    }

    #[inline]
    fn read_lock(&self) -> ReadGuard<'static> {
        match self.srcu {
            Some(d) => ReadGuard::Srcu(d.read_lock_fast()),
            None => ReadGuard::Rcu(nolock::rcu_read_lock()),
        }
    }

    /// The least key of bucket `idx` greater than `after` (any key when `None`) in byte order, copied to `out`;
    /// false if there is none. One walk of the bucket's list inside the caller's read-side section. With
    /// immediate reuse an element may be reused for another key while it is read: a candidate counts only if
    /// its version was even and unchanged around the read and its hash is this bucket's, and a walk that ends
    /// in another bucket's nulls marker (carried there by a reused element), stands on an element being
    /// reused, or runs longer than any list can be, starts again (at most `SCAN_RETRIES` times; then what the
    /// last walk found is the answer).
    fn least_key_after(&self, idx: usize, after: Option<&[u8]>, out: &mut [u8]) -> bool {
        let mut found = false;
        'walk: for _ in 0..=SCAN_RETRIES {
            found = false;
            // Acquire: pairs with the Release CAS that linked the first element.
            let mut cur = self.heads[idx].load(Ordering::Acquire);
            let mut steps = 0usize;
            while !list::is_nulls(cur) {
                steps += 1;
                if cur == UNSET || steps > self.max_entries * 2 + 16 {
                    continue 'walk;
                }
                let el = Elem(cur);
                // Acquire: pairs with the Release stores of the even seq (`begin_init`/`end_init`).
                let s0 = el.seq().load(Ordering::Acquire);
                if s0 & 1 == 0 && el.hash().load(Ordering::Relaxed) as usize & self.mask == idx {
                    let k = el.key_ptr();
                    let above = after.is_none_or(|a| key_cmp(k, a).is_gt());
                    if above && (!found || key_cmp(k, out).is_lt()) {
                        self.copy_key(cur, out);
                        // Acquire fence: the copy happens before the version re-read (pairs with the Release
                        // fence in `begin_init`).
                        fence(Ordering::Acquire);
                        if el.seq().load(Ordering::Relaxed) != s0 {
                            continue 'walk;
                        }
                        found = true;
                    }
                }
                // Acquire: pairs with the Release CAS that linked the successor.
                cur = el.next().load(Ordering::Acquire) & !list::MARK;
            }
            if list::nulls_index(cur) != idx {
                self.counters.nulls_restarts.fetch_add(1, Ordering::Relaxed);
                continue 'walk;
            }
            return found;
        }
        found
    }

    fn copy_key(&self, e: usize, out: &mut [u8]) {
        let k = Elem(e).key_ptr();
        for (i, o) in out.iter_mut().enumerate() {
            // SAFETY: inside the key area of element memory (read-side section held by the caller).
            *o = unsafe { core::ptr::read_volatile(k.add(i)) };
        }
    }

    #[inline]
    fn find_reader(&self, key: &[u8]) -> Option<usize> {
        let hash = self.hash(key);
        if self.validate {
            return self.find_reader_validated(key, hash);
        }
        let idx = hash as usize & self.mask;
        let mut restarts = 0;
        // SAFETY: inside a read-side section (the callers hold a guard); element memory is type-stable.
        let r = unsafe {
            list::lookup(&ElemNodes, &self.heads[idx], idx, |e| Elem(e).key_matches(hash, key), &mut restarts)
        };
        if restarts != 0 {
            self.counters.nulls_restarts.fetch_add(restarts, Ordering::Relaxed);
        }
        r
    }

    #[inline]
    fn find_reader_validated(&self, key: &[u8], hash: u32) -> Option<usize> {
        let idx = hash as usize & self.mask;
        let mut restarts = 0;
        // SAFETY: as in `find_reader`.
        let r = unsafe {
            list::lookup(&ElemNodes, &self.heads[idx], idx, |e| Elem(e).stable_key_match(hash, key), &mut restarts)
        };
        if restarts != 0 {
            self.counters.nulls_restarts.fetch_add(restarts, Ordering::Relaxed);
        }
        r
    }

    /// Run a writer `op` on `key`'s bucket under the map's lock mode, inside one IRQs-off region; retire what
    /// it unlinked after the lock is released.
    #[inline]
    fn locked_op<R>(
        &self,
        key: &[u8],
        op: impl FnOnce(&Inner, &AtomicUsize, usize, u32, &mut Unlinked, &mut WalkStats) -> Result<R, Error>,
    ) -> Result<R, Error> {
        let _irq = crate::cpu::IrqRegion::enter();
        let hash = self.hash(key);
        let idx = hash as usize & self.mask;
        let b = &self.heads[idx];
        let mut un = Unlinked { items: [0; 4], n: 0 };
        let mut ws = WalkStats::default();
        let r = match self.lock {
            LockMode::MapLocked => {
                let c = self.map_locked.as_ref().map(|m| m.enter(hash)).transpose()?;
                let l = &self.locks[idx];
                l.raw_lock();
                point(Point::Locked);
                let r = op(self, b, idx, hash, &mut un, &mut ws);
                l.unlock();
                if let Some(c) = c {
                    c.fetch_sub(1, Ordering::Relaxed);
                }
                r
            }
            LockMode::Rqspin => {
                let l = &self.locks[idx];
                l.rqspin_lock()?;
                point(Point::Locked);
                let r = op(self, b, idx, hash, &mut un, &mut ws);
                l.unlock();
                r
            }
            LockMode::LockFree => {
                let _g = self.read_lock();
                point(Point::Locked);
                op(self, b, idx, hash, &mut un, &mut ws)
            }
        };
        for &e in &un.items[..un.n] {
            point(Point::BeforeRetire);
            self.retire(e);
        }
        if ws.nulls_restarts != 0 || ws.helped != 0 || ws.cas_restarts != 0 {
            let c = &self.counters;
            c.nulls_restarts.fetch_add(ws.nulls_restarts, Ordering::Relaxed);
            c.completions.fetch_add(ws.helped, Ordering::Relaxed);
            c.cas_restarts.fetch_add(ws.cas_restarts, Ordering::Relaxed);
        }
        r
    }

    /// Take a new element: `replacing` = for the update of an existing key (Prealloc's spare).
    #[inline]
    fn alloc(&self, replacing: bool) -> Result<usize, Error> {
        match &self.pool {
            Pool::Prealloc(p) => {
                let e = if replacing { p.take_extra() } else { p.pop() };
                e.ok_or(Error::Full)
            }
            Pool::BpfMa(a) => a.cache_alloc().map(|p| p.as_ptr() as usize).ok_or(Error::NoMem),
            Pool::Nolock(p) => {
                if let Some(g) = &self.group
                    && g.try_charge(self.elem_charge).is_err()
                {
                    return Err(Error::NoMem);
                }
                p.alloc().ok_or_else(|| {
                    if let Some(g) = &self.group {
                        g.uncharge(self.elem_charge);
                        g.note_oom();
                    }
                    Error::NoMem
                })
            }
        }
    }

    /// Uncharge one nolock-cache element (it is freed now, or handed to `kfree_rcu`).
    #[inline]
    fn uncharge_elem(&self) {
        if let Some(g) = &self.group
            && self.elem_charge != 0
        {
            g.uncharge(self.elem_charge);
        }
    }

    /// Give back an element that was never published.
    #[inline]
    fn free_private(&self, e: usize, replacing: bool) {
        // SAFETY: `e` was never reachable from a list.
        unsafe { self.free_now(e, replacing) };
    }

    /// # Safety
    /// No walk can reach `e` any more.
    #[inline]
    unsafe fn free_now(&self, e: usize, replaced: bool) {
        match &self.pool {
            Pool::Prealloc(p) => p.free(e, replaced),
            // SAFETY: per the caller; element addresses are never 0 and came from this allocator.
            Pool::BpfMa(a) => unsafe { a.cache_free(NonNull::new_unchecked(e as *mut u8)) },
            Pool::Nolock(p) => {
                self.uncharge_elem();
                // SAFETY: per the caller.
                unsafe { p.free_now(e) }
            }
        }
    }

    /// Retire an element this context unlinked.
    #[inline]
    fn retire(&self, e: usize) {
        let el = Elem(e);
        match self.retire {
            Retire::Immediate => {
                let replaced = el.repl().load(Ordering::Relaxed) != DEL;
                // SAFETY: unlinked under the bucket lock; readers revalidate (nulls, version).
                unsafe { self.free_now(e, replaced) }
            }
            Retire::PoolAfterRcu => {
                el.owner().store(self as *const Inner as usize, Ordering::Relaxed);
                // SAFETY: the head is inside the unlinked element, untouched until the callback runs; the map
                // waits for callbacks (rcu_barrier) before it is freed.
                unsafe { nolock::call_rcu_nolock(el.rcu(), pool_after_gp) };
            }
            Retire::KfreeRcu => {
                self.uncharge_elem();
                // SAFETY: an unlinked element of a nolock cache; freed once, after the grace period.
                unsafe { nolock::kfree_rcu_nolock(e as *mut u8, el.rcu()) }
            }
            Retire::KfreeSrcu(d) => {
                self.uncharge_elem();
                // SAFETY: as above.
                unsafe { nolock::kfree_srcu_fast_nolock(d, e as *mut u8, el.rcu()) }
            }
        }
    }

    /// Count a new element against `max_entries`.
    #[inline]
    fn count_inc(&self) -> Result<(), Error> {
        // Relaxed: a counter; the kernel's `inc_elem_count` is a plain atomic too.
        if self.count.fetch_add(1, Ordering::Relaxed) >= self.max_entries {
            self.count.fetch_sub(1, Ordering::Relaxed);
            return Err(Error::Full);
        }
        Ok(())
    }

    #[inline]
    fn count_dec(&self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }

    #[inline]
    fn init_elem(&self, e: usize, hash: u32, key: &[u8], value: &[u8]) {
        let el = Elem(e);
        let odd = el.begin_init();
        el.repl().store(0, Ordering::Relaxed);
        el.next().store(UNSET, Ordering::Relaxed);
        el.write(hash, key, self.key_rup, value, self.value_rup);
        el.end_init(odd);
    }

    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn update_in(
        &self,
        b: &AtomicUsize,
        idx: usize,
        hash: u32,
        key: &[u8],
        value: &[u8],
        flags: UpdateFlags,
        un: &mut Unlinked,
        ws: &mut WalkStats,
    ) -> Result<(), Error> {
        // The new element (and whether it was taken as a spare for a replace), and whether it was counted.
        let mut new: Option<(usize, bool)> = None;
        let mut counted = false;
        let want = match flags {
            UpdateFlags::Any => list::Want::Any,
            UpdateFlags::NoExist => list::Want::NoExist,
            UpdateFlags::Exist => list::Want::Exist,
        };
        let get = |replacing: bool| -> Result<usize, Error> {
            if !replacing && !counted {
                self.count_inc()?;
                counted = true;
            }
            if let Some((e, _)) = new {
                return Ok(e);
            }
            let e = self.alloc(replacing)?;
            self.init_elem(e, hash, key, value);
            new = Some((e, replacing));
            Ok(e)
        };
        let mut retire = |e: usize| un.push(self, e);
        let matches = |e: usize| Elem(e).key_matches(hash, key);
        // SAFETY: the caller holds the bucket lock (locked modes) or a read-side section (lock-free mode, where
        // unlinked elements are reused only after a grace period). Removed elements reused at once (locked
        // modes only) need the kernel's order, a replacement linked at the head: see `list::update_at_head`.
        let r = unsafe {
            if matches!(self.retire, Retire::Immediate) {
                list::update_at_head(&ElemNodes, b, idx, matches, want, get, &mut retire, ws)
            } else {
                list::update(&ElemNodes, b, idx, matches, want, get, &mut retire, ws)
            }
        };
        let (keep, err) = match r {
            Ok(list::Done::Inserted) => (true, None),
            Ok(list::Done::Replaced) => {
                if counted {
                    self.count_dec();
                }
                return Ok(());
            }
            Ok(list::Done::Exists) => (false, Some(Error::Exists)),
            Ok(list::Done::NotFound) => (false, Some(Error::NotFound)),
            Err(e) => (false, Some(e)),
        };
        if keep {
            return Ok(());
        }
        if let Some((e, r)) = new {
            self.free_private(e, r);
        }
        if counted {
            self.count_dec();
        }
        Err(err.unwrap_or(Error::Invalid))
    }

    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn delete_in(
        &self,
        b: &AtomicUsize,
        idx: usize,
        hash: u32,
        key: &[u8],
        out: Option<&mut [u8]>,
        un: &mut Unlinked,
        ws: &mut WalkStats,
    ) -> Result<(), Error> {
        let mut retire = |e: usize| un.push(self, e);
        let claimed = |e: usize| {
            if let Some(o) = out {
                Elem(e).copy_value(self.key_rup, o);
            }
            self.count_dec();
        };
        // SAFETY: as in `update_in`.
        let found =
            unsafe { list::delete(&ElemNodes, b, idx, |e| Elem(e).key_matches(hash, key), claimed, &mut retire, ws) };
        if found { Ok(()) } else { Err(Error::NotFound) }
    }
}

/// Grace-period callback: give an element back to its map's pool.
///
/// # Safety
/// `head` is the `RcuHead` of an element retired by `Inner::retire` (`PoolAfterRcu`), whose map is alive
/// (maps wait for their callbacks before they are freed).
unsafe fn pool_after_gp(head: NonNull<RcuHead>) {
    let e = head.as_ptr() as usize - elem::OFF_RCU;
    let el = Elem(e);
    // SAFETY: per the contract; the owner was stored before `call_rcu_nolock`, which orders it before us.
    let m = unsafe { &*(el.owner().load(Ordering::Relaxed) as *const Inner) };
    let replaced = el.repl().load(Ordering::Relaxed) != DEL;
    // SAFETY: a grace period passed since the element was unlinked: no walk can reach it.
    unsafe { m.free_now(e, replaced) };
}

impl Drop for HashMap {
    /// Free every element, wait for the grace-period callbacks of removed ones, and release the pool.
    ///
    /// # Context
    /// Normal context: waits for grace periods (`rcu_barrier`, the SRCU domain's barrier) and destroys the
    /// element cache.
    fn drop(&mut self) {
        let m = &mut *self.inner;
        for b in m.heads.iter() {
            // Acquire (here and below): pairs with the Release CASes that linked the elements.
            let mut cur = b.load(Ordering::Acquire);
            while !list::is_nulls(cur) {
                let next = Elem(cur).next().load(Ordering::Acquire) & !list::MARK;
                // SAFETY: we own the map: no operation runs, so nothing can reach the element after this.
                unsafe { m.free_now(cur, false) };
                cur = next;
            }
        }
        // Callbacks and kfree_rcu blocks that still name this map's elements.
        nolock::rcu_barrier();
        if let Some(d) = m.srcu {
            d.barrier();
        }
        let cache = match &mut m.pool {
            Pool::Nolock(p) => p.cache.take(),
            Pool::Prealloc(p) => p.overflow.as_mut().and_then(|o| o.cache.take()),
            Pool::BpfMa(_) => None,
        };
        if let Some(c) = cache {
            let _ = c.destroy();
        }
        if let Some(g) = &m.group {
            g.uncharge(m.fixed_charge);
        }
    }
}
