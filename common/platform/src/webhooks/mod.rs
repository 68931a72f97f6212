//! Webhooks (contract §14): what the API and the worker share to register
//! and deliver them: the signing secrets and their encryption at rest
//! ([`secret`]), the Standard Webhooks signature ([`sign`]), which targets
//! may be called ([`target`]) and the one HTTP client that calls them
//! ([`client`]).
//!
//! Rules: a secret is shown once (the registration's answer), stored only
//! sealed under `WEBHOOK_SECRET_KEY`, and never printed (its `Debug` is
//! redacted); a target is `https` and a public address, checked when
//! registered and again on every connection, on the very address connected
//! to (so DNS rebinding cannot get around it), unless
//! `WEBHOOK_ALLOW_PRIVATE=true`; redirects are never followed.

pub mod client;
pub mod secret;
pub mod sign;
pub mod target;
