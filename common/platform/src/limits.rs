//! Process limits a service sets at start.

/// The open-file limit before and after [`raise_open_files`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    /// The soft limit the process started with.
    pub before: u64,
    /// The soft limit now (the hard limit when raising worked).
    pub now: u64,
    /// The hard limit.
    pub hard: u64,
}

/// Raises the soft open-file limit (`RLIMIT_NOFILE`) to the hard limit, so
/// that many connections never run the process out of descriptors where the
/// system allows more (CONTRACT §11). The caller logs the result.
pub fn raise_open_files() -> std::io::Result<OpenFiles> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (before, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    if before < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(std::io::Error::from)?;
    }
    let (now, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    Ok(OpenFiles { before, now, hard })
}

/// [`raise_open_files`], logged: the limit before and after, or why it
/// could not be raised.
pub fn raise_open_files_logged() {
    match raise_open_files() {
        Ok(l) => tracing::info!(
            soft_before = l.before,
            soft_now = l.now,
            hard = l.hard,
            "open-file limit raised to the hard limit"
        ),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_reaches_the_hard_one() {
        let got = raise_open_files().expect("limits readable");
        assert_eq!(got.now, got.hard);
        assert!(got.before <= got.now);
    }
}
