//! Typed wrappers: retire objects after a grace period without raw pointers.
