//! Signing secrets: made, shown once as `whsec_<base64>`, sealed at rest
//! with ChaCha20-Poly1305 (ring) under `WEBHOOK_SECRET_KEY`.
//!
//! Rules: the endpoint's id is the sealed secret's associated data, so a
//! sealed secret copied onto another endpoint's row does not open; each
//! seal has a fresh random 96-bit nonce (a handful of secrets per key, far
//! from the birthday bound); neither type prints its bytes.

use std::fmt;

use base64::Engine as _;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

/// What every secret's text starts with.
pub const PREFIX: &str = "whsec_";
/// Random bytes in a new secret (the contract asks for 24 or more).
pub const SECRET_BYTES: usize = 32;

/// An endpoint's signing secret (the bytes the HMAC is keyed with).
#[derive(Clone, PartialEq, Eq)]
pub struct SigningSecret(Vec<u8>);

impl fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningSecret([redacted])")
    }
}

impl SigningSecret {
    /// A new random secret.
    pub fn generate() -> Result<Self, String> {
        let mut bytes = vec![0u8; SECRET_BYTES];
        getrandom::fill(&mut bytes).map_err(|e| format!("no randomness: {e}"))?;
        Ok(Self(bytes))
    }

    /// The secret of a `whsec_<base64>` text (as the Standard Webhooks
    /// libraries read it); `None` when it is not one.
    pub fn parse(text: &str) -> Option<Self> {
        let b64 = text.strip_prefix(PREFIX)?;
        let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
        (!bytes.is_empty()).then_some(Self(bytes))
    }

    /// Its text, `whsec_<base64>`: shown once, to whoever registered it.
    pub fn reveal(&self) -> String {
        format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::STANDARD.encode(&self.0)
        )
    }

    /// The HMAC key.
    pub fn key(&self) -> &[u8] {
        &self.0
    }
}

/// A secret sealed for storage: its nonce and its ciphertext with tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// 12 random bytes.
    pub nonce: Vec<u8>,
    /// The encrypted secret and its 16-byte tag.
    pub sealed: Vec<u8>,
}

/// The key secrets are sealed with (`WEBHOOK_SECRET_KEY`).
pub struct SecretBox(LessSafeKey);

impl fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretBox([redacted])")
    }
}

impl SecretBox {
    /// The box of a 64-hex-character key; `None` when the settings hold
    /// none.
    pub fn from_settings(webhooks: &penora_config::Webhooks) -> Result<Option<Self>, String> {
        webhooks
            .secret_key
            .as_ref()
            .map(|k| Self::from_hex(k.expose()))
            .transpose()
    }

    /// The box of a 32-byte key written as 64 hex characters.
    pub fn from_hex(key: &str) -> Result<Self, String> {
        let bytes = hex::decode(key.trim())
            .map_err(|_| "WEBHOOK_SECRET_KEY: expected 64 hex characters".to_owned())?;
        let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes)
            .map_err(|_| "WEBHOOK_SECRET_KEY: expected 32 bytes".to_owned())?;
        Ok(Self(LessSafeKey::new(key)))
    }

    /// Seals `secret` for the endpoint `endpoint_id`.
    pub fn seal(&self, secret: &SigningSecret, endpoint_id: &str) -> Result<Sealed, String> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| format!("no randomness: {e}"))?;
        let mut sealed = secret.0.clone();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(endpoint_id.as_bytes()),
                &mut sealed,
            )
            .map_err(|_| "sealing failed".to_owned())?;
        Ok(Sealed {
            nonce: nonce.to_vec(),
            sealed,
        })
    }

    /// The secret sealed for `endpoint_id`; `None` when it does not open
    /// (another key, another endpoint, altered bytes).
    pub fn open(&self, sealed: &Sealed, endpoint_id: &str) -> Option<SigningSecret> {
        let nonce = Nonce::try_assume_unique_for_key(&sealed.nonce).ok()?;
        let mut buf = sealed.sealed.clone();
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(endpoint_id.as_bytes()), &mut buf)
            .ok()?;
        Some(SigningSecret(plain.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn a_secret_reads_back_from_its_text_and_never_prints() {
        let s = SigningSecret::generate().expect("random");
        let text = s.reveal();
        assert!(text.starts_with("whsec_"), "{text}");
        assert_eq!(SigningSecret::parse(&text), Some(s.clone()));
        assert_eq!(s.key().len(), SECRET_BYTES);
        assert!(!format!("{s:?}").contains(&text[6..]));
        assert_eq!(SigningSecret::parse("whsec_"), None);
        assert_eq!(SigningSecret::parse("nope"), None);
    }

    #[test]
    fn a_sealed_secret_opens_only_with_its_key_and_for_its_endpoint() {
        let b = SecretBox::from_hex(KEY).expect("key");
        let s = SigningSecret::generate().expect("random");
        let sealed = b.seal(&s, "we_1").expect("sealed");
        assert_eq!(sealed.nonce.len(), 12);
        assert_ne!(&sealed.sealed[..SECRET_BYTES], s.key(), "not in plaintext");
        assert_eq!(b.open(&sealed, "we_1"), Some(s.clone()));
        assert_eq!(b.open(&sealed, "we_2"), None, "bound to its endpoint");
        let other = SecretBox::from_hex(&KEY.replace("00", "ff")).expect("key");
        assert_eq!(other.open(&sealed, "we_1"), None, "bound to its key");
        let mut tampered = sealed.clone();
        tampered.sealed[0] ^= 1;
        assert_eq!(b.open(&tampered, "we_1"), None);
        // Two seals of one secret differ (fresh nonces).
        assert_ne!(b.seal(&s, "we_1").expect("sealed"), sealed);
        assert!(SecretBox::from_hex("abcd").is_err());
        assert!(!format!("{b:?}").contains("0001"));
    }
}
