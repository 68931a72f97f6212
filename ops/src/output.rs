//! How penora-ops prints: aligned tables for people, pretty JSON for scripts,
//! and a progress bar on stderr when stderr is a terminal.

use std::io::{IsTerminal, Write};

use serde::Serialize;

/// Prints `value` as pretty JSON on stdout.
pub fn json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
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
