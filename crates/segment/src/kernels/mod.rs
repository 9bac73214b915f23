//! The engine's hand-written numeric loops. Each has a portable twin (plain Rust the
//! compiler may vectorise for the build target) that the unit tests hold the fast path
//! to; which one runs is decided once per process from the CPU's features ([`cpu`]).

pub mod conv;
pub mod gemm;
pub mod softmax;

use std::sync::OnceLock;

/// The kernel family this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cpu {
    /// x86-64 with AVX2 and FMA: 256-bit registers, fused multiply-add.
    Avx2Fma,
    /// Everything else (and any CPU when `DRISHYA_KERNELS=portable`).
    Portable,
}

/// Read once: the features cannot change under a running process, and the check sat in
/// every kernel call. `DRISHYA_KERNELS=portable` forces the portable twins (to measure
/// them, or to rule the fast path out when chasing a numeric difference).
pub fn cpu() -> Cpu {
    static CPU: OnceLock<Cpu> = OnceLock::new();
    *CPU.get_or_init(|| {
        if std::env::var("DRISHYA_KERNELS").is_ok_and(|v| v == "portable") {
            return Cpu::Portable;
        }
        detect()
    })
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Cpu {
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        Cpu::Avx2Fma
    } else {
        Cpu::Portable
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Cpu {
    Cpu::Portable
}
