//! Small pseudo-random generators with no state outside the caller's stack (usable in signal handlers).

/// A small, fast pseudo-random step (splitmix64): a good seed mixer.
///
/// # Context
/// Any context, signal handlers included: arithmetic only.
#[inline]
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// xorshift64*: a tiny generator, seeded through [`splitmix64`].
///
/// # Context
/// Any context, signal handlers included: arithmetic on the caller's value only.
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` (any value, 0 included).
    ///
    /// # Context
    /// Any context, signal handlers included.
    pub fn new(seed: u64) -> Self {
        Self(splitmix64(seed) | 1)
    }

    /// The next 64 random bits.
    ///
    /// # Context
    /// Any context, signal handlers included.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n > 0`; the modulo bias is negligible for the small `n` of tests and benches).
    ///
    /// # Context
    /// Any context, signal handlers included.
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_differ() {
        let (mut a, mut b) = (Rng::new(0), Rng::new(1));
        assert_ne!(a.next_u64(), b.next_u64());
        assert_ne!(splitmix64(0), splitmix64(1));
    }
}
