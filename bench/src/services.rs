//! What both tools of this crate (`penora-bench`, `penora-chaos`) need to
//! reach the services under test.

use penora_config::BenchSettings;

/// The key, database and broker of the services under test, from the same
/// environment the services read.
#[derive(clap::Args, Debug)]
pub struct Services {
    /// An API key with every scope.
    #[arg(long, env = "PENORA_API_KEY", hide_env_values = true)]
    pub key: String,
    /// The service's database.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// The broker (vhost included).
    #[arg(long, env = "AMQP_URL", hide_env_values = true)]
    pub amqp_url: String,
    /// The services' queue prefix.
    #[arg(long, env = "AMQP_PREFIX", default_value = "")]
    pub prefix: String,
}

impl Services {
    /// The services' settings for these (everything else at its default),
    /// for the broker topology and publisher the tools share with them and
    /// the worker's settle interval the invariant checks wait on.
    pub fn settings(&self) -> anyhow::Result<BenchSettings> {
        Ok(BenchSettings::from_lookup(|k| match k {
            "AMQP_URL" => Some(self.amqp_url.clone()),
            "AMQP_PREFIX" => Some(self.prefix.clone()),
            _ => None,
        })?)
    }
}
