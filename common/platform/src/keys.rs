//! API keys.
//!
//! Rules: a key is 256 random bits shown once at creation; only its SHA-256
//! digest is stored; a presented key is looked up by digest and the digests are
//! compared in constant time; a revoked key stops working on the next request
//! (a key found is never cached; the API remembers unknown digests for a few
//! seconds, see `AUTH_NEGATIVE_CACHE_SECS`). The bootstrap key (`PENORA_API_KEY`) is never
//! stored: its digest is kept in memory and compared the same way.

use std::{collections::BTreeSet, fmt, str::FromStr};

use deadpool_postgres::GenericClient;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use uuid::Uuid;

use penora_store::DbError;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// user-info, projects, transactions, quote.
    Read,
    /// deduct-credits, refund-credits.
    Spend,
    /// save-project.
    Write,
    /// add-credits, key management.
    Admin,
}

impl Scope {
    /// Every scope.
    pub const ALL: [Scope; 4] = [Scope::Read, Scope::Spend, Scope::Write, Scope::Admin];

    /// The scope's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Spend => "spend",
            Self::Write => "write",
            Self::Admin => "admin",
        }
    }
}

impl FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "read" => Ok(Self::Read),
            "spend" => Ok(Self::Spend),
            "write" => Ok(Self::Write),
            "admin" => Ok(Self::Admin),
            other => Err(format!(
                "unknown scope `{other}` (expected read, spend, write, admin)"
            )),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The app a key acts for: one app, or `*` for any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyApp {
    /// Any app.
    Any,
    /// Only this app.
    Only(String),
}

impl KeyApp {
    /// Parses `*` or an app name.
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw == "*" {
            return Ok(Self::Any);
        }
        penora_domain::AppName::parse("app", raw)
            .map(|a| Self::Only(a.as_str().to_owned()))
            .map_err(|e| e.to_string())
    }

    /// Whether the key may act for `app`.
    pub fn allows(&self, app: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Only(own) => own == app,
        }
    }

    /// `*` or the app name.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Any => "*",
            Self::Only(a) => a,
        }
    }
}

/// Who is calling: the key's id, app and scopes. Never holds the key itself.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The key's id (`None` for the bootstrap key).
    pub key_id: Option<Uuid>,
    /// The app the key is bound to.
    pub app: KeyApp,
    /// What the key may do.
    pub scopes: BTreeSet<Scope>,
}

impl Principal {
    /// The bootstrap key's principal: app `*`, every scope.
    pub fn bootstrap() -> Self {
        Self {
            key_id: None,
            app: KeyApp::Any,
            scopes: Scope::ALL.into_iter().collect(),
        }
    }

    /// A stable label for rate limiting and logs (the key id, never the key).
    pub fn label(&self) -> String {
        self.key_id
            .map_or_else(|| "bootstrap".to_owned(), |id| id.to_string())
    }
}

/// SHA-256 digest of a presented or stored key.
pub fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Constant-time equality of two digests.
pub fn digests_equal(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// A freshly made key: the secret (shown once) and its stored record.
#[derive(Debug)]
pub struct NewKey {
    /// The key to hand to the client; printed once, never stored.
    pub secret: penora_config::Secret,
    /// Its id.
    pub id: Uuid,
    /// Its first characters, to recognise it in listings.
    pub prefix: String,
}

/// A stored key, as listed by operators.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyRecord {
    /// The key's id.
    pub id: Uuid,
    /// A name for people.
    pub name: String,
    /// The key's first characters.
    pub prefix: String,
    /// `*` or an app.
    pub app: String,
    /// The key's scopes.
    pub scopes: Vec<String>,
    /// When it was made.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When it was revoked, if it was.
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
}

/// Makes a new random key (`pnr_` and 64 hex digits).
pub fn generate() -> Result<(String, String), getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    let key = format!("pnr_{}", hex::encode(bytes));
    let prefix = key[..12].to_owned();
    Ok((key, prefix))
}

/// Creates a key for `app` with `scopes` and stores its digest.
pub async fn create(
    client: &impl GenericClient,
    name: &str,
    app: &KeyApp,
    scopes: &BTreeSet<Scope>,
) -> Result<NewKey, DbError> {
    let (key, prefix) = generate().map_err(|e| DbError::Other(format!("no randomness: {e}")))?;
    let id = Uuid::now_v7();
    let scopes: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
    client
        .execute(
            "INSERT INTO api_keys (id, name, digest, prefix, app, scopes) VALUES ($1, $2, $3, $4, $5, $6)",
            &[&id, &name, &digest(&key).as_slice(), &prefix, &app.as_str(), &scopes],
        )
        .await?;
    Ok(NewKey {
        secret: penora_config::Secret::new(key),
        id,
        prefix,
    })
}

/// Every stored key, newest first.
pub async fn list(client: &impl GenericClient) -> Result<Vec<KeyRecord>, DbError> {
    let rows = client
        .query(
            "SELECT id, name, prefix, app, scopes, created_at, revoked_at FROM api_keys ORDER BY created_at DESC, id DESC",
            &[],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| KeyRecord {
            id: r.get("id"),
            name: r.get("name"),
            prefix: r.get("prefix"),
            app: r.get("app"),
            scopes: r.get("scopes"),
            created_at: r.get("created_at"),
            revoked_at: r.get("revoked_at"),
        })
        .collect())
}

/// Revokes a key at once; false when no such key exists. Revoking twice keeps
/// the first revocation time.
pub async fn revoke(client: &impl GenericClient, id: Uuid) -> Result<bool, DbError> {
    let n = client
        .execute(
            "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1",
            &[&id],
        )
        .await?;
    Ok(n == 1)
}

/// Finds the live key with this secret, if any.
pub async fn authenticate(
    client: &impl GenericClient,
    presented: &str,
) -> Result<Option<Principal>, DbError> {
    authenticate_digest(client, &digest(presented)).await
}

/// Finds the live key whose SHA-256 digest is `wanted`, if any (a revoked
/// key is not found).
/// The digests of every key not revoked (to exempt them from the
/// per-address budget of authentication failures; each request still looks
/// its key up, so a revocation takes effect at once).
pub async fn live_digests(client: &impl GenericClient) -> Result<Vec<[u8; 32]>, DbError> {
    let rows = client
        .query("SELECT digest FROM api_keys WHERE revoked_at IS NULL", &[])
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| r.try_get::<_, Vec<u8>>("digest").ok())
        .filter_map(|d| d.try_into().ok())
        .collect())
}

pub async fn authenticate_digest(
    client: &impl GenericClient,
    wanted: &[u8; 32],
) -> Result<Option<Principal>, DbError> {
    let row = client
        .query_opt(
            "SELECT id, digest, app, scopes FROM api_keys WHERE digest = $1 AND revoked_at IS NULL",
            &[&wanted.as_slice()],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    let stored: Vec<u8> = row.get("digest");
    if !digests_equal(&stored, wanted) {
        return Ok(None);
    }
    let app: String = row.get("app");
    let scopes: Vec<String> = row.get("scopes");
    if app != "*" {
        penora_domain::labels::register_app(&app);
    }
    Ok(Some(Principal {
        key_id: Some(row.get("id")),
        app: KeyApp::parse(&app).map_err(DbError::Other)?,
        scopes: scopes.iter().filter_map(|s| s.parse().ok()).collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_long_random_and_prefixed() {
        let (a, pa) = generate().expect("random");
        let (b, _) = generate().expect("random");
        assert_ne!(a, b);
        assert_eq!(a.len(), 4 + 64);
        assert!(a.starts_with(&pa));
    }

    #[test]
    fn digests_compare_equal_only_for_the_same_key() {
        assert!(digests_equal(&digest("k1"), &digest("k1")));
        assert!(!digests_equal(&digest("k1"), &digest("k2")));
        assert!(!digests_equal(&digest("k1"), &[0u8; 4]));
    }

    #[test]
    fn bound_keys_allow_only_their_app() {
        assert!(KeyApp::Any.allows("imagegene"));
        let ig = KeyApp::parse("imagegene").expect("valid");
        assert!(ig.allows("imagegene"));
        assert!(!ig.allows("penora"));
        assert!(KeyApp::parse("Image Gene").is_err());
    }
}
