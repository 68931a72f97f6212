//! The support console (contract §17): `/console`, server-rendered HTML
//! with no script, built into the binary.
//!
//! Rules:
//! * a person signs in with an API key of scope `read` (looks) or `admin`
//!   (acts), posted in a form body; the key is hashed at once and never put
//!   in a URL, a log line or a cookie. The browser gets a random session
//!   token in an `HttpOnly`, `SameSite=Strict` cookie scoped to `/console`
//!   (`Secure` behind HTTPS); the database keeps the token's SHA-256, the
//!   key's SHA-256 and the session's CSRF token. Every request looks the key
//!   up again, so revoking a key ends its sessions at once. Sessions end
//!   after `SESSION_HOURS` or on sign-out;
//! * every page carries a Content-Security-Policy that allows no script,
//!   no frame (`frame-ancestors 'none'`), no form target but this origin
//!   and no resource but this origin's, `Cache-Control: no-store`,
//!   `X-Frame-Options: DENY`, `Referrer-Policy: same-origin` (no-referrer
//!   would make browsers send `Origin: null` with the console's own forms),
//!   `X-Content-Type-Options: nosniff`;
//! * every POST is refused (403 `forbidden`) unless its `Origin` (when the
//!   browser sends one) is this host, `Sec-Fetch-Site` (when sent) is
//!   `same-origin`, and (past sign-in) its form's `csrf` equals the
//!   session's;
//! * actions (admin) ask for confirmation on a page of their own, carry a
//!   one-time key made when their form was drawn (the grant's or refund's
//!   reference: a double click or a resent form moves credits once), record
//!   the acting key's id on the ledger entry, and show the entry they made.

mod html;
mod ops;
mod user;

use axum::{
    Router,
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts},
    middleware::{self, Next},
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
};
use penora_platform::keys::{self, Principal, Scope};
use std::collections::HashMap;

use crate::{auth::KeyIdSlot, error::ApiError, serve::ClientAddr, state::AppState};

/// The session cookie's name.
pub const COOKIE: &str = "penora_console";
/// How long a session lasts.
pub const SESSION_HOURS: i64 = 8;
/// The pages' Content-Security-Policy.
pub const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; \
    form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The console's routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/console", get(|| async { Redirect::to("/console/users") }))
        .route(
            "/console/",
            get(|| async { Redirect::to("/console/users") }),
        )
        .route("/console/sign-in", get(sign_in_page).post(sign_in))
        .route("/console/sign-out", post(sign_out))
        .route("/console/assets/console.css", get(stylesheet))
        .route("/console/users", get(user::search))
        .route("/console/users/{user}", get(user::page))
        .route(
            "/console/users/{user}/projects/{project}/thumbnail",
            get(user::thumbnail),
        )
        .route("/console/users/{user}/grant", post(user::grant))
        .route("/console/users/{user}/void", post(user::void))
        .route("/console/users/{user}/refund", post(user::refund))
        .route("/console/ops", get(ops::page))
        .route("/console/ops/dead-letters", post(ops::look))
        .route("/console/ops/dead-letters/replay", post(ops::replay))
        .route("/console/ops/outbox/retry", post(ops::retry_outbox))
        .layer(middleware::from_fn(secure_headers))
}

/// The headers every console answer carries.
async fn secure_headers(req: Request, next: Next) -> Response {
    let mut response = next.run(req).await;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        include_str!("console.css"),
    )
        .into_response()
}

/// An HTML answer.
pub fn html(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

/// A page saying what went wrong, with its code.
pub fn problem(
    status: StatusCode,
    code: &str,
    message: &str,
    bar: Option<&html::Bar<'_>>,
) -> Response {
    let body = format!(
        "<div class=\"notice error\" role=\"alert\"><strong>{}</strong> <code>{}</code></div>\
         <p><a href=\"/console/users\">Back to the users</a></p>",
        html::esc(message),
        html::esc(code)
    );
    html(status, html::page("Error", bar, &body))
}

/// A refusal's page.
pub type Refused = Box<Response>;

/// A console answer: the page asked for, or the page saying why not.
pub type Page = Result<Response, Response>;

/// Turns an error into the page that explains it (`?` in the handlers).
/// The error side is a whole `Response`, as the handlers' own is: it is
/// handed to axum at once, so boxing it would only add an allocation.
#[allow(clippy::result_large_err)]
pub trait OrPage<T> {
    /// The value, or the page explaining the error.
    fn or_page(self, session: &Session) -> Result<T, Response>;
}

impl<T, E: Into<ApiError>> OrPage<T> for Result<T, E> {
    fn or_page(self, session: &Session) -> Result<T, Response> {
        self.map_err(|e| session.problem(e))
    }
}

/// A signed-in person.
pub struct Session {
    /// Whose key.
    pub principal: Principal,
    /// The CSRF token of the session's forms.
    pub csrf: String,
    /// The key's id, for the bar and the ledger.
    pub key_id: String,
}

impl Session {
    /// The key as the API's routes see it (scopes, the app it is bound to).
    pub fn auth(&self) -> crate::auth::Auth {
        crate::auth::Auth(self.principal.clone())
    }

    /// Whether the key may act.
    pub fn is_admin(&self) -> bool {
        self.principal.scopes.contains(&Scope::Admin)
    }

    /// The page's bar.
    pub fn bar(&self) -> html::Bar<'_> {
        html::Bar {
            key_id: &self.key_id,
            role: if self.is_admin() { "admin" } else { "read" },
            csrf: &self.csrf,
        }
    }

    /// Refuses a POST whose form lacks this session's CSRF token.
    pub fn check_csrf(&self, form: &Form) -> Result<(), Refused> {
        let sent = form.get("csrf").unwrap_or("");
        if keys::digests_equal(&keys::digest(sent), &keys::digest(&self.csrf)) {
            Ok(())
        } else {
            Err(self.forbidden(
                "This form is out of date or was not sent from the console; reload the page and try again.",
            ))
        }
    }

    /// A 403 `forbidden` page saying `why`.
    fn forbidden(&self, why: &str) -> Refused {
        Box::new(self.problem(ApiError::Forbidden(why.into())))
    }

    /// A page explaining an error, with its status and code (a server
    /// error's detail is logged, not shown).
    pub fn problem(&self, e: impl Into<ApiError>) -> Response {
        let e = e.into();
        let (status, code) = e.status_and_code();
        let message = if status.is_server_error() {
            tracing::warn!(error = %e, "console: a request failed");
            "The service could not do this now; try again shortly.".to_owned()
        } else {
            e.to_string()
        };
        problem(status, code, &message, Some(&self.bar()))
    }

    /// Refuses unless the key is an admin key.
    pub fn require_admin(&self) -> Result<(), Refused> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(self.forbidden("This API key has the `read` scope: it may look, not act."))
        }
    }

    /// Whether the key is an operator's: an admin key bound to no app (it
    /// may see and act on every app's messages, rows and webhooks).
    pub fn is_operator(&self) -> bool {
        self.is_admin() && self.principal.app == keys::KeyApp::Any
    }

    /// Refuses unless the key is an operator's.
    pub fn require_operator(&self) -> Result<(), Refused> {
        if self.is_operator() {
            Ok(())
        } else {
            Err(self.forbidden(
                "Dead letters and outbox rows are an operator's: sign in with an admin key bound to no app.",
            ))
        }
    }
}

/// The cookie's value, if the request has one.
fn session_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned())
        .filter(|v| !v.is_empty() && v.len() <= 128)
}

impl FromRequestParts<AppState> for Session {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let to_sign_in = || Redirect::to("/console/sign-in").into_response();
        let Some(token) = session_token(&parts.headers) else {
            return Err(to_sign_in());
        };
        let unavailable = |e: String| {
            tracing::warn!(error = %e, "console: the session could not be read");
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "The database is unavailable; try again shortly.",
                None,
            )
        };
        let client = state
            .pool
            .get()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let row = client
            .query_opt(
                "SELECT key_digest, csrf FROM console_sessions \
                 WHERE token_digest = $1 AND expires_at > now()",
                &[&keys::digest(&token).as_slice()],
            )
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let Some(row) = row else {
            return Err(to_sign_in());
        };
        let key_digest: Vec<u8> = row.get(0);
        let principal = match state.bootstrap_digest {
            Some(boot) if keys::digests_equal(&key_digest, &boot) => Some(Principal::bootstrap()),
            _ => {
                let Ok(digest) = <[u8; 32]>::try_from(key_digest.as_slice()) else {
                    return Err(to_sign_in());
                };
                keys::authenticate_digest(&client, &digest)
                    .await
                    .map_err(|e| unavailable(e.to_string()))?
            }
        };
        let Some(principal) = principal.filter(may_sign_in) else {
            // Revoked, or its scopes changed: the session is over.
            return Err(to_sign_in());
        };
        let key_id = principal.label();
        if let Some(slot) = parts.extensions.get::<KeyIdSlot>() {
            let _ = slot.0.set(key_id.clone());
        }
        Ok(Self {
            principal,
            csrf: row.get(1),
            key_id,
        })
    }
}

/// An admin's action: a POST from a console page (this origin), with the
/// session's CSRF token, by an admin key; its form.
pub struct Acting {
    /// Who acts.
    pub session: Session,
    /// What the form sent.
    pub form: Form,
}

/// The largest form an action takes.
const MAX_FORM_BYTES: usize = 16 * 1024;

impl FromRequest<AppState> for Acting {
    type Rejection = Response;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let (mut parts, body) = req.into_parts();
        let session = Session::from_request_parts(&mut parts, state).await?;
        same_origin(&parts.headers).map_err(|r| *r)?;
        let body = axum::body::to_bytes(body, MAX_FORM_BYTES)
            .await
            .map_err(|_| {
                session.problem(ApiError::PayloadTooLarge(format!(
                    "a console form is at most {MAX_FORM_BYTES} bytes"
                )))
            })?;
        let form = Form::parse(&body);
        session.check_csrf(&form).map_err(|r| *r)?;
        session.require_admin().map_err(|r| *r)?;
        Ok(Self { session, form })
    }
}

/// Whether a key may use the console: `read` or `admin`.
fn may_sign_in(p: &Principal) -> bool {
    p.scopes.contains(&Scope::Read) || p.scopes.contains(&Scope::Admin)
}

/// A form body, parsed (`application/x-www-form-urlencoded`).
pub struct Form(HashMap<String, String>);

impl Form {
    /// Parses `body`.
    pub fn parse(body: &[u8]) -> Self {
        Self(
            form_urlencoded::parse(body)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    /// A field, trimmed, when present and not empty.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(|v| v.trim()).filter(|v| !v.is_empty())
    }
}

/// Refuses a POST that did not come from a page of this origin: `Origin`
/// (sent by browsers with every POST) must name this host (`Host`, or
/// `X-Forwarded-Host` behind a proxy that rewrites it), and
/// `Sec-Fetch-Site`, when sent, must be `same-origin`. Another port of the
/// same host is another origin (and the same site, which `SameSite` does not
/// stop): refused.
pub fn same_origin(headers: &HeaderMap) -> Result<(), Refused> {
    let refuse = || {
        Err(Box::new(problem(
            StatusCode::FORBIDDEN,
            "forbidden",
            "This form was sent from another site; the console accepts forms from its own pages only.",
            None,
        )))
    };
    // The host the browser asked for: `Host`, or the one a proxy in front
    // names when it rewrites `Host` (a page's form cannot set this header).
    let hosts = [header::HOST.as_str(), "x-forwarded-host"].map(|name| {
        headers
            .get(name)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.split(',').next())
            .map(str::trim)
    });
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        let authority = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        if authority.is_none() || !hosts.contains(&authority) {
            return refuse();
        }
    }
    if let Some(site) = headers.get("sec-fetch-site")
        && site.as_bytes() != b"same-origin"
    {
        return refuse();
    }
    Ok(())
}

async fn sign_in_page(headers: HeaderMap) -> Response {
    let note = if session_token(&headers).is_some() {
        "<p class=\"muted\">Your session ended; sign in again.</p>"
    } else {
        ""
    };
    sign_in_form(StatusCode::OK, note)
}

fn sign_in_form(status: StatusCode, note: &str) -> Response {
    let body = format!(
        "<section class=\"signin\"><h1>Sign in to the console</h1>{note}\
         <form method=\"post\" action=\"/console/sign-in\" autocomplete=\"off\">\
         <p><label for=\"api_key\">API key (scope <code>read</code> to look, <code>admin</code> to act)\
         <input id=\"api_key\" name=\"api_key\" type=\"password\" required autofocus \
          autocomplete=\"off\" spellcheck=\"false\"></label></p>\
         <p><button type=\"submit\">Sign in</button></p></form>\
         <p class=\"cli\">The key is sent in this form's body only, and kept nowhere: \
         the browser holds a session cookie scripts cannot read.</p></section>"
    );
    html(status, html::page("Sign in", None, &body))
}

async fn sign_in(State(state): State<AppState>, parts: Parts, body: Bytes) -> Response {
    if let Err(r) = same_origin(&parts.headers) {
        return *r;
    }
    let form = Form::parse(&body);
    let Some(key) = form.get("api_key") else {
        return sign_in_form(
            StatusCode::BAD_REQUEST,
            "<div class=\"notice error\" role=\"alert\">Enter an API key. <code>invalid_request</code></div>",
        );
    };
    let digest = keys::digest(key);
    let addr = parts.extensions.get::<ClientAddr>().map(|a| a.0);
    let principal = match state.bootstrap_digest {
        Some(boot) if keys::digests_equal(&digest, &boot) => Ok(Principal::bootstrap()),
        _ => crate::auth::authenticate(&state, addr, Some(digest)).await,
    };
    let principal = match principal {
        Ok(p) if may_sign_in(&p) => p,
        Ok(_) => {
            return sign_in_form(
                StatusCode::FORBIDDEN,
                "<div class=\"notice error\" role=\"alert\">This key has neither the <code>read</code> nor the <code>admin</code> scope. <code>forbidden</code></div>",
            );
        }
        Err(e) => {
            let (status, code) = e.status_and_code();
            return sign_in_form(
                status,
                &format!(
                    "<div class=\"notice error\" role=\"alert\">{} <code>{code}</code></div>",
                    html::esc(&e.to_string())
                ),
            );
        }
    };
    let token = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let csrf = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let stored = async {
        let client = state.pool.get().await.map_err(|e| e.to_string())?;
        client
            .execute(
                "DELETE FROM console_sessions WHERE expires_at < now() - interval '1 day'",
                &[],
            )
            .await
            .map_err(|e| e.to_string())?;
        client
            .execute(
                "INSERT INTO console_sessions (token_digest, key_digest, csrf, expires_at) \
                 VALUES ($1, $2, $3, now() + make_interval(hours => $4::int4))",
                &[
                    &keys::digest(&token).as_slice(),
                    &digest.as_slice(),
                    &csrf,
                    &(SESSION_HOURS as i32),
                ],
            )
            .await
            .map_err(|e| e.to_string())
    }
    .await;
    if let Err(e) = stored {
        tracing::warn!(error = %e, "console: a session could not be stored");
        return sign_in_form(
            StatusCode::SERVICE_UNAVAILABLE,
            "<div class=\"notice error\" role=\"alert\">The database is unavailable; try again shortly. <code>unavailable</code></div>",
        );
    }
    tracing::info!(key_id = %principal.label(), "console: signed in");
    let secure = if behind_https(&parts.headers) {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{COOKIE}={token}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        SESSION_HOURS * 3600
    );
    let mut response = Redirect::to("/console/users").into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    response
}

/// Whether the request came over HTTPS (a proxy in front says so).
fn behind_https(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"))
}

async fn sign_out(
    State(state): State<AppState>,
    session: Session,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = same_origin(&headers) {
        return *r;
    }
    if let Err(r) = session.check_csrf(&Form::parse(&body)) {
        return *r;
    }
    if let (Some(token), Ok(client)) = (session_token(&headers), state.pool.get().await) {
        let _ = client
            .execute(
                "DELETE FROM console_sessions WHERE token_digest = $1",
                &[&keys::digest(&token).as_slice()],
            )
            .await;
    }
    let mut response = Redirect::to("/console/sign-in").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "penora_console=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    response
}
