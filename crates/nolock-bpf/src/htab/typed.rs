//! `TypedHashMap<K, V>`: the byte-oriented map with Rust types for keys and values.

use core::marker::PhantomData;
use core::mem::{MaybeUninit, size_of};

use super::{CreateError, Error, HashMap, HtabAttr, UpdateFlags, ValueRef};

/// Plain data: `Copy`, no padding bytes, every bit pattern valid. Keys are compared and hashed as bytes, and
/// values are copied out of shared memory as bytes, so both must be `Pod`.
///
/// # Safety
/// The type has no padding and no invalid bit patterns (integers, arrays of them, `#[repr(C)]` structs of
/// them without padding).
pub unsafe trait Pod: Copy + 'static {}

macro_rules! pod {
    ($($t:ty),*) => { $(
        // SAFETY: primitive integers and floats have no padding and no invalid bit patterns.
        unsafe impl Pod for $t {}
    )* };
}
pod!(u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize, f32, f64);
// SAFETY: an array of Pod has no padding between elements and no invalid patterns.
unsafe impl<T: Pod, const N: usize> Pod for [T; N] {}

fn bytes_of<T: Pod>(v: &T) -> &[u8] {
    // SAFETY: T is Pod: all size_of::<T>() bytes are initialised.
    unsafe { core::slice::from_raw_parts(v as *const T as *const u8, size_of::<T>()) }
}

/// A [`HashMap`] with key type `K` and value type `V`.
///
/// ```
/// use nolock_bpf::htab::{HtabAttr, TypedHashMap, UpdateFlags};
///
/// let m: TypedHashMap<u32, u64> = TypedHashMap::new(HtabAttr::new(0, 0, 64)).unwrap();
/// m.update(&1, &10, UpdateFlags::Any).unwrap();
/// assert_eq!(m.lookup(&1), Some(10));
/// assert_eq!(m.delete(&1), Ok(()));
/// assert_eq!(m.lookup(&1), None);
/// ```
pub struct TypedHashMap<K: Pod, V: Pod> {
    map: HashMap,
    _t: PhantomData<fn(K, V)>,
}

impl<K: Pod, V: Pod> TypedHashMap<K, V> {
    /// Create a map; `attr`'s key and value sizes are replaced by those of `K` and `V`.
    ///
    /// # Context
    /// Normal context (as [`HashMap::new`]).
    pub fn new(mut attr: HtabAttr) -> Result<Self, CreateError> {
        attr.key_size = size_of::<K>();
        attr.value_size = size_of::<V>();
        Ok(TypedHashMap { map: HashMap::new(attr)?, _t: PhantomData })
    }

    /// The byte-oriented map.
    pub fn raw(&self) -> &HashMap {
        &self.map
    }

    /// Insert or replace.
    pub fn update(&self, key: &K, value: &V, flags: UpdateFlags) -> Result<(), Error> {
        self.map.update(bytes_of(key), bytes_of(value), flags)
    }

    /// A consistent copy of the value (see [`HashMap::lookup_copy`]).
    pub fn lookup(&self, key: &K) -> Option<V> {
        let mut v = MaybeUninit::<V>::zeroed();
        // SAFETY: V is Pod; the buffer is size_of::<V>() initialised (zeroed) bytes.
        let buf = unsafe { core::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, size_of::<V>()) };
        self.map.lookup_copy(bytes_of(key), buf).ok()?;
        // SAFETY: fully written by lookup_copy; every bit pattern is a valid V.
        Some(unsafe { v.assume_init() })
    }

    /// The value in place, under a read-side section (see [`ValueRef`]).
    pub fn lookup_ref(&self, key: &K) -> Option<ValueRef<'_>> {
        self.map.lookup(bytes_of(key))
    }

    /// Delete.
    pub fn delete(&self, key: &K) -> Result<(), Error> {
        self.map.delete(bytes_of(key))
    }

    /// Delete and return the value.
    pub fn lookup_and_delete(&self, key: &K) -> Result<V, Error> {
        let mut v = MaybeUninit::<V>::zeroed();
        // SAFETY: as in `lookup`.
        let buf = unsafe { core::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, size_of::<V>()) };
        self.map.lookup_and_delete(bytes_of(key), buf)?;
        // SAFETY: as in `lookup`.
        Ok(unsafe { v.assume_init() })
    }

    /// Every (key, value), as [`HashMap::for_each`].
    pub fn for_each(&self, mut f: impl FnMut(K, V)) {
        self.map.for_each(|k, v| {
            // SAFETY: the slices have exactly size_of::<K>() / size_of::<V>() bytes; K and V are Pod.
            let (k, v) = unsafe {
                (core::ptr::read_unaligned(k.as_ptr() as *const K), core::ptr::read_unaligned(v.as_ptr() as *const V))
            };
            f(k, v)
        });
    }
}
