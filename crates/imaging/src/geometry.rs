//! The box a user draws, in working-image pixels, and its clipping to the image.

use serde::Serialize;

/// A box in working-image pixels: `[x_min, x_max) x [y_min, y_max)`, inside the image, non-empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BoxPrompt {
    pub x_min: u32,
    pub y_min: u32,
    pub x_max: u32,
    pub y_max: u32,
}

impl BoxPrompt {
    pub fn width(&self) -> u32 {
        self.x_max - self.x_min
    }
    pub fn height(&self) -> u32 {
        self.y_max - self.y_min
    }
}

/// A requested box that has no pixels of the image.
#[derive(Debug, thiserror::Error)]
#[error("the box is empty or outside the image ({0})")]
pub struct BadBox(String);

/// Clips a requested box (floating point, any values) to the image; refuses empty results.
pub fn clip_box(coords: [f64; 4], width: u32, height: u32) -> Result<BoxPrompt, BadBox> {
    if coords.iter().any(|c| !c.is_finite()) {
        return Err(BadBox("coordinates must be finite numbers".into()));
    }
    let [x0, y0, x1, y1] = coords;
    let (x_lo, x_hi) = (x0.min(x1), x0.max(x1));
    let (y_lo, y_hi) = (y0.min(y1), y0.max(y1));
    let clamp = |v: f64, max: u32| v.round().clamp(0.0, f64::from(max)) as u32;
    let prompt = BoxPrompt {
        x_min: clamp(x_lo, width),
        y_min: clamp(y_lo, height),
        x_max: clamp(x_hi, width),
        y_max: clamp(y_hi, height),
    };
    if prompt.x_max <= prompt.x_min || prompt.y_max <= prompt.y_min {
        return Err(BadBox(format!("after clipping to the {width}x{height} image the box has no area")));
    }
    Ok(prompt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxes_are_clipped_and_empty_boxes_refused() {
        let b = clip_box([-10.0, 5.0, 50.0, 500.0], 100, 80).unwrap();
        assert_eq!(b, BoxPrompt { x_min: 0, y_min: 5, x_max: 50, y_max: 80 });
        let swapped = clip_box([50.0, 60.0, 10.0, 20.0], 100, 80).unwrap();
        assert_eq!(swapped, BoxPrompt { x_min: 10, y_min: 20, x_max: 50, y_max: 60 });
        assert!(clip_box([200.0, 0.0, 300.0, 10.0], 100, 80).is_err());
        assert!(clip_box([10.0, 10.0, 10.0, 40.0], 100, 80).is_err());
        assert!(clip_box([f64::NAN, 0.0, 10.0, 10.0], 100, 80).is_err());
    }
}
