//! Safe owners for nolock memory: [`NBox`], a `Box` whose allocation and free are safe from any context.

use core::alloc::Layout;
use core::fmt;
use core::marker::PhantomData;
use core::mem::{ManuallyDrop, MaybeUninit};
use core::ops::{Deref, DerefMut};
use core::ptr::NonNull;

use crate::page::Gfp;
use crate::slab::kmalloc::{kfree_nolock, kmalloc_layout_nolock};

/// A pointer type that owns a value in nolock memory, like `Box<T>`, but whose allocation (`try_new`) and
/// drop are async-signal-safe: usable in signal handlers, real-time threads and under arbitrary locks.
///
/// Allocation is fallible (`try_*` constructors): on out-of-memory the value is handed back, and so it is when
/// `T`'s alignment is above what the arena can give (its size rounded up to a power of two; see
/// [`PageStats::max_align`](crate::page::PageStats::max_align)): the memory is never misaligned. Dropping runs
/// `T`'s destructor (which must itself be safe in the context where the drop happens) and frees the memory
/// with `kfree_nolock`.
///
/// ```
/// use nolock::NBox;
///
/// let b = NBox::try_new([1u32, 2, 3]).expect("out of memory");
/// assert_eq!(b.iter().sum::<u32>(), 6);
/// let s: NBox<[u8]> = NBox::try_from_slice(b"signal-safe bytes").unwrap();
/// assert_eq!(&s[..6], b"signal");
/// let text = NBox::<str>::try_from_str("hello").unwrap();
/// assert_eq!(&*text, "hello");
/// ```
pub struct NBox<T: ?Sized> {
    ptr: NonNull<T>,
    _owns: PhantomData<T>,
}

// SAFETY: NBox owns its T exclusively, like Box.
unsafe impl<T: ?Sized + Send> Send for NBox<T> {}
// SAFETY: shared access to NBox only gives &T, like Box.
unsafe impl<T: ?Sized + Sync> Sync for NBox<T> {}

fn alloc_for(layout: Layout, flags: Gfp) -> Option<NonNull<u8>> {
    if layout.size() == 0 {
        // Zero-sized: no memory needed; a dangling pointer with the right alignment.
        return NonNull::new(layout.align() as *mut u8);
    }
    kmalloc_layout_nolock(layout, flags)
}

impl<T> NBox<T> {
    /// Move `value` into nolock memory. On out-of-memory, returns the value back.
    ///
    /// # Context
    /// Any context (see `kmalloc_nolock`).
    pub fn try_new(value: T) -> Result<Self, T> {
        match alloc_for(Layout::new::<T>(), Gfp::NONE) {
            Some(p) => {
                let ptr = p.cast::<T>();
                // SAFETY: `ptr` is fresh memory of T's size and alignment.
                unsafe { ptr.as_ptr().write(value) };
                Ok(Self { ptr, _owns: PhantomData })
            }
            None => Err(value),
        }
    }

    /// Zeroed, uninitialised memory for a `T`.
    pub fn try_new_zeroed() -> Option<NBox<MaybeUninit<T>>> {
        let p = alloc_for(Layout::new::<T>(), Gfp::ZERO)?;
        Some(NBox { ptr: p.cast(), _owns: PhantomData })
    }

    /// Take the value out and free the memory.
    pub fn into_inner(b: Self) -> T {
        let b = ManuallyDrop::new(b);
        // SAFETY: we own a valid T; it is read once and the memory is freed without dropping it again.
        let v = unsafe { b.ptr.as_ptr().read() };
        // SAFETY: the memory came from `alloc_for` with T's layout and is not used afterwards.
        unsafe { free_raw(b.ptr.cast(), Layout::new::<T>()) };
        v
    }
}

impl<T> NBox<MaybeUninit<T>> {
    /// Declare the value initialised.
    ///
    /// # Safety
    /// The memory must hold a valid `T`.
    pub unsafe fn assume_init(self) -> NBox<T> {
        let b = ManuallyDrop::new(self);
        NBox { ptr: b.ptr.cast(), _owns: PhantomData }
    }
}

impl<T: Copy> NBox<[T]> {
    /// Copy a slice into nolock memory.
    pub fn try_from_slice(src: &[T]) -> Option<Self> {
        let layout = Layout::for_value(src);
        let p = alloc_for(layout, Gfp::NONE)?.cast::<T>();
        // SAFETY: fresh memory for `src.len()` elements; T: Copy so a bitwise copy is a valid clone.
        unsafe { core::ptr::copy_nonoverlapping(src.as_ptr(), p.as_ptr(), src.len()) };
        Some(Self { ptr: NonNull::slice_from_raw_parts(p, src.len()), _owns: PhantomData })
    }
}

impl<T> NBox<[T]> {
    /// A slice of `len` elements built by `f(index)`. If `f` panics, the elements made so far are dropped and
    /// the memory freed.
    ///
    /// # Context
    /// Any context, if `f` is.
    pub fn try_from_fn(len: usize, mut f: impl FnMut(usize) -> T) -> Option<Self> {
        let layout = Layout::array::<T>(len).ok()?;
        let p = alloc_for(layout, Gfp::NONE)?.cast::<T>();
        struct Guard<T> {
            p: NonNull<T>,
            done: usize,
            layout: Layout,
        }
        impl<T> Drop for Guard<T> {
            fn drop(&mut self) {
                // SAFETY: the first `done` elements are initialised; the memory is ours.
                unsafe {
                    core::ptr::drop_in_place(core::ptr::slice_from_raw_parts_mut(self.p.as_ptr(), self.done));
                    free_raw(self.p.cast(), self.layout);
                }
            }
        }
        let mut guard = Guard { p, done: 0, layout };
        for i in 0..len {
            // SAFETY: `i < len`, inside the allocation.
            unsafe { p.as_ptr().add(i).write(f(i)) };
            guard.done = i + 1;
        }
        core::mem::forget(guard);
        Some(Self { ptr: NonNull::slice_from_raw_parts(p, len), _owns: PhantomData })
    }
}

impl NBox<[u8]> {
    /// `len` zero bytes.
    pub fn try_zeroed_bytes(len: usize) -> Option<Self> {
        let p = alloc_for(Layout::array::<u8>(len).ok()?, Gfp::ZERO)?;
        Some(Self { ptr: NonNull::slice_from_raw_parts(p, len), _owns: PhantomData })
    }
}

impl NBox<str> {
    /// Copy a string into nolock memory.
    pub fn try_from_str(s: &str) -> Option<Self> {
        let bytes = NBox::<[u8]>::try_from_slice(s.as_bytes())?;
        let raw = NBox::into_raw(bytes);
        // SAFETY: the bytes are a copy of a valid str; str and [u8] share layout and metadata.
        let ptr = unsafe { NonNull::new_unchecked(raw.as_ptr() as *mut str) };
        Some(NBox { ptr, _owns: PhantomData })
    }
}

impl<T: ?Sized> NBox<T> {
    /// Give up ownership without freeing; see [`NBox::from_raw`].
    pub fn into_raw(b: Self) -> NonNull<T> {
        ManuallyDrop::new(b).ptr
    }

    /// Take ownership of a pointer from [`NBox::into_raw`].
    ///
    /// # Safety
    /// `ptr` must come from `NBox::into_raw` of the same type and not be owned by anything else.
    pub unsafe fn from_raw(ptr: NonNull<T>) -> Self {
        Self { ptr, _owns: PhantomData }
    }

    /// Leak the box, returning a reference that lives forever.
    pub fn leak<'a>(b: Self) -> &'a mut T {
        // SAFETY: the memory is never freed after this.
        unsafe { &mut *NBox::into_raw(b).as_ptr() }
    }

    /// The raw pointer, still owned by the box.
    pub fn as_ptr(b: &Self) -> *const T {
        b.ptr.as_ptr()
    }
}

/// Free memory of `layout` obtained from `alloc_for`.
///
/// # Safety
/// `p` came from `alloc_for(layout, ..)` and is not used afterwards.
unsafe fn free_raw(p: NonNull<u8>, layout: Layout) {
    if layout.size() != 0 {
        // SAFETY: forwarded.
        unsafe { kfree_nolock(p.as_ptr()) };
    }
}

impl<T: ?Sized> Drop for NBox<T> {
    fn drop(&mut self) {
        // SAFETY: we own a valid T; its layout is read before it is dropped.
        unsafe {
            let layout = Layout::for_value(self.ptr.as_ref());
            core::ptr::drop_in_place(self.ptr.as_ptr());
            free_raw(self.ptr.cast(), layout);
        }
    }
}

impl<T: ?Sized> Deref for NBox<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: we own a valid T.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T: ?Sized> DerefMut for NBox<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: we own a valid T exclusively.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T: ?Sized> AsRef<T> for NBox<T> {
    fn as_ref(&self) -> &T {
        self
    }
}

impl<T: ?Sized> AsMut<T> for NBox<T> {
    fn as_mut(&mut self) -> &mut T {
        self
    }
}

impl<T: ?Sized + fmt::Debug> fmt::Debug for NBox<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl<T: ?Sized + fmt::Display> fmt::Display for NBox<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&**self, f)
    }
}

impl<T: ?Sized + PartialEq> PartialEq for NBox<T> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl<T: ?Sized + Eq> Eq for NBox<T> {}

#[cfg(test)]
mod tests {
    use super::*;
    use core::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn values_slices_strings() {
        let b = NBox::try_new(41u64).unwrap();
        assert_eq!(*b + 1, 42);
        assert_eq!(NBox::into_inner(b), 41);
        let z = NBox::<[u64; 4]>::try_new_zeroed().unwrap();
        // SAFETY: zeroed memory is a valid [u64; 4].
        let z = unsafe { z.assume_init() };
        assert_eq!(*z, [0; 4]);
        let big = NBox::try_zeroed_bytes(100_000).unwrap();
        assert!(big.iter().all(|&x| x == 0));
        let v: NBox<[String]> = NBox::try_from_fn(3, |i| format!("#{i}")).unwrap();
        assert_eq!(v[2], "#2");
        let s = NBox::<str>::try_from_str("héllo").unwrap();
        assert_eq!(format!("{s}"), "héllo");
        let unit = NBox::try_new(()).unwrap();
        assert_eq!(*unit, ());
    }

    #[test]
    fn alignment_is_honoured() {
        #[repr(align(64))]
        struct A64([u8; 65]);
        #[repr(align(4096))]
        struct Page([u8; 100]);
        let a = NBox::try_new(A64([1; 65])).ok().unwrap();
        assert_eq!(NBox::as_ptr(&a) as usize % 64, 0);
        assert_eq!(a.0[64], 1);
        let p = NBox::try_new(Page([2; 100])).ok().unwrap();
        assert_eq!(NBox::as_ptr(&p) as usize % 4096, 0);
        assert_eq!(p.0[99], 2);
    }

    #[test]
    fn drops_run_once() {
        static DROPS: AtomicUsize = AtomicUsize::new(0);
        struct D;
        impl Drop for D {
            fn drop(&mut self) {
                DROPS.fetch_add(1, Ordering::Relaxed);
            }
        }
        drop(NBox::try_new(D).ok().unwrap());
        drop(NBox::try_from_fn(5, |_| D).unwrap());
        assert_eq!(DROPS.load(Ordering::Relaxed), 6);
    }
}
