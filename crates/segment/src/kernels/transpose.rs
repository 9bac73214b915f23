//! Matrix transposition between channel-major and pixel-major rows (ops/conv.rs turns each
//! input row pixel-major and each product row back): 8x8 blocks in AVX registers, with
//! its portable twin. Element-wise, the strided reads or writes of a plain loop cost
//! about half as much as the convolution's products themselves.

/// `dst[c * dst_stride + r] = src[r * src_stride + c]` for `r < rows`, `c < cols`.
pub fn transpose(src: &[f32], src_stride: usize, dst: &mut [f32], dst_stride: usize, [rows, cols]: [usize; 2]) {
    if rows == 0 || cols == 0 {
        return;
    }
    let fits = (rows - 1) * src_stride + cols <= src.len() && (cols - 1) * dst_stride + rows <= dst.len();
    assert!(fits && src_stride >= cols && dst_stride >= rows, "transpose: a matrix outside its slice");
    #[cfg(target_arch = "x86_64")]
    if super::cpu().avx2() {
        // SAFETY: the CPU has the features; every index is inside the slices (checked above).
        return unsafe { avx2::transpose(src, src_stride, dst, dst_stride, [rows, cols]) };
    }
    transpose_portable(src, src_stride, dst, dst_stride, [rows, cols], [0, 0])
}

/// The part from row `r0` and column `c0` on (the edges the vector blocks leave).
fn transpose_portable(
    src: &[f32],
    src_stride: usize,
    dst: &mut [f32],
    dst_stride: usize,
    [rows, cols]: [usize; 2],
    [r0, c0]: [usize; 2],
) {
    for r in r0..rows {
        for c in c0..cols {
            dst[c * dst_stride + r] = src[r * src_stride + c];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn transpose(
        src: &[f32],
        src_stride: usize,
        dst: &mut [f32],
        dst_stride: usize,
        [rows, cols]: [usize; 2],
    ) {
        let (full_r, full_c) = (rows / 8 * 8, cols / 8 * 8);
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        for r in (0..full_r).step_by(8) {
            for c in (0..full_c).step_by(8) {
                block(s.add(r * src_stride + c), src_stride, d.add(c * dst_stride + r), dst_stride);
            }
        }
        // The edges: the last columns of the full rows, then the last rows.
        super::transpose_portable(src, src_stride, dst, dst_stride, [full_r, cols], [0, full_c]);
        super::transpose_portable(src, src_stride, dst, dst_stride, [rows, cols], [full_r, 0]);
    }

    /// One 8x8 block.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn block(src: *const f32, src_stride: usize, dst: *mut f32, dst_stride: usize) {
        let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * src_stride)));
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        let out = [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ];
        for (i, v) in out.iter().enumerate() {
            _mm256_storeu_ps(dst.add(i * dst_stride), *v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shape_and_stride_matches_the_portable_twin() {
        for [rows, cols] in [[1, 1], [8, 8], [3, 17], [16, 64], [19, 13], [64, 320], [7, 8], [8, 7]] {
            let (src_stride, dst_stride) = (cols + 3, rows + 5);
            let src: Vec<f32> = (0..rows * src_stride).map(|i| i as f32).collect();
            let mut fast = vec![f32::NAN; cols * dst_stride];
            transpose(&src, src_stride, &mut fast, dst_stride, [rows, cols]);
            let mut plain = vec![f32::NAN; cols * dst_stride];
            transpose_portable(&src, src_stride, &mut plain, dst_stride, [rows, cols], [0, 0]);
            for c in 0..cols {
                for r in 0..rows {
                    let want = src[r * src_stride + c];
                    assert_eq!(fast[c * dst_stride + r], want, "{rows}x{cols} at ({r}, {c})");
                    assert_eq!(plain[c * dst_stride + r], want, "portable, {rows}x{cols} at ({r}, {c})");
                }
                // The gaps between the rows of `dst` are left alone.
                assert!(fast[c * dst_stride + rows..][..(dst_stride - rows).min(fast.len() - c * dst_stride - rows)]
                    .iter()
                    .all(|v| v.is_nan()));
            }
        }
    }
}
