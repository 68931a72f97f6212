//! Images in the workspace: what they are, how they are stored, their
//! thumbnails.
//!
//! Rules:
//! - the size and type of an image are read from its header, with the `image`
//!   crate, before a single pixel is decoded: an image over `max_pixels`
//!   ([`PrepareError::TooManyPixels`]) is refused without costing memory;
//! - a still PNG, JPEG or WebP is stored as lossy WebP (libwebp, through the
//!   `webp` crate) when that is smaller than what was sent; its EXIF
//!   orientation is applied first, and nothing of its metadata (EXIF, GPS,
//!   XMP, text chunks) is carried over;
//! - an animation, a GIF, or an image whose WebP would not be smaller is
//!   stored as sent, less its PNG text/EXIF chunks and JPEG APP1/APP13/comment
//!   segments; `reencode: false` (`store_original`) keeps the exact bytes;
//! - bytes that are not an image are stored as sent: the worker's check fails
//!   the project and releases its bytes, as it always has.
//!
//! Everything here is CPU work: callers run it on a [`crate::cpu_pool`].

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};

/// A recognised image, from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInfo {
    /// `image/png`, `image/jpeg`, `image/webp` or `image/gif`.
    pub media_type: &'static str,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

impl ImageInfo {
    /// Width × height.
    pub fn pixels(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }
}

fn format_of(bytes: &[u8]) -> Option<(ImageFormat, &'static str)> {
    match image::guess_format(bytes).ok()? {
        f @ ImageFormat::Png => Some((f, "image/png")),
        f @ ImageFormat::Jpeg => Some((f, "image/jpeg")),
        f @ ImageFormat::WebP => Some((f, "image/webp")),
        f @ ImageFormat::Gif => Some((f, "image/gif")),
        _ => None,
    }
}

fn reader(bytes: &[u8], format: ImageFormat) -> ImageReader<Cursor<&[u8]>> {
    let mut r = ImageReader::new(Cursor::new(bytes));
    r.set_format(format);
    r
}

/// Recognises the image in `bytes` from its header alone, or says why it is
/// not one.
pub fn probe(bytes: &[u8]) -> Result<ImageInfo, String> {
    let (format, media_type) = format_of(bytes)
        .ok_or_else(|| "not an image of a known type (PNG, JPEG, WebP or GIF)".to_owned())?;
    let (width, height) = reader(bytes, format)
        .into_dimensions()
        .map_err(|e| format!("image header is truncated or corrupt ({e})"))?;
    if width == 0 || height == 0 {
        return Err("image header has a zero dimension".into());
    }
    Ok(ImageInfo {
        media_type,
        width,
        height,
    })
}

/// How images are stored.
#[derive(Debug, Clone, Copy)]
pub struct StoragePolicy {
    /// Re-encode still images as WebP (`IMAGE_STORAGE_FORMAT=webp`, no
    /// `store_original`).
    pub reencode: bool,
    /// WebP quality, 1–100 (`IMAGE_QUALITY`).
    pub quality: f32,
    /// Largest image accepted, in pixels (`MAX_IMAGE_PIXELS`).
    pub max_pixels: u64,
}

impl StoragePolicy {
    /// The policy the settings give; `store_original` is the save's own
    /// request to keep its bytes as sent.
    pub fn from_settings(settings: &crate::config::Settings, store_original: bool) -> Self {
        Self {
            reencode: !store_original
                && settings.image_storage_format == crate::config::ImageStorageFormat::Webp,
            quality: f32::from(settings.image_quality),
            max_pixels: settings.max_image_pixels,
        }
    }
}

/// What was made of the bytes sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredAs {
    /// Re-encoded as WebP.
    Webp,
    /// Kept as sent, less its metadata (an animation, a GIF, or a WebP that
    /// would not have been smaller).
    Stripped,
    /// Exactly as sent (`store_original`).
    Original,
    /// Not a decodable image: kept as sent for the worker to refuse.
    Unrecognised,
}

/// The form in which content is stored.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The bytes to store.
    pub data: Vec<u8>,
    /// The image, when the bytes are one (`None` when not recognised).
    pub info: Option<ImageInfo>,
    /// How many bytes were sent.
    pub original_size: usize,
    /// What was done.
    pub stored_as: StoredAs,
}

/// Why an image is refused outright.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrepareError {
    /// More pixels than `MAX_IMAGE_PIXELS` (a decompression bomb, or simply
    /// too big).
    #[error("the image is {width}x{height} = {pixels} pixels; at most {max} are accepted")]
    TooManyPixels {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// width × height.
        pixels: u64,
        /// The limit.
        max: u64,
    },
}

/// Turns the bytes sent into the form to store (see the module's rules).
pub fn prepare(bytes: Vec<u8>, policy: &StoragePolicy) -> Result<Prepared, PrepareError> {
    let original_size = bytes.len();
    let keep = |data: Vec<u8>, info, stored_as| Prepared {
        data,
        info,
        original_size,
        stored_as,
    };
    let Ok(info) = probe(&bytes) else {
        return Ok(keep(bytes, None, StoredAs::Unrecognised));
    };
    if info.pixels() > policy.max_pixels {
        return Err(PrepareError::TooManyPixels {
            width: info.width,
            height: info.height,
            pixels: info.pixels(),
            max: policy.max_pixels,
        });
    }
    if !policy.reencode {
        return Ok(keep(bytes, Some(info), StoredAs::Original));
    }
    if info.media_type == "image/gif" || is_animated(&bytes, info.media_type) {
        let stripped = strip_metadata(&bytes, info.media_type).unwrap_or(bytes);
        return Ok(keep(stripped, Some(info), StoredAs::Stripped));
    }
    let image = match decode(&bytes, policy.max_pixels) {
        Ok(image) => image,
        // A header that promises an image whose data is corrupt: the worker
        // refuses it with the decoder's reason.
        Err(_) => return Ok(keep(bytes, Some(info), StoredAs::Unrecognised)),
    };
    match encode_webp(image, policy.quality) {
        Some((webp, width, height)) if webp.len() < bytes.len() => Ok(keep(
            webp,
            Some(ImageInfo {
                media_type: "image/webp",
                width,
                height,
            }),
            StoredAs::Webp,
        )),
        _ => {
            let stripped = strip_metadata(&bytes, info.media_type).unwrap_or(bytes);
            Ok(keep(stripped, Some(info), StoredAs::Stripped))
        }
    }
}

/// Decodes a whole image (the first frame of an animation), within
/// `max_pixels`, with its EXIF orientation applied.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<DynamicImage, String> {
    let (format, _) = format_of(bytes).ok_or("not an image of a known type")?;
    let mut r = reader(bytes, format);
    let mut limits = Limits::default();
    // Decoded pixels at up to 16 bytes each (RGBA, 32-bit float) plus room
    // for the decoders' own buffers.
    limits.max_alloc = Some(max_pixels.saturating_mul(16).saturating_add(64 << 20));
    r.limits(limits);
    let mut decoder = r.into_decoder().map_err(|e| e.to_string())?;
    let orientation = decoder.orientation().map_err(|e| e.to_string())?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| e.to_string())?;
    image.apply_orientation(orientation);
    Ok(image)
}

fn is_animated(bytes: &[u8], media_type: &str) -> bool {
    use image::codecs::{png::PngDecoder, webp::WebPDecoder};
    match media_type {
        "image/png" => PngDecoder::new(Cursor::new(bytes))
            .and_then(|d| d.is_apng())
            .unwrap_or(false),
        "image/webp" => WebPDecoder::new(Cursor::new(bytes)).is_ok_and(|d| d.has_animation()),
        _ => false,
    }
}

/// Encodes as lossy WebP (RGB, or RGBA when some pixel is not opaque); `None`
/// when libwebp refuses (e.g. a side over 16,383 pixels).
fn encode_webp(image: DynamicImage, quality: f32) -> Option<(Vec<u8>, u32, u32)> {
    let (width, height) = (image.width(), image.height());
    // Whether every pixel is opaque, read in place (no RGBA copy of the
    // image just to look at its alpha).
    let opaque = match &image {
        DynamicImage::ImageRgba8(b) => b.pixels().all(|p| p.0[3] == u8::MAX),
        DynamicImage::ImageLumaA8(b) => b.pixels().all(|p| p.0[1] == u8::MAX),
        DynamicImage::ImageRgba16(b) => b.pixels().all(|p| p.0[3] == u16::MAX),
        DynamicImage::ImageLumaA16(b) => b.pixels().all(|p| p.0[1] == u16::MAX),
        other if other.color().has_alpha() => other.to_rgba8().pixels().all(|p| p.0[3] == 255),
        _ => true,
    };
    let encoded = if opaque {
        let rgb = image.into_rgb8();
        webp::Encoder::from_rgb(rgb.as_raw(), width, height).encode_simple(false, quality)
    } else {
        let rgba = image.into_rgba8();
        webp::Encoder::from_rgba(rgba.as_raw(), width, height).encode_simple(false, quality)
    };
    encoded.ok().map(|m| (m.to_vec(), width, height))
}

/// Longest side of a thumbnail, in pixels.
pub const THUMBNAIL_MAX_SIDE: u32 = 256;
const THUMBNAIL_QUALITY: f32 = 80.0;

/// A thumbnail: WebP, long side at most [`THUMBNAIL_MAX_SIDE`].
#[derive(Debug, Clone)]
pub struct Thumbnail {
    /// The WebP bytes.
    pub data: Vec<u8>,
    /// Its width.
    pub width: u32,
    /// Its height.
    pub height: u32,
}

/// Checks that `bytes` decode as an image and makes its thumbnail, or says
/// why they are not an image.
pub fn thumbnail(bytes: &[u8], max_pixels: u64) -> Result<(ImageInfo, Thumbnail), String> {
    let info = probe(bytes)?;
    if info.pixels() > max_pixels {
        return Err(format!(
            "the image is {}x{} pixels, more than the {max_pixels} accepted",
            info.width, info.height
        ));
    }
    let image = decode(bytes, max_pixels).map_err(|e| format!("the image does not decode: {e}"))?;
    let small = if image.width().max(image.height()) > THUMBNAIL_MAX_SIDE {
        image.thumbnail(THUMBNAIL_MAX_SIDE, THUMBNAIL_MAX_SIDE)
    } else {
        image
    };
    let (data, width, height) = encode_webp(small, THUMBNAIL_QUALITY)
        .ok_or_else(|| "the thumbnail could not be encoded".to_owned())?;
    Ok((
        info,
        Thumbnail {
            data,
            width,
            height,
        },
    ))
}

/// `bytes` without their metadata, for images kept in their own format:
/// PNG text, EXIF and time chunks; JPEG APP1 (EXIF, XMP), APP13 (IPTC) and
/// comments. `None` when nothing needed removing or the layout is not
/// understood (the bytes are then kept as they are).
pub fn strip_metadata(bytes: &[u8], media_type: &str) -> Option<Vec<u8>> {
    match media_type {
        "image/png" => strip_png(bytes),
        "image/jpeg" => strip_jpeg(bytes),
        _ => None,
    }
}

fn strip_png(b: &[u8]) -> Option<Vec<u8>> {
    const DROP: [&[u8; 4]; 5] = [b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"tIME"];
    let mut out = Vec::with_capacity(b.len());
    out.extend_from_slice(b.get(..8)?);
    let mut at = 8;
    let mut dropped = false;
    while at < b.len() {
        let len = u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize;
        let end = at.checked_add(12)?.checked_add(len)?;
        let chunk = b.get(at..end)?;
        if DROP.iter().any(|d| &chunk[4..8] == *d) {
            dropped = true;
        } else {
            out.extend_from_slice(chunk);
        }
        at = end;
    }
    dropped.then_some(out)
}

fn strip_jpeg(b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(b.len());
    out.extend_from_slice(b.get(..2)?);
    let mut at = 2;
    let mut dropped = false;
    loop {
        if *b.get(at)? != 0xff {
            return None;
        }
        let marker = *b.get(at + 1)?;
        if marker == 0xff {
            at += 1;
            continue;
        }
        // Start of scan: the entropy-coded data and the rest are kept whole.
        if marker == 0xda {
            out.extend_from_slice(&b[at..]);
            break;
        }
        let len = usize::from(u16::from_be_bytes([*b.get(at + 2)?, *b.get(at + 3)?]));
        let end = at.checked_add(2 + len)?;
        let segment = b.get(at..end)?;
        if matches!(marker, 0xe1 | 0xed | 0xfe) {
            dropped = true;
        } else {
            out.extend_from_slice(segment);
        }
        at = end;
    }
    dropped.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 128]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).expect("encodes");
        out.into_inner()
    }

    #[test]
    fn dimensions_are_read_from_the_header() {
        assert_eq!(
            probe(&png(40, 30)),
            Ok(ImageInfo {
                media_type: "image/png",
                width: 40,
                height: 30
            })
        );
        assert!(probe(b"hello world").is_err());
        assert!(probe(b"\x89PNG\r\n\x1a\n").is_err(), "truncated");
        assert!(probe(b"").is_err());
    }

    #[test]
    fn a_still_png_becomes_a_smaller_webp_and_original_keeps_the_bytes() {
        let sent = png(300, 200);
        let policy = StoragePolicy {
            reencode: true,
            quality: 85.0,
            max_pixels: 1 << 24,
        };
        let p = prepare(sent.clone(), &policy).expect("prepared");
        assert_eq!(p.stored_as, StoredAs::Webp);
        assert!(p.data.len() < sent.len());
        assert_eq!(probe(&p.data).map(|i| i.media_type), Ok("image/webp"));
        let p = prepare(
            sent.clone(),
            &StoragePolicy {
                reencode: false,
                ..policy
            },
        )
        .expect("prepared");
        assert_eq!((p.stored_as, p.data), (StoredAs::Original, sent));
    }

    #[test]
    fn too_many_pixels_is_refused_from_the_header() {
        let policy = StoragePolicy {
            reencode: true,
            quality: 85.0,
            max_pixels: 100,
        };
        assert_eq!(
            prepare(png(20, 10), &policy).map(|p| p.stored_as),
            Err(PrepareError::TooManyPixels {
                width: 20,
                height: 10,
                pixels: 200,
                max: 100
            })
        );
    }

    #[test]
    fn text_chunks_are_stripped_from_a_png_kept_as_sent() {
        let mut b = png(4, 4);
        // A tEXt chunk after IHDR (8 + 25 bytes); its CRC is not checked here.
        let mut chunk = 9u32.to_be_bytes().to_vec();
        chunk.extend(b"tEXtGPS\0north");
        chunk.extend([0, 0, 0, 0]);
        b.splice(33..33, chunk);
        let stripped = strip_metadata(&b, "image/png").expect("stripped");
        assert_eq!(stripped, png(4, 4));
        assert!(strip_metadata(&png(4, 4), "image/png").is_none());
    }

    #[test]
    fn the_sample_bombs_are_real_zlib_streams_with_correct_crcs() {
        use image::codecs::png::PngDecoder;
        let profile_of = |data: Vec<u8>| {
            let b = samples::with_png_chunk(&png(4, 4), b"iCCP", &samples::iccp(&data));
            let mut decoder = PngDecoder::new(Cursor::new(&b[..])).expect("a valid PNG");
            decoder.icc_profile().expect("read").expect("a profile")
        };
        let zeros = profile_of(samples::zlib_zeros(1_000));
        assert_eq!(zeros.len() as u64, samples::zlib_zeros_inflated(1_000));
        assert!(zeros.iter().all(|&b| b == 0));
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(profile_of(samples::zlib_stored(&data)), data);
        // About 1,032 to 1, and about the length asked for.
        let bomb = samples::zlib_zeros(1 << 20);
        assert!(bomb.len().abs_diff(1 << 20) < 32, "{}", bomb.len());
        assert!(samples::zlib_zeros_inflated(1 << 20) > 1_000 << 20);
    }
}

/// Realistic artworks for tests and benchmarks: no fixtures on disk, the
/// same bytes for the same seed. Also what hostile clients send: metadata
/// that inflates to gigabytes, built here byte by byte.
#[cfg(any(test, feature = "testing"))]
pub mod samples {
    use std::io::Cursor;

    use image::{ImageFormat, Rgb, RgbImage};

    /// A photo-like RGB image: smooth colour fields, a horizon, a sun, soft
    /// shapes, and film grain (what makes generated art and photos hard to
    /// compress losslessly).
    pub fn photo_like(width: u32, height: u32, seed: u64) -> RgbImage {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let phase = (next() % 1000) as f32 / 159.0;
        let (w, h) = (width as f32, height as f32);
        let sun = (w * 0.7, h * 0.35, w.min(h) * 0.08);
        // Foliage-like detail: random values on a lattice every CELL pixels,
        // smoothly interpolated (value noise).
        const CELL: u32 = 3;
        let (gw, gh) = (width / CELL + 2, height / CELL + 2);
        let lattice: Vec<f32> = (0..gw * gh)
            .map(|_| (next() % 1000) as f32 / 1000.0)
            .collect();
        let detail = move |x: u32, y: u32| {
            let (gx, gy) = (x / CELL, y / CELL);
            let (fx, fy) = (
                (x % CELL) as f32 / CELL as f32,
                (y % CELL) as f32 / CELL as f32,
            );
            let at = |i: u32, j: u32| lattice[(j * gw + i) as usize];
            let top = at(gx, gy) * (1.0 - fx) + at(gx + 1, gy) * fx;
            let bottom = at(gx, gy + 1) * (1.0 - fx) + at(gx + 1, gy + 1) * fx;
            top * (1.0 - fy) + bottom * fy - 0.5
        };
        RgbImage::from_fn(width, height, |x, y| {
            let (u, v) = (x as f32 / w, y as f32 / h);
            let horizon = 0.55 + 0.05 * (u * 9.0 + phase).sin();
            let base = if v < horizon {
                // Sky: blue to orange towards the horizon.
                let t = v / horizon;
                [40.0 + 200.0 * t, 90.0 + 90.0 * t, 200.0 - 120.0 * t]
            } else {
                // Land: greens and browns with rolling hills.
                let t = (v - horizon) / (1.0 - horizon);
                let hills = (u * 23.0 + phase).sin() * (v * 31.0).cos();
                [
                    60.0 + 50.0 * t + 30.0 * hills,
                    110.0 - 40.0 * t + 25.0 * hills,
                    50.0 + 20.0 * t,
                ]
            };
            let (dx, dy) = (x as f32 - sun.0, y as f32 - sun.1);
            let glow = (-(dx * dx + dy * dy) / (2.0 * sun.2 * sun.2)).exp();
            let texture = 22.0 * ((u * 260.0).sin() * (v * 170.0 + phase).sin())
                + 10.0 * ((u * 37.0 + v * 53.0) * 13.0).sin();
            let foliage = if v < horizon { 10.0 } else { 60.0 } * detail(x, y);
            let mut px = [0u8; 3];
            for (c, out) in px.iter_mut().enumerate() {
                let grain = (next() % 9) as f32 - 4.0;
                let value = base[c] + 180.0 * glow + texture + foliage + grain;
                *out = value.clamp(0.0, 255.0) as u8;
            }
            Rgb(px)
        })
    }

    /// [`photo_like`] as a PNG (about 1.9 MB at 1024×1024).
    pub fn photo_like_png(width: u32, height: u32, seed: u64) -> Vec<u8> {
        encode(&photo_like(width, height, seed), ImageFormat::Png)
    }

    /// An image in the given format.
    pub fn encode(image: &RgbImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        // Writing to memory in a supported format cannot fail.
        let _ = image.write_to(&mut out, format);
        out.into_inner()
    }

    /// `png` with one more chunk of type `kind` holding `data` (with its
    /// CRC), right after its IHDR: where a colour profile or text goes.
    pub fn with_png_chunk(png: &[u8], kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
        // The signature (8 bytes), then IHDR (length, type, 13 bytes, CRC).
        let after_ihdr = png.len().min(8 + 4 + 4 + 13 + 4);
        let mut chunk = Vec::with_capacity(data.len() + 12);
        chunk.extend(u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
        chunk.extend(kind);
        chunk.extend(data);
        let crc = crc32(chunk.get(4..).unwrap_or_default());
        chunk.extend(crc.to_be_bytes());
        let mut out = Vec::with_capacity(png.len() + chunk.len());
        out.extend(png.get(..after_ihdr).unwrap_or_default());
        out.extend(chunk);
        out.extend(png.get(after_ihdr..).unwrap_or_default());
        out
    }

    /// The data of a PNG `iCCP` chunk: a profile name, compression method 0,
    /// then `zlib` (the profile, deflated).
    pub fn iccp(zlib: &[u8]) -> Vec<u8> {
        let mut data = b"ICC Profile\0\0".to_vec();
        data.extend(zlib);
        data
    }

    /// The data of a PNG `zTXt` chunk: a keyword, compression method 0, then
    /// `zlib` (the text, deflated).
    pub fn ztxt(zlib: &[u8]) -> Vec<u8> {
        let mut data = b"Comment\0\0".to_vec();
        data.extend(zlib);
        data
    }

    /// `jpeg` with `segments` (marker, payload) inserted right after its SOI.
    pub fn with_jpeg_segments(jpeg: &[u8], segments: &[(u8, Vec<u8>)]) -> Vec<u8> {
        let soi = jpeg.len().min(2);
        let mut out = jpeg.get(..soi).unwrap_or_default().to_vec();
        for (marker, payload) in segments {
            out.extend([0xff, *marker]);
            // The length counts itself; a payload is at most 65,533 bytes.
            out.extend(
                u16::try_from(payload.len() + 2)
                    .unwrap_or(u16::MAX)
                    .to_be_bytes(),
            );
            out.extend(payload);
        }
        out.extend(jpeg.get(soi..).unwrap_or_default());
        out
    }

    /// JPEG APP2 segments carrying a `len`-byte colour profile (of zeros) in
    /// as many pieces as it takes, as cameras and editors split big ones.
    pub fn icc_app2_segments(len: usize) -> Vec<(u8, Vec<u8>)> {
        const PIECE: usize = 65_533 - 14;
        let count = len.div_ceil(PIECE).max(1);
        (0..count)
            .map(|i| {
                let mut payload = b"ICC_PROFILE\0".to_vec();
                payload.push(u8::try_from(i + 1).unwrap_or(u8::MAX));
                payload.push(u8::try_from(count).unwrap_or(u8::MAX));
                payload.resize(14 + PIECE.min(len - i * PIECE), 0);
                (0xe2, payload)
            })
            .collect()
    }

    /// A zlib stream of about `deflated_len` bytes that inflates to about
    /// 1,032 times as many zero bytes: one dynamic-Huffman block (RFC 1951
    /// §3.2.7) whose every two bits say "258 more zeros" (the best ratio
    /// deflate allows), as decompression bombs are made.
    pub fn zlib_zeros(deflated_len: usize) -> Vec<u8> {
        let mut w = BitWriter::default();
        w.bits(1, 1); // BFINAL
        w.bits(2, 2); // BTYPE: dynamic Huffman codes
        w.bits(29, 5); // HLIT: 286 literal/length codes (up to 285, "258")
        w.bits(1, 5); // HDIST: 2 distance codes
        w.bits(14, 4); // HCLEN: 18 code-length codes
        // The code-length code, in its permuted order: symbol 18 ("11 to
        // 138 zeros") gets 1 bit, lengths 1 and 2 get 2 bits each. Its
        // canonical codes are then 18 = 0, 1 = 10, 2 = 11.
        for symbol in [16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1] {
            w.bits(
                match symbol {
                    18 => 1,
                    1 | 2 => 2,
                    _ => 0,
                },
                3,
            );
        }
        // Literal/length code lengths: 0 -> 2, 1..=255 none, 256 (end of
        // block) -> 2, 257..=284 none, 285 ("258 bytes") -> 1; both
        // distance codes -> 1. Canonical codes: 285 = 0, literal 0 = 10,
        // end of block = 11; distance 1 back = 0.
        w.code(0b11, 2);
        w.code(0, 1);
        w.bits(138 - 11, 7);
        w.code(0, 1);
        w.bits(117 - 11, 7);
        w.code(0b11, 2);
        w.code(0, 1);
        w.bits(28 - 11, 7);
        w.code(0b10, 2);
        w.code(0b10, 2);
        w.code(0b10, 2);
        // One literal zero, then "258 bytes, 1 back" over and over: the
        // code 0 twice, four times a byte.
        w.code(0b10, 2);
        let repeats = 4 * deflated_len.saturating_sub(20);
        w.zero_bits(2 * repeats);
        w.code(0b11, 2);
        let inflated = 1 + 258 * repeats as u64;
        let mut out = vec![0x78, 0xda];
        out.extend(w.finish());
        // Adler-32 of zeros: A stays 1, B counts the bytes.
        let b = u32::try_from(inflated % 65_521).unwrap_or_default();
        out.extend(((b << 16) | 1).to_be_bytes());
        out
    }

    /// How many zero bytes [`zlib_zeros`]`(deflated_len)` inflates to.
    pub fn zlib_zeros_inflated(deflated_len: usize) -> u64 {
        1 + 258 * 4 * deflated_len.saturating_sub(20) as u64
    }

    /// A zlib stream holding `data` as stored (uncompressed) blocks: a real
    /// stream any inflater accepts, with no encoder needed.
    pub fn zlib_stored(data: &[u8]) -> Vec<u8> {
        let mut out = vec![0x78, 0x01];
        let mut blocks = data.chunks(usize::from(u16::MAX)).peekable();
        if data.is_empty() {
            out.extend([1, 0, 0, 0xff, 0xff]);
        }
        while let Some(block) = blocks.next() {
            // BFINAL on the last block, BTYPE 00; stored blocks start on a
            // byte boundary.
            out.push(u8::from(blocks.peek().is_none()));
            let len = u16::try_from(block.len()).unwrap_or(u16::MAX);
            out.extend(len.to_le_bytes());
            out.extend((!len).to_le_bytes());
            out.extend(block);
        }
        let (mut a, mut b) = (1u32, 0u32);
        for &byte in data {
            a = (a + u32::from(byte)) % 65_521;
            b = (b + a) % 65_521;
        }
        out.extend(((b << 16) | a).to_be_bytes());
        out
    }

    /// Deflate's bit order: fields least significant bit first, Huffman
    /// codes most significant bit first.
    #[derive(Default)]
    struct BitWriter {
        out: Vec<u8>,
        acc: u32,
        len: u32,
    }

    impl BitWriter {
        fn bits(&mut self, value: u32, count: u32) {
            self.acc |= value << self.len;
            self.len += count;
            while self.len >= 8 {
                self.out.push(self.acc as u8);
                self.acc >>= 8;
                self.len -= 8;
            }
        }

        fn code(&mut self, code: u32, len: u32) {
            for i in (0..len).rev() {
                self.bits((code >> i) & 1, 1);
            }
        }

        /// `count` zero bits, a byte at a time once the first is out.
        fn zero_bits(&mut self, count: usize) {
            for _ in 0..count % 8 {
                self.bits(0, 1);
            }
            if count >= 8 {
                // The pending bits go out with the first byte; the rest are
                // whole zero bytes.
                self.bits(0, 8);
                self.out.resize(self.out.len() + count / 8 - 1, 0);
            }
        }

        fn finish(mut self) -> Vec<u8> {
            if self.len > 0 {
                self.out.push(self.acc as u8);
            }
            self.out
        }
    }

    /// The CRC-32 of PNG chunks (ISO 3309, as zlib's).
    pub fn crc32(bytes: &[u8]) -> u32 {
        const TABLE: [u32; 256] = {
            let mut table = [0u32; 256];
            let mut n = 0;
            while n < 256 {
                let mut c = n as u32;
                let mut k = 0;
                while k < 8 {
                    c = if c & 1 == 1 {
                        0xedb8_8320 ^ (c >> 1)
                    } else {
                        c >> 1
                    };
                    k += 1;
                }
                table[n] = c;
                n += 1;
            }
            table
        };
        !bytes.iter().fold(!0u32, |crc, &b| {
            TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8)
        })
    }
}
