//! Page descriptors: the side table that maps any arena address to what lives there, in O(1).
//!
//! One 32-byte [`PageDesc`] per arena page, indexed by page number (the userspace `struct page`). The `info`
//! word says what the page belongs to; slabs keep their free-list state and partial-list link in the descriptor
//! of their first ("head") page, so no allocator metadata ever lives inside user memory except the link word of
//! a free object.
//!
//! Which descriptors are written:
//! - every page of a slab: kind `SLAB`, cache id, head page (so an interior pointer finds its slab);
//! - only the head page of a large kmalloc run or an `alloc_pages_nolock` run: kind `LARGE`/`PAGES` and the
//!   run length; its other pages keep kind `FREE`, so a pointer into them is reported as not allocated;
//! - on release, the same descriptors go back to `FREE` before the pages return to the bitmap.

use crate::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use crate::sync::slab_freelist::SlabFreelist;

/// What a page is used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Not allocated (or a non-head page of a large run).
    Free = 0,
    /// Part of a slab of a `KmemCache`.
    Slab = 1,
    /// Head of a large `kmalloc_nolock` run (above the largest size class).
    Large = 2,
    /// Head of an `alloc_pages_nolock` run.
    Pages = 3,
}

/// In the kind byte (kinds need two bits): the slab ends in a free map (the slab layer's `FLAG_MAP_KEY`).
const MAPPED_BIT: u64 = 1 << 7;
/// The kind byte without [`MAPPED_BIT`].
const KIND_MASK: u64 = 0x7f;
const DEBUG_BIT: u64 = 1 << 8;
const STRIDE_SHIFT_BIT: u32 = 9;
const KEYED_BIT: u64 = 1 << 15;

/// Decoded `info` word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Info(pub u64);

impl Info {
    /// Build an info word.
    #[inline]
    pub fn new(kind: Kind, cache_id: u16, head: u32) -> Self {
        Self(kind as u64 | (u64::from(cache_id) << 16) | (u64::from(head) << 32))
    }

    /// Info word of a slab page; `debug` marks slabs of debug caches so that the free fast path can route
    /// them to the checked path without looking at the cache; `stride_shift` is log2 of the object stride when
    /// every address of the slab that is a multiple of the stride is an object (0: check by division); `keyed`
    /// marks slabs of caches whose free objects carry the free key, so that the free fast path knows without
    /// looking at the cache; `mapped` marks slabs that end in a free map (the same mark kept outside the
    /// objects).
    #[inline]
    pub fn slab(cache_id: u16, head: u32, debug: bool, stride_shift: u32, keyed: bool, mapped: bool) -> Self {
        debug_assert!(stride_shift < 64);
        Self(
            Self::new(Kind::Slab, cache_id, head).0
                | if debug { DEBUG_BIT } else { 0 }
                | if keyed { KEYED_BIT } else { 0 }
                | if mapped { MAPPED_BIT } else { 0 }
                | (u64::from(stride_shift) << STRIDE_SHIFT_BIT),
        )
    }

    /// A slab of a cache whose free objects carry the free key (the slab layer's `FLAG_FREE_KEY`).
    #[inline(always)]
    pub fn is_keyed(self) -> bool {
        self.0 & KEYED_BIT != 0
    }

    /// A slab that ends in a free map (the slab layer's `FLAG_MAP_KEY`).
    #[inline(always)]
    pub fn is_mapped(self) -> bool {
        self.0 & MAPPED_BIT != 0
    }

    /// log2 of the stride if objects sit exactly at the multiples of a power-of-two stride (0: not so).
    #[inline(always)]
    pub fn stride_shift(self) -> u32 {
        ((self.0 >> STRIDE_SHIFT_BIT) & 0x3f) as u32
    }

    /// A slab page of a non-debug cache (the free fast path's one test).
    #[inline(always)]
    pub fn is_plain_slab(self) -> bool {
        self.0 & (KIND_MASK | DEBUG_BIT) == Kind::Slab as u64
    }
    /// The page's kind.
    #[inline]
    pub fn kind(self) -> Kind {
        match self.0 & KIND_MASK {
            1 => Kind::Slab,
            2 => Kind::Large,
            3 => Kind::Pages,
            _ => Kind::Free,
        }
    }
    /// Whether this is a page of a slab of cache `cache_id` (kind and cache id in one compare, for list walks).
    #[inline(always)]
    pub fn is_slab_of(self, cache_id: u16) -> bool {
        self.0 & (0xffff_0000 | KIND_MASK) == (u64::from(cache_id) << 16) | Kind::Slab as u64
    }
    /// Cache id (slab pages).
    #[inline]
    pub fn cache_id(self) -> u16 {
        (self.0 >> 16) as u16
    }
    /// Page index of the slab's (or run's) first page.
    #[inline]
    pub fn head(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

/// The descriptor of one arena page. Zeroed memory is a free page.
#[repr(C, align(32))]
#[derive(Debug, Default)]
pub struct PageDesc {
    /// [`Info`]: kind, cache id, head page.
    pub info: AtomicU64,
    /// Slab head pages: the slab's free list and counters.
    pub slab: SlabFreelist,
    /// Slab head pages: link in the cache's partial list (`TaggedStack` encoding).
    pub next: AtomicU32,
    /// Slab head pages: shard id + 1 of the thread that last took the slab's objects (0: none).
    pub owner: AtomicU32,
    /// Large / pages runs: run length in pages.
    pub npages: AtomicU64,
}

impl PageDesc {
    /// The current info word. `Acquire`: pairs with the `Release` store that published the page's owner.
    #[inline]
    pub fn info(&self) -> Info {
        Info(self.info.load(Ordering::Acquire))
    }

    /// The descriptor's last 16 bytes (`next`, `owner`, `npages`) as an `rcu_head`: only while the page is the
    /// head of a dead slab waiting for a grace period, when nothing else uses those fields (the kernel's
    /// `struct slab` overlays its `rcu_head` the same way).
    pub fn rcu_head(&self) -> core::ptr::NonNull<crate::sync::rcu_head::RcuHead> {
        core::ptr::NonNull::from(&self.next).cast()
    }

    /// Publish what this page now belongs to. `Release`: pairs with [`PageDesc::info`].
    #[inline]
    pub fn set_info(&self, info: Info) {
        self.info.store(info.0, Ordering::Release);
    }
}

const _: () = assert!(core::mem::size_of::<PageDesc>() == 32);
const _: () = assert!(core::mem::offset_of!(PageDesc, next) == 16 && core::mem::offset_of!(PageDesc, npages) == 24);
