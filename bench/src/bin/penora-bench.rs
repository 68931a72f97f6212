//! `penora-bench`: see [`penora_bench::bench`].

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    penora_bench::bench::run(penora_bench::bench::Args::parse()).await
}
