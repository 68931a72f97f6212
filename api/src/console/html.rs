//! HTML for people: escaping, amounts and times with their exact value on
//! hover, and the page frame. No script anywhere: the Content-Security-Policy
//! allows none.

use std::fmt::Write;

use time::OffsetDateTime;

/// `s` escaped for text and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `n` with thousands separators.
pub fn grouped(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("−{out}") } else { out }
}

/// An amount of Ku coins: grouped, signed when `signed`, the exact integer
/// on hover.
pub fn ku(n: i64, signed: bool) -> String {
    let class = match (signed, n.signum()) {
        (true, -1) => " class=\"neg\"",
        (true, 1) => " class=\"pos\"",
        _ => "",
    };
    let sign = if signed && n > 0 { "+" } else { "" };
    format!(
        "<span{class} title=\"{n} Ku\" data-exact=\"{n}\">{sign}{} Ku</span>",
        grouped(n)
    )
}

/// A byte count for people, the exact count on hover.
pub fn bytes(n: i64) -> String {
    let (value, unit) = if n >= 1 << 20 {
        (n as f64 / (1 << 20) as f64, "MiB")
    } else if n >= 1 << 10 {
        (n as f64 / (1 << 10) as f64, "KiB")
    } else {
        return format!("<span title=\"{n} bytes\">{n} B</span>");
    };
    format!("<span title=\"{n} bytes\">{value:.1} {unit}</span>")
}

/// An instant for people ("7 Dec 2026 19:40 UTC", and "in 3 h" / "2 d
/// ago" against `now`), RFC 3339 to the millisecond on hover.
pub fn when(at: OffsetDateTime, now: OffsetDateTime) -> String {
    let exact = penora_domain::timefmt::rfc3339_millis(at);
    let at = at.to_offset(time::UtcOffset::UTC);
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][usize::from(u8::from(at.month())) - 1];
    let relative = relative(at - now);
    format!(
        "<time datetime=\"{exact}\" title=\"{exact}\">{} {month} {} {:02}:{:02} UTC <span class=\"muted\">({relative})</span></time>",
        at.day(),
        at.year(),
        at.hour(),
        at.minute()
    )
}

/// An optional instant, or `never`/`—`.
pub fn when_opt(at: Option<OffsetDateTime>, now: OffsetDateTime, none: &str) -> String {
    at.map_or_else(
        || format!("<span class=\"muted\">{none}</span>"),
        |t| when(t, now),
    )
}

fn relative(d: time::Duration) -> String {
    let secs = d.whole_seconds();
    let abs = secs.unsigned_abs();
    let amount = if abs < 60 {
        return "now".into();
    } else if abs < 3600 {
        format!("{} min", abs / 60)
    } else if abs < 86_400 {
        format!("{} h", abs / 3600)
    } else {
        format!("{} d", abs / 86_400)
    };
    if secs > 0 {
        format!("in {amount}")
    } else {
        format!("{amount} ago")
    }
}

/// Who is signed in, for the page's bar.
pub struct Bar<'a> {
    /// The key's id.
    pub key_id: &'a str,
    /// `admin` or `read`.
    pub role: &'a str,
    /// The session's CSRF token, for the sign-out form.
    pub csrf: &'a str,
}

/// A whole page: the frame around `body`.
pub fn page(title: &str, bar: Option<&Bar<'_>>, body: &str) -> String {
    let mut out = String::with_capacity(body.len() + 1024);
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta name=\"referrer\" content=\"same-origin\">\
         <title>{} · Penora Credits console</title>\
         <link rel=\"stylesheet\" href=\"/console/assets/console.css\"></head><body>\
         <header class=\"bar\"><strong>Penora Credits</strong>",
        esc(title)
    );
    if let Some(bar) = bar {
        let _ = write!(
            out,
            "<nav><a href=\"/console/users\">Users</a> · <a href=\"/console/ops\">Operations</a></nav>\
             <span class=\"who\">Signed in: key <code>{}</code> ({})\
             <form method=\"post\" action=\"/console/sign-out\"> \
             <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <button class=\"secondary\" type=\"submit\">Sign out</button></form></span>",
            esc(bar.key_id),
            esc(bar.role),
            esc(bar.csrf)
        );
    }
    let _ = write!(out, "</header><main>{body}</main></body></html>");
    out
}

/// A table: `head` cells, then rows of cells (already HTML); `numeric`
/// columns align right. Stacked as label/value pairs on a phone.
pub fn table(head: &[&str], numeric: &[usize], rows: &[Vec<String>], empty: &str) -> String {
    if rows.is_empty() {
        return format!("<p class=\"empty\">{}</p>", esc(empty));
    }
    let mut out = String::from("<div class=\"scroll\"><table class=\"stack\"><thead><tr>");
    for (i, h) in head.iter().enumerate() {
        let class = if numeric.contains(&i) {
            " class=\"num\""
        } else {
            ""
        };
        let _ = write!(out, "<th scope=\"col\"{class}>{}</th>", esc(h));
    }
    out.push_str("</tr></thead><tbody>");
    for row in rows {
        out.push_str("<tr>");
        for (i, cell) in row.iter().enumerate() {
            let class = if numeric.contains(&i) {
                " class=\"num\""
            } else {
                ""
            };
            let label = head.get(i).copied().unwrap_or("");
            let _ = write!(out, "<td{class} data-label=\"{}\">{cell}</td>", esc(label));
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table></div>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_amounts_keep_their_exact_value() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(grouped(1_234_567), "1,234,567");
        assert_eq!(grouped(-1000), "−1,000");
        assert_eq!(grouped(999), "999");
        assert!(ku(-5, true).contains("title=\"-5 Ku\""));
        assert!(ku(12345, false).contains(">12,345 Ku<"));
    }
}
