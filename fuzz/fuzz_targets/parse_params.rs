//! The request parsers: the `/generate_mask` box JSON, then the box clipped to an
//! image, and the `/replace_product` settings fields. Input: `S` + six NUL-separated
//! fields for settings, otherwise a JSON body (a leading `B` is skipped).
#![no_main]

use drishya_imaging::clip_box;
use drishya_imaging::params::{parse_box, parse_settings, ReplaceFields};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((b'S', rest)) => {
            let text = String::from_utf8_lossy(rest);
            let mut f = text.split('\0');
            let fields = ReplaceFields {
                scale_factor: f.next(),
                use_blending: f.next(),
                feather_amount: f.next(),
                enable_color_grading: f.next(),
                color_grade_strength: f.next(),
                grading_method: f.next(),
            };
            if let Ok(s) = parse_settings(&fields) {
                assert!((0.5..=2.0).contains(&s.scale_factor));
                assert!(s.feather_amount <= 30);
                if let Some(g) = s.grading {
                    assert!((0.0..=1.0).contains(&g.strength));
                }
            }
        }
        Some((b'B', rest)) => check_box(rest),
        _ => check_box(data),
    }
});

fn check_box(body: &[u8]) {
    if let Ok(coords) = parse_box(body) {
        if let Ok(b) = clip_box(coords, 640, 480) {
            assert!(b.x_min < b.x_max && b.x_max <= 640);
            assert!(b.y_min < b.y_max && b.y_max <= 480);
        }
    }
}
