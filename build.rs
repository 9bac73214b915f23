//! Link-time settings for the binaries (nothing is generated).
//!
//! On Linux with GNU ld, the relative relocations of the position-independent executable are
//! packed (`DT_RELR`, glibc >= 2.36: Debian bookworm, the Docker base). Unpacked, they are a
//! 2.8 MB table the dynamic loader reads whole at every start, which alone was a fifth of the
//! idle RSS (docs/performance.md §5); packed, a few KB. The binary stays position-independent
//! (address-space randomisation kept).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let target = std::env::var("TARGET").unwrap_or_default();
    if target.ends_with("-linux-gnu") && std::env::var_os("DRISHYA_UNPACKED_RELOCS").is_none() {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    println!("cargo:rerun-if-env-changed=DRISHYA_UNPACKED_RELOCS");
}
