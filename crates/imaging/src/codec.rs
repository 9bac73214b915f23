//! Decoding uploads into the working image, and the small image helpers around it.
//!
//! A scene upload is sniffed (never trusted by name or Content-Type), decoded within
//! allocation limits, EXIF-rotated, flattened to RGB over white and downscaled to at
//! most `max_width` with area (box) resampling. Product uploads keep their alpha.

use std::io::Cursor;

use fast_image_resize::images::Image as FrImage;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::codecs::png::{CompressionType, FilterType as PngFilter, PngEncoder};
use image::metadata::Orientation;
use image::{DynamicImage, GrayImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage, RgbaImage};

use crate::params::InputError;

/// Longest side a replacement product is kept at (bigger ones are downscaled first).
pub const MAX_PRODUCT_SIDE: u32 = 2048;

/// Largest decoded image we accept, in pixels (a 48 MP phone photo fits).
pub const MAX_PIXELS: u64 = 50_000_000;

/// Largest side we accept.
pub const MAX_SIDE: u32 = 16_384;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("unsupported file type: expected a JPEG, PNG or WebP image")]
    Unsupported,
    #[error("the uploaded file is empty")]
    Empty,
    #[error("the image could not be decoded (truncated or corrupt {format} data)")]
    Corrupt { format: &'static str },
    #[error("the image is too large: {width}x{height} pixels (limit {max_mp} megapixels, {max_side} px a side)")]
    TooManyPixels { width: u32, height: u32, max_mp: u64, max_side: u32 },
    #[error("image processing failed: {0}")]
    Processing(String),
}

/// The working image and the size the upload had (after EXIF rotation).
pub struct Scene {
    pub image: RgbImage,
    pub original_width: u32,
    pub original_height: u32,
    /// 1, or 2/4/8 when a large JPEG was decoded at reduced scale.
    pub decode_divisor: u32,
}

/// Decodes a scene photo into the working image.
pub fn decode_scene(bytes: &[u8], max_width: u32) -> Result<Scene, ImageError> {
    let header = probe(bytes)?;
    let (original_width, original_height) = header.oriented_size();
    let reduced = match header.format {
        ImageFormat::Jpeg if original_width >= max_width.saturating_mul(2) => {
            decode_jpeg_reduced(bytes, &header, max_width)?
        }
        _ => None,
    };
    let (image, decode_divisor) = match reduced {
        Some(found) => found,
        None => (decode_oriented(bytes)?, 1),
    };
    let rgb = flatten_over_white(image);
    let image = downscale_to_width(rgb, max_width)?;
    Ok(Scene { image, original_width, original_height, decode_divisor })
}

/// Decodes a product image, keeping its alpha; very large products are downscaled.
pub fn decode_product(bytes: &[u8]) -> Result<RgbaImage, ImageError> {
    let rgba = decode_oriented(bytes)?.into_rgba8();
    let long_side = rgba.width().max(rgba.height());
    if long_side <= MAX_PRODUCT_SIDE {
        return Ok(rgba);
    }
    let scale = MAX_PRODUCT_SIDE as f64 / long_side as f64;
    let width = ((rgba.width() as f64 * scale).round() as u32).max(1);
    let height = ((rgba.height() as f64 * scale).round() as u32).max(1);
    let raw = area_resize(rgba.width(), rgba.height(), rgba.into_raw(), (width, height), PixelType::U8x4)?;
    RgbaImage::from_raw(width, height, raw).ok_or_else(|| ImageError::Processing("product buffer size".into()))
}

/// What the header says, before any pixel is decoded.
struct Header {
    format: ImageFormat,
    width: u32,
    height: u32,
    orientation: Orientation,
}

impl Header {
    fn swaps_axes(&self) -> bool {
        matches!(
            self.orientation,
            Orientation::Rotate90 | Orientation::Rotate270 | Orientation::Rotate90FlipH | Orientation::Rotate270FlipH
        )
    }

    /// Size as displayed (after EXIF orientation).
    fn oriented_size(&self) -> (u32, u32) {
        if self.swaps_axes() {
            (self.height, self.width)
        } else {
            (self.width, self.height)
        }
    }
}

fn probe(bytes: &[u8]) -> Result<Header, ImageError> {
    let (format, mut decoder) = open_decoder(bytes)?;
    if format == ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        return Err(ImageError::Corrupt { format: "JPEG" });
    }
    let (width, height) = decoder.dimensions();
    check_dimensions(width, height)?;
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    Ok(Header { format, width, height, orientation })
}

/// Decodes a JPEG with DCT scaling at the smallest of 1/2, 1/4, 1/8 that keeps the
/// displayed width at least `max_width`; `None` when no reduction applies. A 24 MP
/// phone photo then never exists at full size in memory.
fn decode_jpeg_reduced(
    bytes: &[u8],
    header: &Header,
    max_width: u32,
) -> Result<Option<(DynamicImage, u32)>, ImageError> {
    let corrupt = |_| ImageError::Corrupt { format: "JPEG" };
    let (shown_width, _) = header.oriented_size();
    let ratio = f64::from(max_width) / f64::from(shown_width);
    let want = |side: u32| (f64::from(side) * ratio).ceil().min(f64::from(u16::MAX)) as u16;
    let mut decoder = jpeg_decoder::Decoder::new(Cursor::new(bytes));
    decoder.set_max_decoding_buffer_size((MAX_PIXELS * 4) as usize);
    let (width, height) = decoder.scale(want(header.width), want(header.height)).map_err(corrupt)?;
    let (width, height) = (u32::from(width), u32::from(height));
    if width >= header.width {
        return Ok(None);
    }
    let pixels = decoder.decode().map_err(corrupt)?;
    let format = decoder.info().map(|info| info.pixel_format);
    let image = match format {
        Some(jpeg_decoder::PixelFormat::RGB24) => {
            RgbImage::from_raw(width, height, pixels).map(DynamicImage::ImageRgb8)
        }
        Some(jpeg_decoder::PixelFormat::L8) => GrayImage::from_raw(width, height, pixels).map(DynamicImage::ImageLuma8),
        Some(jpeg_decoder::PixelFormat::CMYK32) => {
            RgbImage::from_raw(width, height, cmyk_to_rgb(&pixels)).map(DynamicImage::ImageRgb8)
        }
        Some(jpeg_decoder::PixelFormat::L16) | None => return Ok(None),
    };
    let mut image = image.ok_or(ImageError::Corrupt { format: "JPEG" })?;
    image.apply_orientation(header.orientation);
    Ok(Some((image, header.width / width.max(1))))
}

/// JPEG decoders fill a truncated scan with grey instead of failing: require an
/// end-of-image marker after the last start-of-scan (entropy data never holds FF D9).
pub(crate) fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last_scan = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    let last_end = bytes.windows(2).rposition(|w| w == [0xFF, 0xD9]);
    matches!((last_scan, last_end), (Some(scan), Some(end)) if end > scan)
}

/// CMYK as jpeg-decoder returns it to RGB, the same conversion as the image crate's
/// decoder uses at full scale (`(255 - c) * (255 - k) / 255`; a test holds them equal).
fn cmyk_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    cmyk.chunks_exact(4)
        .flat_map(|p| {
            let k = 255 - u32::from(p[3]);
            [0, 1, 2].map(|c| (((255 - u32::from(p[c])) * k + 127) / 255) as u8)
        })
        .collect()
}

/// Sniffs the format (never trusting names) and reads the header within limits.
pub(crate) fn open_decoder(bytes: &[u8]) -> Result<(ImageFormat, impl ImageDecoder + '_), ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    let mut reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|_| ImageError::Unsupported)?;
    let format = match reader.format() {
        Some(f @ (ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP)) => f,
        _ => return Err(ImageError::Unsupported),
    };
    reader.limits(decode_limits());
    let decoder = reader.into_decoder().map_err(|e| classify(e, format_name(format)))?;
    Ok((format, decoder))
}

/// Checks dimensions before allocating, decodes and applies EXIF orientation.
fn decode_oriented(bytes: &[u8]) -> Result<DynamicImage, ImageError> {
    let (format, mut decoder) = open_decoder(bytes)?;
    let (width, height) = decoder.dimensions();
    check_dimensions(width, height)?;
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| classify(e, format_name(format)))?;
    image.apply_orientation(orientation);
    Ok(image)
}

pub(crate) fn format_name(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Jpeg => "JPEG",
        ImageFormat::Png => "PNG",
        ImageFormat::WebP => "WebP",
        _ => "image",
    }
}

fn decode_limits() -> Limits {
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    // 50 MP at 4 bytes a pixel, with room for the decoder's own buffers.
    limits.max_alloc = Some(MAX_PIXELS * 4 + 64 * 1024 * 1024);
    limits
}

pub(crate) fn check_dimensions(width: u32, height: u32) -> Result<(), ImageError> {
    let too_big = width == 0
        || height == 0
        || width > MAX_SIDE
        || height > MAX_SIDE
        || u64::from(width) * u64::from(height) > MAX_PIXELS;
    if too_big && width > 0 && height > 0 {
        return Err(too_many_pixels(width, height));
    }
    if too_big {
        return Err(ImageError::Corrupt { format: "image" });
    }
    Ok(())
}

fn too_many_pixels(width: u32, height: u32) -> ImageError {
    ImageError::TooManyPixels { width, height, max_mp: MAX_PIXELS / 1_000_000, max_side: MAX_SIDE }
}

pub(crate) fn classify(error: image::ImageError, format: &'static str) -> ImageError {
    match error {
        image::ImageError::Limits(_) => {
            ImageError::TooManyPixels { width: 0, height: 0, max_mp: MAX_PIXELS / 1_000_000, max_side: MAX_SIDE }
        }
        image::ImageError::Unsupported(_) => ImageError::Unsupported,
        _ => ImageError::Corrupt { format },
    }
}

/// RGB, with transparent pixels composited over white.
pub fn flatten_over_white(image: DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.into_rgb8();
    }
    let rgba = image.into_rgba8();
    let (width, height) = rgba.dimensions();
    let mut out = RgbImage::new(width, height);
    for (dst, src) in out.pixels_mut().zip(rgba.pixels()) {
        let alpha = u32::from(src[3]);
        for c in 0..3 {
            let value = (u32::from(src[c]) * alpha + 255 * (255 - alpha) + 127) / 255;
            dst[c] = value as u8;
        }
    }
    out
}

/// Downscales so the width is at most `max_width`, keeping the aspect ratio, with area
/// (box-filter convolution) resampling. Never upscales.
pub fn downscale_to_width(image: RgbImage, max_width: u32) -> Result<RgbImage, ImageError> {
    let (width, height) = image.dimensions();
    if width <= max_width {
        return Ok(image);
    }
    let new_height =
        ((u64::from(height) * u64::from(max_width) + u64::from(width) / 2) / u64::from(width)).max(1) as u32;
    let raw = area_resize(width, height, image.into_raw(), (max_width, new_height), PixelType::U8x3)?;
    RgbImage::from_raw(max_width, new_height, raw).ok_or_else(|| ImageError::Processing("resize buffer size".into()))
}

/// Area (box) resampling of a packed 8-bit buffer with fast_image_resize.
fn area_resize(width: u32, height: u32, raw: Vec<u8>, to: (u32, u32), pixel: PixelType) -> Result<Vec<u8>, ImageError> {
    let src = FrImage::from_vec_u8(width, height, raw, pixel).map_err(|e| ImageError::Processing(e.to_string()))?;
    let mut dst = FrImage::new(to.0, to.1, pixel);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Box));
    Resizer::new().resize(&src, &mut dst, &options).map_err(|e| ImageError::Processing(e.to_string()))?;
    Ok(dst.into_vec())
}

/// PNG bytes of an 8-bit image buffer, with fast compression (artefacts are short-lived).
pub fn encode_png<I: PngSource>(image: &I) -> Result<Vec<u8>, ImageError> {
    use image::ImageEncoder;
    let mut out = Vec::new();
    let (raw, width, height, color) = image.parts();
    PngEncoder::new_with_quality(&mut out, CompressionType::Fast, PngFilter::Adaptive)
        .write_image(raw, width, height, color)
        .map_err(|e| ImageError::Processing(e.to_string()))?;
    Ok(out)
}

/// A format a result is downloaded in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Png,
    /// Baseline JPEG at a quality of 1-100 (alpha is not kept: RGB and grey only).
    Jpeg {
        quality: u8,
    },
    /// Lossless WebP: the image crate 0.25 has no lossy WebP encoder.
    WebP,
}

/// JPEG quality when the request names none.
pub const DEFAULT_JPEG_QUALITY: u8 = 90;

impl OutputFormat {
    /// From a request's `format` (png, jpeg or jpg, webp; any case; absent = png) and
    /// `quality` (a whole number 1-100; absent = [`DEFAULT_JPEG_QUALITY`]). A quality is
    /// checked whatever the format, so a typo is never silently ignored; only JPEG uses it.
    pub fn parse(format: Option<&str>, quality: Option<&str>) -> Result<Self, InputError> {
        let quality = match quality.map(str::trim) {
            None => DEFAULT_JPEG_QUALITY,
            Some(q) => match q.parse::<u8>() {
                Ok(q @ 1..=100) => q,
                _ => return Err(InputError::invalid("quality", "must be a whole number from 1 to 100")),
            },
        };
        match format.map(|f| f.trim().to_ascii_lowercase()).as_deref() {
            None | Some("png") => Ok(OutputFormat::Png),
            Some("jpeg" | "jpg") => Ok(OutputFormat::Jpeg { quality }),
            Some("webp") => Ok(OutputFormat::WebP),
            Some(_) => Err(InputError::invalid("format", "must be png, jpeg or webp")),
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            OutputFormat::Png => "image/png",
            OutputFormat::Jpeg { .. } => "image/jpeg",
            OutputFormat::WebP => "image/webp",
        }
    }

    /// File extension, without the dot.
    pub fn extension(self) -> &'static str {
        match self {
            OutputFormat::Png => "png",
            OutputFormat::Jpeg { .. } => "jpg",
            OutputFormat::WebP => "webp",
        }
    }
}

/// The image's bytes in `format` (PNG as [`encode_png`]).
pub fn encode_as<I: PngSource>(image: &I, format: OutputFormat) -> Result<Vec<u8>, ImageError> {
    let mut out = Vec::new();
    write_as(image, format, &mut out)?;
    Ok(out)
}

/// [`encode_as`] into a writer, so that a large image's bytes need not be held in memory.
/// The WebP encoder copies the pixels to RGBA first (image-webp), so a WebP needs
/// 4 more bytes a pixel while it is made; PNG and JPEG work from the buffer as it is.
pub fn write_as<I: PngSource, W: std::io::Write>(image: &I, format: OutputFormat, out: W) -> Result<(), ImageError> {
    use image::codecs::jpeg::JpegEncoder;
    use image::codecs::webp::WebPEncoder;
    use image::{ExtendedColorType, ImageEncoder};
    let (raw, width, height, color) = image.parts();
    let failed = |e: image::ImageError| ImageError::Processing(e.to_string());
    match format {
        OutputFormat::Png => PngEncoder::new_with_quality(out, CompressionType::Fast, PngFilter::Adaptive)
            .write_image(raw, width, height, color)
            .map_err(failed),
        OutputFormat::Jpeg { .. } if !matches!(color, ExtendedColorType::Rgb8 | ExtendedColorType::L8) => {
            Err(ImageError::Processing("JPEG cannot hold an alpha channel".into()))
        }
        OutputFormat::Jpeg { quality } => {
            JpegEncoder::new_with_quality(out, quality).write_image(raw, width, height, color).map_err(failed)
        }
        OutputFormat::WebP => WebPEncoder::new_lossless(out).write_image(raw, width, height, color).map_err(failed),
    }
}

/// The image buffers we write as PNG.
pub trait PngSource {
    fn parts(&self) -> (&[u8], u32, u32, image::ExtendedColorType);
}

macro_rules! png_source {
    ($ty:ty, $color:expr) => {
        impl PngSource for $ty {
            fn parts(&self) -> (&[u8], u32, u32, image::ExtendedColorType) {
                (self.as_raw(), self.width(), self.height(), $color)
            }
        }
    };
}
png_source!(RgbImage, image::ExtendedColorType::Rgb8);
png_source!(GrayImage, image::ExtendedColorType::L8);
png_source!(RgbaImage, image::ExtendedColorType::Rgba8);

/// Decodes one of our own PNG artefacts.
pub fn decode_png(bytes: &[u8]) -> Result<DynamicImage, ImageError> {
    image::load_from_memory_with_format(bytes, ImageFormat::Png).map_err(|_| ImageError::Corrupt { format: "PNG" })
}

/// The masked object cut out: the scene's pixels with the mask as their alpha.
pub fn cutout(scene: &RgbImage, mask: &GrayImage) -> Result<RgbaImage, ImageError> {
    let (width, height) = scene.dimensions();
    if mask.dimensions() != (width, height) {
        return Err(ImageError::Processing("the mask and the scene differ in size".into()));
    }
    let mut raw = Vec::with_capacity(width as usize * height as usize * 4);
    for (rgb, alpha) in scene.as_raw().chunks_exact(3).zip(mask.as_raw()) {
        raw.extend_from_slice(&[rgb[0], rgb[1], rgb[2], *alpha]);
    }
    RgbaImage::from_raw(width, height, raw).ok_or_else(|| ImageError::Processing("cut-out buffer size".into()))
}

/// The scene with the mask as a translucent overlay and a solid outline.
pub fn mask_overlay(scene: &RgbImage, mask: &GrayImage) -> RgbImage {
    const TINT: [u16; 3] = [255, 40, 110];
    let mut out = scene.clone();
    let (width, height) = mask.dimensions();
    if scene.dimensions() != (width, height) {
        return out;
    }
    for (x, y, pixel) in out.enumerate_pixels_mut() {
        if mask.get_pixel(x, y)[0] < 128 {
            continue;
        }
        let edge = is_edge(mask, x, y);
        for c in 0..3 {
            let v = u16::from(pixel[c]);
            pixel[c] = if edge { TINT[c] as u8 } else { ((v * 55 + TINT[c] * 45) / 100) as u8 };
        }
    }
    out
}

fn is_edge(mask: &GrayImage, x: u32, y: u32) -> bool {
    let (width, height) = mask.dimensions();
    let outside = |dx: i64, dy: i64| {
        let nx = i64::from(x) + dx;
        let ny = i64::from(y) + dy;
        nx < 0
            || ny < 0
            || nx >= i64::from(width)
            || ny >= i64::from(height)
            || mask.get_pixel(nx as u32, ny as u32)[0] < 128
    };
    outside(-1, 0) || outside(1, 0) || outside(0, -1) || outside(0, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_formats_and_qualities_parse_strictly() {
        let parse = OutputFormat::parse;
        assert_eq!(parse(None, None).unwrap(), OutputFormat::Png);
        assert_eq!(parse(Some(" JPG "), Some("75")).unwrap(), OutputFormat::Jpeg { quality: 75 });
        assert_eq!(parse(Some("jpeg"), None).unwrap(), OutputFormat::Jpeg { quality: DEFAULT_JPEG_QUALITY });
        assert_eq!(parse(Some("WebP"), Some("100")).unwrap(), OutputFormat::WebP);
        let bad = [
            (Some("gif"), None),
            (Some(""), None),
            (Some("png"), Some("0")),
            (None, Some("101")),
            (Some("jpeg"), Some("abc")),
            (Some("jpeg"), Some("-1")),
            (Some("jpeg"), Some("50.0")),
        ];
        for (format, quality) in bad {
            assert!(parse(format, quality).is_err(), "{format:?} {quality:?}");
        }
    }

    #[test]
    fn the_cutout_takes_the_mask_as_alpha_and_jpeg_refuses_alpha() {
        let scene = RgbImage::from_fn(4, 3, |x, y| image::Rgb([x as u8, y as u8, 9]));
        let mask = GrayImage::from_fn(4, 3, |x, _| image::Luma([if x < 2 { 255 } else { 0 }]));
        let cut = cutout(&scene, &mask).unwrap();
        for (x, y, p) in cut.enumerate_pixels() {
            assert_eq!(p.0, [x as u8, y as u8, 9, mask.get_pixel(x, y)[0]]);
        }
        assert!(cutout(&scene, &GrayImage::new(3, 3)).is_err());
        assert!(encode_as(&cut, OutputFormat::Jpeg { quality: 90 }).is_err());
        assert!(encode_as(&scene, OutputFormat::Jpeg { quality: 90 }).unwrap().starts_with(&[0xFF, 0xD8]));
    }

    fn png_of(image: &RgbImage) -> Vec<u8> {
        encode_png(image).unwrap()
    }

    #[test]
    fn small_images_are_not_upscaled() {
        let img = RgbImage::from_pixel(300, 200, image::Rgb([10, 20, 30]));
        let scene = decode_scene(&png_of(&img), 1280).unwrap();
        assert_eq!(scene.image.dimensions(), (300, 200));
        assert_eq!(scene.image.get_pixel(5, 5), &image::Rgb([10, 20, 30]));
    }

    #[test]
    fn wide_images_are_downscaled_keeping_aspect() {
        let img = RgbImage::from_pixel(2000, 1000, image::Rgb([200, 100, 50]));
        let scene = decode_scene(&png_of(&img), 1280).unwrap();
        assert_eq!(scene.image.dimensions(), (1280, 640));
        assert_eq!((scene.original_width, scene.original_height), (2000, 1000));
        assert_eq!(scene.image.get_pixel(640, 320), &image::Rgb([200, 100, 50]));
    }

    #[test]
    fn transparency_becomes_white() {
        let mut img = RgbaImage::from_pixel(4, 4, image::Rgba([0, 0, 0, 0]));
        img.put_pixel(0, 0, image::Rgba([0, 0, 0, 255]));
        let bytes = encode_png(&img).unwrap();
        let scene = decode_scene(&bytes, 1280).unwrap();
        assert_eq!(scene.image.get_pixel(0, 0), &image::Rgb([0, 0, 0]));
        assert_eq!(scene.image.get_pixel(3, 3), &image::Rgb([255, 255, 255]));
    }

    #[test]
    fn non_images_and_truncated_files_are_refused() {
        assert!(matches!(decode_scene(b"hello, world", 1280), Err(ImageError::Unsupported)));
        assert!(matches!(decode_scene(b"", 1280), Err(ImageError::Empty)));
        let img = RgbImage::from_pixel(64, 64, image::Rgb([1, 2, 3]));
        let bytes = png_of(&img);
        let cut = &bytes[..bytes.len() / 2];
        assert!(matches!(decode_scene(cut, 1280), Err(ImageError::Corrupt { .. })));
    }

    #[test]
    fn overlay_tints_only_masked_pixels() {
        let scene = RgbImage::from_pixel(10, 10, image::Rgb([100, 100, 100]));
        let mut mask = GrayImage::new(10, 10);
        for y in 2..8 {
            for x in 2..8 {
                mask.put_pixel(x, y, image::Luma([255]));
            }
        }
        let out = mask_overlay(&scene, &mask);
        assert_eq!(out.get_pixel(0, 0), scene.get_pixel(0, 0));
        assert_ne!(out.get_pixel(5, 5), scene.get_pixel(5, 5));
    }
}
