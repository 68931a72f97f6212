//! Bounded metric label values: a label takes only values from a known
//! set, so a client sending new names cannot make the series explode.

/// Apps that may appear as a metric's `app` label: the two apps of the
/// product, and every app that a stored key names (registered when the key
/// authenticates). Anything else is `other`, so a client sending new app
/// names cannot make the series explode.
static KNOWN_APPS: std::sync::LazyLock<std::sync::RwLock<std::collections::BTreeSet<String>>> =
    std::sync::LazyLock::new(|| {
        std::sync::RwLock::new([crate::PENORA, crate::IMAGEGENE].map(str::to_owned).into())
    });

/// Registers `app`, named by a key, as a label value.
pub fn register_app(app: &str) {
    let known = KNOWN_APPS.read().is_ok_and(|k| k.contains(app));
    if !known && let Ok(mut k) = KNOWN_APPS.write() {
        k.insert(app.to_owned());
    }
}

/// The `app` label for `app`: itself when known, else `other`.
pub fn app_label(app: &str) -> String {
    if KNOWN_APPS.read().is_ok_and(|k| k.contains(app)) {
        app.to_owned()
    } else {
        "other".to_owned()
    }
}

/// The `method` label for an HTTP method: the methods the API serves, or
/// `other`.
pub fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "POST" => "POST",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded() {
        assert_eq!(app_label("imagegene"), "imagegene");
        assert_eq!(app_label("made-up-by-a-client"), "other");
        register_app("studio");
        assert_eq!(app_label("studio"), "studio");
        assert_eq!(method_label("POST"), "POST");
        assert_eq!(method_label("BREW"), "other");
    }
}
