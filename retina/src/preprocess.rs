//! Untrusted bytes -> the model's input tensor, as Pillow would make it.
//!
//! 1. [`decode`]: sniff the format from the bytes (never the URL or the
//!    Content-Type), accept JPEG, PNG, GIF (first frame), WebP and BMP, and
//!    refuse anything over the width, height or allocation limits before it
//!    is decoded (a decompression bomb costs a header read).
//! 2. [`to_rgb8`]: 8-bit RGB; alpha dropped, grayscale replicated, 16-bit
//!    scaled by 1/257 (rounded).
//! 3. [`resize_crop_normalize`]: shorter side to the model's `resize`
//!    (256 for EfficientNet-Lite0) with Pillow's antialiased bilinear
//!    filter (the same fixed-point arithmetic, so lossless inputs match
//!    Pillow pixel for pixel), centre crop `crop` (224) with offsets
//!    floored, then `(x - mean) / std` per channel (`(x - 127) / 128`), in
//!    the model's channel order and layout: all from its catalogue entry
//!    ([`ImageSettings`]).

use std::io::Cursor;

use image::{DynamicImage, ImageFormat, ImageReader};

use crate::catalog::{ChannelOrder, ImageSettings, Layout};

#[derive(Debug, Clone)]
pub struct DecodeLimits {
    pub max_width: u32,
    pub max_height: u32,
    /// Bytes the decoder may allocate.
    pub max_alloc: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self { max_width: 8192, max_height: 8192, max_alloc: 128 << 20 }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("not an image: {0}")]
    NotAnImage(String),
    #[error("image too large: {0}")]
    TooLarge(String),
    #[error("undecodable image: {0}")]
    Undecodable(String),
}

/// An 8-bit RGB image, row-major.
#[derive(Debug, Clone)]
pub struct Rgb8 {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<DynamicImage, DecodeError> {
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DecodeError::Undecodable(e.to_string()))?;
    let format = match reader.format() {
        Some(f @ (ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::Gif | ImageFormat::WebP | ImageFormat::Bmp)) => f,
        Some(other) => return Err(DecodeError::NotAnImage(format!("{other:?} is not supported"))),
        // The reason names what the bytes look like, never the bytes: it
        // travels to dead letters and clients.
        None => {
            let looks_like =
                if bytes.iter().take(512).all(|b| b.is_ascii() && (!b.is_ascii_control() || b.is_ascii_whitespace())) {
                    "text"
                } else {
                    "binary data"
                };
            return Err(DecodeError::NotAnImage(format!(
                "{} bytes of unrecognised content ({looks_like})",
                bytes.len()
            )));
        }
    };
    if format == ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        return Err(DecodeError::Undecodable("truncated Jpeg: no end-of-image marker after the last scan".into()));
    }
    // The RGB copy `to_rgb8` makes is part of a decode's memory: take it
    // out of the budget the decoder gets (the header gives the size).
    let (width, height) = ImageReader::with_format(Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|e| DecodeError::Undecodable(format!("{format:?}: {e}")))?;
    if width == 0 || height == 0 {
        return Err(DecodeError::Undecodable(format!("{format:?} of {width}x{height} pixels has no pixels")));
    }
    let rgb_copy = width as u64 * height as u64 * 3;
    let too_large = || {
        DecodeError::TooLarge(format!(
            "{format:?} of {width}x{height} px over the limits ({}x{} px, {} MiB with its RGB copy)",
            limits.max_width,
            limits.max_height,
            limits.max_alloc >> 20
        ))
    };
    if width > limits.max_width || height > limits.max_height || rgb_copy > limits.max_alloc {
        return Err(too_large());
    }
    let mut l = image::Limits::default();
    l.max_image_width = Some(limits.max_width);
    l.max_image_height = Some(limits.max_height);
    l.max_alloc = Some(limits.max_alloc - rgb_copy);
    reader.limits(l);
    let img = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(e) => DecodeError::TooLarge(format!(
            "{format:?} over the limits ({}x{} px, {} MiB): {e}",
            limits.max_width,
            limits.max_height,
            limits.max_alloc >> 20
        )),
        image::ImageError::Unsupported(e) => DecodeError::NotAnImage(e.to_string()),
        other => DecodeError::Undecodable(format!("{format:?}: {other}")),
    })?;
    if img.width() == 0 || img.height() == 0 {
        return Err(DecodeError::Undecodable(format!("{format:?} decoded to {}x{} pixels", img.width(), img.height())));
    }
    Ok(img)
}

/// Whether a JPEG reaches its end-of-image marker (FF D9), walking its
/// segments from the start: JPEG decoders fill a truncated scan with gray
/// and succeed; Pillow refuses such a file, and so do we. Whatever follows
/// the end-of-image marker (a motion photo's video, an appended thumbnail)
/// is not looked at, as Pillow does not.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    if !bytes.starts_with(&[0xff, 0xd8]) {
        return false;
    }
    let mut i = 2;
    loop {
        // Fill bytes (FF FF ...) may precede a marker.
        while bytes.get(i) == Some(&0xff) && bytes.get(i + 1) == Some(&0xff) {
            i += 1;
        }
        let (Some(&0xff), Some(&marker)) = (bytes.get(i), bytes.get(i + 1)) else {
            return false;
        };
        i += 2;
        match marker {
            0xd9 => return true,
            // Markers without a length: TEM, RSTn.
            0x01 | 0xd0..=0xd7 => continue,
            _ => {}
        }
        let Some(len) = bytes.get(i..i + 2).map(|b| u16::from_be_bytes([b[0], b[1]]) as usize) else {
            return false;
        };
        if len < 2 {
            return false;
        }
        i += len;
        if marker == 0xda {
            // Entropy-coded data: every FF in it is followed by 00 (stuffing)
            // or a restart marker; anything else is the next marker.
            loop {
                match (bytes.get(i), bytes.get(i + 1)) {
                    (Some(&0xff), Some(&(0x00 | 0xd0..=0xd7))) => i += 2,
                    (Some(&0xff), Some(_)) => break,
                    (Some(_), _) => i += 1,
                    (None, _) => return false,
                }
            }
        }
    }
}

/// 8-bit RGB as Pillow's `convert("RGB")` gives it (16-bit first scaled
/// by 1/257, rounded).
pub fn to_rgb8(img: DynamicImage) -> Rgb8 {
    let (width, height) = (img.width() as usize, img.height() as usize);
    let scale16 = |v: u16| ((v as u32 + 128) / 257) as u8;
    let pixels = match img {
        DynamicImage::ImageRgb8(b) => b.into_raw(),
        DynamicImage::ImageRgba8(b) => b.into_raw().chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect(),
        DynamicImage::ImageLuma8(b) => b.into_raw().into_iter().flat_map(|v| [v, v, v]).collect(),
        DynamicImage::ImageLumaA8(b) => b.into_raw().chunks_exact(2).flat_map(|p| [p[0], p[0], p[0]]).collect(),
        DynamicImage::ImageLuma16(b) => b.into_raw().into_iter().map(scale16).flat_map(|v| [v, v, v]).collect(),
        DynamicImage::ImageLumaA16(b) => {
            b.into_raw().chunks_exact(2).map(|p| scale16(p[0])).flat_map(|v| [v, v, v]).collect()
        }
        DynamicImage::ImageRgb16(b) => b.into_raw().into_iter().map(scale16).collect(),
        DynamicImage::ImageRgba16(b) => {
            b.into_raw().chunks_exact(4).flat_map(|p| [scale16(p[0]), scale16(p[1]), scale16(p[2])]).collect()
        }
        other => other.to_rgb8().into_raw(),
    };
    Rgb8 { width, height, pixels }
}

/// Pillow's fixed-point precision for 8-bit resampling.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// For output positions `window` of `out_size`: first input index and
/// fixed-point weights. A port of Pillow's `precompute_coeffs` +
/// `normalize_coeffs_8bpc` for the bilinear (triangle) filter, support
/// scaled when downsampling. Only the crop window is computed: a 1x8192
/// image resizes to 256x2097152, whose full table would take ~100 MB.
fn coefficients(in_size: usize, out_size: usize, window: std::ops::Range<usize>) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // triangle support 1.0, scaled
    window
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C's (int) cast truncates toward zero, as `as` does.
            let xmin = ((center - support + 0.5) as isize).max(0) as usize;
            let xmax = ((center + support + 0.5) as isize).min(in_size as isize).max(xmin as isize) as usize;
            let w: Vec<f64> = (xmin..xmax)
                .map(|x| {
                    let t = ((x as f64 - center + 0.5) * ss).abs();
                    if t < 1.0 { 1.0 - t } else { 0.0 }
                })
                .collect();
            let total: f64 = w.iter().sum();
            let one = (1u32 << PRECISION_BITS) as f64;
            let fixed = w
                .iter()
                .map(|v| {
                    let v = if total != 0.0 { v / total } else { *v };
                    if v < 0.0 { (-0.5 + v * one) as i32 } else { (0.5 + v * one) as i32 }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One output pixel of the horizontal pass: `K` RGB input pixels
/// weighted, the sums starting at `half` (rounding). `taps` holds `K`
/// pixels and `k` `K` weights (the caller matched on the length).
#[inline(always)]
fn weighted_pixel<const K: usize>(taps: &[u8], k: &[i32], half: i32) -> [i32; 3] {
    let (Some(taps), Some(k)) = (taps.get(..3 * K), k.first_chunk::<K>()) else {
        unreachable!("weighted_pixel::<{K}> called with {} pixels and {} weights", taps.len() / 3, k.len());
    };
    let mut acc = [half; 3];
    for i in 0..K {
        acc[0] += taps[3 * i] as i32 * k[i];
        acc[1] += taps[3 * i + 1] as i32 * k[i];
        acc[2] += taps[3 * i + 2] as i32 * k[i];
    }
    acc
}

/// The output size Pillow code `resize` would be called with: shorter side
/// `resize`, the other rounded (half to even, as Python's `round`).
pub fn resized_size(width: usize, height: usize, resize: usize) -> (usize, usize) {
    let r = resize as f64;
    if width <= height {
        (resize, (height as f64 * r / width as f64).round_ties_even() as usize)
    } else {
        ((width as f64 * r / height as f64).round_ties_even() as usize, resize)
    }
}

/// Shorter side to `s.resize` (antialiased bilinear), centre crop
/// `s.crop`, normalise, in `s.channels` order and `s.layout`. Only the crop
/// window is computed; each output pixel is what Pillow's full resize would
/// give there. Returns `crop * crop * 3` values; an image without pixels,
/// or whose pixels do not match its size, is refused.
///
/// Written for speed (it runs once per image, beside the network): the
/// horizontal pass accumulates the three channels of a pixel together, the
/// vertical pass adds whole weighted rows (contiguous, so the compiler
/// vectorises it), and normalisation is a 256-entry table per channel. The
/// integer sums are the same as Pillow's, only in another order, so the
/// pixels are identical (`tests::the_fast_resize_equals_the_plain_port`).
pub fn resize_crop_normalize(img: &Rgb8, s: &ImageSettings) -> Result<Vec<f32>, DecodeError> {
    let (w, h) = (img.width, img.height);
    if w == 0 || h == 0 || img.pixels.len() != w * h * 3 {
        return Err(DecodeError::Undecodable(format!("{w}x{h} image with {} bytes of pixels", img.pixels.len())));
    }
    let (nw, nh) = resized_size(w, h, s.resize);
    let side = s.crop;
    let (left, top) = ((nw.saturating_sub(side)) / 2, (nh.saturating_sub(side)) / 2);
    let row_len = side * 3;

    // Horizontal pass (skipped when the width does not change, as Pillow
    // does), over the input rows the vertical pass will read. Coefficient
    // tables are indexed from the window's start.
    let hcoef = (nw != w).then(|| coefficients(w, nw, left..left + side));
    let vcoef = (nh != h).then(|| coefficients(h, nh, top..top + side));
    let rows = match &vcoef {
        Some(v) => v[0].0..v[side - 1].0 + v[side - 1].1.len(),
        None => top..top + side,
    };
    let row0 = rows.start;
    let half = 1i32 << (PRECISION_BITS - 1);
    let mut temp = vec![0u8; rows.len() * row_len];
    for (y, dst) in rows.zip(temp.chunks_exact_mut(row_len)) {
        let src = &img.pixels[y * w * 3..(y + 1) * w * 3];
        match &hcoef {
            Some(coef) => {
                for ((xmin, k), out) in coef.iter().zip(dst.chunks_exact_mut(3)) {
                    let taps = &src[xmin * 3..(xmin + k.len()) * 3];
                    let acc = match k.len() {
                        // The common tap counts (downscales up to 3.5x)
                        // unrolled: the loop overhead was half the time.
                        2 => weighted_pixel::<2>(taps, k, half),
                        3 => weighted_pixel::<3>(taps, k, half),
                        4 => weighted_pixel::<4>(taps, k, half),
                        5 => weighted_pixel::<5>(taps, k, half),
                        6 => weighted_pixel::<6>(taps, k, half),
                        7 => weighted_pixel::<7>(taps, k, half),
                        _ => {
                            let mut acc = [half; 3];
                            for (p, &kv) in taps.chunks_exact(3).zip(k) {
                                acc[0] += p[0] as i32 * kv;
                                acc[1] += p[1] as i32 * kv;
                                acc[2] += p[2] as i32 * kv;
                            }
                            acc
                        }
                    };
                    out.copy_from_slice(&acc.map(clip8));
                }
            }
            None => dst.copy_from_slice(&src[left * 3..(left + side) * 3]),
        }
    }

    // Vertical pass into the cropped RGB image.
    let mut crop = vec![0u8; side * row_len];
    let mut acc = vec![0i32; row_len];
    for (oy, dst) in crop.chunks_exact_mut(row_len).enumerate() {
        match &vcoef {
            Some(coef) => {
                let (ymin, k) = &coef[oy];
                acc.fill(half);
                for (i, &kv) in k.iter().enumerate() {
                    let r = ymin + i - row0;
                    for (a, &p) in acc.iter_mut().zip(&temp[r * row_len..(r + 1) * row_len]) {
                        *a += p as i32 * kv;
                    }
                }
                for (d, &a) in dst.iter_mut().zip(&acc) {
                    *d = clip8(a);
                }
            }
            None => {
                let r = top + oy - row0;
                dst.copy_from_slice(&temp[r * row_len..(r + 1) * row_len]);
            }
        }
    }

    // Per output channel: the input channel it takes, and its value for
    // each of the 256 pixel values.
    let source: [usize; 3] = match s.channels {
        ChannelOrder::Rgb => [0, 1, 2],
        ChannelOrder::Bgr => [2, 1, 0],
    };
    let lut: [[f32; 256]; 3] = std::array::from_fn(|oc| std::array::from_fn(|v| (v as f32 - s.mean[oc]) / s.std[oc]));
    let plane = side * side;
    let mut out = vec![0f32; plane * 3];
    match s.layout {
        Layout::Nhwc => {
            for (o, px) in out.chunks_exact_mut(3).zip(crop.chunks_exact(3)) {
                for oc in 0..3 {
                    o[oc] = lut[oc][px[source[oc]] as usize];
                }
            }
        }
        Layout::Nchw => {
            for (oc, o) in out.chunks_exact_mut(plane).enumerate() {
                let (table, c) = (&lut[oc], source[oc]);
                for (v, px) in o.iter_mut().zip(crop.chunks_exact(3)) {
                    *v = table[px[c] as usize];
                }
            }
        }
    }
    Ok(out)
}

/// Decode, convert and preprocess in one go.
pub fn prepare(bytes: &[u8], limits: &DecodeLimits, settings: &ImageSettings) -> Result<Vec<f32>, DecodeError> {
    resize_crop_normalize(&to_rgb8(decode(bytes, limits)?), settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn efficientnet() -> &'static ImageSettings {
        crate::catalog::builtin().spec("efficientnet-lite0").and_then(|s| s.image.as_ref()).expect("image settings")
    }

    /// The straightforward port of Pillow's resample this module shipped
    /// first, one output value at a time: the oracle the fast one is held to.
    fn plain_port(img: &Rgb8, s: &ImageSettings) -> Result<Vec<f32>, DecodeError> {
        let (w, h) = (img.width, img.height);
        if w == 0 || h == 0 || img.pixels.len() != w * h * 3 {
            return Err(DecodeError::Undecodable(format!("{w}x{h} image with {} bytes of pixels", img.pixels.len())));
        }
        let (nw, nh) = resized_size(w, h, s.resize);
        let side = s.crop;
        let (left, top) = ((nw.saturating_sub(side)) / 2, (nh.saturating_sub(side)) / 2);
        // Per output channel: the input channel it takes.
        let source: [usize; 3] = match s.channels {
            ChannelOrder::Rgb => [0, 1, 2],
            ChannelOrder::Bgr => [2, 1, 0],
        };
        let plane = side * side;

        // Horizontal pass (skipped when the width does not change, as Pillow
        // does), over the input rows the vertical pass will read. Coefficient
        // tables are indexed from the window's start.
        let hcoef = (nw != w).then(|| coefficients(w, nw, left..left + side));
        let vcoef = (nh != h).then(|| coefficients(h, nh, top..top + side));
        let rows: Vec<usize> = match &vcoef {
            Some(v) => {
                let first = v[0].0;
                let last = v[side - 1].0 + v[side - 1].1.len();
                (first..last).collect()
            }
            None => (top..top + side).collect(),
        };
        let row0 = rows.first().copied().unwrap_or(0);
        let half = 1i32 << (PRECISION_BITS - 1);
        let mut temp = vec![0u8; rows.len() * side * 3];
        for (r, &y) in rows.iter().enumerate() {
            let src = &img.pixels[y * w * 3..(y + 1) * w * 3];
            let dst = &mut temp[r * side * 3..(r + 1) * side * 3];
            for ox in 0..side {
                let xx = left + ox;
                for c in 0..3 {
                    dst[ox * 3 + c] = match &hcoef {
                        Some(coef) => {
                            let (xmin, k) = &coef[ox];
                            let acc =
                                k.iter().enumerate().fold(half, |a, (i, kv)| a + src[(xmin + i) * 3 + c] as i32 * kv);
                            clip8(acc)
                        }
                        None => src[xx * 3 + c],
                    };
                }
            }
        }
        let mut out = vec![0f32; side * side * 3];
        let mut px = [0u8; 3];
        for oy in 0..side {
            let yy = top + oy;
            for ox in 0..side {
                for c in 0..3 {
                    let v = match &vcoef {
                        Some(coef) => {
                            let (ymin, k) = &coef[oy];
                            let acc = k
                                .iter()
                                .enumerate()
                                .fold(half, |a, (i, kv)| a + temp[((ymin + i - row0) * side + ox) * 3 + c] as i32 * kv);
                            clip8(acc)
                        }
                        None => temp[((yy - row0) * side + ox) * 3 + c],
                    };
                    px[c] = v;
                }
                for oc in 0..3 {
                    let at = match s.layout {
                        Layout::Nhwc => (oy * side + ox) * 3 + oc,
                        Layout::Nchw => oc * plane + oy * side + ox,
                    };
                    out[at] = (px[source[oc]] as f32 - s.mean[oc]) / s.std[oc];
                }
            }
        }
        Ok(out)
    }

    /// Random images of many shapes (up, down, unchanged on one axis or
    /// both), every channel order and layout: the fast resize gives the
    /// plain port's values exactly.
    #[test]
    fn the_fast_resize_equals_the_plain_port() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let shapes =
            [(451, 300), (300, 451), (256, 256), (256, 700), (900, 256), (17, 33), (1, 300), (640, 2), (224, 224)];
        for (i, &(width, height)) in shapes.iter().enumerate() {
            let img = Rgb8 { width, height, pixels: (0..width * height * 3).map(|_| next() as u8).collect() };
            for (channels, layout) in [
                (ChannelOrder::Rgb, Layout::Nchw),
                (ChannelOrder::Bgr, Layout::Nhwc),
                (ChannelOrder::Rgb, Layout::Nhwc),
                (ChannelOrder::Bgr, Layout::Nchw),
            ] {
                let (resize, crop) = [(256, 224), (224, 224), (300, 17)][i % 3];
                let s = ImageSettings {
                    resize,
                    crop,
                    mean: [123.7, 116.3, 103.5],
                    std: [58.4, 57.1, 57.4],
                    channels,
                    layout,
                };
                let fast = resize_crop_normalize(&img, &s).expect("fast");
                let plain = plain_port(&img, &s).expect("plain");
                assert!(fast == plain, "{width}x{height} to {resize}/{crop} {channels:?} {layout:?}");
            }
        }
    }

    #[test]
    fn sizes_round_like_python() {
        assert_eq!(resized_size(451, 300, 256), (385, 256));
        assert_eq!(resized_size(200, 300, 256), (256, 384));
        assert_eq!(resized_size(14, 25, 256), (256, 457));
        assert_eq!(resized_size(256, 256, 256), (256, 256));
    }

    /// The same pixels in another channel order, layout, scale and crop.
    #[test]
    fn channel_order_layout_and_normalisation_follow_the_settings() {
        let img =
            Rgb8 { width: 4, height: 4, pixels: (0..16).flat_map(|i| [10 * i as u8, 100, 200 - i as u8]).collect() };
        let nhwc = ImageSettings {
            resize: 4,
            crop: 2,
            mean: [0.0; 3],
            std: [1.0; 3],
            channels: ChannelOrder::Rgb,
            layout: Layout::Nhwc,
        };
        let base = resize_crop_normalize(&img, &nhwc).expect("rgb");
        assert_eq!(base.len(), 2 * 2 * 3);
        // Crop (1,1)..(3,3) of the 4x4 image: pixel 5 first.
        assert_eq!(&base[..3], &[50.0, 100.0, 195.0]);
        let bgr_chw = ImageSettings {
            mean: [1.0, 2.0, 3.0],
            std: [2.0, 2.0, 2.0],
            channels: ChannelOrder::Bgr,
            layout: Layout::Nchw,
            ..nhwc.clone()
        };
        let other = resize_crop_normalize(&img, &bgr_chw).expect("bgr");
        for p in 0..4 {
            for oc in 0..3 {
                let rgb = base[p * 3 + (2 - oc)];
                assert_eq!(other[oc * 4 + p], (rgb - bgr_chw.mean[oc]) / 2.0, "pixel {p} channel {oc}");
            }
        }
    }

    #[test]
    fn coefficients_sum_to_one_in_fixed_point() {
        for (i, o) in [(600, 256), (14, 256), (1000, 256), (256, 256)] {
            for (_, k) in coefficients(i, o, 0..o) {
                let s: i64 = k.iter().map(|v| *v as i64).sum();
                assert!((s - (1 << PRECISION_BITS)).abs() <= k.len() as i64, "{i}->{o}: {s}");
            }
        }
    }

    #[test]
    fn text_is_not_an_image_and_bombs_are_refused() {
        let e = decode(b"<!doctype html><html>secret token", &DecodeLimits::default()).expect_err("html");
        assert!(matches!(e, DecodeError::NotAnImage(_)), "{e}");
        // Defect 11.16: the reason quoted the body's first bytes.
        assert!(!e.to_string().contains("html") && !e.to_string().contains("secret"), "{e}");
        // A valid 64x64 PNG is over a 32 px limit before any pixel is decoded.
        let mut png = Vec::new();
        image::RgbImage::new(64, 64).write_to(&mut Cursor::new(&mut png), ImageFormat::Png).expect("encode");
        let limits = DecodeLimits { max_width: 32, max_height: 32, max_alloc: 1 << 20 };
        assert!(matches!(decode(&png, &limits), Err(DecodeError::TooLarge(_))));
        assert!(matches!(decode(&png[..png.len() / 2], &DecodeLimits::default()), Err(DecodeError::Undecodable(_))));
        let mut jpeg = Vec::new();
        image::RgbImage::new(64, 64).write_to(&mut Cursor::new(&mut jpeg), ImageFormat::Jpeg).expect("encode");
        assert!(decode(&jpeg, &DecodeLimits::default()).is_ok());
        let e = decode(&jpeg[..jpeg.len() - 10], &DecodeLimits::default()).expect_err("truncated");
        assert!(e.to_string().contains("truncated Jpeg"), "{e}");
    }

    fn jpeg(width: u32, height: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let img = image::RgbImage::from_fn(width, height, |x, y| image::Rgb([(x * 7) as u8, (y * 3) as u8, 99]));
        img.write_to(&mut Cursor::new(&mut out), ImageFormat::Jpeg).expect("encode");
        out
    }

    /// Defect 11.14: the last FF DA of the file was taken as the last scan,
    /// so a JPEG followed by other data (a motion photo's video holding an
    /// FF DA and no FF D9) was refused, although Pillow decodes it.
    #[test]
    fn the_truncated_jpeg_check_refuses_jpegs_with_trailing_data() {
        let mut motion = jpeg(64, 48);
        motion.extend_from_slice(b"\x00\x00\x00\x18ftypmp42");
        motion.extend_from_slice(&[0xff, 0xda, 0x00, 0x0c, 1, 2, 3, 0xff, 0x00, 9, 9]);
        let img = decode(&motion, &DecodeLimits::default()).expect("decodes like Pillow");
        assert_eq!((img.width(), img.height()), (64, 48));
        // Still refused: cut inside the scan.
        let plain = jpeg(64, 48);
        assert!(decode(&plain[..plain.len() - 40], &DecodeLimits::default()).is_err());
    }

    /// A BMP header saying 0x0 pixels.
    fn empty_bmp() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"BM");
        b.extend_from_slice(&54u32.to_le_bytes()); // file size
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&54u32.to_le_bytes()); // pixel data offset
        b.extend_from_slice(&40u32.to_le_bytes()); // BITMAPINFOHEADER
        b.extend_from_slice(&0i32.to_le_bytes()); // width
        b.extend_from_slice(&0i32.to_le_bytes()); // height
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&24u16.to_le_bytes());
        b.extend_from_slice(&[0; 24]);
        b
    }

    /// Defect 11.13: a 0x0 image reached an out-of-bounds index in the
    /// resize (a panic in the decode pool).
    #[test]
    fn a_0x0_gif_or_bmp_reaches_an_out_of_bounds_index_in_the_resize() {
        let empty = Rgb8 { width: 0, height: 0, pixels: Vec::new() };
        assert!(resize_crop_normalize(&empty, efficientnet()).is_err());
        let lying = Rgb8 { width: 10, height: 10, pixels: vec![0; 3] };
        assert!(resize_crop_normalize(&lying, efficientnet()).is_err());
        assert!(prepare(&empty_bmp(), &DecodeLimits::default(), efficientnet()).is_err());
    }

    /// Defect 11.9: resize coefficients covered the whole resized axis (a
    /// 1x8192 image built ~100 MB of tables), and the RGB copy was not in
    /// the decode budget.
    #[test]
    fn retina_memory_exceeds_its_bounds() {
        let tall = Rgb8 { width: 1, height: 8192, pixels: vec![128; 8192 * 3] };
        let out = resize_crop_normalize(&tall, efficientnet()).expect("resized");
        assert_eq!(out.len(), 224 * 224 * 3);
        // Same pixels as the full-table computation would give: a flat
        // image stays flat.
        assert!(out.iter().all(|v| (*v - (128.0 - 127.0) / 128.0).abs() < 1e-6));
        // 1000x1000 RGB is 3 MB of copy: a 3.5 MB budget leaves too little
        // for the decode itself, counted together.
        let jpeg = jpeg(1000, 1000);
        let limits = DecodeLimits { max_width: 8192, max_height: 8192, max_alloc: 3_000_000 };
        assert!(matches!(decode(&jpeg, &limits), Err(DecodeError::TooLarge(_))));
        assert!(decode(&jpeg, &DecodeLimits::default()).is_ok());
    }
}
