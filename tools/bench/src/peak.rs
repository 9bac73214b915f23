//! `--stage kernel_peak`: the ceiling the models' GFLOP/s are judged against. A VM shows
//! no clock in /proc/cpuinfo, so it is measured: a chain of dependent integer adds runs at
//! one a cycle. One core's FMA peak is measured with independent chains of vector FMAs
//! (AVX2 and, where present, AVX-512), and the product kernel's own rate on a dense-layer
//! sized product, with the kernel family this process chose (`DRISHYA_KERNELS=avx2` to
//! measure the AVX2 one on an AVX-512 machine).

use std::time::Instant;

use serde_json::{json, Value};

use drishya_segment::kernels::gemm::{gemm, Packed};

/// Best of a few timings of `f`, in seconds (the least disturbed by the shared cores).
fn best_of(mut f: impl FnMut()) -> f64 {
    (0..5)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

pub fn kernel_peak() -> Result<Value, String> {
    let family = format!("{:?}", drishya_segment::kernels::cpu());
    let (rows, inputs, outputs) = (4096, 512, 512);
    let a: Vec<f32> = (0..rows * inputs).map(|i| (i % 97) as f32 * 0.01).collect();
    let w: Vec<f32> = (0..inputs * outputs).map(|i| (i % 89) as f32 * 0.01).collect();
    let packed = Packed::from_inputs_major(&w, vec![0.0; outputs], inputs, outputs).ok_or("gemm shapes")?;
    let mut out = vec![0f32; rows * outputs];
    let seconds = best_of(|| gemm(&a, &packed, &mut out));
    let gemm_gflops = 2.0 * (rows * inputs * outputs) as f64 / seconds / 1e9;
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut value = json!({
        "kernel_family": family,
        "gemm": format!("{rows}x{inputs} * {inputs}x{outputs}"),
        "gemm_gflops": round(gemm_gflops),
    });
    #[cfg(target_arch = "x86_64")]
    {
        let ghz = x86::clock_ghz();
        value["clock_ghz"] = json!(round(ghz));
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features.
            let peak = unsafe { x86::fma_peak_avx2() };
            value["fma_peak_avx2_gflops"] = json!(round(peak));
            value["fma_peak_avx2_flops_per_cycle"] = json!(round(peak / ghz));
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: as above.
            let peak = unsafe { x86::fma_peak_avx512() };
            value["fma_peak_avx512_gflops"] = json!(round(peak));
            value["fma_peak_avx512_flops_per_cycle"] = json!(round(peak / ghz));
        }
    }
    Ok(value)
}

fn round(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::best_of;
    use std::arch::x86_64::*;

    const ITERATIONS: u64 = 20_000_000;

    /// Cycles per second from `ITERATIONS` x 10 dependent adds (one cycle each).
    pub fn clock_ghz() -> f64 {
        let seconds = best_of(|| {
            let mut x: u64 = 0;
            for _ in 0..ITERATIONS {
                // SAFETY: register arithmetic only.
                unsafe {
                    std::arch::asm!(
                        "add {0}, 1", "add {0}, 1", "add {0}, 1", "add {0}, 1", "add {0}, 1",
                        "add {0}, 1", "add {0}, 1", "add {0}, 1", "add {0}, 1", "add {0}, 1",
                        inout(reg) x,
                        options(nomem, nostack),
                    );
                }
            }
            std::hint::black_box(x);
        });
        (ITERATIONS * 10) as f64 / seconds / 1e9
    }

    /// Twelve independent accumulators: enough to cover the FMA latency on every port.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fma_peak_avx2() -> f64 {
        let seconds = best_of(|| {
            let mut acc = [_mm256_set1_ps(0.5); 12];
            let (x, y) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
            for _ in 0..ITERATIONS / 4 {
                for a in acc.iter_mut() {
                    *a = _mm256_fmadd_ps(*a, x, y);
                }
            }
            std::hint::black_box(acc);
        });
        (ITERATIONS / 4 * 12 * 8 * 2) as f64 / seconds / 1e9
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma_peak_avx512() -> f64 {
        let seconds = best_of(|| {
            let mut acc = [_mm512_set1_ps(0.5); 12];
            let (x, y) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
            for _ in 0..ITERATIONS / 4 {
                for a in acc.iter_mut() {
                    *a = _mm512_fmadd_ps(*a, x, y);
                }
            }
            std::hint::black_box(acc);
        });
        (ITERATIONS / 4 * 12 * 16 * 2) as f64 / seconds / 1e9
    }
}
