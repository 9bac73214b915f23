//! The engine tests' helpers: the fixtures (shared with the app's tests) and the
//! onnxruntime reference tensors (`models/reference/*.npy`).
#![allow(dead_code)]

#[path = "../../../../tests/common/fixtures.rs"]
mod fixtures;

pub use fixtures::*;

use std::path::Path;

/// Reads a little-endian float32 `.npy` file: (shape, values).
pub fn npy_f32(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = read(path);
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{} is not .npy", path.display());
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
    };
    let header = std::str::from_utf8(&bytes[start..start + header_len]).unwrap();
    assert!(header.contains("'descr': '<f4'") && header.contains("'fortran_order': False"), "{header}");
    let shape_text = header.split("'shape': (").nth(1).unwrap().split(')').next().unwrap();
    let shape: Vec<usize> = shape_text.split(',').filter_map(|s| s.trim().parse().ok()).collect();
    let data: Vec<f32> =
        bytes[start + header_len..].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    assert_eq!(data.len(), shape.iter().product::<usize>(), "{}", path.display());
    (shape, data)
}

/// Largest absolute difference between two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

pub fn reference(name: &str) -> (Vec<usize>, Vec<f32>) {
    npy_f32(&shared(&format!("models/reference/{name}.npy")))
}
