//! The engine's hand-written numeric loops. Each has a portable twin (plain Rust the
//! compiler may vectorise for the build target) that the unit tests hold the fast path
//! to; which one runs is decided once per process from the CPU's features ([`cpu`]).

pub mod conv;
pub mod gemm;
pub mod softmax;
pub mod transpose;

use std::sync::OnceLock;

/// The kernel family this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cpu {
    /// x86-64 with AVX-512F as well: 32 registers of 512 bits for the product kernel (the
    /// other kernels use their AVX2 forms).
    Avx512,
    /// x86-64 with AVX2 and FMA: 256-bit registers, fused multiply-add.
    Avx2Fma,
    /// Everything else (and any CPU when `DRISHYA_KERNELS=portable`).
    Portable,
}

impl Cpu {
    /// Whether the AVX2/FMA forms of the kernels run (AVX-512 machines have them too).
    pub fn avx2(self) -> bool {
        matches!(self, Cpu::Avx512 | Cpu::Avx2Fma)
    }
}

/// Read once: the features cannot change under a running process, and the check sat in
/// every kernel call. `DRISHYA_KERNELS` caps the family: `avx2` (to measure the AVX2 path
/// on an AVX-512 machine) or `portable` (the portable twins, to measure them or to rule
/// the fast paths out when chasing a numeric difference); a CPU without the features
/// still gets what it has.
pub fn cpu() -> Cpu {
    static CPU: OnceLock<Cpu> = OnceLock::new();
    *CPU.get_or_init(|| {
        let detected = detect();
        match std::env::var("DRISHYA_KERNELS").as_deref() {
            Ok("portable") => Cpu::Portable,
            Ok("avx2") if detected == Cpu::Avx512 => Cpu::Avx2Fma,
            _ => detected,
        }
    })
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Cpu {
    use std::arch::is_x86_feature_detected as has;
    match (has!("avx2") && has!("fma"), has!("avx512f")) {
        (true, true) => Cpu::Avx512,
        (true, false) => Cpu::Avx2Fma,
        _ => Cpu::Portable,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Cpu {
    Cpu::Portable
}
