//! How penora-ops prints: aligned tables for people, pretty JSON for scripts,
//! and a progress bar on stderr when stderr is a terminal.
//!
//! Rule: what it prints may come from outside (a message body ImageGene
//! published, a reason or title a client sent), so no character of it
//! reaches the terminal that could act on it: control characters (escape
//! sequences, carriage returns, C1 controls) and bidirectional or invisible
//! format characters are printed as `\u{…}` escapes in tables and text, and
//! as `\uXXXX` escapes in JSON (still valid JSON).

use std::io::{IsTerminal, Write};

use penora_domain::is_bidi_or_invisible_format;
use serde::Serialize;

/// Whether `c` must not reach a terminal as it is.
fn unsafe_char(c: char) -> bool {
    c.is_control() || is_bidi_or_invisible_format(c)
}

/// `raw` safe to print: every control or format character as `\u{…}`.
pub fn text(raw: &str) -> String {
    penora_platform::dead_letters::escaped(raw)
}

/// `json` (as serde_json writes it: control characters below U+0020
/// already escaped) with DEL, the C1 controls and the format characters
/// escaped as `\uXXXX` too. They can only stand inside strings, where such
/// an escape means the same character.
fn json_text(json: String) -> String {
    if !json.chars().any(unsafe_char) {
        return json;
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if unsafe_char(c) && !matches!(c, '\n' | ' ') {
            // Every character here is in the Basic Multilingual Plane.
            out.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// Prints `value` as pretty JSON on stdout.
pub fn json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", json_text(serde_json::to_string_pretty(value)?));
    Ok(())
}

/// How a column lines up.
#[derive(Clone, Copy)]
pub enum Align {
    /// Text.
    Left,
    /// Numbers.
    Right,
}

/// Prints `rows` under `header`, each column as wide as its widest cell,
/// two spaces apart.
pub fn table(header: &[(&str, Align)], rows: &[Vec<String>]) {
    let rows = &safe_rows(rows);
    let mut widths: Vec<usize> = header.iter().map(|(h, _)| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        cells
            .zip(header.iter().zip(&widths))
            .map(|(c, ((_, align), &w))| match align {
                Align::Left => format!("{c:<w$}"),
                Align::Right => format!("{c:>w$}"),
            })
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    println!("{}", line(&mut header.iter().map(|(h, _)| *h)));
    for row in rows {
        println!("{}", line(&mut row.iter().map(String::as_str)));
    }
}

/// [`table`], every cell printed safely ([`text`]).
fn safe_rows(rows: &[Vec<String>]) -> Vec<Vec<String>> {
    rows.iter()
        .map(|row| row.iter().map(|c| text(c)).collect())
        .collect()
}

/// Draws `stage done/total` on stderr when it is a terminal.
pub fn progress_bar(stage: &str, done: u64, total: u64) {
    let mut err = std::io::stderr();
    if !err.is_terminal() {
        return;
    }
    let width = 30u64;
    let filled = (done.min(total) * width)
        .checked_div(total)
        .unwrap_or(width);
    let _ = write!(
        err,
        "\r[{}{}] {done}/{total} {stage:<30}",
        "#".repeat(filled as usize),
        " ".repeat((width - filled) as usize)
    );
    if done >= total {
        let _ = writeln!(err);
    }
    let _ = err.flush();
}

/// An optional value as a cell: `-` when missing.
pub fn cell<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// Records a run of `kind` (`ops_runs`, shown on the console's operations
/// page). A failure to record is said on stderr and changes nothing else:
/// the check itself ran.
pub async fn record_run(
    client: &impl deadpool_postgres::GenericClient,
    kind: &str,
    ok: bool,
    summary: &str,
    report: &impl Serialize,
    started: time::OffsetDateTime,
) {
    let report = serde_json::to_value(report).unwrap_or(serde_json::Value::Null);
    if let Err(e) =
        penora_store::ops_runs::record(client, kind, ok, summary, &report, started).await
    {
        eprintln!("note: this run was not recorded for the console ({e})");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_from_outside_cannot_act_on_the_terminal() {
        assert_eq!(text("plain ümlaut"), "plain ümlaut");
        // An escape sequence that would clear the screen, a carriage return
        // that would overwrite the line, a C1 CSI, a right-to-left override.
        assert_eq!(
            text("a\u{1b}[2Jb\rc\u{9b}d\u{202e}e"),
            "a\\u{1b}[2Jb\\u{d}c\\u{9b}d\\u{202e}e"
        );
        let json = json_text(
            serde_json::to_string_pretty(&serde_json::json!({"body": "x\u{1b}y\u{9b}z\u{202e}"}))
                .expect("json"),
        );
        assert!(
            !json.chars().any(|c| c == '\u{9b}' || c == '\u{202e}'),
            "{json}"
        );
        let back: serde_json::Value = serde_json::from_str(&json).expect("still JSON");
        assert_eq!(back["body"], "x\u{1b}y\u{9b}z\u{202e}");
    }
}
