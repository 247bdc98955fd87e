//! `RcuPtr`: retire objects after a grace period without raw pointers.
//!
//! A client of the RCU layer (grace periods, `call_rcu_nolock`) and of the slab layer (`kmalloc_nolock` for the
//! nodes), so it sits above both, beside `NBox`.
//!
//! [`RcuPtr<T>`] is an atomic pointer to a `T` in nolock memory. Readers [`load`](RcuPtr::load) it inside a
//! read-side section and get a `&T` that lives as long as their guard; writers [`publish`](RcuPtr::publish) a
//! new value, and the old one is dropped and freed after a grace period of the pointer's flavour — RCU by
//! default, or an SRCU-fast domain (sleepable readers). Publishing allocates with `kmalloc_nolock` and retires
//! with `call_rcu_nolock`, so every operation is safe from any context, signal handlers included.
//!
//! ```
//! use nolock::RcuPtr;
//!
//! static CONFIG: RcuPtr<[u32; 4]> = RcuPtr::null();
//!
//! CONFIG.publish([1, 2, 3, 4]).expect("out of memory");
//! {
//!     let guard = nolock::rcu_read_lock();
//!     assert_eq!(CONFIG.load(&guard).unwrap()[2], 3);
//! }
//! CONFIG.publish([5, 6, 7, 8]).unwrap(); // the old array is dropped after a grace period
//! nolock::rcu_barrier();
//! ```

use core::alloc::Layout;
use core::marker::PhantomData;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicPtr, Ordering};

use crate::page::Gfp;
use crate::rcu::classic::RcuReadGuard;
use crate::rcu::srcu::{SrcuFast, SrcuFastGuard};
use crate::rcu::{GracePeriod, RcuHead};
use crate::slab::kmalloc::{kfree_nolock, kmalloc_layout_nolock};

mod sealed {
    /// Only this module's flavours implement [`super::Flavor`]: a flavour's `guards` check is what makes
    /// `RcuPtr::load` sound, so outside implementations are not allowed.
    pub trait Sealed {}
    impl Sealed for super::Rcu {}
    impl Sealed for super::Srcu {}
}

/// A grace-period flavour for typed wrappers: which read guard protects loads, and which [`GracePeriod`] old
/// values wait for. Sealed: implemented by [`Rcu`] and [`Srcu`] only.
pub trait Flavor: sealed::Sealed {
    /// The read-side guard whose lifetime bounds loaded references.
    type Guard<'g>;
    /// The grace period replaced values wait for before they are dropped and freed.
    ///
    /// # Context
    /// Any context (for [`Srcu`], the first use of its domain attaches its table, see
    /// [`SrcuFast::read_lock_fast`]).
    fn grace_period(&self) -> GracePeriod;
    /// Whether `guard` is a read-side section of *this* flavour's domain (so it protects loads of a pointer of
    /// this flavour).
    ///
    /// # Context
    /// Any context (a comparison).
    fn guards(&self, guard: &Self::Guard<'_>) -> bool;
}

/// The RCU flavour (non-sleepable readers, [`RcuReadGuard`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct Rcu;

impl Flavor for Rcu {
    type Guard<'g> = RcuReadGuard;
    #[inline]
    fn grace_period(&self) -> GracePeriod {
        GracePeriod::RCU
    }
    #[inline(always)]
    fn guards(&self, _guard: &RcuReadGuard) -> bool {
        true // one RCU domain per process
    }
}

/// An SRCU-fast flavour (sleepable readers of one domain, [`SrcuFastGuard`]).
#[derive(Clone, Copy, Debug)]
pub struct Srcu(pub &'static SrcuFast);

impl Flavor for Srcu {
    type Guard<'g> = SrcuFastGuard<'g>;
    #[inline]
    fn grace_period(&self) -> GracePeriod {
        GracePeriod::srcu_fast(self.0)
    }
    #[inline(always)]
    fn guards(&self, guard: &SrcuFastGuard<'_>) -> bool {
        guard.is_of(self.0)
    }
}

#[repr(C)]
struct Node<T> {
    head: RcuHead,
    value: T,
}

unsafe fn drop_node<T>(head: NonNull<RcuHead>) {
    let node = head.as_ptr() as *mut Node<T>;
    // SAFETY: the head is the first field of a Node<T> allocated by `publish`; its grace period has ended, so
    // no reader can still see the value.
    unsafe {
        core::ptr::drop_in_place(&mut (*node).value);
        kfree_nolock(node as *mut u8);
    }
}

/// An atomic, grace-period-protected pointer to a `T` (see the module documentation).
pub struct RcuPtr<T: Send + Sync + 'static, F: Flavor = Rcu> {
    ptr: AtomicPtr<Node<T>>,
    flavor: F,
    _owns: PhantomData<T>,
}

// SAFETY: the pointer hands out &T to any thread (T: Sync) and drops T on the worker thread (T: Send).
unsafe impl<T: Send + Sync, F: Flavor + Send> Send for RcuPtr<T, F> {}
// SAFETY: as above; all shared access goes through atomics.
unsafe impl<T: Send + Sync, F: Flavor + Sync> Sync for RcuPtr<T, F> {}

impl<T: Send + Sync> RcuPtr<T, Rcu> {
    /// A null pointer protected by RCU.
    pub const fn null() -> Self {
        Self { ptr: AtomicPtr::new(core::ptr::null_mut()), flavor: Rcu, _owns: PhantomData }
    }
}

impl<T: Send + Sync> Default for RcuPtr<T, Rcu> {
    fn default() -> Self {
        Self::null()
    }
}

impl<T: Send + Sync> RcuPtr<T, Srcu> {
    /// A null pointer protected by the SRCU-fast domain `domain` (readers use `domain.read_lock_fast()`).
    pub const fn null_srcu(domain: &'static SrcuFast) -> Self {
        Self { ptr: AtomicPtr::new(core::ptr::null_mut()), flavor: Srcu(domain), _owns: PhantomData }
    }
}

impl<T: Send + Sync, F: Flavor> RcuPtr<T, F> {
    /// The current value, valid while `guard` lives (`rcu_dereference`).
    ///
    /// # Panics
    /// If `guard` is a section of another SRCU-fast domain than this pointer's: its grace periods do not wait
    /// for that guard, so the reference could outlive the value.
    ///
    /// # Context
    /// Any context (one `Acquire` load; for SRCU-fast pointers, one pointer comparison).
    #[inline]
    pub fn load<'g>(&self, guard: &'g F::Guard<'_>) -> Option<&'g T> {
        if !self.flavor.guards(guard) {
            wrong_domain();
        }
        // Acquire: pairs with the Release swap in `publish`, so the value's initialisation is visible.
        let p = self.ptr.load(Ordering::Acquire);
        // SAFETY: a published node stays allocated until a grace period after it was replaced; the guard
        // proves we are inside a read-side section of the flavour, so that grace period cannot have ended.
        (!p.is_null()).then(|| unsafe { &(*p).value })
    }

    /// Whether the pointer is null.
    ///
    /// # Context
    /// Any context.
    pub fn is_null(&self) -> bool {
        self.ptr.load(Ordering::Relaxed).is_null()
    }

    /// Publish `value` (`rcu_assign_pointer`); the previous value is dropped and freed after a grace period.
    /// On out-of-memory, the value is handed back and nothing changes.
    ///
    /// # Context
    /// Any context: allocates with `kmalloc_nolock`, retires with `call_*_nolock`. `T`'s destructor later runs
    /// on the grace-period worker thread.
    pub fn publish(&self, value: T) -> Result<(), T> {
        let Some(mem) = kmalloc_layout_nolock(Layout::new::<Node<T>>(), Gfp::NONE) else {
            return Err(value);
        };
        let node = mem.cast::<Node<T>>();
        // SAFETY: fresh memory with Node<T>'s layout.
        unsafe { node.as_ptr().write(Node { head: RcuHead::new(), value }) };
        // Release: publishes the initialised node to `load`'s Acquire.
        let old = self.ptr.swap(node.as_ptr(), Ordering::AcqRel);
        self.retire(old);
        Ok(())
    }

    /// Set the pointer to null; the previous value is retired after a grace period.
    ///
    /// # Context
    /// Any context.
    pub fn clear(&self) {
        let old = self.ptr.swap(core::ptr::null_mut(), Ordering::AcqRel);
        self.retire(old);
    }

    /// Publish `value` and return the value it replaced, readable while `guard` lives (the replaced value is
    /// retired at once, but its grace period cannot end before `guard`'s read-side section does). On
    /// out-of-memory, the value is handed back and nothing changes.
    ///
    /// # Panics
    /// As [`load`](Self::load), for a guard of another SRCU-fast domain.
    ///
    /// # Context
    /// As [`publish`](Self::publish).
    pub fn swap<'g>(&self, value: T, guard: &'g F::Guard<'_>) -> Result<Option<&'g T>, T> {
        if !self.flavor.guards(guard) {
            wrong_domain();
        }
        let node = Self::new_node(value)?;
        // AcqRel: the Release half publishes the new node to `load`'s Acquire; the Acquire half pairs with the
        // Release of the writer that published the old one, whose value we hand out.
        let old = self.ptr.swap(node.as_ptr(), Ordering::AcqRel);
        // SAFETY: `old` was published and is retired only below, after `guard`'s section began, so its grace
        // period outlasts the guard.
        let old_ref = (!old.is_null()).then(|| unsafe { &(*old).value });
        self.retire(old);
        Ok(old_ref)
    }

    /// Publish `new` only if the pointer still holds `current` (compared by address: a reference obtained by
    /// [`load`](Self::load) or returned by an operation of this pointer, or `None` for null). On success,
    /// returns the replaced value (retired, readable while `guard` lives); on failure, hands `new` back with the
    /// value the pointer holds now. `Err` with `current == actual` happens only on out-of-memory.
    ///
    /// # Panics
    /// As [`load`](Self::load), for a guard of another SRCU-fast domain.
    ///
    /// # Context
    /// As [`publish`](Self::publish).
    #[allow(clippy::type_complexity)]
    pub fn compare_exchange<'g>(
        &self,
        current: Option<&T>,
        new: T,
        guard: &'g F::Guard<'_>,
    ) -> Result<Option<&'g T>, (T, Option<&'g T>)> {
        if !self.flavor.guards(guard) {
            wrong_domain();
        }
        let node = match Self::new_node(new) {
            Ok(n) => n,
            Err(v) => return Err((v, self.load(guard))),
        };
        match self.cas_node(current, node, guard) {
            Ok(old) => Ok(old),
            Err(actual) => {
                // SAFETY: the node was never published: its value is read back once and its memory freed.
                let v = unsafe { Self::unmake_node(node) };
                Err((v, actual))
            }
        }
    }

    /// Read-copy-update: compute the new value from the current one with `f` and publish it, retrying (with a
    /// fresh `f` call on the newer value) while other writers get in first. Returns the value it replaced
    /// (retired, readable while `guard` lives). One node is allocated up front and reused across retries; each
    /// value `f` made that lost its race is dropped at once (it was never visible). On out-of-memory, `Err`
    /// with `f`'s first value. If `f` panics on a retry, the node is leaked (its value was already dropped),
    /// never published nor dropped twice.
    ///
    /// Lock-free: a retry means another writer's update succeeded.
    ///
    /// ```
    /// use nolock::rcu_ptr::RcuPtr;
    ///
    /// static COUNTS: RcuPtr<[u64; 2]> = RcuPtr::null();
    /// let guard = nolock::rcu_read_lock();
    /// COUNTS.update(&guard, |cur| { let mut c = cur.copied().unwrap_or_default(); c[1] += 1; c }).unwrap();
    /// assert_eq!(COUNTS.load(&guard), Some(&[0, 1]));
    /// ```
    ///
    /// # Panics
    /// As [`load`](Self::load), for a guard of another SRCU-fast domain.
    ///
    /// # Context
    /// As [`publish`](Self::publish), if `f` is (it runs inside the caller's read-side section).
    pub fn update<'g>(&self, guard: &'g F::Guard<'_>, mut f: impl FnMut(Option<&T>) -> T) -> Result<Option<&'g T>, T> {
        let mut cur = self.load(guard);
        let node = Self::new_node(f(cur))?;
        loop {
            match self.cas_node(cur, node, guard) {
                Ok(old) => return Ok(old),
                Err(actual) => {
                    cur = actual;
                    // SAFETY: the node is still ours (never published): replace the value that lost.
                    unsafe {
                        core::ptr::drop_in_place(&mut (*node.as_ptr()).value);
                    }
                    let v = f(cur);
                    // SAFETY: as above; the slot was just emptied.
                    unsafe { core::ptr::addr_of_mut!((*node.as_ptr()).value).write(v) };
                }
            }
        }
    }

    /// A node holding `value`, not yet published.
    fn new_node(value: T) -> Result<NonNull<Node<T>>, T> {
        let Some(mem) = crate::kmalloc_layout_nolock(Layout::new::<Node<T>>(), Gfp::NONE) else {
            return Err(value);
        };
        let node = mem.cast::<Node<T>>();
        // SAFETY: fresh memory with Node<T>'s layout.
        unsafe { node.as_ptr().write(Node { head: RcuHead::new(), value }) };
        Ok(node)
    }

    /// Take the value back out of a node that was never published, and free it.
    ///
    /// # Safety
    /// `node` came from `new_node` and was never published.
    unsafe fn unmake_node(node: NonNull<Node<T>>) -> T {
        // SAFETY: per the contract, the node and its value are ours alone.
        unsafe {
            let v = core::ptr::addr_of!((*node.as_ptr()).value).read();
            crate::kfree_nolock(node.as_ptr() as *mut u8);
            v
        }
    }

    /// The node whose value `current` is (by address; never dereferenced), or null.
    fn node_of(current: Option<&T>) -> *mut Node<T> {
        current.map_or(core::ptr::null_mut(), |r| {
            (r as *const T as *const u8).wrapping_sub(core::mem::offset_of!(Node<T>, value)) as *mut Node<T>
        })
    }

    /// CAS `current`'s node to `node`; on success retire the old node and return its value; on failure the
    /// value now published.
    #[allow(clippy::type_complexity)]
    fn cas_node<'g>(
        &self,
        current: Option<&T>,
        node: NonNull<Node<T>>,
        _guard: &'g F::Guard<'_>,
    ) -> Result<Option<&'g T>, Option<&'g T>> {
        let expected = Self::node_of(current);
        // Success AcqRel: the Release half publishes the new node to `load`'s Acquire; the Acquire half pairs
        // with the Release of the writer that published the old one. Failure Acquire: the same pairing for the
        // value we hand back.
        match self.ptr.compare_exchange(expected, node.as_ptr(), Ordering::AcqRel, Ordering::Acquire) {
            Ok(old) => {
                // SAFETY: `old` was published; it is retired only below, after the caller's section began, so
                // its grace period outlasts `_guard`.
                let r = (!old.is_null()).then(|| unsafe { &(*old).value });
                self.retire(old);
                Ok(r)
            }
            // SAFETY: a published node, protected by the caller's section as in `load`.
            Err(now) => Err((!now.is_null()).then(|| unsafe { &(*now).value })),
        }
    }

    fn retire(&self, old: *mut Node<T>) {
        if let Some(old) = NonNull::new(old) {
            // SAFETY: `old` is unlinked; its head is ours to queue and `drop_node::<T>` matches its type.
            unsafe { self.flavor.grace_period().call(old.cast::<RcuHead>(), drop_node::<T>) };
        }
    }
}

#[cold]
#[inline(never)]
#[track_caller]
fn wrong_domain() -> ! {
    panic!("nolock: RcuPtr::load with a guard of another SRCU-fast domain than the pointer's (it does not protect it)")
}

impl<T: Send + Sync, F: Flavor> Drop for RcuPtr<T, F> {
    /// The last value is retired after a grace period (readers may still hold it).
    fn drop(&mut self) {
        self.clear();
    }
}

impl<T: Send + Sync, F: Flavor> core::fmt::Debug for RcuPtr<T, F> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("RcuPtr").field("ptr", &self.ptr.load(Ordering::Relaxed)).finish()
    }
}
