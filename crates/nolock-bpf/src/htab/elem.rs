//! The element layout (the kernel's `htab_elem`) and the reads of element fields that readers race with.
//!
//! ```text
//! offset  0  next     AtomicUsize  nulls-list link (bit 1: frozen), see `list`
//!         8  repl     AtomicUsize  removal claim: 0, DEL, or the replacing element
//!        16  rcu      RcuHead      16 B: grace-period callback link; while free, the free-list link
//!                                  (Prealloc's u32 index link, or a slab's free pointer)
//!        32  seq      AtomicU32    version: odd while the element is (re)initialised, even when published
//!        36  hash     AtomicU32    the key's hash
//!        40  owner    usize        the map (for grace-period callbacks that give an element back)
//!        48  key      rup8(key_size) bytes, zero-padded
//!  48+rup8(key) value rup8(value_size) bytes
//! ```
//!
//! 48 bytes of header, as the kernel's; `elem_size = 48 + rup8(key) + rup8(value)`. Every field a lockless
//! reader probes (`next`, `seq`, `hash`, key) is outside the free-list link, so it keeps its meaning across a
//! free and a reuse in type-stable memory.

use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering, fence};

use nolock::RcuHead;

/// Header size.
pub const HDR: usize = 48;
/// Offset of `next`.
pub const OFF_NEXT: usize = 0;
/// Offset of `repl`.
pub const OFF_REPL: usize = 8;
/// Offset of the `RcuHead` (and of the free-list link while the element is free).
pub const OFF_RCU: usize = 16;
/// Offset of `seq`.
pub const OFF_SEQ: usize = 32;
/// Offset of `hash`.
pub const OFF_HASH: usize = 36;
/// Offset of `owner`.
pub const OFF_OWNER: usize = 40;

const _: () = assert!(core::mem::size_of::<RcuHead>() == 16);

/// Round up to a multiple of 8.
#[inline]
pub const fn rup8(n: usize) -> usize {
    (n + 7) & !7
}

/// Field accessors on an element address. Every function requires `e` to point to element memory of the map
/// (live or free, never unmapped while the caller's protection holds).
#[derive(Clone, Copy)]
pub struct Elem(pub usize);

impl Elem {
    /// `next`.
    #[inline]
    pub fn next<'a>(self) -> &'a AtomicUsize {
        // SAFETY: element memory stays mapped and 8-aligned while the caller's protection holds (type).
        unsafe { &*((self.0 + OFF_NEXT) as *const AtomicUsize) }
    }
    /// `repl`.
    #[inline]
    pub fn repl<'a>(self) -> &'a AtomicUsize {
        // SAFETY: as in `next`.
        unsafe { &*((self.0 + OFF_REPL) as *const AtomicUsize) }
    }
    /// The `RcuHead`.
    #[inline]
    pub fn rcu(self) -> core::ptr::NonNull<RcuHead> {
        // SAFETY: element addresses are never 0, so this is not null.
        unsafe { core::ptr::NonNull::new_unchecked((self.0 + OFF_RCU) as *mut RcuHead) }
    }
    /// The free-list link of Prealloc (an index link).
    #[inline]
    pub fn free_link<'a>(self) -> &'a AtomicU32 {
        // SAFETY: as in `next`.
        unsafe { &*((self.0 + OFF_RCU) as *const AtomicU32) }
    }
    /// `seq`.
    #[inline]
    pub fn seq<'a>(self) -> &'a AtomicU32 {
        // SAFETY: as in `next`.
        unsafe { &*((self.0 + OFF_SEQ) as *const AtomicU32) }
    }
    /// `hash`.
    #[inline]
    pub fn hash<'a>(self) -> &'a AtomicU32 {
        // SAFETY: as in `next`.
        unsafe { &*((self.0 + OFF_HASH) as *const AtomicU32) }
    }
    /// `owner`.
    #[inline]
    pub fn owner<'a>(self) -> &'a AtomicUsize {
        // SAFETY: as in `next`.
        unsafe { &*((self.0 + OFF_OWNER) as *const AtomicUsize) }
    }
    /// The key bytes.
    #[inline]
    pub fn key_ptr(self) -> *mut u8 {
        (self.0 + HDR) as *mut u8
    }
    /// The value bytes (`key_rup` = rup8(key size)).
    #[inline]
    pub fn value_ptr(self, key_rup: usize) -> *mut u8 {
        (self.0 + HDR + key_rup) as *mut u8
    }

    /// Whether the element's key equals `key` (hash first). Reads that may race with a reuse of the element
    /// are volatile; the caller revalidates when it must (see [`Elem::stable_key_match`]).
    #[inline]
    pub fn key_matches(self, hash: u32, key: &[u8]) -> bool {
        if self.hash().load(Ordering::Relaxed) != hash {
            return false;
        }
        let p = self.key_ptr();
        let words = key.len() / 8;
        for i in 0..words {
            // SAFETY: the key area holds rup8(key.len()) bytes; 8-aligned (header and key sizes are).
            let w = unsafe { core::ptr::read_volatile((p as *const u64).add(i)) };
            if w != u64::from_ne_bytes(key[i * 8..i * 8 + 8].try_into().unwrap()) {
                return false;
            }
        }
        for (i, &b) in key.iter().enumerate().skip(words * 8) {
            // SAFETY: inside the key area.
            if unsafe { core::ptr::read_volatile(p.add(i)) } != b {
                return false;
            }
        }
        true
    }

    /// The element's key equals `key` and the element was not reinitialised while we compared: the seq was
    /// even and unchanged around the comparison.
    #[inline]
    pub fn stable_key_match(self, hash: u32, key: &[u8]) -> bool {
        // Acquire: pairs with the Release store of the even seq in `begin_init`/`end_init` (the key written
        // before it is visible).
        let s0 = self.seq().load(Ordering::Acquire);
        if s0 & 1 != 0 || !self.key_matches(hash, key) {
            return false;
        }
        // Acquire fence: the key reads above happen before the re-read of seq (seqlock reader side; pairs
        // with the Release fence in `begin_init`).
        fence(Ordering::Acquire);
        self.seq().load(Ordering::Relaxed) == s0
    }

    /// Start (re)initialising a private element: seq becomes odd. Returns the odd value.
    #[inline]
    pub fn begin_init(self) -> u32 {
        let s = self.seq().load(Ordering::Relaxed);
        let odd = s.wrapping_add(1) | 1;
        self.seq().store(odd, Ordering::Relaxed);
        // Release fence: readers that see any of the writes below also see the odd seq (pairs with the Acquire
        // fence in `stable_key_match` / `copy_value_checked`).
        fence(Ordering::Release);
        odd
    }

    /// End initialising: seq becomes even.
    #[inline]
    pub fn end_init(self, odd: u32) {
        // Release: pairs with the Acquire load of seq by readers; the key, hash and value are visible before.
        self.seq().store(odd.wrapping_add(1), Ordering::Release);
    }

    /// Write key, hash and value of a private element (between `begin_init` and `end_init`).
    #[inline]
    pub fn write(self, hash: u32, key: &[u8], key_rup: usize, value: &[u8], value_rup: usize) {
        self.hash().store(hash, Ordering::Relaxed);
        let k = self.key_ptr();
        let v = self.value_ptr(key_rup);
        // SAFETY: the element holds key_rup + value_rup bytes after the header; the element is private (a
        // stale reader may read these bytes concurrently with volatile reads and revalidates with seq).
        unsafe {
            core::ptr::copy_nonoverlapping(key.as_ptr(), k, key.len());
            core::ptr::write_bytes(k.add(key.len()), 0, key_rup - key.len());
            core::ptr::copy_nonoverlapping(value.as_ptr(), v, value.len());
            core::ptr::write_bytes(v.add(value.len()), 0, value_rup - value.len());
        }
    }

    /// Copy the value out with volatile reads (it may be written concurrently by users or by a reuse).
    #[inline]
    pub fn copy_value(self, key_rup: usize, out: &mut [u8]) {
        // SAFETY: the value area of this element holds at least `out.len()` bytes (callers copy at most the
        // value size), 8-aligned (the header and `key_rup` are multiples of 8).
        unsafe { copy_value_at(self.value_ptr(key_rup), out) }
    }
}

/// Copy `out.len()` bytes of the value at `v` with volatile reads, word by word where whole words fit (a word
/// written concurrently with one atomic store is never torn).
///
/// # Safety
/// `v` is 8-aligned and `out.len()` bytes from it are readable (element memory under the caller's protection).
#[inline]
pub unsafe fn copy_value_at(v: *const u8, out: &mut [u8]) {
    let words = out.len() / 8;
    for i in 0..words {
        // SAFETY: per the contract, inside the value area, 8-aligned.
        let w = unsafe { core::ptr::read_volatile((v as *const u64).add(i)) };
        out[i * 8..i * 8 + 8].copy_from_slice(&w.to_ne_bytes());
    }
    for (i, o) in out.iter_mut().enumerate().skip(words * 8) {
        // SAFETY: per the contract, inside the value area.
        *o = unsafe { core::ptr::read_volatile(v.add(i)) };
    }
}
