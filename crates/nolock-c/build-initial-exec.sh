#!/usr/bin/env bash
# Build libnolock_c.so with every thread-local of nolock and of this crate in the initial-exec TLS model, so
# that a thread's first touch never goes through the dynamic loader. Needs a nightly toolchain: stable Rust
# has no way to choose the TLS model (-Z tls-model is unstable), and its cdylibs use general-dynamic.
# Output: target/initial-exec/release/libnolock_c.so. Then check it:
#   NOLOCK_C_LIB=target/initial-exec/release/libnolock_c.so NOLOCK_C_EXPECT_IE=1 \
#     cargo test --release -p nolock-c -- --nocapture   # every test, on this build
set -euo pipefail
cd "$(dirname "$0")/../.."
RUSTFLAGS="${RUSTFLAGS:-} -Z tls-model=initial-exec" CARGO_TARGET_DIR=target/initial-exec \
    cargo +nightly build --release -p nolock-c
echo "built target/initial-exec/release/libnolock_c.so"
