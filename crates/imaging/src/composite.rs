//! Compositing: put a replacement product into the masked region of a scene
//! (the Flask app's replace step).
//!
//! Everything is computed on the mask's bounding box `B` only: the product is
//! resized (Lanczos3, premultiplied alpha) straight to the part of it that is
//! visible inside `B`, the feathering distance transform covers `B` plus a
//! one-pixel ring, and the output is a copy of the scene in which only pixels
//! inside `B` are written. Pixels outside `B` are bit-identical to the scene.

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{GrayImage, RgbImage, RgbaImage};

/// Which pixels of the scene the product's colours are matched to.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum GradeTarget {
    /// The scene pixels under the mask (the product being replaced).
    MaskedArea,
    /// Every pixel of the scene.
    WholeImage,
}

/// Colour-grading settings.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Grading {
    /// Statistics to move towards.
    pub target: GradeTarget,
    /// 0 = product unchanged, 1 = product mean/std equal the target's.
    pub strength: f32,
}

/// User settings of one "replace product" request (serialised to repeat the composite at
/// full resolution, see `fullres`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Settings {
    /// Product's shorter side relative to the mask box's shorter side, 0.5..=2.0.
    pub scale_factor: f32,
    /// Feather the mask edge and harmonise the seam.
    pub use_blending: bool,
    /// Width of the feathered edge in pixels, 0..=30.
    pub feather_amount: u32,
    /// Optional colour grading.
    pub grading: Option<Grading>,
}

/// An axis-aligned rectangle in pixel coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
}

impl Rect {
    /// Whether `(x, y)` lies inside the rectangle.
    pub fn contains(&self, x: u32, y: u32) -> bool {
        x >= self.x && y >= self.y && x - self.x < self.w && y - self.y < self.h
    }
}

/// Why a composite could not be made. Messages are meant for end users.
#[derive(Debug, thiserror::Error)]
pub enum CompositeError {
    #[error("The mask is empty: draw a box around the product and generate a mask first.")]
    EmptyMask,
    #[error("The mask is {mask_w}x{mask_h} pixels but the image is {scene_w}x{scene_h}: generate the mask again for this image.")]
    SizeMismatch { scene_w: u32, scene_h: u32, mask_w: u32, mask_h: u32 },
    #[error("The product image is empty (it has no pixels).")]
    EmptyProduct,
    #[error("Invalid setting: {0}.")]
    InvalidSettings(&'static str),
    #[error("The product image could not be resized: {0}")]
    Resize(String),
}

/// Mask values above this are "in".
pub(crate) const MASK_THRESHOLD: u8 = 127;
/// Inside-mask pixels at most this far from the edge are softened by the seam blur.
pub(crate) const HARMONISE_BAND: f32 = 2.0;
/// Largest feather width honoured, in pixels.
const MAX_FEATHER: u32 = 30;

/// Bounding box of the pixels with value > 127, or `None` when there are none.
pub fn mask_bbox(mask: &GrayImage) -> Option<Rect> {
    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
    for (y, row) in mask.as_raw().chunks_exact(mask.width().max(1) as usize).enumerate() {
        if let Some(first) = row.iter().position(|&v| v > MASK_THRESHOLD) {
            let last = row.iter().rposition(|&v| v > MASK_THRESHOLD).unwrap_or(first);
            (x0, x1) = (x0.min(first), x1.max(last));
            (y0, y1) = (y0.min(y), y);
        }
    }
    (x0 <= x1 && y0 <= y1).then(|| Rect {
        x: x0 as u32,
        y: y0 as u32,
        w: (x1 - x0 + 1) as u32,
        h: (y1 - y0 + 1) as u32,
    })
}

/// Replace the masked product of `scene` by `product`.
///
/// Out-of-range settings are clamped into their documented ranges; non-finite
/// ones are rejected. The result has the scene's size and differs from it only
/// inside the mask's bounding box, and only where the mask is set.
pub fn replace_product(
    scene: &RgbImage,
    mask: &GrayImage,
    product: &RgbaImage,
    settings: &Settings,
) -> Result<RgbImage, CompositeError> {
    let params = Params::from_settings(settings)?;
    check_inputs(scene, mask, product)?;
    let bbox = mask_bbox(mask).ok_or(CompositeError::EmptyMask)?;
    let mut placed = place_product(product, bbox, params.scale)?;
    grading_luts(scene, mask, bbox, &placed, params.grading).apply(&mut placed);
    let field = MaskField::new(mask, bbox, params.feather);
    let mut out = scene.clone();
    let ctx = Layers { bbox, placed: &placed, field: &field };
    composite_into(&mut out, &ctx);
    if params.feather > 0 {
        harmonise_seam(&mut out, &ctx);
    }
    Ok(out)
}

/// Validated and clamped settings.
pub(crate) struct Params {
    pub(crate) scale: f64,
    pub(crate) feather: u32,
    pub(crate) grading: Option<Grading>,
}

impl Params {
    pub(crate) fn from_settings(s: &Settings) -> Result<Self, CompositeError> {
        if !s.scale_factor.is_finite() {
            return Err(CompositeError::InvalidSettings("the product scale must be a number"));
        }
        let grading = match s.grading {
            Some(g) if !g.strength.is_finite() => {
                return Err(CompositeError::InvalidSettings("the grading strength must be a number"))
            }
            Some(g) => Some(Grading { strength: g.strength.clamp(0.0, 1.0), ..g }),
            None => None,
        };
        let feather = if s.use_blending { s.feather_amount.min(MAX_FEATHER) } else { 0 };
        Ok(Params { scale: f64::from(s.scale_factor.clamp(0.5, 2.0)), feather, grading })
    }
}

pub(crate) fn check_inputs(scene: &RgbImage, mask: &GrayImage, product: &RgbaImage) -> Result<(), CompositeError> {
    if scene.dimensions() != mask.dimensions() {
        return Err(CompositeError::SizeMismatch {
            scene_w: scene.width(),
            scene_h: scene.height(),
            mask_w: mask.width(),
            mask_h: mask.height(),
        });
    }
    if product.width() == 0 || product.height() == 0 {
        return Err(CompositeError::EmptyProduct);
    }
    Ok(())
}

/// The visible part of the resized product, in coordinates local to `B`.
pub(crate) struct Placed {
    /// Where the pixels sit, relative to the top-left corner of `B`.
    pub(crate) rect: Rect,
    /// Straight (non-premultiplied) RGBA, `rect.w * rect.h * 4` bytes.
    pub(crate) rgba: Vec<u8>,
}

impl Placed {
    /// RGBA at `B`-local `(x, y)`, or `None` outside the product.
    pub(crate) fn pixel(&self, x: u32, y: u32) -> Option<[u8; 4]> {
        if !self.rect.contains(x, y) {
            return None;
        }
        let i = ((y - self.rect.y) as usize * self.rect.w as usize + (x - self.rect.x) as usize) * 4;
        self.rgba.get(i..i + 4)?.try_into().ok()
    }
}

/// Full target size of the product: shorter side = round(min(B) * scale).
fn target_size(product: (u32, u32), bbox: Rect, scale: f64) -> (u64, u64) {
    let (pw, ph) = (f64::from(product.0), f64::from(product.1));
    let short = (f64::from(bbox.w.min(bbox.h)) * scale).round().max(1.0);
    // The cap only matters for absurd aspect ratios; it keeps later i64 maths exact.
    let long_of = |long: f64, short_src: f64| (long * short / short_src).round().clamp(1.0, 1e12) as u64;
    if pw <= ph {
        (short as u64, long_of(ph, pw))
    } else {
        (long_of(pw, ph), short as u64)
    }
}

/// One axis of the placement: product of length `full` centred in `0..len`.
/// Returns (start inside B, visible length, first visible product pixel).
fn centre_axis(len: u32, full: u64) -> (u32, u32, u64) {
    let offset = (i64::from(len) - full as i64).div_euclid(2);
    let start = offset.max(0);
    let end = (offset + full as i64).min(i64::from(len));
    let visible = (end - start).max(0) as u32;
    (start as u32, visible, (start - offset) as u64)
}

/// Resize the product (Lanczos3, premultiplied alpha) directly to the part of
/// it visible inside `bbox`, centred on `bbox`.
fn place_product(product: &RgbaImage, bbox: Rect, scale: f64) -> Result<Placed, CompositeError> {
    place_product_rows(product, bbox, scale, 0..bbox.h)
}

/// [`place_product`] for the rows `rows` of `B` only (`B`-local; the full-resolution
/// composite works in strips). The filter reads source pixels beyond the crop, so a
/// strip's rows are the rows the whole placement would have.
pub(crate) fn place_product_rows(
    product: &RgbaImage,
    bbox: Rect,
    scale: f64,
    rows: std::ops::Range<u32>,
) -> Result<Placed, CompositeError> {
    let (tw, th) = target_size(product.dimensions(), bbox, scale);
    let (x, w, skip_x) = centre_axis(bbox.w, tw);
    let (y, h, skip_y) = centre_axis(bbox.h, th);
    // The visible rows of the product, cut to `rows`.
    let (top, bottom) = (y.max(rows.start), (y + h).min(rows.end));
    let (y, h, skip_y) = (top, bottom.saturating_sub(top), skip_y + u64::from(top.saturating_sub(y)));
    let rect = Rect { x, y, w, h };
    if w == 0 || h == 0 {
        return Ok(Placed { rect, rgba: Vec::new() });
    }
    let (sw, sh) = (f64::from(product.width()), f64::from(product.height()));
    let crop_axis = |skip: u64, vis: u32, full: u64, src: f64| {
        let left = skip as f64 * src / full as f64;
        let right = ((skip + u64::from(vis)) as f64 * src / full as f64).min(src);
        (left, right - left)
    };
    let (left, width) = crop_axis(skip_x, w, tw, sw);
    let (top, height) = crop_axis(skip_y, h, th, sh);
    let resize_err = |e: &dyn std::fmt::Display| CompositeError::Resize(e.to_string());
    let src = ImageRef::new(product.width(), product.height(), product.as_raw(), PixelType::U8x4)
        .map_err(|e| resize_err(&e))?;
    let mut dst = Image::new(w, h, PixelType::U8x4);
    let options = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3))
        .crop(left, top, width, height)
        .use_alpha(true);
    Resizer::new().resize(&src, &mut dst, &options).map_err(|e| resize_err(&e))?;
    Ok(Placed { rect, rgba: dst.into_vec() })
}

/// Mean and (population) standard deviation of one channel.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Moments {
    mean: f64,
    std: f64,
}

/// Moments of the R, G and B channels.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ChannelStats([Moments; 3]);

impl ChannelStats {
    /// Statistics of an iterator of pixels whose first three bytes are RGB.
    /// `None` when there are no pixels.
    fn from_rgb<'a>(pixels: impl Iterator<Item = &'a [u8]>) -> Option<Self> {
        let (mut n, mut sums) = (0u64, [(0u64, 0u64); 3]);
        for p in pixels {
            n += 1;
            for ((sum, sq), &v) in sums.iter_mut().zip(p) {
                *sum += u64::from(v);
                *sq += u64::from(v) * u64::from(v);
            }
        }
        let n = (n > 0).then_some(n as f64)?;
        Some(ChannelStats(sums.map(|(sum, sq)| {
            let mean = sum as f64 / n;
            Moments { mean, std: (sq as f64 / n - mean * mean).max(0.0).sqrt() }
        })))
    }
}

/// Statistics of the scene under the mask (only `bbox` is visited).
fn masked_stats(scene: &RgbImage, mask: &GrayImage, bbox: Rect) -> Option<ChannelStats> {
    let (skip, take) = (bbox.x as usize, bbox.w as usize);
    let scene_rows = scene.as_raw().chunks_exact(scene.width().max(1) as usize * 3);
    let mask_rows = mask.as_raw().chunks_exact(mask.width().max(1) as usize);
    let rows = scene_rows.zip(mask_rows).skip(bbox.y as usize).take(bbox.h as usize);
    let pixels = rows.flat_map(|(srow, mrow)| {
        let row = srow.chunks_exact(3).zip(mrow).skip(skip).take(take);
        row.filter(|(_, &m)| m > MASK_THRESHOLD).map(|(p, _)| p)
    });
    ChannelStats::from_rgb(pixels)
}

/// The colour grading of one composite: a lookup table per channel (`None`: unchanged).
/// Made once at working resolution and applied at any resolution, so the full-resolution
/// result has the colours of the preview.
#[derive(Debug, Clone, Default)]
pub(crate) struct GradeLuts([Option<[u8; 256]>; 3]);

impl GradeLuts {
    /// Grades the product's opaque pixels.
    pub(crate) fn apply(&self, placed: &mut Placed) {
        if self.0.iter().all(Option::is_none) {
            return;
        }
        for p in placed.rgba.chunks_exact_mut(4).filter(|p| p[3] > 0) {
            for (v, lut) in p.iter_mut().zip(&self.0) {
                if let Some(lut) = lut {
                    *v = lut[usize::from(*v)];
                }
            }
        }
    }
}

/// The grading of `placed` (the product placed in `bbox` of `scene`) under `grading`.
pub(crate) fn grading_luts(
    scene: &RgbImage,
    mask: &GrayImage,
    bbox: Rect,
    placed: &Placed,
    grading: Option<Grading>,
) -> GradeLuts {
    let Some(grading) = grading else { return GradeLuts::default() };
    let target = match grading.target {
        GradeTarget::MaskedArea => masked_stats(scene, mask, bbox),
        GradeTarget::WholeImage => ChannelStats::from_rgb(scene.as_raw().chunks_exact(3)),
    };
    match target {
        Some(target) => product_luts(placed, &target, grading.strength),
        None => GradeLuts::default(),
    }
}

/// Tables that move the product's opaque pixels towards `target` by `strength`
/// (`new = (x − μp)/σp · σ' + μ'`, clipped); channels with σp = 0 are left alone.
fn product_luts(placed: &Placed, target: &ChannelStats, strength: f32) -> GradeLuts {
    let opaque = placed.rgba.chunks_exact(4).filter(|p| p[3] > 0);
    let Some(ChannelStats(src)) = ChannelStats::from_rgb(opaque) else { return GradeLuts::default() };
    let mut luts = [None; 3];
    for ((lut, p), t) in luts.iter_mut().zip(src).zip(target.0) {
        *lut = grade_lut(p, t, f64::from(strength));
    }
    GradeLuts(luts)
}

/// Lookup table of the grading transform for one channel, `None` if σp = 0.
fn grade_lut(product: Moments, target: Moments, s: f64) -> Option<[u8; 256]> {
    if product.std <= f64::EPSILON {
        return None;
    }
    let mean = (1.0 - s) * product.mean + s * target.mean;
    let std = (1.0 - s) * product.std + s * target.std;
    let mut lut = [0u8; 256];
    for (x, out) in lut.iter_mut().enumerate() {
        *out = ((x as f64 - product.mean) / product.std * std + mean).round().clamp(0.0, 255.0) as u8;
    }
    Some(lut)
}

/// Distance of every pixel of `B` to the nearest pixel outside the mask,
/// stored with a one-pixel ring around `B` (which is always outside).
pub(crate) struct MaskField {
    /// Padded width (`B.w + 2`).
    stride: usize,
    /// Euclidean distance, 0 outside the mask (infinite for a hard mask).
    dist: Vec<f32>,
    feather: u32,
}

impl MaskField {
    /// Build the field; the distance transform only runs when `feather > 0`.
    pub(crate) fn new(mask: &GrayImage, bbox: Rect, feather: u32) -> Self {
        let (stride, rows) = (bbox.w as usize + 2, bbox.h as usize + 2);
        let mut dist = vec![0.0f32; stride * rows];
        for (ly, row) in dist.chunks_exact_mut(stride).enumerate().skip(1).take(bbox.h as usize) {
            for (lx, d) in row.iter_mut().enumerate().skip(1).take(bbox.w as usize) {
                let (x, y) = (bbox.x + lx as u32 - 1, bbox.y + ly as u32 - 1);
                if mask.get_pixel_checked(x, y).is_some_and(|p| p.0[0] > MASK_THRESHOLD) {
                    *d = f32::INFINITY;
                }
            }
        }
        if feather > 0 {
            euclidean_distance_transform(&mut dist, stride);
        }
        MaskField { stride, dist, feather }
    }

    /// Distance at `B`-local `(x, y)`.
    pub(crate) fn distance(&self, x: u32, y: u32) -> f32 {
        let i = (y as usize + 1) * self.stride + x as usize + 1;
        self.dist.get(i).copied().unwrap_or(0.0)
    }

    /// Mask weight in 0..=1: 0 outside, ramping to 1 at `feather` px inside.
    pub(crate) fn weight(&self, x: u32, y: u32) -> f32 {
        let d = self.distance(x, y);
        match (d > 0.0, self.feather) {
            (false, _) => 0.0,
            (true, 0) => 1.0,
            (true, f) => (d / f as f32).min(1.0),
        }
    }
}

/// Exact Euclidean distance transform in place: zeros are sources,
/// infinities become distances to the nearest zero. Vertical distances come
/// from two sweeps, then each row gets the Felzenszwalb–Huttenlocher lower
/// envelope of parabolas.
fn euclidean_distance_transform(grid: &mut [f32], stride: usize) {
    if stride == 0 {
        return;
    }
    column_distances(grid, stride);
    let mut dt = Dt1d::default();
    for row in grid.chunks_exact_mut(stride) {
        row.iter_mut().for_each(|v| *v *= *v);
        dt.squared(row);
        row.iter_mut().for_each(|v| *v = v.sqrt());
    }
}

/// Vertical distance of every cell to the nearest zero in its column.
fn column_distances(grid: &mut [f32], stride: usize) {
    let rows = grid.len() / stride;
    for y in 1..rows {
        let (head, tail) = grid.split_at_mut(y * stride);
        let (Some(prev), Some(cur)) = (head.chunks_exact(stride).last(), tail.chunks_exact_mut(stride).next()) else {
            continue;
        };
        for (c, p) in cur.iter_mut().zip(prev).filter(|(c, _)| **c != 0.0) {
            *c = *p + 1.0;
        }
    }
    for y in (1..rows).rev() {
        let (head, tail) = grid.split_at_mut(y * stride);
        let (Some(cur), Some(next)) = (head.chunks_exact_mut(stride).last(), tail.chunks_exact(stride).next()) else {
            continue;
        };
        for (c, n) in cur.iter_mut().zip(next) {
            *c = c.min(*n + 1.0);
        }
    }
}

/// Scratch space of the 1-D squared distance transform.
#[derive(Default)]
struct Dt1d {
    /// Parabolas of the lower envelope: (position, value at position).
    v: Vec<(usize, f64)>,
    /// Left boundary of each parabola's interval.
    z: Vec<f64>,
}

impl Dt1d {
    /// In place: `f[q] = min_p (q − p)² + f[p]`; infinite samples are not sources.
    fn squared(&mut self, f: &mut [f32]) {
        self.v.clear();
        self.z.clear();
        for (q, &fq) in f.iter().enumerate().filter(|(_, v)| v.is_finite()) {
            let (qf, fq) = (q as f64, f64::from(fq));
            while let (Some(&(p, fp)), Some(&zk)) = (self.v.last(), self.z.last()) {
                let pf = p as f64;
                let s = ((fq + qf * qf) - (fp + pf * pf)) / (2.0 * (qf - pf));
                if s <= zk && self.v.len() > 1 {
                    self.v.pop();
                    self.z.pop();
                } else {
                    self.z.push(s);
                    break;
                }
            }
            if self.v.is_empty() {
                self.z.push(f64::NEG_INFINITY);
            }
            self.v.push((q, fq));
        }
        let mut k = 0;
        for (q, out) in f.iter_mut().enumerate() {
            let qf = q as f64;
            while self.z.get(k + 1).is_some_and(|&z| z < qf) {
                k += 1;
            }
            if let Some(&(p, fp)) = self.v.get(k) {
                let d = qf - p as f64;
                *out = (d * d + fp) as f32;
            }
        }
    }
}

/// Everything needed to write the product into the scene.
struct Layers<'a> {
    bbox: Rect,
    placed: &'a Placed,
    field: &'a MaskField,
}

impl Layers<'_> {
    /// Product RGBA and coverage (alpha × mask weight) at `B`-local `(x, y)`.
    fn coverage(&self, x: u32, y: u32) -> Option<([u8; 4], f32)> {
        let w = self.field.weight(x, y);
        let p = self.placed.pixel(x, y)?;
        let c = w * f32::from(p[3]) / 255.0;
        (c > 0.0).then_some((p, c))
    }
}

/// Blend the product over `out` inside `B`, writing only covered pixels.
fn composite_into(out: &mut RgbImage, ctx: &Layers) {
    let width = out.width() as usize;
    let buf: &mut [u8] = out;
    for ly in 0..ctx.bbox.h {
        for lx in 0..ctx.bbox.w {
            let Some((p, c)) = ctx.coverage(lx, ly) else { continue };
            let i = ((ctx.bbox.y + ly) as usize * width + (ctx.bbox.x + lx) as usize) * 3;
            let Some(px) = buf.get_mut(i..i + 3) else { continue };
            for (v, &pv) in px.iter_mut().zip(&p) {
                *v = (f32::from(*v) * (1.0 - c) + f32::from(pv) * c).round() as u8;
            }
        }
    }
}

/// Soften the seam: covered pixels within `HARMONISE_BAND` px of the mask edge
/// are replaced by the 3×3 mean of the blended result.
fn harmonise_seam(out: &mut RgbImage, ctx: &Layers) {
    let mut updates = Vec::new();
    for ly in 0..ctx.bbox.h {
        for lx in 0..ctx.bbox.w {
            let d = ctx.field.distance(lx, ly);
            if d > 0.0 && d <= HARMONISE_BAND && ctx.coverage(lx, ly).is_some() {
                let (x, y) = (ctx.bbox.x + lx, ctx.bbox.y + ly);
                updates.push((x, y, box_mean(out, x, y)));
            }
        }
    }
    for (x, y, rgb) in updates {
        if let Some(p) = out.get_pixel_mut_checked(x, y) {
            p.0 = rgb;
        }
    }
}

/// Mean of the 3×3 neighbourhood of `(x, y)` (neighbours outside the image skipped).
pub(crate) fn box_mean(img: &RgbImage, x: u32, y: u32) -> [u8; 3] {
    let (mut sum, mut n) = ([0u32; 3], 0u32);
    for ny in y.saturating_sub(1)..=y.saturating_add(1) {
        for nx in x.saturating_sub(1)..=x.saturating_add(1) {
            if let Some(p) = img.get_pixel_checked(nx, ny) {
                sum.iter_mut().zip(p.0).for_each(|(s, v)| *s += u32::from(v));
                n += 1;
            }
        }
    }
    sum.map(|s| ((s + n / 2) / n.max(1)) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Luma, Rgb, Rgba};

    fn rect_mask(w: u32, h: u32, r: Rect) -> GrayImage {
        GrayImage::from_fn(w, h, |x, y| Luma([if r.contains(x, y) { 255 } else { 0 }]))
    }

    /// Ellipse centred in a `w`×`h` mask with radii `w/4`, `h/4`.
    fn ellipse_mask(w: u32, h: u32) -> GrayImage {
        GrayImage::from_fn(w, h, |x, y| {
            let (dx, dy) = ((x as f32 - w as f32 / 2.0) * 4.0 / w as f32, (y as f32 - h as f32 / 2.0) * 4.0 / h as f32);
            Luma([if dx * dx + dy * dy <= 1.0 { 255 } else { 0 }])
        })
    }

    fn hard(scale: f32) -> Settings {
        Settings { scale_factor: scale, use_blending: false, feather_amount: 0, grading: None }
    }

    fn textured(w: u32, h: u32, seed: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let v = (x * 7 + y * 13 + seed * 31) % 61;
            Rgb([60 + v as u8, 90 + (v as u8 / 2), 120 + ((v * 3) % 41) as u8])
        })
    }

    fn stats_in(img: &RgbImage, r: Rect) -> [Moments; 3] {
        let px = (r.y..r.y + r.h).flat_map(|y| (r.x..r.x + r.w).map(move |x| (x, y)));
        ChannelStats::from_rgb(px.map(|(x, y)| &img.get_pixel(x, y).0[..])).unwrap().0
    }

    fn assert_outside_identical(a: &RgbImage, b: &RgbImage, r: Rect) {
        for (x, y, p) in a.enumerate_pixels().filter(|(x, y, _)| !r.contains(*x, *y)) {
            assert_eq!(p, b.get_pixel(x, y), "pixel ({x},{y}) outside B changed");
        }
    }

    #[test]
    fn bbox_of_mask() {
        let mut m = GrayImage::new(50, 40);
        assert_eq!(mask_bbox(&m), None);
        m.put_pixel(10, 5, Luma([128]));
        m.put_pixel(30, 20, Luma([255]));
        m.put_pixel(45, 35, Luma([127])); // not "in"
        assert_eq!(mask_bbox(&m), Some(Rect { x: 10, y: 5, w: 21, h: 16 }));
    }

    #[test]
    fn errors_on_bad_inputs() {
        let scene = RgbImage::new(20, 20);
        let product = RgbaImage::from_pixel(4, 4, Rgba([1, 2, 3, 255]));
        let full = GrayImage::from_pixel(20, 20, Luma([255]));
        let run = |s: &RgbImage, m: &GrayImage, p: &RgbaImage, scale| replace_product(s, m, p, &hard(scale));
        assert!(matches!(run(&scene, &GrayImage::new(20, 20), &product, 1.0), Err(CompositeError::EmptyMask)));
        assert!(matches!(
            run(&RgbImage::new(0, 0), &GrayImage::new(0, 0), &product, 1.0),
            Err(CompositeError::EmptyMask)
        ));
        let small = GrayImage::from_pixel(10, 20, Luma([255]));
        assert!(matches!(run(&scene, &small, &product, 1.0), Err(CompositeError::SizeMismatch { mask_w: 10, .. })));
        assert!(matches!(run(&scene, &full, &RgbaImage::new(0, 5), 1.0), Err(CompositeError::EmptyProduct)));
        assert!(matches!(run(&scene, &full, &product, f32::NAN), Err(CompositeError::InvalidSettings(_))));
    }

    #[test]
    fn distance_transform_is_exact_on_rectangle() {
        let b = Rect { x: 3, y: 2, w: 20, h: 12 };
        let field = MaskField::new(&rect_mask(30, 20, b), b, 5);
        for (lx, ly) in (0..b.h).flat_map(|y| (0..b.w).map(move |x| (x, y))) {
            let want = (lx + 1).min(ly + 1).min(b.w - lx).min(b.h - ly) as f32;
            assert!((field.distance(lx, ly) - want).abs() < 1e-4, "({lx},{ly})");
        }
    }

    #[test]
    fn distance_transform_matches_brute_force() {
        let (w, h, mut seed) = (37u32, 29u32, 12345u32);
        let mask = GrayImage::from_fn(w, h, |x, y| {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let blob = (x as i32 - 18).pow(2) + (y as i32 - 14).pow(2) < 150;
            Luma([if blob && !(seed >> 16).is_multiple_of(9) { 200 } else { 0 }])
            // blob with holes
        });
        let b = mask_bbox(&mask).unwrap();
        let field = MaskField::new(&mask, b, 3);
        let outside: Vec<(i64, i64)> = (-1..=h as i64)
            .flat_map(|y| (-1..=w as i64).map(move |x| (x, y)))
            .filter(|&(x, y)| mask.get_pixel_checked(x as u32, y as u32).is_none_or(|p| p.0[0] <= 127))
            .collect();
        for (lx, ly) in (0..b.h).flat_map(|y| (0..b.w).map(move |x| (x, y))) {
            let (x, y) = (i64::from(b.x + lx), i64::from(b.y + ly));
            let d2 = outside.iter().map(|&(ox, oy)| (ox - x).pow(2) + (oy - y).pow(2)).min().unwrap();
            assert!((field.distance(lx, ly) - (d2 as f32).sqrt()).abs() < 1e-3, "({lx},{ly})");
        }
    }

    #[test]
    fn feather_ramps_from_edge_to_inside() {
        let b = Rect { x: 5, y: 5, w: 40, h: 40 };
        let mut mask = rect_mask(50, 50, b);
        let field = MaskField::new(&mask, b, 10);
        let row: Vec<f32> = (0..20).map(|x| field.weight(x, 20)).collect();
        assert!((row[0] - 0.1).abs() < 1e-6, "edge pixel is 1/feather");
        assert!(row.windows(2).all(|w| w[1] >= w[0]), "monotonic: {row:?}");
        assert!(row[9..].iter().all(|&w| w == 1.0), "1 from feather px inside");
        assert_eq!(MaskField::new(&mask, b, 0).weight(0, 20), 1.0, "hard mask");
        mask.put_pixel(25, 25, Luma([0])); // in B, outside the mask
        assert_eq!(MaskField::new(&mask, b, 10).weight(20, 20), 0.0);
    }

    #[test]
    fn resize_uses_premultiplied_alpha() {
        // Opaque white square on transparent black: no dark fringe after resizing.
        let product = RgbaImage::from_fn(40, 40, |x, y| {
            let v = if (10..30).contains(&x) && (10..30).contains(&y) { 255 } else { 0 };
            Rgba([v, v, v, v])
        });
        let placed = place_product(&product, Rect { x: 0, y: 0, w: 17, h: 17 }, 1.0).unwrap();
        let fringe: Vec<_> = placed.rgba.chunks_exact(4).filter(|p| p[3] > 8 && p[3] < 250).collect();
        assert!(!fringe.is_empty());
        assert!(fringe.iter().all(|p| p[..3].iter().all(|&v| v >= 240)), "{fringe:?}");
    }

    #[test]
    fn product_is_scaled_by_shorter_side_and_centred() {
        let b = Rect { x: 50, y: 70, w: 100, h: 60 };
        let scene = RgbImage::from_pixel(200, 200, Rgb([0, 0, 255]));
        let product = RgbaImage::from_pixel(40, 20, Rgba([255, 0, 0, 255]));
        let out = replace_product(&scene, &rect_mask(200, 200, b), &product, &hard(0.5)).unwrap();
        let red: Vec<(u32, u32)> =
            out.enumerate_pixels().filter(|(_, _, p)| p.0[0] > 128).map(|(x, y, _)| (x, y)).collect();
        // Shorter side round(60 * 0.5) = 30, longer 60; centred: x 70..130, y 85..115.
        assert_eq!(red.len(), 60 * 30);
        assert!(red.iter().all(|&(x, y)| (70..130).contains(&x) && (85..115).contains(&y)));
        assert_outside_identical(&scene, &out, b);
    }

    #[test]
    fn scale_two_is_clipped_to_box() {
        let b = Rect { x: 30, y: 20, w: 50, h: 30 };
        let scene = textured(120, 80, 1);
        let product = RgbaImage::from_pixel(9, 13, Rgba([10, 200, 30, 255]));
        let out = replace_product(&scene, &rect_mask(120, 80, b), &product, &hard(2.0)).unwrap();
        for (x, y, p) in out.enumerate_pixels().filter(|(x, y, _)| b.contains(*x, *y)) {
            assert!(p.0[1] > 190 && p.0[0] < 20, "({x},{y}) {p:?}");
        }
        assert_outside_identical(&scene, &out, b);
    }

    #[test]
    fn transparent_product_and_unmasked_pixels_keep_scene() {
        let b = Rect { x: 10, y: 10, w: 40, h: 40 };
        let scene = textured(60, 60, 2);
        let mut mask = rect_mask(60, 60, b);
        mask.put_pixel(45, 30, Luma([0])); // inside B, outside the mask
                                           // Left half opaque, right half fully transparent (white under alpha 0).
        let product = RgbaImage::from_fn(40, 40, |x, _| Rgba([250, 250, 250, if x < 20 { 255 } else { 0 }]));
        let settings = Settings { use_blending: true, feather_amount: 6, ..hard(1.0) };
        let out = replace_product(&scene, &mask, &product, &settings).unwrap();
        for (x, y) in (b.y..b.y + b.h).flat_map(|y| (34..50).map(move |x| (x, y))) {
            assert_eq!(out.get_pixel(x, y), scene.get_pixel(x, y), "({x},{y})");
        }
        assert_eq!(out.get_pixel(45, 30), scene.get_pixel(45, 30));
        assert!(out.get_pixel(25, 30).0.iter().all(|&v| v >= 249), "deep inside = product");
        assert!(out.get_pixel(10, 30).0[0] < 200, "edge pixel is mostly scene");
        assert_outside_identical(&scene, &out, b);
    }

    /// Scene, graded result and B (40×20, same size as the product: no resampling).
    fn graded(target: GradeTarget, strength: f32, product: &RgbaImage) -> (RgbImage, RgbImage, Rect) {
        let b = Rect { x: 10, y: 10, w: 40, h: 20 };
        let scene = textured(60, 40, 3);
        let grading = Some(Grading { target, strength });
        let out = replace_product(&scene, &rect_mask(60, 40, b), product, &Settings { grading, ..hard(1.0) });
        (scene, out.unwrap(), b)
    }

    fn varied_product() -> RgbaImage {
        RgbaImage::from_fn(40, 20, |x, y| {
            let v = ((x * 5 + y * 11) % 90) as u8;
            Rgba([100 + v, 80 + v / 2, 40 + v, 255])
        })
    }

    #[test]
    fn grading_strength_zero_keeps_product() {
        let product = varied_product();
        let (_, out, b) = graded(GradeTarget::MaskedArea, 0.0, &product);
        for (x, y, p) in product.enumerate_pixels() {
            assert_eq!(&out.get_pixel(b.x + x, b.y + y).0[..], &p.0[..3]);
        }
    }

    #[test]
    fn grading_strength_one_matches_target_stats() {
        for (target, whole) in [(GradeTarget::MaskedArea, false), (GradeTarget::WholeImage, true)] {
            let (scene, out, b) = graded(target, 1.0, &varied_product());
            let want = stats_in(&scene, if whole { Rect { x: 0, y: 0, w: 60, h: 40 } } else { b });
            for (w, g) in want.iter().zip(stats_in(&out, b)) {
                assert!((w.mean - g.mean).abs() <= 1.0 && (w.std - g.std).abs() <= 1.0, "{target:?} {w:?} {g:?}");
            }
        }
    }

    #[test]
    fn grading_leaves_flat_channel_alone() {
        let product = RgbaImage::from_fn(40, 20, |x, y| Rgba([200, (x * 6) as u8, (y * 9) as u8, 255]));
        let (scene, out, b) = graded(GradeTarget::MaskedArea, 1.0, &product);
        assert!((0..20).all(|y| (0..40).all(|x| out.get_pixel(b.x + x, b.y + y).0[0] == 200)));
        let (want, got) = (stats_in(&scene, b), stats_in(&out, b));
        assert!((want[1].mean - got[1].mean).abs() <= 1.0, "other channels still graded");
    }

    #[test]
    fn photo_product_with_all_options() {
        // A photo-sized, textured product (unit tests need no fixtures; tests/ use photos).
        let product = image::DynamicImage::ImageRgb8(textured(600, 400, 7)).to_rgba8();
        let (scene, mask) = (textured(320, 240, 4), ellipse_mask(320, 240));
        let b = mask_bbox(&mask).unwrap();
        for target in [GradeTarget::MaskedArea, GradeTarget::WholeImage] {
            let grading = Some(Grading { target, strength: 0.7 });
            let s = Settings { scale_factor: 1.3, use_blending: true, feather_amount: 30, grading };
            let out = replace_product(&scene, &mask, &product, &s).unwrap();
            assert_eq!(out.dimensions(), scene.dimensions());
            assert_outside_identical(&scene, &out, b);
            assert_eq!(out.get_pixel(b.x, b.y), scene.get_pixel(b.x, b.y), "B corner is outside the ellipse");
            assert_ne!(out.get_pixel(160, 120), scene.get_pixel(160, 120));
        }
    }

    #[test]
    fn extreme_aspect_products_do_not_blow_up() {
        let (scene, mask) = (textured(64, 64, 5), GrayImage::from_pixel(64, 64, Luma([255])));
        for product in [RgbaImage::from_pixel(1, 5000, Rgba([9, 9, 9, 255])), RgbaImage::new(1, 1)] {
            let out = replace_product(&scene, &mask, &product, &hard(2.0)).unwrap();
            assert_eq!(out.dimensions(), (64, 64));
        }
    }

    /// `cargo test --release -- --ignored --nocapture bench`
    #[test]
    #[ignore]
    fn bench_1280x853() {
        let product = image::DynamicImage::ImageRgb8(textured(600, 400, 7)).to_rgba8();
        let (scene, mask) = (textured(1280, 853, 6), ellipse_mask(1280, 853));
        let grading = Some(Grading { target: GradeTarget::MaskedArea, strength: 0.5 });
        let s = Settings { scale_factor: 1.0, use_blending: true, feather_amount: 15, grading };
        let (runs, start) = (20, std::time::Instant::now());
        for _ in 0..runs {
            std::hint::black_box(replace_product(&scene, &mask, &product, &s).unwrap());
        }
        println!("replace_product 1280x853, B = {:?}: {:?}/run", mask_bbox(&mask), start.elapsed() / runs);
    }
}
