//! `Images`: checking, re-encoding and storing project images, in the API
//! (a save) and in the worker (a queued save, thumbnails).
//!
//! `MAX_CONCURRENT_SAVES` and `SAVE_QUEUE_WAIT_MS` are the API's admission
//! of save bodies; they sit here, not in [`crate::Http`], because what they
//! bound is the image work held in memory at once.

use std::{path::PathBuf, time::Duration};

use crate::{ConfigError, read::Vars};

/// How images are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageStorageFormat {
    /// Still PNG/JPEG/WebP re-encoded as lossy WebP when smaller (default).
    Webp,
    /// Every image kept exactly as sent.
    Original,
}

/// Image limits, encoding and the threads doing the work.
#[derive(Debug, Clone)]
pub struct Images {
    /// `MAX_IMAGE_PIXELS`: largest image accepted (width × height), read
    /// from its header before decoding.
    pub max_pixels: u64,
    /// `IMAGE_QUALITY`: WebP quality (1–100) of stored images.
    pub quality: u8,
    /// `IMAGE_STORAGE_FORMAT`: `webp` (re-encode still images when smaller)
    /// or `original` (store every image exactly as sent).
    pub storage_format: ImageStorageFormat,
    /// `IMAGE_THREADS`: threads (at the lowest CPU priority) decoding and
    /// encoding images.
    pub threads: usize,
    /// `IMAGE_CPU_CGROUP`: a cgroup the image threads join (e.g. one with
    /// `cpu.idle = 1`, so image work never takes CPU from the database on a
    /// shared machine); unset: they stay where the process is.
    pub cpu_cgroup: Option<PathBuf>,
    /// `MAX_CONCURRENT_SAVES`: save bodies held and processed at once.
    pub max_concurrent_saves: usize,
    /// `SAVE_QUEUE_WAIT_MS`: how long a save waits for a free slot before
    /// `503` with `Retry-After`.
    pub save_queue_wait: Duration,
}

impl Images {
    /// Reads this section through `lookup` (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        Self::read(&Vars::new(&lookup))
    }

    pub(crate) fn read(vars: &Vars<'_>) -> Result<Self, ConfigError> {
        let cpu_cgroup = vars.get("IMAGE_CPU_CGROUP").map(PathBuf::from);
        if let Some(dir) = &cpu_cgroup
            && !dir.is_dir()
        {
            return Err(ConfigError {
                variable: "IMAGE_CPU_CGROUP",
                reason: format!("{} is not a directory (a cgroup)", dir.display()),
            });
        }
        Ok(Self {
            max_pixels: vars.positive("MAX_IMAGE_PIXELS", 16_777_216)?,
            quality: match vars.parse::<u8>("IMAGE_QUALITY", "85")? {
                q @ 1..=100 => q,
                q => {
                    return Err(ConfigError {
                        variable: "IMAGE_QUALITY",
                        reason: format!("must be from 1 to 100, got {q}"),
                    });
                }
            },
            storage_format: match vars.get("IMAGE_STORAGE_FORMAT").as_deref() {
                None | Some("webp") => ImageStorageFormat::Webp,
                Some("original") => ImageStorageFormat::Original,
                Some(other) => {
                    return Err(ConfigError {
                        variable: "IMAGE_STORAGE_FORMAT",
                        reason: format!("expected `webp` or `original`, got `{other}`"),
                    });
                }
            },
            threads: vars.positive(
                "IMAGE_THREADS",
                std::thread::available_parallelism().map_or(2, |n| n.get().min(4)),
            )?,
            cpu_cgroup,
            max_concurrent_saves: vars.positive("MAX_CONCURRENT_SAVES", 8)?,
            save_queue_wait: Duration::from_millis(vars.parse("SAVE_QUEUE_WAIT_MS", "1000")?),
        })
    }
}
