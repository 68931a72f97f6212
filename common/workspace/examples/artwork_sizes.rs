//! Prints what the test artworks weigh as PNG and as the WebP the service
//! stores, and how long preparing each took:
//! `cargo run --release -p penora-workspace --features testing --example artwork_sizes`.

use std::time::Instant;

use penora_workspace::imaging::{StoragePolicy, prepare, samples};

fn main() {
    let policy = StoragePolicy {
        reencode: true,
        quality: 85.0,
        max_pixels: 4096 * 4096,
    };
    for (side, seed) in [(1024, 1), (2048, 2)] {
        let png = samples::photo_like_png(side, side, seed);
        let started = Instant::now();
        match prepare(png.clone(), &policy) {
            Ok(p) => println!(
                "{side}x{side}: PNG {} bytes -> stored {} bytes ({:?}) in {} ms",
                png.len(),
                p.data.len(),
                p.stored_as,
                started.elapsed().as_millis()
            ),
            Err(e) => println!("{side}x{side}: refused: {e}"),
        }
    }
}
