//! A password or other secret from the command line, the environment or a
//! file: never printed by `Debug` (flags and configurations are logged).

use std::path::Path;

/// A secret string. `Debug` shows `<redacted>`; [`Secret::expose`] is the
/// one way to read it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself, for the one call that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Reads a secret from a file: its whole content less one trailing
    /// newline (`echo pw > file` works). An empty secret is refused.
    pub fn from_file(path: &Path) -> std::io::Result<Self> {
        let mut s = std::fs::read_to_string(path)?;
        if s.ends_with('\n') {
            s.pop();
            if s.ends_with('\r') {
                s.pop();
            }
        }
        if s.is_empty() {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "the file is empty"));
        }
        Ok(Self(s))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_secret() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert!(!format!("{:?}", Some(s.clone())).contains("hunter2"));
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn a_file_loses_one_trailing_newline_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pw");
        for (content, want) in [("pw\n", "pw"), ("pw\r\n", "pw"), ("pw", "pw"), (" pw \n\n", " pw \n")] {
            std::fs::write(&path, content).expect("write");
            assert_eq!(Secret::from_file(&path).expect("read").expose(), want, "{content:?}");
        }
        std::fs::write(&path, "\n").expect("write");
        assert!(Secret::from_file(&path).is_err(), "empty");
        assert!(Secret::from_file(&dir.path().join("missing")).is_err());
    }
}
