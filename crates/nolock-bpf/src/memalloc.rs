//! `BpfMemAlloc`: a faithful re-creation of the kernel's `bpf_mem_alloc` (work in progress; see issue 9).
