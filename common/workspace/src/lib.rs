//! Penora Credits' shared workspace: projects of every app, their storage
//! quota, and (with feature `images`) the image work that stores them
//! optimised: decoding, WebP, thumbnails. The ledger and `penora-ops` build
//! without it, and so without libwebp.

#[cfg(feature = "images")]
pub mod cpu_pool;
pub mod images;
#[cfg(feature = "images")]
pub mod imaging;
pub mod projects;
