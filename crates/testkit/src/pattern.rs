//! Object stamps that detect corruption, use after free and double hand-outs: word 0 holds a stamp (`seq`),
//! every further word a value derived from it, and the bytes past the last whole word another.
//!
//! Reads and writes are volatile, so the compiler cannot merge a fill with a later check or drop a check of
//! memory it believes unchanged.

/// The pattern word at index `i >= 1` of an object stamped with `seq` (word 0 is `seq` itself, which is also
/// `pattern_word(seq, 0)`).
///
/// # Context
/// Any context, signal handlers included: arithmetic only.
#[inline]
pub fn pattern_word(seq: u64, i: usize) -> u64 {
    seq ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// The pattern byte at offset `j` past the last whole word of an object stamped with `seq`.
#[inline]
fn pattern_byte(seq: u64, j: usize) -> u8 {
    seq as u8 ^ j as u8
}

/// Stamp the first `len` bytes of `p` with `seq`: word 0 is `seq`, word `i` is `pattern_word(seq, i)`, and
/// when `len >= 8` is not a whole number of words, byte `j` past the last whole word is `seq as u8 ^ j as u8`.
/// With `len < 8` one word is written.
///
/// # Safety
/// `p` must be 8-aligned and valid for writes of `max(len, 8)` bytes.
///
/// # Context
/// Any context, signal handlers included: memory writes only.
pub unsafe fn fill(p: *mut u8, len: usize, seq: u64) {
    let w = p.cast::<u64>();
    // SAFETY: the caller guarantees at least one writable, aligned word.
    unsafe { w.write_volatile(seq) };
    for i in 1..len / 8 {
        // SAFETY: `i < len / 8`, inside the caller's range.
        unsafe { w.add(i).write_volatile(pattern_word(seq, i)) };
    }
    for j in (len / 8 * 8).max(8)..len {
        // SAFETY: `j < len`, inside the caller's range.
        unsafe { p.add(j).write_volatile(pattern_byte(seq, j)) };
    }
}

/// What [`check`] found wrong: the word (or, past the last whole word, byte) index, what it should hold and
/// what it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Damage {
    /// Index of the first bad word; for a bad byte past the last whole word, `len / 8` plus its offset in
    /// that tail.
    pub word: usize,
    /// What it should hold.
    pub expected: u64,
    /// What it holds.
    pub found: u64,
}

/// Check a stamp made by [`fill`] with the same `len`. With `seq == None`, word 0 is taken as the stamp and only
/// has to lie in `1..seq_limit`. Returns the stamp found.
///
/// # Safety
/// As [`fill`], for reads.
///
/// # Context
/// Any context, signal handlers included: memory reads only.
pub unsafe fn check(p: *const u8, len: usize, seq: Option<u64>, seq_limit: u64) -> Result<u64, Damage> {
    let w = p.cast::<u64>();
    // SAFETY: the caller guarantees at least one readable, aligned word.
    let first = unsafe { w.read_volatile() };
    let seq = match seq {
        Some(s) if s != first => {
            return Err(Damage { word: 0, expected: s, found: first });
        }
        Some(s) => s,
        None if first == 0 || first >= seq_limit => {
            return Err(Damage { word: 0, expected: seq_limit, found: first });
        }
        None => first,
    };
    for i in 1..len / 8 {
        // SAFETY: `i < len / 8`, inside the caller's range.
        let v = unsafe { w.add(i).read_volatile() };
        if v != pattern_word(seq, i) {
            return Err(Damage { word: i, expected: pattern_word(seq, i), found: v });
        }
    }
    let tail = (len / 8 * 8).max(8);
    for j in tail..len {
        // SAFETY: `j < len`, inside the caller's range.
        let v = unsafe { p.add(j).read_volatile() };
        if v != pattern_byte(seq, j) {
            let expected = u64::from(pattern_byte(seq, j));
            return Err(Damage { word: len / 8 + (j - tail), expected, found: u64::from(v) });
        }
    }
    Ok(seq)
}

/// Whether the first `len` bytes of `p` are all zero (volatile reads).
///
/// # Safety
/// `p` must be valid for reads of `len` bytes.
///
/// # Context
/// Any context, signal handlers included: memory reads only.
pub unsafe fn is_zeroed(p: *const u8, len: usize) -> bool {
    // SAFETY: `i < len`, inside the caller's range.
    (0..len).all(|i| unsafe { p.add(i).read_volatile() } == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_then_check_finds_every_damage() {
        for len in [1usize, 8, 16, 100, 4096, 4099] {
            let mut buf = vec![0u64; len.div_ceil(8).max(1)];
            let p = buf.as_mut_ptr().cast::<u8>();
            // SAFETY: `buf` holds at least max(len, 8) bytes, 8-aligned.
            unsafe { fill(p, len, 42) };
            // SAFETY: as above.
            assert_eq!(unsafe { check(p, len, Some(42), u64::MAX) }, Ok(42));
            // SAFETY: as above.
            assert_eq!(unsafe { check(p, len, None, 43) }, Ok(42));
            // SAFETY: as above.
            assert!(unsafe { check(p, len, Some(41), u64::MAX) }.is_err());
            // SAFETY: as above.
            assert!(unsafe { check(p, len, None, 42) }.is_err(), "stamp outside 1..seq_limit");
            for byte in 0..buf.len() * 8 {
                // SAFETY: `byte` lies inside `buf`.
                unsafe { *p.add(byte) ^= 0x10 };
                // SAFETY: as above.
                let r = unsafe { check(p, len, Some(42), u64::MAX) };
                let counted = byte < len.max(8);
                assert_eq!(r.is_err(), counted, "len {len}, byte {byte}");
                // SAFETY: as above.
                unsafe { *p.add(byte) ^= 0x10 };
            }
        }
    }

    #[test]
    fn zeroed() {
        let mut buf = [0u8; 64];
        // SAFETY: 64 readable bytes.
        assert!(unsafe { is_zeroed(buf.as_ptr(), 64) });
        buf[63] = 1;
        // SAFETY: as above.
        assert!(!unsafe { is_zeroed(buf.as_ptr(), 64) });
        // SAFETY: as above.
        assert!(unsafe { is_zeroed(buf.as_ptr(), 63) });
    }
}
