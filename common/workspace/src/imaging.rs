//! Images in the workspace: what they are, how they are stored, their
//! thumbnails.
//!
//! Rules:
//! - before any decoder sees the bytes, one pass over the container (PNG
//!   chunks, JPEG segments, WebP RIFF chunks, GIF blocks) sums the metadata
//!   they carry: more than [`MAX_METADATA_BYTES`]
//!   ([`PrepareError::TooMuchMetadata`]) is refused. The same pass says
//!   whether the image is animated and how big a PNG is, so that no decoder
//!   is needed for either;
//! - no decoder ever inflates compressed metadata: the bytes handed to one
//!   are without PNG `iCCP`, `zTXt` and `iTXt` chunks, and every decoder runs
//!   within explicit [`image::Limits`]: the pixel budget's, or those of a
//!   header alone for [`probe`];
//! - the size and type of an image are read from its header, with the `image`
//!   crate, before a single pixel is decoded: an image over `max_pixels`
//!   ([`PrepareError::TooManyPixels`]) is refused without costing memory;
//! - a still PNG, JPEG or WebP is stored as lossy WebP (libwebp, through the
//!   `webp` crate) when that is smaller than what was sent; its EXIF
//!   orientation is applied first, and nothing of its metadata (EXIF, GPS,
//!   XMP, text chunks, colour profile) is carried over;
//! - an animation, a GIF, or an image whose WebP would not be smaller is
//!   stored as sent, less its PNG text/EXIF/time/colour-profile chunks and
//!   JPEG APP1/APP13/comment segments; `reencode: false` (`store_original`)
//!   keeps the exact bytes (within the metadata bound all the same);
//! - bytes that are not an image are stored as sent: the worker's check fails
//!   the project and releases its bytes, as it always has.
//!
//! Colour: no colour profile is ever applied. A PNG's `iCCP` profile is
//! dropped (decoders never see it, and neither the WebP nor the form kept as
//! sent carries it), so a wide-gamut PNG (Display P3, Adobe RGB) is shown as
//! if it were sRGB, a little less saturated than its author saw it. A JPEG
//! kept as sent keeps its APP2 profile.
//!
//! Everything here is CPU work: callers run it on a [`crate::cpu_pool`].

use std::{borrow::Cow, io::Cursor, ops::Range};

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};

pub use crate::images::{ImageInfo, THUMBNAIL_MAX_SIDE, Thumbnail};

/// The most metadata an image may carry, in bytes as sent (compressed or
/// not): colour profiles, EXIF, XMP, text and comments together. A real
/// colour profile takes a few kilobytes (sRGB about 3 KB) and EXIF with its
/// thumbnail at most 64 KB; 1 MiB leaves room for big XMP while bounding
/// what reading metadata can ever cost (and none is ever inflated).
pub const MAX_METADATA_BYTES: u64 = 1 << 20;

/// Memory a decoder may take beyond the pixels: a PNG row, JPEG tables, the
/// metadata it keeps (at most [`MAX_METADATA_BYTES`]).
const DECODER_SLACK: u64 = 64 << 20;

fn format_of(bytes: &[u8]) -> Option<(ImageFormat, &'static str)> {
    match image::guess_format(bytes).ok()? {
        f @ ImageFormat::Png => Some((f, "image/png")),
        f @ ImageFormat::Jpeg => Some((f, "image/jpeg")),
        f @ ImageFormat::WebP => Some((f, "image/webp")),
        f @ ImageFormat::Gif => Some((f, "image/gif")),
        _ => None,
    }
}

/// What a decoder may allocate for an image of at most `max_pixels`: the
/// pixels at up to 16 bytes each (RGBA, 32-bit float) plus its own buffers.
/// A header alone (`max_pixels` 0) needs only the latter.
fn limits(max_pixels: u64) -> Limits {
    let mut limits = Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(16).saturating_add(DECODER_SLACK));
    limits
}

/// A reader over bytes already checked (see [`check`]), within `limits`:
/// no decoder is ever made without explicit limits (the `image` crate's
/// own PNG decoder has none).
fn reader(view: &[u8], format: ImageFormat, limits: Limits) -> ImageReader<Cursor<&[u8]>> {
    let mut r = ImageReader::new(Cursor::new(view));
    r.set_format(format);
    r.limits(limits);
    r
}

/// Recognises the image in `bytes` from its header alone, or says why it is
/// not one (or is refused: too much metadata).
pub fn probe(bytes: &[u8]) -> Result<ImageInfo, String> {
    check(bytes, None)
        .map(|c| c.info)
        .map_err(Unfit::into_reason)
}

/// The checks the content of a save must pass before anything decodes it:
/// its metadata within [`MAX_METADATA_BYTES`], its pixels within
/// `max_pixels`. `Ok(None)`: not an image (stored as sent, for the worker to
/// refuse).
pub fn screen(bytes: &[u8], max_pixels: u64) -> Result<Option<ImageInfo>, PrepareError> {
    match check(bytes, Some(max_pixels)) {
        Ok(checked) => Ok(Some(checked.info)),
        Err(Unfit::Refused(e)) => Err(e),
        Err(Unfit::NotAnImage(_)) => Ok(None),
    }
}

/// An image that passed the checks no decoder is trusted with.
struct Checked<'a> {
    info: ImageInfo,
    format: ImageFormat,
    /// A PNG with `acTL` before its first `IDAT`, or a WebP with the
    /// animation flag.
    animated: bool,
    /// What decoders get: the bytes less what they must not see.
    view: Cow<'a, [u8]>,
}

/// Why bytes are not taken as an image.
enum Unfit {
    /// Refused outright (too much metadata, too many pixels).
    Refused(PrepareError),
    /// Not an image of a known type, or its header is corrupt: the reason.
    NotAnImage(String),
}

impl Unfit {
    fn into_reason(self) -> String {
        match self {
            Unfit::Refused(e) => e.to_string(),
            Unfit::NotAnImage(reason) => reason,
        }
    }
}

/// The checks, cheapest first: the type (magic bytes), one pass over the
/// container (metadata, animation, a PNG's size from its IHDR), then the
/// header through a decoder that sees only [`for_decoders`] pieces (a copy
/// of the bytes without them, only when there are some), within
/// limits for `max_pixels`. With `max_pixels` `None` (a probe) a header of
/// any size is read, within the limits of a header alone.
fn check(bytes: &[u8], max_pixels: Option<u64>) -> Result<Checked<'_>, Unfit> {
    let (format, media_type) = format_of(bytes).ok_or_else(|| {
        Unfit::NotAnImage("not an image of a known type (PNG, JPEG, WebP or GIF)".to_owned())
    })?;
    let layout = Layout::of(bytes, format);
    if layout.metadata > MAX_METADATA_BYTES {
        let (what, largest) = layout.largest.unwrap_or(("metadata", layout.metadata));
        return Err(Unfit::Refused(PrepareError::TooMuchMetadata {
            bytes: layout.metadata,
            what,
            largest,
            max: MAX_METADATA_BYTES,
        }));
    }
    let too_many = |width: u32, height: u32| {
        let pixels = u64::from(width) * u64::from(height);
        match max_pixels {
            Some(max) if pixels > max => Err(Unfit::Refused(PrepareError::TooManyPixels {
                width,
                height,
                pixels,
                max,
            })),
            _ => Ok(()),
        }
    };
    // A PNG says its size in its first chunk: one over the budget is refused
    // before a decoder (which would allocate a row of it) is made.
    if let Some((width, height)) = layout.png_size {
        too_many(width, height)?;
    }
    let view = if layout.hidden {
        without(bytes, format, for_decoders).map_or(Cow::Borrowed(bytes), Cow::Owned)
    } else {
        Cow::Borrowed(bytes)
    };
    let (width, height) = reader(&view, format, limits(max_pixels.unwrap_or(0)))
        .into_dimensions()
        .map_err(|e| Unfit::NotAnImage(format!("image header is truncated or corrupt ({e})")))?;
    if width == 0 || height == 0 {
        return Err(Unfit::NotAnImage(
            "image header has a zero dimension".into(),
        ));
    }
    too_many(width, height)?;
    Ok(Checked {
        info: ImageInfo {
            media_type,
            width,
            height,
        },
        format,
        animated: layout.animated,
        view,
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
    /// The policy the image settings give; `store_original` is the save's
    /// own request to keep its bytes as sent.
    pub fn from_settings(images: &penora_config::Images, store_original: bool) -> Self {
        Self {
            reencode: !store_original
                && images.storage_format == penora_config::ImageStorageFormat::Webp,
            quality: f32::from(images.quality),
            max_pixels: images.max_pixels,
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

/// Why an image is refused outright. The API answers each with `400
/// invalid_request` naming `content`.
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
    /// More metadata than [`MAX_METADATA_BYTES`]: a colour profile or text
    /// that would inflate to gigabytes, or megabytes of APP segments.
    /// Decided from the container alone, before any decoder reads it.
    #[error(
        "the image carries {bytes} bytes of metadata (the largest: a {what} of {largest} bytes); at most {max} are accepted"
    )]
    TooMuchMetadata {
        /// Bytes of metadata, in all, as sent.
        bytes: u64,
        /// The biggest piece of it, e.g. "PNG iCCP chunk".
        what: &'static str,
        /// Its bytes.
        largest: u64,
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
    let Checked {
        info,
        format,
        animated,
        view,
    } = match check(&bytes, Some(policy.max_pixels)) {
        Ok(checked) => checked,
        Err(Unfit::Refused(e)) => return Err(e),
        Err(Unfit::NotAnImage(_)) => return Ok(keep(bytes, None, StoredAs::Unrecognised)),
    };
    if !policy.reencode {
        drop(view);
        return Ok(keep(bytes, Some(info), StoredAs::Original));
    }
    if info.media_type == "image/gif" || animated {
        drop(view);
        let stripped = strip_metadata(&bytes, info.media_type).unwrap_or(bytes);
        return Ok(keep(stripped, Some(info), StoredAs::Stripped));
    }
    let decoded = decode_view(&view, format, policy.max_pixels);
    drop(view);
    let image = match decoded {
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
/// `max_pixels` and the metadata bound, with its EXIF orientation applied.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<DynamicImage, String> {
    let checked = check(bytes, Some(max_pixels)).map_err(Unfit::into_reason)?;
    decode_view(&checked.view, checked.format, max_pixels)
}

/// Decodes bytes that passed [`check`].
fn decode_view(view: &[u8], format: ImageFormat, max_pixels: u64) -> Result<DynamicImage, String> {
    let limits = limits(max_pixels);
    let max_alloc = limits.max_alloc.unwrap_or(u64::MAX);
    let mut decoder = reader(view, format, limits)
        .into_decoder()
        .map_err(|e| e.to_string())?;
    // `Limits` bound the decoders' own buffers; the buffer of pixels is
    // allocated here, so it is held to the budget here.
    let (width, height) = decoder.dimensions();
    if u64::from(width) * u64::from(height) > max_pixels || decoder.total_bytes() > max_alloc {
        return Err(format!(
            "the image is {width}x{height} pixels, more than the {max_pixels} accepted"
        ));
    }
    let orientation = decoder.orientation().map_err(|e| e.to_string())?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| e.to_string())?;
    image.apply_orientation(orientation);
    Ok(image)
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

const THUMBNAIL_QUALITY: f32 = 80.0;

/// Checks that `bytes` decode as an image and makes its thumbnail, or says
/// why they are not an image (or are refused: too many pixels, too much
/// metadata). Content stored before these checks existed goes through them
/// too.
pub fn thumbnail(bytes: &[u8], max_pixels: u64) -> Result<(ImageInfo, Thumbnail), String> {
    let checked = check(bytes, Some(max_pixels)).map_err(Unfit::into_reason)?;
    let image = decode_view(&checked.view, checked.format, max_pixels)
        .map_err(|e| format!("the image does not decode: {e}"))?;
    drop(checked.view);
    let small = if image.width().max(image.height()) > THUMBNAIL_MAX_SIDE {
        image.thumbnail(THUMBNAIL_MAX_SIDE, THUMBNAIL_MAX_SIDE)
    } else {
        image
    };
    let (data, width, height) = encode_webp(small, THUMBNAIL_QUALITY)
        .ok_or_else(|| "the thumbnail could not be encoded".to_owned())?;
    Ok((
        checked.info,
        Thumbnail {
            data,
            width,
            height,
        },
    ))
}

/// `bytes` without their metadata, for images kept in their own format:
/// PNG text, EXIF, time and colour-profile (`iCCP`) chunks; JPEG APP1 (EXIF,
/// XMP), APP13 (IPTC) and comments. `None` when nothing needed removing (the
/// bytes are then kept as they are).
pub fn strip_metadata(bytes: &[u8], media_type: &str) -> Option<Vec<u8>> {
    let format = match media_type {
        "image/png" => ImageFormat::Png,
        "image/jpeg" => ImageFormat::Jpeg,
        _ => return None,
    };
    without(bytes, format, kept_as_sent)
}

/// Whether a piece stays in an image stored in its own format.
fn kept_as_sent(tag: Tag) -> bool {
    match tag {
        Tag::Png(kind) => !matches!(
            &kind,
            b"tEXt" | b"zTXt" | b"iTXt" | b"eXIf" | b"tIME" | b"iCCP"
        ),
        Tag::Jpeg(marker) => !matches!(marker, 0xe1 | 0xed | 0xfe),
        _ => true,
    }
}

/// Whether a decoder gets to see a piece. Never PNG's compressed chunks:
/// the png crate inflates an `iCCP` profile while it reads the header, and
/// the `image` crate's XMP and IPTC readers inflate `iTXt` and `zTXt`.
/// Uncompressed metadata (`tEXt`, `eXIf` with the orientation) stays: it
/// costs no more than its bytes, within [`MAX_METADATA_BYTES`], and leaving
/// it spares a copy of the whole image.
fn for_decoders(tag: Tag) -> bool {
    !matches!(tag, Tag::Png(kind) if matches!(&kind, b"iCCP" | b"zTXt" | b"iTXt"))
}

/// `bytes` less the pieces `keep` refuses, or `None` when it refuses none.
fn without(bytes: &[u8], format: ImageFormat, keep: fn(Tag) -> bool) -> Option<Vec<u8>> {
    let mut out: Option<Vec<u8>> = None;
    walk(bytes, format, &mut |tag, range| {
        let piece = bytes.get(range.clone()).unwrap_or_default();
        match (&mut out, keep(tag)) {
            (Some(out), true) => out.extend_from_slice(piece),
            // The first piece left out: everything before it is kept (the
            // pieces are contiguous from the start).
            (None, false) => {
                let mut kept = Vec::with_capacity(bytes.len());
                kept.extend_from_slice(bytes.get(..range.start).unwrap_or_default());
                out = Some(kept);
            }
            (Some(_), false) | (None, true) => {}
        }
    });
    out
}

// The container walk: one pass over an image's chunks or segments, before any
// decoder, bounds-checked at every step (a hostile length ends its piece at
// the end of the bytes; nothing here indexes or panics).

/// What a piece of an image file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    /// Bytes of no chunk or segment: a signature or file header, what follows
    /// the end of the image, what is not understood.
    Raw,
    /// A PNG chunk, by type.
    Png([u8; 4]),
    /// A JPEG marker and its segment, by marker; a scan (SOS) runs to the
    /// next marker, over its entropy-coded data.
    Jpeg(u8),
    /// A WebP RIFF chunk, by FourCC.
    Webp([u8; 4]),
    /// A GIF block: a frame (0x2c), the trailer (0x3b), or an extension by
    /// its label.
    Gif(u8),
    /// A GIF application extension, by identifier and authentication code.
    GifApplication([u8; 11]),
}

impl Tag {
    /// What the piece is when it is metadata (counted against
    /// [`MAX_METADATA_BYTES`]), as messages name it.
    fn metadata(self) -> Option<&'static str> {
        const APP: [&str; 16] = [
            "JPEG APP0 segment",
            "JPEG APP1 segment",
            "JPEG APP2 segment",
            "JPEG APP3 segment",
            "JPEG APP4 segment",
            "JPEG APP5 segment",
            "JPEG APP6 segment",
            "JPEG APP7 segment",
            "JPEG APP8 segment",
            "JPEG APP9 segment",
            "JPEG APP10 segment",
            "JPEG APP11 segment",
            "JPEG APP12 segment",
            "JPEG APP13 segment",
            "JPEG APP14 segment",
            "JPEG APP15 segment",
        ];
        match self {
            Tag::Png(kind) => match &kind {
                b"iCCP" => Some("PNG iCCP chunk"),
                b"zTXt" => Some("PNG zTXt chunk"),
                b"iTXt" => Some("PNG iTXt chunk"),
                b"tEXt" => Some("PNG tEXt chunk"),
                b"eXIf" => Some("PNG eXIf chunk"),
                _ => None,
            },
            // APP0 (JFIF) and APP14 (Adobe) say how the pixels are coded;
            // decoders read a few bytes of them and skip the rest.
            Tag::Jpeg(0xe0 | 0xee) => None,
            Tag::Jpeg(marker @ 0xe1..=0xef) => APP.get(usize::from(marker - 0xe0)).copied(),
            Tag::Jpeg(0xfe) => Some("JPEG COM segment"),
            Tag::Webp(kind) => match &kind {
                b"ICCP" => Some("WebP ICCP chunk"),
                b"EXIF" => Some("WebP EXIF chunk"),
                b"XMP " => Some("WebP XMP chunk"),
                _ => None,
            },
            Tag::Gif(0xfe) => Some("GIF comment extension"),
            Tag::Gif(0x01) => Some("GIF plain text extension"),
            // The loop count of an animation is structure, not metadata.
            Tag::GifApplication(id) if !matches!(&id, b"NETSCAPE2.0" | b"ANIMEXTS1.0") => {
                Some("GIF application extension")
            }
            _ => None,
        }
    }
}

/// What one pass over a container says.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Layout {
    /// Bytes of metadata in all, whole pieces as sent.
    metadata: u64,
    /// The biggest piece of metadata: what it is, its bytes.
    largest: Option<(&'static str, u64)>,
    /// A PNG with `acTL` before its first `IDAT` (what makes it an APNG to
    /// the png crate), or a WebP whose VP8X has the animation flag.
    animated: bool,
    /// A PNG's width and height, from its IHDR.
    png_size: Option<(u32, u32)>,
    /// Some piece that decoders must not see ([`for_decoders`]).
    hidden: bool,
}

impl Layout {
    fn of(bytes: &[u8], format: ImageFormat) -> Self {
        let mut layout = Layout::default();
        let mut seen_idat = false;
        walk(bytes, format, &mut |tag, range| {
            // Metadata counts by what its chunk declares, not only by what
            // is there: a decoder may size its buffer by the declaration (a
            // WebP EXIF chunk declaring 4 GiB in a short file made
            // image-webp allocate 4 GiB of zeros).
            let declared = match tag {
                Tag::Png(_) => be32(bytes, range.start).map(|n| u64::from(n) + 12),
                Tag::Webp(_) => le32(bytes, range.start + 4).map(|n| u64::from(n) + 8),
                _ => None,
            };
            let len = declared.unwrap_or(0).max(range.len() as u64);
            if let Some(what) = tag.metadata() {
                layout.metadata += len;
                if layout.largest.is_none_or(|(_, most)| len > most) {
                    layout.largest = Some((what, len));
                }
            }
            layout.hidden |= !for_decoders(tag);
            match tag {
                // Length, type, then width and height (of its 13 bytes).
                Tag::Png(kind) if &kind == b"IHDR" && range.len() == 12 + 13 => {
                    layout.png_size =
                        be32(bytes, range.start + 8).zip(be32(bytes, range.start + 12));
                }
                Tag::Png(kind) if &kind == b"IDAT" => seen_idat = true,
                Tag::Png(kind) if &kind == b"acTL" && !seen_idat => layout.animated = true,
                Tag::Webp(kind) if &kind == b"VP8X" => {
                    // Flags, first byte of its data: 0x02 is "animation".
                    layout.animated |= bytes.get(range.start + 8).is_some_and(|f| f & 0x02 != 0);
                }
                _ => {}
            }
        });
        layout
    }
}

/// Calls `visit` with each piece of the container, in order: the pieces are
/// contiguous and cover every byte. Whatever the bytes, it ends: each step
/// moves forward, and a length that runs past the end ends its piece at the
/// end.
fn walk(bytes: &[u8], format: ImageFormat, visit: &mut dyn FnMut(Tag, Range<usize>)) {
    let end = match format {
        ImageFormat::Png => walk_png(bytes, visit),
        ImageFormat::Jpeg => walk_jpeg(bytes, visit),
        ImageFormat::WebP => walk_webp(bytes, visit),
        ImageFormat::Gif => walk_gif(bytes, visit),
        _ => 0,
    };
    // What follows the end of the image, or was not understood.
    if end < bytes.len() {
        visit(Tag::Raw, end..bytes.len());
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    let bytes = b.get(at..at.checked_add(2)?)?;
    bytes.try_into().ok().map(u16::from_be_bytes)
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    let bytes = b.get(at..at.checked_add(4)?)?;
    bytes.try_into().ok().map(u32::from_be_bytes)
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    let bytes = b.get(at..at.checked_add(4)?)?;
    bytes.try_into().ok().map(u32::from_le_bytes)
}

fn fourcc(b: &[u8], at: usize) -> Option<[u8; 4]> {
    b.get(at..at.checked_add(4)?)?.try_into().ok()
}

/// `at + len`, or the end of `b` when that is past it.
fn clamp(b: &[u8], at: usize, len: usize) -> usize {
    at.saturating_add(len).min(b.len())
}

/// PNG: the signature, then chunks (length, type, data, CRC) up to `IEND`.
/// Returns where the walk stopped.
fn walk_png(b: &[u8], visit: &mut dyn FnMut(Tag, Range<usize>)) -> usize {
    let mut at = b.len().min(8);
    visit(Tag::Raw, 0..at);
    while let (Some(len), Some(kind)) = (be32(b, at), fourcc(b, at + 4)) {
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        let end = clamp(b, at, len.saturating_add(12));
        visit(Tag::Png(kind), at..end);
        at = end;
        if &kind == b"IEND" {
            break;
        }
    }
    at
}

/// JPEG: SOI, then marker segments up to EOI, each scan with its
/// entropy-coded data; all of them (APP segments may follow the first scan
/// of a progressive JPEG). Returns where the walk stopped.
fn walk_jpeg(b: &[u8], visit: &mut dyn FnMut(Tag, Range<usize>)) -> usize {
    let mut at = b.len().min(2);
    visit(Tag::Raw, 0..at);
    while at < b.len() {
        if b.get(at) != Some(&0xff) {
            // No marker where one should be: decoders look for the next one,
            // and so does this walk.
            let next = next_marker(b, at + 1);
            visit(Tag::Raw, at..next);
            at = next;
            continue;
        }
        // 0xFF, perhaps more of them as fill, then the marker.
        let mut code = at + 1;
        while b.get(code) == Some(&0xff) {
            code += 1;
        }
        let Some(&marker) = b.get(code) else { break };
        let after = code + 1;
        let end = match marker {
            // End of image: what follows is not part of it.
            0xd9 => {
                visit(Tag::Jpeg(marker), at..after);
                return after;
            }
            // Every other marker outside a scan is read with a length, as
            // the decoder (zune-jpeg) reads it, restarts, SOI and TEM
            // included: a walk that took them as bare markers could be led
            // to see a segment where the decoder sees an APP2 profile, and
            // the metadata would escape the bound.
            _ => {
                let Some(len) = be16(b, after) else { break };
                // The length counts its own two bytes.
                let end = clamp(b, after, usize::from(len).max(2));
                if marker == 0xda {
                    next_marker(b, end)
                } else {
                    end
                }
            }
        };
        visit(Tag::Jpeg(marker), at..end);
        at = end;
    }
    at
}

/// Where the next JPEG marker starts, from `from` on: an 0xFF followed by
/// neither 0x00 (a stuffed byte of data), a restart marker (part of the
/// scan) nor another 0xFF (fill before the marker); or the end.
fn next_marker(b: &[u8], from: usize) -> usize {
    let mut at = from;
    while let Some(offset) = b
        .get(at..)
        .and_then(|rest| rest.iter().position(|&x| x == 0xff))
    {
        let ff = at + offset;
        match b.get(ff + 1) {
            None => return b.len(),
            Some(0x00 | 0xd0..=0xd7 | 0xff) => at = ff + 1,
            Some(_) => return ff,
        }
    }
    b.len()
}

/// WebP: the RIFF header, then chunks (FourCC, size, data padded to even)
/// to the end of the bytes. Returns where the walk stopped.
fn walk_webp(b: &[u8], visit: &mut dyn FnMut(Tag, Range<usize>)) -> usize {
    // "RIFF", the size of what follows, "WEBP". The walk goes on to the end
    // of the bytes, not of the RIFF size: the decoder (image-webp) may read
    // chunks past a RIFF size that says less than the file holds, and their
    // metadata must be counted too.
    let mut at = b.len().min(12);
    visit(Tag::Raw, 0..at);
    while at < b.len() {
        let (Some(kind), Some(size)) = (fourcc(b, at), le32(b, at + 4)) else {
            break;
        };
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        let end = clamp(b, at, size.saturating_add(size & 1).saturating_add(8));
        visit(Tag::Webp(kind), at..end);
        at = end;
    }
    at
}

/// GIF: the header, the logical screen descriptor and the global colour
/// table, then blocks (extensions, frames) up to the trailer. Returns where
/// the walk stopped.
fn walk_gif(b: &[u8], visit: &mut dyn FnMut(Tag, Range<usize>)) -> usize {
    let table = |flags: u8| match flags & 0x80 {
        0 => 0,
        _ => 3usize << ((flags & 7) + 1),
    };
    let mut at = clamp(b, 13, b.get(10).map_or(0, |&f| table(f)));
    visit(Tag::Raw, 0..at);
    while let Some(&introducer) = b.get(at) {
        let end = match introducer {
            0x21 => {
                let Some(&label) = b.get(at + 1) else { break };
                let end = sub_blocks_end(b, at + 2);
                let tag = match label {
                    // The first sub-block is 11 bytes: identifier, code.
                    0xff => Tag::GifApplication(
                        b.get(at + 3..at + 14)
                            .and_then(|id| id.try_into().ok())
                            .unwrap_or_default(),
                    ),
                    _ => Tag::Gif(label),
                };
                visit(tag, at..end);
                end
            }
            0x2c => {
                // The image descriptor (10 bytes), its colour table, the LZW
                // minimum code size, then the data's sub-blocks.
                let Some(&flags) = b.get(at + 9) else { break };
                let end = sub_blocks_end(b, at + 10 + table(flags) + 1);
                visit(Tag::Gif(introducer), at..end);
                end
            }
            0x3b => {
                visit(Tag::Gif(introducer), at..at + 1);
                return at + 1;
            }
            _ => break,
        };
        at = end;
    }
    at
}

/// Where a run of GIF sub-blocks (a length byte, then that many bytes; a
/// zero length ends the run) that starts at `at` ends.
fn sub_blocks_end(b: &[u8], mut at: usize) -> usize {
    while let Some(&len) = b.get(at) {
        at += 1 + usize::from(len);
        if len == 0 {
            return at;
        }
    }
    b.len()
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

    // Image bombs in metadata (issue 24).

    const POLICY: StoragePolicy = StoragePolicy {
        reencode: true,
        quality: 85.0,
        max_pixels: 1 << 24,
    };

    /// The pieces [`walk`] visits, checking as it goes that they are
    /// contiguous from the start.
    fn pieces(bytes: &[u8], format: ImageFormat) -> Vec<(Tag, Range<usize>)> {
        let mut out: Vec<(Tag, Range<usize>)> = Vec::new();
        walk(bytes, format, &mut |tag, range| {
            let expected = out.last().map_or(0, |(_, r)| r.end);
            assert_eq!(range.start, expected, "{tag:?} {range:?} after {out:?}");
            assert!(range.start <= range.end && range.end <= bytes.len());
            out.push((tag, range));
        });
        assert_eq!(out.last().map_or(0, |(_, r)| r.end), bytes.len(), "{out:?}");
        out
    }

    /// This process's peak resident memory, kB (nextest runs each test in a
    /// process of its own).
    fn peak_rss_kb() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0)
    }

    fn photo(width: u32, height: u32, format: ImageFormat) -> Vec<u8> {
        samples::encode(&samples::photo_like(width, height, 5), format)
    }

    fn refused_for_metadata(bytes: Vec<u8>) -> (u64, &'static str) {
        match prepare(bytes, &POLICY) {
            Err(PrepareError::TooMuchMetadata {
                bytes, what, max, ..
            }) => {
                assert_eq!(max, MAX_METADATA_BYTES);
                (bytes, what)
            }
            other => panic!(
                "not refused for its metadata: {:?}",
                other.map(|p| p.stored_as)
            ),
        }
    }

    /// A WebP in the extended format (VP8X) around a lossless bitstream,
    /// with `chunks` (ICCP goes before the image data, EXIF and XMP after).
    fn webp_with(chunks: &[(&[u8; 4], Vec<u8>)]) -> Vec<u8> {
        let simple = photo(64, 48, ImageFormat::WebP);
        assert_eq!(
            simple.get(12..16),
            Some(&b"VP8L"[..]),
            "a simple lossless WebP"
        );
        let push = |out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]| {
            out.extend(kind);
            out.extend(u32::try_from(data.len()).expect("small").to_le_bytes());
            out.extend(data);
            if data.len() % 2 == 1 {
                out.push(0);
            }
        };
        let flags = chunks.iter().fold(0u8, |f, (kind, _)| {
            f | match *kind {
                b"ICCP" => 0x20,
                b"EXIF" => 0x08,
                b"XMP " => 0x04,
                _ => 0,
            }
        });
        let mut vp8x = vec![flags, 0, 0, 0];
        vp8x.extend(&63u32.to_le_bytes()[..3]);
        vp8x.extend(&47u32.to_le_bytes()[..3]);
        let mut body = b"WEBP".to_vec();
        push(&mut body, b"VP8X", &vp8x);
        for (kind, data) in chunks.iter().filter(|(k, _)| *k == b"ICCP") {
            push(&mut body, kind, data);
        }
        body.extend(&simple[12..]);
        for (kind, data) in chunks.iter().filter(|(k, _)| *k != b"ICCP") {
            push(&mut body, kind, data);
        }
        let mut out = b"RIFF".to_vec();
        out.extend(u32::try_from(body.len()).expect("small").to_le_bytes());
        out.extend(body);
        out
    }

    /// `gif` with an extension (label, data in sub-blocks) after its global
    /// colour table.
    fn gif_with(gif: &[u8], label: u8, data: &[u8]) -> Vec<u8> {
        let flags = gif[10];
        let at = 13
            + if flags & 0x80 != 0 {
                3 << ((flags & 7) + 1)
            } else {
                0
            };
        let mut ext = vec![0x21, label];
        for block in data.chunks(255) {
            ext.push(u8::try_from(block.len()).expect("at most 255"));
            ext.extend(block);
        }
        ext.push(0);
        [&gif[..at], &ext, &gif[at..]].concat()
    }

    #[test]
    fn the_walk_finds_every_chunk_of_a_png_and_stops_at_iend() {
        let mut b = samples::with_png_chunk(&png(8, 8), b"iCCP", &samples::iccp(&[0; 100]));
        b.extend(b"trailing bytes after IEND");
        let tags: Vec<Tag> = pieces(&b, ImageFormat::Png)
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        assert_eq!(tags.first(), Some(&Tag::Raw));
        assert_eq!(tags.get(1), Some(&Tag::Png(*b"IHDR")));
        assert_eq!(tags.get(2), Some(&Tag::Png(*b"iCCP")));
        assert_eq!(tags.iter().rev().nth(1), Some(&Tag::Png(*b"IEND")));
        assert_eq!(tags.last(), Some(&Tag::Raw));
        let layout = Layout::of(&b, ImageFormat::Png);
        assert_eq!(layout.png_size, Some((8, 8)));
        // Length, type and CRC; the profile's name and method; the profile.
        assert_eq!(layout.metadata, 12 + 13 + 100);
        assert_eq!(layout.largest, Some(("PNG iCCP chunk", 125)));
        assert!(layout.hidden && !layout.animated);
    }

    #[test]
    fn hostile_lengths_and_truncations_end_the_walk_without_a_panic() {
        let sig = b"\x89PNG\r\n\x1a\n";
        let cases: Vec<(ImageFormat, Vec<u8>)> = vec![
            // A chunk declaring 4 GiB, then 100 bytes: metadata counts what
            // it declares (a decoder may size a buffer by it).
            (
                ImageFormat::Png,
                [&sig[..], &[0xff; 4], b"iCCP", &[0; 100]].concat(),
            ),
            (
                ImageFormat::Png,
                [&sig[..], &[0x7f, 0xff, 0xff, 0xf3], b"IHDR"].concat(),
            ),
            (ImageFormat::Png, [&sig[..], &[0, 0, 0]].concat()),
            (ImageFormat::Png, sig[..5].to_vec()),
            (
                ImageFormat::Jpeg,
                vec![0xff, 0xd8, 0xff, 0xe2, 0xff, 0xff, 1, 2],
            ),
            (ImageFormat::Jpeg, vec![0xff, 0xd8, 0xff, 0xe2]),
            (ImageFormat::Jpeg, vec![0xff, 0xd8, 0xff, 0xff, 0xff]),
            (ImageFormat::Jpeg, vec![0xff, 0xd8, 0xff, 0xda, 0, 0, 0xff]),
            (
                ImageFormat::Jpeg,
                vec![0xff, 0xd8, 1, 2, 3, 0xff, 0x00, 0xff, 0xd0, 9],
            ),
            (
                ImageFormat::Jpeg,
                vec![0xff, 0xd8, 0xff, 0xe1, 0, 1, 0xff, 0xd9, 7],
            ),
            (
                ImageFormat::WebP,
                [&b"RIFF"[..], &[0xff; 4], b"WEBPEXIF", &[0xff; 4], &[1; 9]].concat(),
            ),
            (
                ImageFormat::WebP,
                [&b"RIFF"[..], &[0; 4], b"WEBPEXIF", &[0xff; 4]].concat(),
            ),
            (ImageFormat::WebP, b"RIFF\x04\0\0\0WEBPVP8".to_vec()),
            (
                ImageFormat::Gif,
                [&b"GIF89a"[..], &[1, 0, 1, 0, 0xff, 0, 0]].concat(),
            ),
            (
                ImageFormat::Gif,
                [&b"GIF89a"[..], &[1, 0, 1, 0, 0, 0, 0, 0x21, 0xfe, 0xff, 1]].concat(),
            ),
            (
                ImageFormat::Gif,
                [
                    &b"GIF89a"[..],
                    &[1, 0, 1, 0, 0, 0, 0, 0x2c, 0, 0, 0, 0, 1, 0, 1, 0, 0xff],
                ]
                .concat(),
            ),
            (
                ImageFormat::Gif,
                [&b"GIF89a"[..], &[1, 0, 1, 0, 0, 0, 0, 0x21, 0xff, 11, b'N']].concat(),
            ),
        ];
        for (format, bytes) in cases {
            pieces(&bytes, format);
            let layout = Layout::of(&bytes, format);
            if layout.metadata > MAX_METADATA_BYTES {
                assert!(
                    matches!(
                        screen(&bytes, 1 << 24),
                        Err(PrepareError::TooMuchMetadata { .. })
                    ),
                    "{bytes:?}"
                );
            }
            let _ = without(&bytes, format, for_decoders);
            let _ = without(&bytes, format, kept_as_sent);
            let _ = prepare(bytes.clone(), &POLICY);
            let _ = thumbnail(&bytes, 1 << 24);
        }
        // A truncated chunk counts what it declares, and is dropped.
        let b = [&sig[..], &[0xff; 4], b"iCCP", &[0; 100]].concat();
        assert_eq!(
            Layout::of(&b, ImageFormat::Png).metadata,
            u64::from(u32::MAX) + 12
        );
        assert_eq!(
            without(&b, ImageFormat::Png, for_decoders),
            Some(sig.to_vec())
        );
    }

    proptest::proptest! {
        /// Whatever follows the magic bytes of each format, the walk visits
        /// contiguous pieces covering every byte, nothing built on it
        /// panics, and metadata declared over the bound is refused.
        #[test]
        fn any_bytes_walk_into_contiguous_pieces_without_a_panic(
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
            format in 0usize..4,
        ) {
            let (format, magic): (ImageFormat, &[u8]) = [
                (ImageFormat::Png, &b"\x89PNG\r\n\x1a\n"[..]),
                (ImageFormat::Jpeg, &[0xff, 0xd8, 0xff][..]),
                (ImageFormat::WebP, &b"RIFF\x20\0\0\0WEBP"[..]),
                (ImageFormat::Gif, &b"GIF89a"[..]),
            ][format];
            let bytes = [magic, &tail].concat();
            pieces(&bytes, format);
            let layout = Layout::of(&bytes, format);
            if layout.metadata > MAX_METADATA_BYTES {
                let refused = matches!(
                    screen(&bytes, 1 << 24),
                    Err(PrepareError::TooMuchMetadata { .. })
                );
                proptest::prop_assert!(refused);
            }
            if let Some(kept) = without(&bytes, format, for_decoders) {
                proptest::prop_assert!(kept.len() < bytes.len());
            }
            let _ = without(&bytes, format, kept_as_sent);
        }
    }

    #[test]
    fn metadata_counts_what_it_declares_past_the_riff_size_and_behind_stray_markers() {
        // A WebP whose EXIF chunk declares 4 GiB in a short file: image-webp
        // would allocate what it declares.
        let mut b = webp_with(&[(b"EXIF", vec![1; 16])]);
        let at = b.len() - 16 - 4;
        b[at..at + 4].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
        assert!(matches!(
            screen(&b, 1 << 24),
            Err(PrepareError::TooMuchMetadata { .. })
        ));
        // A RIFF size that stops before an EXIF chunk of 2 MiB the file
        // still holds: the decoder may read it, so it counts.
        let mut b = webp_with(&[]);
        let riff = u32::try_from(b.len() - 8).expect("small");
        b.extend(b"EXIF");
        b.extend(u32::try_from(2 << 20).expect("small").to_le_bytes());
        b.extend(vec![7u8; 2 << 20]);
        b[4..8].copy_from_slice(&riff.to_le_bytes());
        assert!(matches!(
            screen(&b, 1 << 24),
            Err(PrepareError::TooMuchMetadata { .. })
        ));
        // JPEG: a restart marker outside a scan has a length to the decoder
        // (zune-jpeg), so what it covers is not hidden from the count: here
        // it covers 0xFFC4 bytes, behind which 20 APP2 segments of 60,000
        // bytes each (1.2 MB of profile) stand.
        let mut b = vec![0xff, 0xd8];
        for _ in 0..20 {
            b.extend([0xff, 0xd0, 0xff, 0xc4]);
            b.extend(vec![0u8; 0xffc4 - 2]);
            b.extend([0xff, 0xe2]);
            b.extend(60_002u16.to_be_bytes());
            b.extend(vec![0x41u8; 60_000]);
        }
        b.extend([0xff, 0xd9]);
        let layout = Layout::of(&b, ImageFormat::Jpeg);
        assert!(layout.metadata >= 20 * 60_000, "{}", layout.metadata);
        assert!(matches!(
            screen(&b, 1 << 24),
            Err(PrepareError::TooMuchMetadata { .. })
        ));
    }

    #[test]
    fn a_png_colour_profile_bomb_is_refused_from_its_size_alone() {
        let zlib = samples::zlib_zeros(2 << 20);
        let bomb = samples::with_png_chunk(&png(64, 64), b"iCCP", &samples::iccp(&zlib));
        let peak = peak_rss_kb();
        let (bytes, what) = refused_for_metadata(bomb.clone());
        assert_eq!(
            (bytes, what),
            (zlib.len() as u64 + 12 + 13, "PNG iCCP chunk")
        );
        assert!(probe(&bomb).is_err_and(|e| e.contains("bytes of metadata")));
        assert!(
            screen(&bomb, 1 << 24).is_err_and(|e| e.to_string().contains("iCCP")),
            "the API's check refuses it"
        );
        let ztxt = samples::with_png_chunk(&png(64, 64), b"zTXt", &samples::ztxt(&zlib));
        assert_eq!(refused_for_metadata(ztxt).1, "PNG zTXt chunk");
        // Kept exactly as sent on request, it is refused all the same.
        let original = StoragePolicy {
            reencode: false,
            ..POLICY
        };
        assert!(matches!(
            prepare(bomb, &original),
            Err(PrepareError::TooMuchMetadata { .. })
        ));
        // Two gigabytes of zeros were never written.
        let grown = peak_rss_kb().saturating_sub(peak);
        assert!(grown < 32 * 1024, "the peak RSS grew by {grown} kB");
    }

    #[test]
    fn a_png_with_a_small_colour_profile_still_becomes_a_webp_and_no_decoder_sees_the_profile() {
        let profile: Vec<u8> = (0..3_144u32).map(|i| (i % 251) as u8).collect();
        let sent = samples::with_png_chunk(
            &photo(320, 240, ImageFormat::Png),
            b"iCCP",
            &samples::iccp(&samples::zlib_stored(&profile)),
        );
        let view = without(&sent, ImageFormat::Png, for_decoders).expect("the profile left out");
        // Plain text costs decoders no more than its bytes: no copy for it.
        let text = samples::with_png_chunk(&png(8, 8), b"tEXt", b"Software\0penora");
        assert!(!Layout::of(&text, ImageFormat::Png).hidden);
        assert!(!view.windows(4).any(|w| w == b"iCCP"));
        // The chunk, its name and method, then zlib: header, one stored
        // block's header, the profile, Adler-32.
        let chunk = 12 + 13 + 2 + 5 + profile.len() + 4;
        assert_eq!(view.len(), sent.len() - chunk);
        let p = prepare(sent.clone(), &POLICY).expect("prepared");
        assert_eq!(p.stored_as, StoredAs::Webp);
        assert_eq!(p.info.map(|i| (i.width, i.height)), Some((320, 240)));
        // Kept in its own format, it goes without its profile too.
        let stripped = strip_metadata(&sent, "image/png").expect("stripped");
        assert!(!stripped.windows(4).any(|w| w == b"iCCP"));
        assert_eq!(decode(&stripped, 1 << 24).map(|i| i.width()), Ok(320));
    }

    #[test]
    fn a_bomb_under_the_bound_is_never_inflated_by_the_thumbnail_or_the_webp() {
        // About 1 GB of zeros in 1 MB less 64 KiB: under the bound, so a
        // stored original may carry it, and the worker makes its thumbnail.
        let zlib = samples::zlib_zeros((1 << 20) - (64 << 10));
        assert!(samples::zlib_zeros_inflated(zlib.len()) > 1_000_000_000);
        let sent = samples::with_png_chunk(&png(300, 200), b"iCCP", &samples::iccp(&zlib));
        let peak = peak_rss_kb();
        let (info, thumb) = thumbnail(&sent, 1 << 24).expect("a thumbnail");
        assert_eq!((info.width, thumb.width, thumb.height), (300, 256, 171));
        let p = prepare(sent.clone(), &POLICY).expect("prepared");
        assert_eq!(p.stored_as, StoredAs::Webp);
        let kept = prepare(
            sent.clone(),
            &StoragePolicy {
                reencode: false,
                ..POLICY
            },
        )
        .expect("prepared");
        assert_eq!((kept.stored_as, kept.data), (StoredAs::Original, sent));
        // The decoders' limits would stop an inflation at 320 MiB (and the
        // png crate would ignore the error): none of this inflated a byte.
        let grown = peak_rss_kb().saturating_sub(peak);
        assert!(grown < 32 * 1024, "the peak RSS grew by {grown} kB");
    }

    #[test]
    fn over_the_bound_the_thumbnail_refuses_what_was_stored_before_the_bound() {
        let zlib = samples::zlib_zeros(4 << 20);
        let stored = samples::with_png_chunk(&png(300, 200), b"iCCP", &samples::iccp(&zlib));
        let e = thumbnail(&stored, 1 << 24).expect_err("refused");
        assert!(e.contains("bytes of metadata") && e.contains("iCCP"), "{e}");
        assert!(decode(&stored, 1 << 24).is_err());
    }

    #[test]
    fn an_apng_is_told_from_its_chunks_without_a_decoder() {
        // acTL (1 frame, looping) and an fcTL making IDAT the first frame:
        // a valid APNG.
        let mut actl = 1u32.to_be_bytes().to_vec();
        actl.extend(0u32.to_be_bytes());
        let mut fctl = 0u32.to_be_bytes().to_vec();
        for v in [16u32, 16, 0, 0] {
            fctl.extend(v.to_be_bytes());
        }
        fctl.extend([0, 1, 0, 10, 0, 0]);
        let still = png(16, 16);
        let apng = samples::with_png_chunk(&still, b"fcTL", &fctl);
        let apng = samples::with_png_chunk(&apng, b"acTL", &actl);
        assert!(
            image::codecs::png::PngDecoder::new(Cursor::new(&apng[..]))
                .and_then(|d| d.is_apng())
                .expect("decodes"),
            "the png crate agrees"
        );
        assert!(Layout::of(&apng, ImageFormat::Png).animated);
        assert!(!Layout::of(&still, ImageFormat::Png).animated);
        assert_eq!(
            prepare(apng, &POLICY).map(|p| p.stored_as),
            Ok(StoredAs::Stripped)
        );
        // acTL after the image data is no animation (the png crate ignores it).
        let mut late = still.clone();
        let iend = late.len() - 12;
        let mut chunk = 8u32.to_be_bytes().to_vec();
        chunk.extend(b"acTL");
        chunk.extend(&actl);
        chunk.extend(samples::crc32(&chunk[4..]).to_be_bytes());
        late.splice(iend..iend, chunk);
        assert!(!Layout::of(&late, ImageFormat::Png).animated);
    }

    #[test]
    fn a_jpeg_with_megabytes_of_app_segments_or_comments_is_refused() {
        let jpeg = photo(320, 240, ImageFormat::Jpeg);
        let huge = samples::with_jpeg_segments(&jpeg, &samples::icc_app2_segments(3 << 20));
        let (bytes, what) = refused_for_metadata(huge);
        assert!(bytes > 3 << 20, "{bytes}");
        assert_eq!(what, "JPEG APP2 segment");
        let comments: Vec<(u8, Vec<u8>)> = (0..20).map(|_| (0xfe, vec![b'x'; 65_533])).collect();
        assert_eq!(
            refused_for_metadata(samples::with_jpeg_segments(&jpeg, &comments)).1,
            "JPEG COM segment"
        );
        // A real profile in one APP2 segment is fine, and APP0/APP14 are
        // structure, not metadata.
        let fine = samples::with_jpeg_segments(&jpeg, &samples::icc_app2_segments(60_000));
        assert_eq!(
            prepare(fine, &POLICY).map(|p| p.stored_as),
            Ok(StoredAs::Webp)
        );
        let structural: Vec<(u8, Vec<u8>)> = (0..20).map(|_| (0xee, vec![0; 65_533])).collect();
        let layout = Layout::of(
            &samples::with_jpeg_segments(&jpeg, &structural),
            ImageFormat::Jpeg,
        );
        assert_eq!(layout.metadata, 0);
    }

    #[test]
    fn a_jpeg_is_walked_through_its_scans_to_eoi() {
        let jpeg = photo(64, 48, ImageFormat::Jpeg);
        let tags: Vec<Tag> = pieces(&jpeg, ImageFormat::Jpeg)
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        assert!(tags.contains(&Tag::Jpeg(0xda)), "{tags:?}");
        assert_eq!(tags.last(), Some(&Tag::Jpeg(0xd9)), "{tags:?}");
        assert!(!tags.contains(&Tag::Raw) || tags.first() == Some(&Tag::Raw));
        // An APP1 segment after the scan (as between progressive scans) is
        // found and counted too.
        let eoi = jpeg.len() - 2;
        let mut late = jpeg.clone();
        late.splice(
            eoi..eoi,
            [&[0xff, 0xe1, 0x03, 0xe9][..], &[0; 999]].concat(),
        );
        assert_eq!(Layout::of(&late, ImageFormat::Jpeg).metadata, 1_003);
        assert!(strip_metadata(&late, "image/jpeg").is_some_and(|s| s == jpeg));
    }

    #[test]
    fn a_webp_with_oversized_metadata_is_refused_and_a_small_one_is_kept() {
        let big = webp_with(&[(b"EXIF", vec![0; (1 << 20) + 1])]);
        assert_eq!(refused_for_metadata(big).1, "WebP EXIF chunk");
        let icc = webp_with(&[(b"ICCP", vec![0; 2 << 20])]);
        assert_eq!(refused_for_metadata(icc).1, "WebP ICCP chunk");
        let small = webp_with(&[(b"EXIF", vec![0; 1000]), (b"XMP ", vec![b' '; 1001])]);
        assert_eq!(
            Layout::of(&small, ImageFormat::WebP).metadata,
            8 + 1000 + 8 + 1002
        );
        let p = prepare(small, &POLICY).expect("prepared");
        assert_eq!(p.info.map(|i| (i.width, i.height)), Some((64, 48)));
    }

    #[test]
    fn an_animated_webp_is_told_from_its_vp8x_flags() {
        let mut b = webp_with(&[]);
        assert!(!Layout::of(&b, ImageFormat::WebP).animated);
        b[20] |= 0x02;
        assert!(Layout::of(&b, ImageFormat::WebP).animated);
    }

    #[test]
    fn a_gif_with_megabytes_of_comments_or_application_data_is_refused() {
        let gif = photo(32, 32, ImageFormat::Gif);
        assert_eq!(
            refused_for_metadata(gif_with(&gif, 0xfe, &vec![b'x'; 2 << 20])).1,
            "GIF comment extension"
        );
        let mut xmp = b"XMP DataXMP".to_vec();
        xmp.resize(2 << 20, b' ');
        let with_xmp = gif_with(&gif, 0xff, &xmp);
        assert_eq!(
            refused_for_metadata(with_xmp).1,
            "GIF application extension"
        );
        // A loop count is structure; a short comment is fine.
        let mut looping = b"NETSCAPE2.0".to_vec();
        looping.extend([3, 1, 0, 0]);
        let small = gif_with(&gif_with(&gif, 0xff, &looping), 0xfe, b"made with love");
        let layout = Layout::of(&small, ImageFormat::Gif);
        assert_eq!(layout.metadata, 2 + 1 + 14 + 1);
        let tags: Vec<Tag> = pieces(&small, ImageFormat::Gif)
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        assert_eq!(tags.last(), Some(&Tag::Gif(0x3b)), "{tags:?}");
        let p = prepare(small, &POLICY).expect("prepared");
        assert_eq!(
            (p.stored_as, p.info.map(|i| i.width)),
            (StoredAs::Stripped, Some(32))
        );
    }

    #[test]
    fn a_png_over_the_pixel_budget_is_refused_from_ihdr_before_a_decoder() {
        // 100,000 x 1: a decoder would allocate a row; IHDR says enough.
        let mut ihdr = 100_000u32.to_be_bytes().to_vec();
        ihdr.extend(1u32.to_be_bytes());
        ihdr.extend([16, 6, 0, 0, 0]);
        let b = samples::with_png_chunk(b"\x89PNG\r\n\x1a\n", b"IHDR", &ihdr);
        assert_eq!(
            screen(&b, 50_000),
            Err(PrepareError::TooManyPixels {
                width: 100_000,
                height: 1,
                pixels: 100_000,
                max: 50_000
            })
        );
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
