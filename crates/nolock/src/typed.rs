//! [`TypedCache<T>`]: a [`KmemCache`] of `T`s that hands out owners ([`CacheBox`]) instead of raw pointers.
//!
//! The untyped [`KmemCache`] keeps its name (it is the kernel's `kmem_cache`, sized by a `Layout` at run time);
//! the typed one is a separate type rather than `KmemCache<T = ()>` so that the untyped API, its raw-pointer
//! methods and every existing caller stay exactly as they are.
//!
//! ```
//! use nolock::typed::TypedCache;
//!
//! #[derive(Debug, PartialEq)]
//! struct Packet { len: u32, data: [u8; 60] }
//!
//! let cache = TypedCache::<Packet>::new("packets").unwrap();
//! let mut p = cache.alloc(Packet { len: 3, data: [0; 60] }).expect("out of memory");
//! p.data[..3].copy_from_slice(b"abc");
//! assert_eq!(p.len, 3);
//! drop(p); // dropped in place, and the memory goes back to the cache
//! assert_eq!(cache.stats().frees, 1);
//! ```

use core::alloc::Layout;
use core::fmt;
use core::marker::PhantomData;
use core::mem::ManuallyDrop;
use core::ops::{Deref, DerefMut};
use core::ptr::NonNull;

use crate::page::Gfp;
use crate::slab::KmemCache;
use crate::slab::cache::{CacheError, CacheStats};

/// A cache of `T`s (see the module documentation). Allocation and free are safe from any context; `T`'s
/// destructor runs where the owner is dropped (so it must be safe there).
pub struct TypedCache<T> {
    cache: KmemCache,
    _holds: PhantomData<fn() -> T>,
}

/// The layout of a cache object for `T` (zero-sized types get one byte: a cache needs a size).
fn layout_of<T>() -> Layout {
    let l = Layout::new::<T>();
    if l.size() == 0 {
        // A one-byte object aligned as T: valid since T's alignment is a power of two.
        Layout::from_size_align(1, l.align()).unwrap_or(l)
    } else {
        l
    }
}

impl<T> TypedCache<T> {
    /// A cache named `name` for objects of type `T`.
    ///
    /// # Errors
    /// As [`KmemCache::new`]: `T` too large for a slab object, an alignment above the cache maximum, the cache
    /// table full, or nolock unable to start.
    ///
    /// # Context
    /// Normal context (see [`KmemCache::new`]).
    pub fn new(name: &str) -> Result<Self, CacheError> {
        Ok(Self { cache: KmemCache::new(name, layout_of::<T>())?, _holds: PhantomData })
    }

    /// A typed cache over a cache built with more options (type-safe flags, debug, hardened...); the cache's
    /// object size and alignment must fit `T` (checked once here).
    ///
    /// # Errors
    /// [`CacheError::BadSize`] when `cache`'s objects are smaller than `T`; [`CacheError::BadAlign`] when an
    /// object it hands out is not aligned for `T` (checked on one object).
    ///
    /// # Context
    /// Any context (allocates and frees one object to check the alignment).
    pub fn from_cache(cache: KmemCache) -> Result<Self, CacheError> {
        let l = layout_of::<T>();
        if cache.object_size() < l.size() {
            return Err(CacheError::BadSize);
        }
        if let Some(p) = cache.alloc_nolock(Gfp::NONE) {
            let aligned = (p.as_ptr() as usize).is_multiple_of(l.align());
            // SAFETY: just allocated from this cache, not used.
            unsafe { cache.free_nolock(p) };
            if !aligned {
                return Err(CacheError::BadAlign);
            }
        }
        Ok(Self { cache, _holds: PhantomData })
    }

    /// Move `value` into an object of the cache. On out-of-memory, the value is handed back.
    #[inline]
    pub fn alloc(&self, value: T) -> Result<CacheBox<'_, T>, T> {
        match self.cache.alloc_nolock(Gfp::NONE) {
            Some(p) => {
                let ptr = p.cast::<T>();
                // SAFETY: a fresh object of at least T's size, aligned for T (the cache's layout is T's).
                unsafe { ptr.as_ptr().write(value) };
                Ok(CacheBox { cache: self, ptr })
            }
            None => Err(value),
        }
    }

    /// Like [`alloc`](Self::alloc), building the value in place with `f` only once the memory is there (`None`
    /// on out-of-memory; `f` is then not called).
    ///
    /// # Context
    /// Any context, if `f` is.
    pub fn alloc_with(&self, f: impl FnOnce() -> T) -> Option<CacheBox<'_, T>> {
        let p = self.cache.alloc_nolock(Gfp::NONE)?;
        let ptr = p.cast::<T>();
        /// Gives the object back if `f` panics.
        struct Undo<'a>(&'a KmemCache, NonNull<u8>);
        impl Drop for Undo<'_> {
            fn drop(&mut self) {
                // SAFETY: an object of this cache that was never handed out.
                unsafe { self.0.free_nolock(self.1) };
            }
        }
        let undo = Undo(&self.cache, p);
        let v = f();
        core::mem::forget(undo);
        // SAFETY: as in `alloc`.
        unsafe { ptr.as_ptr().write(v) };
        Some(CacheBox { cache: self, ptr })
    }

    /// The untyped cache underneath.
    pub fn as_kmem_cache(&self) -> &KmemCache {
        &self.cache
    }

    /// The cache's counters.
    ///
    /// # Context
    /// Any context (reads counters; O(threads)).
    pub fn stats(&self) -> CacheStats {
        self.cache.stats()
    }
}

impl<T> fmt::Debug for TypedCache<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TypedCache").field("cache", &self.cache).finish()
    }
}

/// An owned `T` in an object of a [`TypedCache`]: dropping it drops the `T` and frees the object into its
/// cache. It borrows the cache, so the cache outlives every owner.
pub struct CacheBox<'c, T> {
    cache: &'c TypedCache<T>,
    ptr: NonNull<T>,
}

// SAFETY: the box owns its T exclusively (like Box); the cache reference is used only to free, which any thread
// may do. TypedCache<T> is Sync (its KmemCache is).
unsafe impl<T: Send> Send for CacheBox<'_, T> {}
// SAFETY: shared access gives only &T.
unsafe impl<T: Sync> Sync for CacheBox<'_, T> {}

impl<'c, T> CacheBox<'c, T> {
    /// Take the value out and free the object.
    pub fn into_inner(b: Self) -> T {
        let b = ManuallyDrop::new(b);
        // SAFETY: we own a valid T; read once, then the object is freed without dropping it again.
        unsafe {
            let v = b.ptr.as_ptr().read();
            b.cache.cache.free_nolock(b.ptr.cast());
            v
        }
    }

    /// Give up ownership without freeing (see [`CacheBox::from_raw`]).
    pub fn into_raw(b: Self) -> NonNull<T> {
        ManuallyDrop::new(b).ptr
    }

    /// Take ownership of a pointer from [`CacheBox::into_raw`].
    ///
    /// # Safety
    /// `ptr` came from `CacheBox::into_raw` of a box of `cache`, and nothing else owns it.
    pub unsafe fn from_raw(cache: &'c TypedCache<T>, ptr: NonNull<T>) -> Self {
        Self { cache, ptr }
    }

    /// The cache the object belongs to.
    pub fn cache(b: &Self) -> &'c TypedCache<T> {
        b.cache
    }
}

impl<T> Drop for CacheBox<'_, T> {
    fn drop(&mut self) {
        // SAFETY: we own a valid T in an object of this cache; dropped once, then the object is freed.
        unsafe {
            core::ptr::drop_in_place(self.ptr.as_ptr());
            self.cache.cache.free_nolock(self.ptr.cast());
        }
    }
}

impl<T> Deref for CacheBox<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: we own a valid T.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> DerefMut for CacheBox<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: we own a valid T exclusively.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T: fmt::Debug> fmt::Debug for CacheBox<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl<T: PartialEq> PartialEq for CacheBox<'_, T> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}
