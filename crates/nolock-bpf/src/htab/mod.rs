//! `HashMap`: a byte-oriented BPF hash map (work in progress; see issue 9).
