//! `penora-chaos`: see [`penora_bench::chaos`].

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    penora_bench::chaos::run(penora_bench::chaos::Args::parse()).await
}
