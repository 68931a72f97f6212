//! The console's users: search by prefix, a user's page, and the admin
//! actions on it (grant, void a lot, refund a reservation).

use std::fmt::Write;

use axum::{
    extract::{Path, Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use deadpool_postgres::GenericClient;
use penora_domain::{AppName, Credits, Description, GrantReason, ProjectCode, UserId};
use penora_ledger as ledger;
use penora_ledger::grant_rules::LotTerms;
use penora_workspace::projects::{self, Rendition, StoredContent};
use serde::Deserialize;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{Acting, Form, OrPage, Page, Session, html, problem};
use crate::{error::ApiError, extract, state::AppState};

/// Entries per ledger page.
const LEDGER_PAGE: i64 = 25;
/// Where an action's idempotency reference starts: `console-` and the
/// one-time key its form was drawn with.
pub const REFERENCE_PREFIX: &str = "console-";

/// Query of the search.
#[derive(Debug, Deserialize)]
pub struct SearchQuery {
    q: Option<String>,
}

/// `LIKE` pattern of a prefix.
fn prefix_pattern(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '\\' | '%' | '_') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}

/// Users whose id starts with `q` (the first 50, by id).
pub async fn search(
    State(state): State<AppState>,
    session: Session,
    Query(query): Query<SearchQuery>,
) -> Page {
    let q = query.q.unwrap_or_default();
    let q = q.trim();
    let client = state.pool.get().await.or_page(&session)?;
    let rows = client
        .query(
            "SELECT user_id, balance, updated_at FROM accounts \
             WHERE user_id LIKE $1 ESCAPE '\\' ORDER BY user_id LIMIT 50",
            &[&prefix_pattern(q)],
        )
        .await
        .or_page(&session)?;
    let now = OffsetDateTime::now_utc();
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let user: String = r.get(0);
            vec![
                format!(
                    "<a href=\"/console/users/{}\">{}</a>",
                    urlenc(&user),
                    html::esc(&user)
                ),
                html::ku(r.get(1), false),
                html::when(r.get(2), now),
            ]
        })
        .collect();
    let body = format!(
        "<h1>Users</h1>\
         <form method=\"get\" action=\"/console/users\" role=\"search\" class=\"inline\">\
         <label for=\"q\">User id starts with<input id=\"q\" name=\"q\" value=\"{}\" autofocus></label>\
         <button type=\"submit\">Find</button></form>\
         <p class=\"cli\">Same as: <code>penora-ops credits balance &lt;user_id&gt;</code></p>{}",
        html::esc(q),
        html::table(
            &["User", "Spendable", "Last movement"],
            &[1],
            &rows,
            "No user's id starts with this."
        )
    );
    Ok(super::html(
        StatusCode::OK,
        html::page("Users", Some(&session.bar()), &body),
    ))
}

/// `s` percent-encoded for a path segment.
pub fn urlenc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Query of a user's page.
#[derive(Debug, Deserialize)]
pub struct PageQuery {
    before: Option<String>,
}

/// A user's page.
pub async fn page(
    State(state): State<AppState>,
    session: Session,
    Path(raw_user): Path<String>,
    Query(query): Query<PageQuery>,
) -> Page {
    let user = extract::user_id(Some(&raw_user)).or_page(&session)?;
    let before = match query.before.as_deref().map(str::parse::<i64>) {
        None => None,
        Some(Ok(id)) if id > 0 => Some(id),
        Some(_) => {
            return Err(session.problem(ApiError::InvalidRequest(
                "before: must be a ledger entry id".into(),
            )));
        }
    };
    let client = state.pool.get().await.or_page(&session)?;
    match render_user(&client, &session, &user, before)
        .await
        .or_page(&session)?
    {
        Some(body) => Ok(super::html(
            StatusCode::OK,
            html::page(user.as_str(), Some(&session.bar()), &body),
        )),
        None => Err(problem(
            StatusCode::NOT_FOUND,
            "user_not_found",
            &format!("No user {}", user.as_str()),
            Some(&session.bar()),
        )),
    }
}

async fn render_user(
    client: &impl GenericClient,
    session: &Session,
    user: &UserId,
    before: Option<i64>,
) -> Result<Option<String>, tokio_postgres::Error> {
    let u = user.as_str();
    let Some(account) = client
        .query_opt(
            "SELECT a.balance, a.storage_used_bytes, a.created_at, a.chain_seq, \
                    c.seq, c.checked_at, \
                    (SELECT coalesce(sum(r.amount - r.refunded_amount), 0)::int8 FROM reservations r \
                      WHERE r.user_id = a.user_id AND r.state IN ('reserved', 'partially_refunded')) AS reserved \
             FROM accounts a LEFT JOIN audit_checkpoints c ON c.user_id = a.user_id \
             WHERE a.user_id = $1",
            &[&u],
        )
        .await?
    else {
        return Ok(None);
    };
    let now = OffsetDateTime::now_utc();
    let admin = session.is_admin();
    let csrf = html::esc(&session.csrf);
    let path = format!("/console/users/{}", urlenc(u));
    let balance: i64 = account.get(0);
    let chain_seq: i64 = account.get(3);
    let checked: Option<i64> = account.get(4);
    let checked_at: Option<OffsetDateTime> = account.get(5);
    let reserved: i64 = account.get(6);
    let categories = client
        .query(
            "SELECT category, coalesce(sum(remaining), 0)::int8 FROM credit_lots \
             WHERE user_id = $1 AND status = 'active' GROUP BY category ORDER BY category",
            &[&u],
        )
        .await?;
    let mut out = String::new();
    let _ = write!(
        out,
        "<p><a href=\"/console/users\">← Users</a></p><h1>User <code>{}</code></h1>\
         <section aria-labelledby=\"balance\"><h2 id=\"balance\">Balance</h2><div class=\"cards\">\
         <div class=\"card\" data-field=\"spendable\"><div class=\"label\">Spendable</div><div class=\"value\">{}</div></div>\
         <div class=\"card\" data-field=\"reserved\"><div class=\"label\">Reserved</div><div class=\"value\">{}</div></div>",
        html::esc(u),
        html::ku(balance, false),
        html::ku(reserved, false)
    );
    for c in &categories {
        let category: String = c.get(0);
        let _ = write!(
            out,
            "<div class=\"card\" data-field=\"category-{0}\"><div class=\"label\">{0}</div><div class=\"value\">{1}</div></div>",
            html::esc(&category),
            html::ku(c.get(1), false)
        );
    }
    let _ = write!(
        out,
        "<div class=\"card\"><div class=\"label\">Storage used</div><div class=\"value\">{}</div></div></div>\
         <p class=\"cli\">Same as: <code>penora-ops credits balance {}</code></p></section>",
        html::bytes(account.get(1)),
        html::esc(u)
    );

    // Grant.
    if admin {
        let _ = write!(
            out,
            "<section aria-labelledby=\"grant\"><h2 id=\"grant\">Grant credits</h2>\
             <form method=\"post\" action=\"{path}/grant\" class=\"inline\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <input type=\"hidden\" name=\"nonce\" value=\"{}\">\
             <label for=\"g-amount\">Amount (Ku)<input id=\"g-amount\" name=\"amount\" type=\"number\" min=\"1\" step=\"1\" required></label>\
             <label for=\"g-category\">Category<select id=\"g-category\" name=\"category\">\
             <option value=\"paid\">paid</option><option value=\"promotional\">promotional</option></select></label>\
             <label for=\"g-expires\">Expires (UTC, optional)<input id=\"g-expires\" name=\"expires_at\" type=\"datetime-local\"></label>\
             <label for=\"g-reason\">Reason (required)<input id=\"g-reason\" name=\"reason\" required maxlength=\"500\"></label>\
             <button type=\"submit\">Grant…</button></form>\
             <p class=\"cli\">Same as: <code>penora-ops credits grant {} &lt;amount&gt; --reason &lt;reason&gt;</code></p></section>",
            Uuid::new_v4(),
            html::esc(u)
        );
    }

    // Lots.
    let lots = client
        .query(
            "SELECT lot_id, category, priority, granted, remaining, expires_at, status, app_name, \
                    reference, created_at \
             FROM credit_lots WHERE user_id = $1 ORDER BY lot_id DESC LIMIT 100",
            &[&u],
        )
        .await?;
    let rows: Vec<Vec<String>> = lots
        .iter()
        .map(|l| {
            let lot_id: i64 = l.get(0);
            let status: String = l.get(6);
            let mut row = vec![
                lot_id.to_string(),
                html::esc(l.get::<_, &str>(1)),
                l.get::<_, i32>(2).to_string(),
                html::ku(l.get(3), false),
                html::ku(l.get(4), false),
                html::when_opt(l.get(5), now, "never"),
                html::esc(&status),
                html::esc(l.get::<_, &str>(7)),
                l.get::<_, Option<&str>>(8)
                    .map_or_else(String::new, |r| format!("<code>{}</code>", html::esc(r))),
                html::when(l.get(9), now),
            ];
            if admin {
                row.push(if status == "active" {
                    format!(
                        "<details class=\"act\"><summary>Void…</summary>\
                         <form method=\"post\" action=\"{path}/void\" class=\"inline\">\
                         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
                         <input type=\"hidden\" name=\"lot_id\" value=\"{lot_id}\">\
                         <label for=\"v-reason-{lot_id}\">Reason<input id=\"v-reason-{lot_id}\" name=\"reason\" required maxlength=\"500\"></label>\
                         <button class=\"danger\" type=\"submit\">Void lot {lot_id}…</button></form></details>"
                    )
                } else {
                    String::new()
                });
            }
            row
        })
        .collect();
    let mut head = vec![
        "Lot",
        "Category",
        "Priority",
        "Granted",
        "Remaining",
        "Expires",
        "Status",
        "App",
        "Reference",
        "Granted at",
    ];
    if admin {
        head.push("Action");
    }
    let _ = write!(
        out,
        "<section aria-labelledby=\"lots\"><h2 id=\"lots\">Credit lots</h2>{}\
         <p class=\"cli\">Same as: <code>GET /api/unified/credit-lots?user_id={}</code></p></section>",
        html::table(&head, &[3, 4], &rows, "No lots."),
        html::esc(u)
    );

    // Limits and allowances.
    let limits = client
        .query(
            "SELECT scope, period, max_credits, updated_at FROM spend_limits WHERE user_id = $1 ORDER BY scope, period",
            &[&u],
        )
        .await?;
    let rows: Vec<Vec<String>> = limits
        .iter()
        .map(|l| {
            vec![
                html::esc(l.get::<_, &str>(0)),
                html::esc(l.get::<_, &str>(1)),
                html::ku(l.get(2), false),
                html::when(l.get(3), now),
            ]
        })
        .collect();
    let allowances = client
        .query(
            "SELECT allowance_id, amount, period, category, max_rollover, app_name, next_grant_at \
             FROM allowances WHERE user_id = $1 ORDER BY allowance_id",
            &[&u],
        )
        .await?;
    let arows: Vec<Vec<String>> = allowances
        .iter()
        .map(|a| {
            vec![
                format!("<code>{}</code>", html::esc(a.get::<_, &str>(0))),
                html::ku(a.get(1), false),
                html::esc(a.get::<_, &str>(2)),
                html::esc(a.get::<_, &str>(3)),
                html::ku(a.get(4), false),
                html::esc(a.get::<_, &str>(5)),
                html::when(a.get(6), now),
            ]
        })
        .collect();
    let _ = write!(
        out,
        "<section aria-labelledby=\"limits\"><h2 id=\"limits\">Spend limits and allowances</h2>{}{}\
         <p class=\"cli\">Same as: <code>GET /api/unified/limits?user_id={user}</code>, \
         <code>GET /api/unified/allowances?user_id={user}</code></p></section>",
        html::table(
            &["Scope", "Period", "At most", "Set"],
            &[2],
            &rows,
            "No spend limit."
        ),
        html::table(
            &[
                "Allowance",
                "Amount",
                "Period",
                "Category",
                "Max rollover",
                "App",
                "Next grant"
            ],
            &[1, 4],
            &arows,
            "No recurring allowance."
        ),
        user = html::esc(u),
    );

    // Reservations.
    let reservations = client
        .query(
            "SELECT app_name, project_code, amount, refunded_amount, state, created_at, refundable_until, description \
             FROM reservations WHERE user_id = $1 \
             ORDER BY state IN ('reserved', 'partially_refunded') DESC, created_at DESC, project_code LIMIT 20",
            &[&u],
        )
        .await?;
    let rows: Vec<Vec<String>> = reservations
        .iter()
        .map(|r| {
            let app: &str = r.get(0);
            let code: &str = r.get(1);
            let amount: i64 = r.get(2);
            let refunded: i64 = r.get(3);
            let state: &str = r.get(4);
            let until: OffsetDateTime = r.get(6);
            let mut row = vec![
                html::esc(app),
                format!("<code>{}</code>", html::esc(code)),
                html::ku(amount, false),
                html::ku(refunded, false),
                html::esc(state),
                html::when(r.get(5), now),
                html::when(until, now),
            ];
            if admin {
                let open = matches!(state, "reserved" | "partially_refunded") && until > now;
                row.push(if open {
                    format!(
                        "<details class=\"act\"><summary>Refund…</summary>\
                         <form method=\"post\" action=\"{path}/refund\" class=\"inline\">\
                         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
                         <input type=\"hidden\" name=\"nonce\" value=\"{nonce}\">\
                         <input type=\"hidden\" name=\"app_name\" value=\"{app}\">\
                         <input type=\"hidden\" name=\"project_code\" value=\"{code}\">\
                         <label for=\"r-amount-{nonce}\">Amount (empty: all {left})<input id=\"r-amount-{nonce}\" name=\"amount\" type=\"number\" min=\"1\" max=\"{left}\" step=\"1\"></label>\
                         <label for=\"r-reason-{nonce}\">Reason<input id=\"r-reason-{nonce}\" name=\"reason\" required maxlength=\"500\"></label>\
                         <button type=\"submit\">Refund…</button></form></details>",
                        nonce = Uuid::new_v4(),
                        app = html::esc(app),
                        code = html::esc(code),
                        left = amount - refunded,
                    )
                } else {
                    String::new()
                });
            }
            row
        })
        .collect();
    let mut head = vec![
        "App",
        "Code",
        "Amount",
        "Refunded",
        "State",
        "Made",
        "Refund deadline",
    ];
    if admin {
        head.push("Action");
    }
    let note = if rows.len() == 20 {
        "<p class=\"muted\">The 20 most recent open reservations first, then the most recent closed ones.</p>"
    } else {
        ""
    };
    let _ = write!(
        out,
        "<section aria-labelledby=\"reservations\"><h2 id=\"reservations\">Reservations</h2>{note}{}\
         <p class=\"cli\">Same as: <code>POST /api/unified/refund-credits</code> with <code>user_id</code>, <code>project_code</code>, <code>amount</code>, <code>reference</code></p></section>",
        html::table(&head, &[2, 3], &rows, "No reservations.")
    );

    // Ledger.
    let entries = client
        .query(
            "SELECT id, kind, amount, balance_after, app_name, description, project_code, reference, \
                    created_at, acted_by, chain_seq \
             FROM ledger_entries WHERE user_id = $1 AND ($2::int8 IS NULL OR id < $2) \
             ORDER BY id DESC LIMIT $3",
            &[&u, &before, &(LEDGER_PAGE + 1)],
        )
        .await?;
    let more = entries.len() as i64 > LEDGER_PAGE;
    let shown = &entries[..entries.len().min(LEDGER_PAGE as usize)];
    let rows: Vec<Vec<String>> = shown.iter().map(|e| entry_row(e, now)).collect();
    let mut pager = String::from("<nav class=\"pager\" aria-label=\"Ledger pages\">");
    if before.is_some() {
        let _ = write!(pager, "<a href=\"{path}#ledger\">Newest</a>");
    }
    if more && let Some(last) = shown.last() {
        let _ = write!(
            pager,
            "<a href=\"{path}?before={}#ledger\" rel=\"next\">Older entries →</a>",
            last.get::<_, i64>(0)
        );
    }
    pager.push_str("</nav>");
    let _ = write!(
        out,
        "<section aria-labelledby=\"ledger\"><h2 id=\"ledger\">Ledger</h2>{}{pager}\
         <p class=\"cli\">Same as: <code>GET /api/unified/transactions?user_id={}</code></p></section>",
        html::table(&ENTRY_HEAD, &[2, 3], &rows, "No entries."),
        html::esc(u)
    );

    // Projects.
    let projects = client
        .query(
            "SELECT p.id, p.app_source, p.project_type, p.title, p.status, p.size_bytes, p.created_at, \
                    p.project_code, c.thumbnail IS NOT NULL AS thumb \
             FROM projects p LEFT JOIN project_contents c ON c.user_id = p.user_id AND c.project_id = p.id \
             WHERE p.user_id = $1 AND p.status <> 'deleted' ORDER BY p.created_at DESC LIMIT 24",
            &[&u],
        )
        .await?;
    let rows: Vec<Vec<String>> = projects
        .iter()
        .map(|p| {
            let id: Uuid = p.get(0);
            let title: &str = p.get(3);
            let thumb: Option<bool> = p.get(8);
            vec![
                if thumb == Some(true) {
                    format!(
                        "<img class=\"thumb\" src=\"{path}/projects/{id}/thumbnail\" alt=\"Thumbnail of {}\" width=\"96\" height=\"96\">",
                        html::esc(title)
                    )
                } else {
                    "<span class=\"muted\">—</span>".into()
                },
                html::esc(title),
                format!(
                    "{} / {}",
                    html::esc(p.get::<_, &str>(1)),
                    html::esc(p.get::<_, &str>(2))
                ),
                html::esc(p.get::<_, &str>(4)),
                html::bytes(p.get(5)),
                p.get::<_, Option<&str>>(7)
                    .map_or_else(String::new, |c| format!("<code>{}</code>", html::esc(c))),
                html::when(p.get(6), now),
            ]
        })
        .collect();
    let _ = write!(
        out,
        "<section aria-labelledby=\"projects\"><h2 id=\"projects\">Projects</h2>{}\
         <p class=\"cli\">Same as: <code>GET /api/unified/projects?user_id={}</code></p></section>",
        html::table(
            &[
                "Thumbnail",
                "Title",
                "App / type",
                "Status",
                "Size",
                "Code",
                "Saved"
            ],
            &[4],
            &rows,
            "No projects."
        ),
        html::esc(u)
    );

    // The audit chain.
    let checked = checked.unwrap_or(0);
    let state = if chain_seq == 0 {
        "<span class=\"muted\">no chained entry yet</span>".to_owned()
    } else if checked >= chain_seq {
        format!("<strong class=\"pos\">every link checked</strong> ({chain_seq} of {chain_seq})")
    } else {
        format!(
            "<strong>{} of {chain_seq} links checked</strong>; {} waiting for the audit",
            checked,
            chain_seq - checked
        )
    };
    let _ = write!(
        out,
        "<section aria-labelledby=\"audit\"><h2 id=\"audit\">Audit chain</h2>\
         <p data-field=\"audit\" data-chain-seq=\"{chain_seq}\" data-checked=\"{checked}\">{state}; last checked {}</p>\
         <p class=\"cli\">Same as: <code>penora-ops audit verify</code></p></section>",
        html::when_opt(checked_at, now, "never")
    );
    Ok(Some(out))
}

/// The ledger table's columns.
const ENTRY_HEAD: [&str; 9] = [
    "Entry",
    "Kind",
    "Amount",
    "Balance after",
    "App",
    "Why",
    "Code / reference",
    "When",
    "Acted by",
];

/// One ledger row (columns of the user page's query).
fn entry_row(e: &tokio_postgres::Row, now: OffsetDateTime) -> Vec<String> {
    let code: Option<&str> = e.get(6);
    let reference: Option<&str> = e.get(7);
    let refs = [code, reference]
        .iter()
        .flatten()
        .map(|s| format!("<code>{}</code>", html::esc(s)))
        .collect::<Vec<_>>()
        .join(" ");
    vec![
        e.get::<_, i64>(0).to_string(),
        html::esc(e.get::<_, &str>(1)),
        html::ku(e.get(2), true),
        html::ku(e.get(3), false),
        html::esc(e.get::<_, &str>(4)),
        e.get::<_, Option<&str>>(5)
            .map_or_else(String::new, html::esc),
        refs,
        html::when(e.get(8), now),
        e.get::<_, Option<&str>>(9)
            .map_or_else(String::new, |k| format!("<code>{}</code>", html::esc(k))),
    ]
}

/// A project's thumbnail, for the user's page.
pub async fn thumbnail(
    State(state): State<AppState>,
    session: Session,
    Path((raw_user, project)): Path<(String, String)>,
) -> Page {
    let user = extract::user_id(Some(&raw_user)).or_page(&session)?;
    let Ok(id) = Uuid::parse_str(&project) else {
        return Err(session.problem(ApiError::NotFound("no such project".into())));
    };
    let client = state.pool.get().await.or_page(&session)?;
    Ok(
        match projects::content(&client, &user, id, Rendition::Thumbnail, None)
            .await
            .or_page(&session)?
        {
            Some(StoredContent::Image {
                media_type,
                data: Some(data),
                ..
            }) => (
                [
                    (header::CONTENT_TYPE, media_type),
                    (header::CACHE_CONTROL, "private, no-store".to_owned()),
                ],
                data,
            )
                .into_response(),
            _ => StatusCode::NOT_FOUND.into_response(),
        },
    )
}

/// The one-time key of the form (a UUID).
fn nonce(form: &Form) -> Result<Uuid, ApiError> {
    form.get("nonce")
        .and_then(|n| Uuid::parse_str(n).ok())
        .ok_or_else(|| {
            ApiError::InvalidRequest(
                "nonce: the form's one-time key is missing; reload the page".into(),
            )
        })
}

/// The confirmation page of an action: what it will do, and the same form
/// again with `confirm=yes`.
fn confirm_page(
    session: &Session,
    action: &str,
    what: &str,
    form: &Form,
    fields: &[&str],
    user: &str,
) -> Response {
    let mut hidden = String::new();
    for f in fields {
        if let Some(v) = form.get(f) {
            let _ = write!(
                hidden,
                "<input type=\"hidden\" name=\"{f}\" value=\"{}\">",
                html::esc(v)
            );
        }
    }
    let back = format!("/console/users/{}", urlenc(user));
    let body = format!(
        "<h1>Confirm</h1><div class=\"notice\" role=\"status\"><p>{what}</p></div>\
         <form method=\"post\" action=\"{back}/{action}\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\">{hidden}\
         <input type=\"hidden\" name=\"confirm\" value=\"yes\">\
         <button type=\"submit\" autofocus>Confirm</button> <a href=\"{back}\">Cancel</a></form>",
        html::esc(&session.csrf)
    );
    super::html(
        StatusCode::OK,
        html::page("Confirm", Some(&session.bar()), &body),
    )
}

/// The page after an action: what happened, and the entries it made.
async fn done_page(
    state: &AppState,
    session: &Session,
    user: &str,
    headline: &str,
    replayed: bool,
    entries: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Page {
    let client = state.pool.get().await.or_page(session)?;
    let rows = client
        .query(
            &format!(
                "SELECT id, kind, amount, balance_after, app_name, description, project_code, reference, \
                        created_at, acted_by, chain_seq FROM ledger_entries WHERE {entries} ORDER BY id"
            ),
            params,
        )
        .await
    .or_page(session)?;
    let now = OffsetDateTime::now_utc();
    let rows: Vec<Vec<String>> = rows.iter().map(|e| entry_row(e, now)).collect();
    let replay = if replayed {
        "<p><strong>This was done before</strong> (the same form was sent again): nothing moved twice.</p>"
    } else {
        ""
    };
    let back = format!("/console/users/{}", urlenc(user));
    let body = format!(
        "<h1>Done</h1><div class=\"notice ok\" role=\"status\" data-replayed=\"{replayed}\"><p>{}</p>{replay}</div>\
         <h2>The ledger entry it made</h2>{}<p><a href=\"{back}\">Back to {}</a></p>",
        html::esc(headline),
        html::table(
            &ENTRY_HEAD,
            &[2, 3],
            &rows,
            "No entry (nothing was left to move)."
        ),
        html::esc(user)
    );
    Ok(super::html(
        StatusCode::OK,
        html::page("Done", Some(&session.bar()), &body),
    ))
}

/// Grant: confirm, then grant with the form's one-time key as reference.
pub async fn grant(
    State(state): State<AppState>,
    Path(raw_user): Path<String>,
    Acting { session, form }: Acting,
) -> Page {
    let parsed = (|| -> Result<_, ApiError> {
        let user = extract::user_id(Some(&raw_user))?;
        let amount = form
            .get("amount")
            .and_then(|a| a.parse::<i64>().ok())
            .ok_or_else(|| {
                ApiError::InvalidRequest("amount: must be a whole number of Ku".into())
            })?;
        let amount = Credits::new("amount", amount, state.settings.ledger.max_deduct_amount)?;
        let reason = GrantReason::parse("reason", form.get("reason"))?;
        let expires = form.get("expires_at").map(|raw| {
            // datetime-local: "YYYY-MM-DDTHH:MM", read as UTC.
            if raw.len() == 16 {
                format!("{raw}:00Z")
            } else {
                format!("{raw}Z")
            }
        });
        let terms = LotTerms::parse(
            form.get("category"),
            None,
            expires.as_deref(),
            OffsetDateTime::now_utc(),
        )?;
        Ok((user, amount, reason, terms, nonce(&form)?))
    })();
    let (user, amount, reason, terms, nonce) = parsed.or_page(&session)?;
    if form.get("confirm") != Some("yes") {
        let expiry = terms.expires_at.map_or("never expire".to_owned(), |t| {
            format!("expire at {}", penora_domain::timefmt::rfc3339_millis(t))
        });
        let what = format!(
            "Grant <strong>{}</strong> {} credits to <code>{}</code>, which {expiry}. Reason: “{}”.",
            html::ku(amount.get(), false),
            terms.category.as_str(),
            html::esc(user.as_str()),
            html::esc(&reason)
        );
        return Ok(confirm_page(
            &session,
            "grant",
            &what,
            &form,
            &["nonce", "amount", "category", "expires_at", "reason"],
            user.as_str(),
        ));
    }
    let grant = ledger::Grant {
        user_id: user.clone(),
        amount,
        // As `add-credits`: a key bound to an app grants for it.
        app_name: match session.auth().bound_app() {
            None => AppName::penora(),
            Some(own) => AppName::parse("app_name", own).or_page(&session)?,
        },
        reason,
        reference: format!("{REFERENCE_PREFIX}{nonce}"),
        category: terms.category,
        priority: terms.priority,
        expires_at: terms.expires_at,
        acted_by: Some(session.key_id.clone()),
    };
    let mut client = state.pool.get().await.or_page(&session)?;
    let outcome = ledger::grant(&mut client, &grant, None)
        .await
        .or_page(&session)?;
    drop(client);
    if !outcome.replayed {
        state.jobs_committed();
    }
    let entry = outcome.value.entry_id;
    done_page(
        &state,
        &session,
        user.as_str(),
        &format!(
            "Granted {} Ku to {}; the balance is {} Ku.",
            outcome.value.credits_added,
            user.as_str(),
            outcome.value.new_balance
        ),
        outcome.replayed,
        "user_id = $1 AND id = $2",
        &[&user.as_str(), &entry],
    )
    .await
}

/// Void a lot: confirm, then void (idempotent by the lot's state).
pub async fn void(
    State(state): State<AppState>,
    Path(raw_user): Path<String>,
    Acting { session, form }: Acting,
) -> Page {
    let parsed = (|| -> Result<_, ApiError> {
        let user = extract::user_id(Some(&raw_user))?;
        let lot_id = form
            .get("lot_id")
            .and_then(|a| a.parse::<i64>().ok())
            .filter(|l| *l > 0)
            .ok_or_else(|| ApiError::InvalidRequest("lot_id: must be a lot's id".into()))?;
        let reason = Description::parse("reason", form.get("reason"))?
            .ok_or_else(|| ApiError::InvalidRequest("reason: is required".into()))?;
        Ok((user, lot_id, reason))
    })();
    let (user, lot_id, reason) = parsed.or_page(&session)?;
    if form.get("confirm") != Some("yes") {
        let what = format!(
            "Void lot <strong>{lot_id}</strong> of <code>{}</code>: its remaining credits are taken away. Reason: “{}”.",
            html::esc(user.as_str()),
            html::esc(&reason)
        );
        return Ok(confirm_page(
            &session,
            "void",
            &what,
            &form,
            &["lot_id", "reason"],
            user.as_str(),
        ));
    }
    let mut client = state.pool.get().await.or_page(&session)?;
    let outcome = ledger::void_lot_as(
        &mut client,
        &user,
        lot_id,
        // A key bound to an app voids only the lots that app granted.
        (&reason, session.auth().bound_app()),
        None,
        Some(&session.key_id),
    )
    .await
    .or_page(&session)?;
    drop(client);
    if !outcome.replayed {
        state.jobs_committed();
    }
    done_page(
        &state,
        &session,
        user.as_str(),
        &format!(
            "Lot {lot_id} is {}: {} Ku taken away; the balance is {} Ku.",
            outcome.value.status, outcome.value.credits_voided, outcome.value.new_balance
        ),
        outcome.replayed,
        "user_id = $1 AND kind = 'void' AND id IN \
         (SELECT m.entry_id FROM lot_movements m WHERE m.user_id = $1 AND m.lot_id = $2)",
        &[&user.as_str(), &lot_id],
    )
    .await
}

/// Refund a reservation in full or in part: confirm, then refund with the
/// form's one-time key as reference.
pub async fn refund(
    State(state): State<AppState>,
    Path(raw_user): Path<String>,
    Acting { session, form }: Acting,
) -> Page {
    let parsed = (|| -> Result<_, ApiError> {
        let user = extract::user_id(Some(&raw_user))?;
        // A key bound to an app refunds only that app's reservations.
        let app = crate::routes::credits::acting_app(
            &session.auth(),
            "app_name",
            Some(form.get("app_name").unwrap_or("")),
        )?;
        let code = ProjectCode::parse(form.get("project_code").unwrap_or(""))?;
        let amount = match form.get("amount") {
            None => None,
            Some(raw) => Some(
                Credits::new(
                    "amount",
                    raw.parse::<i64>().map_err(|_| {
                        ApiError::InvalidRequest("amount: must be a whole number of Ku".into())
                    })?,
                    state.settings.ledger.max_deduct_amount,
                )?
                .get(),
            ),
        };
        let reason = Description::parse("reason", form.get("reason"))?
            .ok_or_else(|| ApiError::InvalidRequest("reason: is required".into()))?;
        Ok((user, app, code, amount, reason, nonce(&form)?))
    })();
    let (user, app, code, amount, reason, nonce) = parsed.or_page(&session)?;
    if form.get("confirm") != Some("yes") {
        let how_much = amount.map_or("everything still refundable".to_owned(), |a| {
            html::ku(a, false)
        });
        let what = format!(
            "Refund {how_much} of reservation <code>{}</code> ({}) to <code>{}</code>. Reason: “{}”.",
            html::esc(code.as_str()),
            html::esc(app.as_str()),
            html::esc(user.as_str()),
            html::esc(&reason)
        );
        return Ok(confirm_page(
            &session,
            "refund",
            &what,
            &form,
            &["nonce", "app_name", "project_code", "amount", "reason"],
            user.as_str(),
        ));
    }
    let reference = format!("{REFERENCE_PREFIX}{nonce}");
    let request = ledger::Refund {
        user_id: user.clone(),
        project_code: code,
        app_name: Some(app),
        reason: Some(reason),
        amount,
        reference: Some(reference.clone()),
        acted_by: Some(session.key_id.clone()),
    };
    let mut client = state.pool.get().await.or_page(&session)?;
    let outcome = ledger::refund(&mut client, &request, None)
        .await
        .or_page(&session)?;
    drop(client);
    if !outcome.replayed {
        state.jobs_committed();
    }
    done_page(
        &state,
        &session,
        user.as_str(),
        &format!(
            "Refunded {} Ku of {}; the balance is {} Ku, {} Ku still reserved.",
            outcome.value.credits_refunded,
            outcome.value.project_code,
            outcome.value.new_balance,
            outcome.value.remaining_reserved
        ),
        outcome.replayed,
        "user_id = $1 AND reference = $2 AND kind = 'refund'",
        &[&user.as_str(), &reference],
    )
    .await
}
