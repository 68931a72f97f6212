//! What an image really is, by its bytes: PNG, JPEG, WebP or GIF, and its
//! dimensions. Nothing is decoded beyond the headers.

/// A recognised image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInfo {
    /// `image/png`, `image/jpeg`, `image/webp` or `image/gif`.
    pub media_type: &'static str,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

fn be16(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from(u16::from_be_bytes([
        *b.get(at)?,
        *b.get(at + 1)?,
    ])))
}

fn le16(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from(u16::from_le_bytes([
        *b.get(at)?,
        *b.get(at + 1)?,
    ])))
}

fn le24(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes([
        *b.get(at)?,
        *b.get(at + 1)?,
        *b.get(at + 2)?,
        0,
    ]))
}

/// Recognises the image in `bytes`, or says why it is not one.
pub fn sniff(bytes: &[u8]) -> Result<ImageInfo, String> {
    let info = if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        png(bytes)
    } else if bytes.starts_with(b"\xff\xd8\xff") {
        jpeg(bytes)
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        le16(bytes, 6)
            .zip(le16(bytes, 8))
            .map(|(width, height)| ImageInfo {
                media_type: "image/gif",
                width,
                height,
            })
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        webp(bytes)
    } else {
        return Err("not an image of a known type (PNG, JPEG, WebP or GIF)".into());
    };
    match info {
        Some(i) if i.width > 0 && i.height > 0 => Ok(i),
        Some(_) => Err("image header has a zero dimension".into()),
        None => Err("image header is truncated or corrupt".into()),
    }
}

fn png(b: &[u8]) -> Option<ImageInfo> {
    if b.get(12..16)? != b"IHDR" {
        return None;
    }
    let w = u32::from_be_bytes(b.get(16..20)?.try_into().ok()?);
    let h = u32::from_be_bytes(b.get(20..24)?.try_into().ok()?);
    Some(ImageInfo {
        media_type: "image/png",
        width: w,
        height: h,
    })
}

fn jpeg(b: &[u8]) -> Option<ImageInfo> {
    let mut i = 2;
    while i + 4 <= b.len() {
        if b[i] != 0xff {
            return None;
        }
        let marker = b[i + 1];
        if marker == 0xff {
            i += 1; // fill byte
            continue;
        }
        let len = be16(b, i + 2)? as usize;
        let is_sof = (0xc0..=0xcf).contains(&marker) && !matches!(marker, 0xc4 | 0xc8 | 0xcc);
        if is_sof {
            return Some(ImageInfo {
                media_type: "image/jpeg",
                height: be16(b, i + 5)?,
                width: be16(b, i + 7)?,
            });
        }
        if len < 2 {
            return None;
        }
        i += 2 + len;
    }
    None
}

fn webp(b: &[u8]) -> Option<ImageInfo> {
    let (width, height) = match b.get(12..16)? {
        b"VP8 " => {
            if b.get(23..26)? != [0x9d, 0x01, 0x2a] {
                return None;
            }
            (le16(b, 26)? & 0x3fff, le16(b, 28)? & 0x3fff)
        }
        b"VP8L" => {
            if *b.get(20)? != 0x2f {
                return None;
            }
            let bits = u32::from_le_bytes(b.get(21..25)?.try_into().ok()?);
            ((bits & 0x3fff) + 1, ((bits >> 14) & 0x3fff) + 1)
        }
        b"VP8X" => (le24(b, 24)? + 1, le24(b, 27)? + 1),
        _ => return None,
    };
    Some(ImageInfo {
        media_type: "image/webp",
        width,
        height,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_of(w: u32, h: u32) -> Vec<u8> {
        let mut b = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
        b.extend(w.to_be_bytes());
        b.extend(h.to_be_bytes());
        b.extend([8, 6, 0, 0, 0]);
        b
    }

    #[test]
    fn png_dimensions_are_read() {
        assert_eq!(
            sniff(&png_of(1024, 768)),
            Ok(ImageInfo {
                media_type: "image/png",
                width: 1024,
                height: 768
            })
        );
    }

    #[test]
    fn gif_jpeg_and_webp_are_recognised() {
        let gif = b"GIF89a\x00\x02\x00\x01\x00\x00".to_vec();
        assert_eq!(
            sniff(&gif).map(|i| (i.media_type, i.width, i.height)),
            Ok(("image/gif", 512, 256))
        );
        // SOI, APP0 (len 16), SOF0: len 17, precision 8, height 300, width 400.
        let mut jpg = vec![0xff, 0xd8, 0xff, 0xe0, 0x00, 0x10];
        jpg.extend([0u8; 14]);
        jpg.extend([0xff, 0xc0, 0x00, 0x11, 0x08, 0x01, 0x2c, 0x01, 0x90, 0x03]);
        assert_eq!(
            sniff(&jpg).map(|i| (i.media_type, i.width, i.height)),
            Ok(("image/jpeg", 400, 300))
        );
        let mut webp = b"RIFF\0\0\0\0WEBPVP8X".to_vec();
        webp.extend([10, 0, 0, 0, 0, 0, 0, 0]);
        webp.extend([0xff, 0x03, 0x00, 0xff, 0x01, 0x00]); // 1024 x 512
        assert_eq!(
            sniff(&webp).map(|i| (i.media_type, i.width, i.height)),
            Ok(("image/webp", 1024, 512))
        );
    }

    #[test]
    fn anything_else_is_refused() {
        assert!(sniff(b"hello world").is_err());
        assert!(sniff(b"\x89PNG\r\n\x1a\n").is_err(), "truncated");
        assert!(sniff(&[0xff, 0xd8, 0xff, 0x00]).is_err());
        assert!(sniff(&png_of(0, 10)).is_err());
        assert!(sniff(b"").is_err());
    }
}
