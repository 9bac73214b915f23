//! The result at the photo's own resolution.
//!
//! Every step before it runs on the working image (at most `MAX_IMAGE_WIDTH` wide), and the
//! mask is in that image. Only the mask's bounding box changes in a composite, so the full-
//! resolution result is the photo decoded once at full size, with the composite redone in
//! that box alone:
//!
//! * the box, scaled by photo width / working width (and the same for heights), is the
//!   region `R`; every pixel outside it is the decoded photo's, bit for bit;
//! * inside `R` the mask is the working mask upsampled bilinearly and thresholded, so its
//!   edge follows the contour smoothly rather than in working-pixel steps;
//! * the product is placed in `R` as the working composite places it in the box, resized
//!   straight from the uploaded product (Lanczos3), feathered over the feather width scaled
//!   to the photo, and graded with the very tables the working composite used (the preview's
//!   colours);
//! * `R` is done in strips of rows, each with its own slice of mask, distance field and
//!   product, so a box covering the whole photo costs the decoded photo plus one strip.
//!
//! The photo is decoded once (oriented and flattened in place): a 24 MP photo is held as one
//! RGB buffer, never two.

use std::ops::Range;

use image::metadata::Orientation;
use image::{DynamicImage, GrayImage, ImageFormat, Luma, RgbImage, RgbaImage};

use crate::codec::{self, ImageError};
use crate::composite::{
    box_mean, check_inputs, grading_luts, mask_bbox, place_product_rows, CompositeError, MaskField, Params, Rect,
    Settings, HARMONISE_BAND,
};

/// Pixels of `R` a strip covers (its rows are `STRIP_PIXELS / R.w`, at least `MIN_STRIP_ROWS`):
/// a strip's scratch (distance field, mask, product, copy of the rows) stays a small part of
/// the decoded photo however wide it is, and its margins (the feather width above and below)
/// stay small beside the strip.
const STRIP_PIXELS: u64 = 1 << 21;
const MIN_STRIP_ROWS: u32 = 16;

/// Largest photo whose full-resolution result is made as a WebP: image-webp's lossless
/// encoder copies the pixels to RGBA and holds the whole encoded frame, so a WebP takes
/// several times the memory of a PNG of the same photo (docs/performance.md).
pub const MAX_WEBP_PIXELS: u64 = 25_000_000;

/// A photo's size in pixels from its header alone (before any orientation: the count is
/// what matters).
pub fn photo_size(bytes: &[u8]) -> Result<(u32, u32), ImageError> {
    let (_, decoder) = codec::open_decoder(bytes)?;
    Ok(image::ImageDecoder::dimensions(&decoder))
}

/// Decodes a photo at full size as [`codec::decode_scene`] does before it downscales:
/// sniffed, within the same limits, EXIF-oriented, transparent pixels over white. The
/// pixels are decoded into one buffer that is then turned and flattened in place.
pub fn decode_full(bytes: &[u8]) -> Result<RgbImage, ImageError> {
    let (format, mut decoder) = codec::open_decoder(bytes)?;
    if format == ImageFormat::Jpeg && !codec::jpeg_is_complete(bytes) {
        return Err(ImageError::Corrupt { format: "JPEG" });
    }
    let (width, height) = image::ImageDecoder::dimensions(&decoder);
    codec::check_dimensions(width, height)?;
    let orientation = image::ImageDecoder::orientation(&mut decoder).unwrap_or(Orientation::NoTransforms);
    let image = DynamicImage::from_decoder(decoder).map_err(|e| codec::classify(e, codec::format_name(format)))?;
    let rgb = match image {
        DynamicImage::ImageRgb8(rgb) => rgb,
        DynamicImage::ImageRgba8(rgba) => flatten_in_place(rgba),
        // Grey and 16-bit images: their RGB copy is the only RGB buffer.
        other => codec::flatten_over_white(other),
    };
    Ok(orient_in_place(rgb, orientation))
}

/// RGBA to RGB over white, in the RGBA buffer (each pixel moves down, never over one
/// not yet read), with the rounding of [`codec::flatten_over_white`].
fn flatten_in_place(rgba: RgbaImage) -> RgbImage {
    let (width, height) = rgba.dimensions();
    let mut raw = rgba.into_raw();
    let pixels = raw.len() / 4;
    for i in 0..pixels {
        let (r, g, b, a) = (raw[4 * i], raw[4 * i + 1], raw[4 * i + 2], u32::from(raw[4 * i + 3]));
        for (c, v) in [r, g, b].into_iter().enumerate() {
            raw[3 * i + c] = ((u32::from(v) * a + 255 * (255 - a) + 127) / 255) as u8;
        }
    }
    raw.truncate(pixels * 3);
    raw.shrink_to_fit();
    // The length is width * height * 3 by construction.
    RgbImage::from_raw(width, height, raw).unwrap_or_default()
}

/// The EXIF orientation applied in the image's own buffer, with the result of
/// `DynamicImage::apply_orientation` (which copies the image for the quarter turns).
pub(crate) fn orient_in_place(mut image: RgbImage, orientation: Orientation) -> RgbImage {
    use image::imageops::{flip_horizontal_in_place, flip_vertical_in_place, rotate180_in_place};
    match orientation {
        Orientation::NoTransforms => {}
        Orientation::Rotate180 => rotate180_in_place(&mut image),
        Orientation::FlipHorizontal => flip_horizontal_in_place(&mut image),
        Orientation::FlipVertical => flip_vertical_in_place(&mut image),
        // A quarter turn is a transpose and a flip.
        Orientation::Rotate90 => {
            image = transpose_in_place(image);
            flip_horizontal_in_place(&mut image);
        }
        Orientation::Rotate270 => {
            image = transpose_in_place(image);
            flip_vertical_in_place(&mut image);
        }
        Orientation::Rotate90FlipH => image = transpose_in_place(image),
        Orientation::Rotate270FlipH => {
            image = transpose_in_place(image);
            rotate180_in_place(&mut image);
        }
    }
    image
}

/// Transposes a `w`x`h` image in its own buffer by following the permutation's cycles
/// (a bit per pixel marks those already moved).
fn transpose_in_place(image: RgbImage) -> RgbImage {
    let (w, h) = image.dimensions();
    let mut raw = image.into_raw();
    let n = w as usize * h as usize;
    if w > 1 && h > 1 {
        let (w, h) = (w as usize, h as usize);
        // Pixel (x, y) at y * w + x goes to x * h + y.
        let dest = |i: usize| (i % w) * h + i / w;
        let mut moved = vec![0u64; n.div_ceil(64)];
        for start in 0..n {
            if moved[start / 64] >> (start % 64) & 1 == 1 {
                continue;
            }
            let mut carried = [raw[3 * start], raw[3 * start + 1], raw[3 * start + 2]];
            let mut i = start;
            loop {
                let j = dest(i);
                let held = [raw[3 * j], raw[3 * j + 1], raw[3 * j + 2]];
                raw[3 * j..3 * j + 3].copy_from_slice(&carried);
                moved[j / 64] |= 1 << (j % 64);
                carried = held;
                i = j;
                if j == start {
                    break;
                }
            }
        }
    }
    RgbImage::from_raw(h, w, raw).unwrap_or_default()
}

/// Redoes the working composite of `product` into `mask` (both as `replace_product` was
/// given them, with `working` the working image) in `full`, the same photo at its own
/// size. Returns the region `R` written; `full` is unchanged outside it.
pub fn composite_full(
    full: &mut RgbImage,
    working: &RgbImage,
    mask: &GrayImage,
    product: &RgbaImage,
    settings: &Settings,
) -> Result<Rect, CompositeError> {
    composite_in_strips(full, working, mask, product, settings, STRIP_PIXELS)
}

fn composite_in_strips(
    full: &mut RgbImage,
    working: &RgbImage,
    mask: &GrayImage,
    product: &RgbaImage,
    settings: &Settings,
    strip_pixels: u64,
) -> Result<Rect, CompositeError> {
    let params = Params::from_settings(settings)?;
    check_inputs(working, mask, product)?;
    let bbox = mask_bbox(mask).ok_or(CompositeError::EmptyMask)?;
    // The grading tables of the working composite: the preview's colours.
    let placed = place_product_rows(product, bbox, params.scale, 0..bbox.h)?;
    let luts = grading_luts(working, mask, bbox, &placed, params.grading);
    drop(placed);

    let sampler = MaskSampler::new(mask, full.dimensions());
    let region = sampler.region(bbox);
    let local = Rect { x: 0, y: 0, w: region.w, h: region.h };
    let feather = match params.feather {
        0 => 0,
        f => (f64::from(f) * sampler.mean_scale()).round().max(1.0) as u32,
    };
    // Rows beyond a strip that its distance field must see: a pixel's distance matters up
    // to the feather width (and the seam band), and any outside pixel that near is within
    // that many rows. Farther ones only ever give a weight of 1, as does the strip's edge.
    let margin = feather.max(HARMONISE_BAND.ceil() as u32) + 1;
    let rows_per_strip = (strip_pixels / u64::from(region.w)).clamp(u64::from(MIN_STRIP_ROWS), u64::from(u32::MAX));
    let rows_per_strip = rows_per_strip as u32;
    let (full_w, full_h) = full.dimensions();
    let (region_end_x, region_end_y) = (region.x + region.w, region.y + region.h);
    // The strip's copy has one more column and row each side where the photo has them:
    // the seam's 3x3 mean reads them.
    let (cx0, cx1) = (region.x.saturating_sub(1), (region_end_x + 1).min(full_w));
    // The photo's row just above a strip as it was before the strip above wrote it.
    let mut carry: Option<Vec<u8>> = None;

    let mut y0 = region.y;
    while y0 < region_end_y {
        let y1 = y0.saturating_add(rows_per_strip).min(region_end_y);
        // Rows of the distance field, of the composite (the strip and one row each side,
        // read by the seam's mean) and of the copy.
        let fields = y0.saturating_sub(1 + margin).max(region.y)..(y1 + 1 + margin).min(region_end_y);
        let composed = y0.saturating_sub(1).max(region.y)..(y1 + 1).min(region_end_y);
        let copied = y0.saturating_sub(1)..(y1 + 1).min(full_h);

        let strip_mask = sampler.rows(region, fields.clone());
        let field_rect = Rect { x: 0, y: 0, w: region.w, h: fields.end - fields.start };
        let field = MaskField::new(&strip_mask, field_rect, feather);
        drop(strip_mask);
        let rows = composed.start - region.y..composed.end - region.y;
        let mut placed = place_product_rows(product, local, params.scale, rows)?;
        luts.apply(&mut placed);

        let mut strip = copy_rows(full, cx0..cx1, copied.clone());
        if let (Some(row), true) = (&carry, copied.start < y0) {
            let bytes = row.len();
            strip.as_mut()[..bytes].copy_from_slice(row);
        }
        let at = Offsets { region, field_top: fields.start, copy_left: cx0, copy_top: copied.start };
        let cover = |x: u32, y: u32| -> Option<([u8; 4], f32)> {
            let w = field.weight(x - region.x, y - at.field_top);
            let p = placed.pixel(x - region.x, y - region.y)?;
            let c = w * f32::from(p[3]) / 255.0;
            (c > 0.0).then_some((p, c))
        };
        for y in composed.clone() {
            for x in region.x..region_end_x {
                let Some((p, c)) = cover(x, y) else { continue };
                let px = strip.get_pixel_mut(x - at.copy_left, y - at.copy_top);
                for (v, &pv) in px.0.iter_mut().zip(&p) {
                    *v = (f32::from(*v) * (1.0 - c) + f32::from(pv) * c).round() as u8;
                }
            }
        }
        if feather > 0 {
            let mut updates = Vec::new();
            for y in y0..y1 {
                for x in region.x..region_end_x {
                    let d = field.distance(x - region.x, y - at.field_top);
                    if d > 0.0 && d <= HARMONISE_BAND && cover(x, y).is_some() {
                        let (sx, sy) = (x - at.copy_left, y - at.copy_top);
                        updates.push((sx, sy, box_mean(&strip, sx, sy)));
                    }
                }
            }
            for (x, y, rgb) in updates {
                strip.get_pixel_mut(x, y).0 = rgb;
            }
        }
        carry = (y1 < region_end_y).then(|| copy_rows(full, cx0..cx1, y1 - 1..y1).into_raw());
        write_rows(full, &strip, &at, y0..y1);
        y0 = y1;
    }
    Ok(region)
}

/// Where a strip's buffers sit in the photo.
#[derive(Clone, Copy)]
struct Offsets {
    region: Rect,
    field_top: u32,
    copy_left: u32,
    copy_top: u32,
}

/// The photo's pixels in `cols` x `rows`.
fn copy_rows(full: &RgbImage, cols: Range<u32>, rows: Range<u32>) -> RgbImage {
    let width = full.width() as usize * 3;
    let (left, right) = (cols.start as usize * 3, cols.end as usize * 3);
    let mut out = Vec::with_capacity((right - left) * (rows.end - rows.start) as usize);
    for row in full.as_raw().chunks_exact(width).skip(rows.start as usize).take((rows.end - rows.start) as usize) {
        out.extend_from_slice(&row[left..right]);
    }
    RgbImage::from_raw(cols.end - cols.start, rows.end - rows.start, out).unwrap_or_default()
}

/// Writes the strip's rows `rows` of the region (and only the region's columns) back.
fn write_rows(full: &mut RgbImage, strip: &RgbImage, at: &Offsets, rows: Range<u32>) {
    let width = full.width() as usize * 3;
    let strip_width = strip.width() as usize * 3;
    let (left, right) = (at.region.x as usize * 3, (at.region.x + at.region.w) as usize * 3);
    let strip_left = (at.region.x - at.copy_left) as usize * 3;
    let raw: &mut [u8] = full;
    for y in rows {
        let dst = y as usize * width;
        let src = (y - at.copy_top) as usize * strip_width + strip_left;
        raw[dst + left..dst + right].copy_from_slice(&strip.as_raw()[src..src + right - left]);
    }
}

/// The working mask read at the photo's resolution: bilinear between working pixels'
/// centres (clamped at the image's edge), thresholded at half.
struct MaskSampler<'a> {
    mask: &'a GrayImage,
    full: (u32, u32),
    scale_x: f64,
    scale_y: f64,
}

impl<'a> MaskSampler<'a> {
    fn new(mask: &'a GrayImage, full: (u32, u32)) -> Self {
        let (w, h) = mask.dimensions();
        MaskSampler {
            mask,
            full,
            scale_x: f64::from(full.0) / f64::from(w.max(1)),
            scale_y: f64::from(full.1) / f64::from(h.max(1)),
        }
    }

    fn mean_scale(&self) -> f64 {
        (self.scale_x + self.scale_y) / 2.0
    }

    /// The working box `bbox` in photo pixels: every photo pixel whose centre falls in it.
    /// The upsampled mask is empty outside (a pixel beyond is nearer the outside
    /// neighbour than the box's edge pixel, so its value is under half).
    fn region(&self, bbox: Rect) -> Rect {
        let (full_w, full_h) = self.full;
        let span = |start: u32, len: u32, scale: f64, limit: u32| {
            let a = ((f64::from(start) * scale).floor() as u32).min(limit.saturating_sub(1));
            let b = ((f64::from(start + len) * scale).ceil() as u32).clamp(a + 1, limit.max(a + 1));
            (a, b - a)
        };
        let (x, w) = span(bbox.x, bbox.w, self.scale_x, full_w);
        let (y, h) = span(bbox.y, bbox.h, self.scale_y, full_h);
        Rect { x, y, w, h }
    }

    /// The mask over `region`'s columns and the photo rows `rows` (255 in, 0 out).
    fn rows(&self, region: Rect, rows: Range<u32>) -> GrayImage {
        let (w, h) = self.mask.dimensions();
        let taps = |pos: u32, scale: f64, len: u32| {
            let u = (f64::from(pos) + 0.5) / scale - 0.5;
            let i = u.floor();
            let f = (u - i) as f32;
            let clamp = |v: f64| v.clamp(0.0, f64::from(len - 1)) as usize;
            (clamp(i), clamp(i + 1.0), f)
        };
        let cols: Vec<_> = (region.x..region.x + region.w).map(|x| taps(x, self.scale_x, w)).collect();
        let raw = self.mask.as_raw();
        let stride = w as usize;
        let mut out = GrayImage::new(region.w, rows.end - rows.start);
        for (y, out_row) in rows.zip(out.rows_mut()) {
            let (y0, y1, fy) = taps(y, self.scale_y, h);
            let (top, bottom) = (&raw[y0 * stride..][..stride], &raw[y1 * stride..][..stride]);
            for (&(x0, x1, fx), px) in cols.iter().zip(out_row) {
                let lerp = |a: u8, b: u8, t: f32| f32::from(a) + (f32::from(b) - f32::from(a)) * t;
                let v =
                    lerp(top[x0], top[x1], fx) + (lerp(bottom[x0], bottom[x1], fx) - lerp(top[x0], top[x1], fx)) * fy;
                *px = Luma([if v > 127.5 { 255 } else { 0 }]);
            }
        }
        out
    }
}

/// What the last replacement used, kept so the full-resolution result repeats it: the
/// settings as one JSON line, then the product's bytes as uploaded (decoding them again
/// gives the same pixels; they are usually smaller than the decoded product).
pub struct Replacement<'a> {
    pub settings: Settings,
    pub product: &'a [u8],
}

impl<'a> Replacement<'a> {
    pub fn pack(settings: &Settings, product: &[u8]) -> Vec<u8> {
        let mut out = serde_json::to_vec(settings).unwrap_or_default();
        out.push(b'\n');
        out.extend_from_slice(product);
        out
    }

    pub fn unpack(bytes: &'a [u8]) -> Result<Self, ImageError> {
        let broken = || ImageError::Processing("the stored replacement is unreadable".into());
        let split = bytes.iter().position(|&b| b == b'\n').ok_or_else(broken)?;
        let settings = serde_json::from_slice(&bytes[..split]).map_err(|_| broken())?;
        Ok(Replacement { settings, product: &bytes[split + 1..] })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::composite::{replace_product, GradeTarget, Grading};
    use image::{Rgb, Rgba};

    fn textured(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| Rgb([(x * 7 % 251) as u8, (y * 5 % 241) as u8, ((x + y) * 3 % 239) as u8]))
    }

    fn blob(w: u32, h: u32) -> GrayImage {
        GrayImage::from_fn(w, h, |x, y| {
            let (dx, dy) = (x as f32 / w as f32 - 0.45, y as f32 / h as f32 - 0.55);
            Luma([if dx * dx * 3.0 + dy * dy * 5.0 < 0.12 { 255 } else { 0 }])
        })
    }

    fn product() -> RgbaImage {
        RgbaImage::from_fn(90, 140, |x, y| Rgba([200 - x as u8, 40 + y as u8, 90, if x < 80 { 255 } else { 100 }]))
    }

    fn all_options() -> Settings {
        let grading = Some(Grading { target: GradeTarget::MaskedArea, strength: 0.6 });
        Settings { scale_factor: 1.2, use_blending: true, feather_amount: 9, grading }
    }

    #[test]
    fn in_place_orientation_matches_the_image_crate() {
        let image = textured(7, 4);
        for o in [
            Orientation::NoTransforms,
            Orientation::Rotate90,
            Orientation::Rotate180,
            Orientation::Rotate270,
            Orientation::FlipHorizontal,
            Orientation::FlipVertical,
            Orientation::Rotate90FlipH,
            Orientation::Rotate270FlipH,
        ] {
            let mut want = DynamicImage::ImageRgb8(image.clone());
            want.apply_orientation(o);
            assert_eq!(orient_in_place(image.clone(), o), want.into_rgb8(), "{o:?}");
        }
    }

    #[test]
    fn rgba_is_flattened_in_place_as_upload_does() {
        let rgba = RgbaImage::from_fn(9, 5, |x, y| Rgba([x as u8 * 20, y as u8 * 40, 7, (x * 30 + y) as u8]));
        let want = codec::flatten_over_white(DynamicImage::ImageRgba8(rgba.clone()));
        assert_eq!(flatten_in_place(rgba), want);
    }

    #[test]
    fn at_the_working_size_it_is_the_working_composite() {
        let (scene, mask) = (textured(160, 120), blob(160, 120));
        let mut full = scene.clone();
        composite_full(&mut full, &scene, &mask, &product(), &all_options()).unwrap();
        assert_eq!(full, replace_product(&scene, &mask, &product(), &all_options()).unwrap());
    }

    #[test]
    fn strips_give_the_image_one_pass_gives_and_outside_r_is_untouched() {
        let (working, mask) = (textured(160, 120), blob(160, 120));
        let photo = textured(700, 525);
        let mut whole = photo.clone();
        let region = composite_in_strips(&mut whole, &working, &mask, &product(), &all_options(), u64::MAX).unwrap();
        let mut strips = photo.clone();
        composite_in_strips(&mut strips, &working, &mask, &product(), &all_options(), 1).unwrap();
        assert_eq!(whole, strips, "16-row strips differ from one pass");
        let changed = photo.enumerate_pixels().filter(|&(x, y, p)| whole.get_pixel(x, y) != p);
        let (mut n, mut outside) = (0, 0);
        for (x, y, _) in changed {
            n += 1;
            outside += usize::from(!region.contains(x, y));
        }
        assert_eq!(outside, 0);
        assert!(n > 20_000, "only {n} pixels changed");
    }

    #[test]
    fn the_mask_is_upsampled_smoothly() {
        // A diagonal edge: at 4x, each working step of 1 px must become steps of 1 px,
        // not blocks of 4.
        let mask = GrayImage::from_fn(40, 40, |x, y| Luma([if x + y < 40 { 255 } else { 0 }]));
        let sampler = MaskSampler::new(&mask, (160, 160));
        let up = sampler.rows(Rect { x: 0, y: 0, w: 160, h: 160 }, 0..160);
        let edge: Vec<u32> =
            (0..160).map(|y| (0..160).take_while(|&x| up.get_pixel(x, y)[0] == 255).count() as u32).collect();
        // (The first rows are the image's edge, where the working row is all in.)
        assert!(edge[4..].windows(2).all(|w| w[0] >= w[1] && w[0] - w[1] <= 2), "{edge:?}");
    }

    #[test]
    fn replacement_round_trips() {
        let packed = Replacement::pack(&all_options(), b"\x89PNG\n\x00bytes");
        let back = Replacement::unpack(&packed).unwrap();
        assert_eq!((back.settings, back.product), (all_options(), &b"\x89PNG\n\x00bytes"[..]));
        assert!(Replacement::unpack(b"{oops}\nxx").is_err());
    }
}
