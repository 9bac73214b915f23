//! Any bytes through the upload path: sniff, header checks, decode (incl. the reduced
//! JPEG path), EXIF orientation, flatten, area downscale; and the product decoder.
//! Errors are fine; panics, aborts and runaway allocations are findings.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A small target width makes the reduced-scale JPEG path reachable from small inputs.
    if let Ok(scene) = drishya_imaging::decode_scene(data, 64) {
        assert!(scene.image.width() <= 64);
        assert!(scene.image.width() > 0 && scene.image.height() > 0);
    }
    let _ = drishya_imaging::decode_product(data);
});
