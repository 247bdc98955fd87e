//! The `nolock` command.
fn main() {
    nolock::init();
    println!("nolock: {:?}", nolock::stats::snapshot().pages);
}
