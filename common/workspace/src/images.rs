//! What the workspace knows of an image, whether or not this build can
//! decode one (the decoding lives in `imaging`, behind the `images`
//! feature).

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

/// Longest side of a thumbnail, in pixels.
pub const THUMBNAIL_MAX_SIDE: u32 = 256;

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
