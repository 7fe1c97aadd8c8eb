//! The error a handler returns to fail one event (or its `init`).
//!
//! [`Error`] is deliberately a plain message: it ends up in the dead-letter entry and in the operator's
//! view, so it must say what was wrong with the event. Any `std::error::Error` converts into it, so `?`
//! works on `serde_json`, `str::from_utf8`, number parsing and so on.

use std::fmt;

/// `Result` with [`Error`] as the default error type; `Result` alone means `Result<(), Error>`.
pub type Result<T = (), E = Error> = std::result::Result<T, E>;

/// Why a handler could not process one event (or could not start).
///
/// Build one with [`Error::msg`] or [`bail!`](crate::bail), or convert any `std::error::Error` with `?`.
/// Like `anyhow::Error`, it does not implement `std::error::Error` itself: that would conflict with the
/// blanket conversion that makes `?` work.
#[derive(Clone, PartialEq, Eq)]
pub struct Error {
    message: String,
}

impl Error {
    /// An error with this message.
    pub fn msg(message: impl fmt::Display) -> Self {
        Error {
            message: message.to_string(),
        }
    }

    /// The message, as the host will record it.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Prefixes the message with what was being done: `"{context}: {message}"`.
    #[must_use]
    pub fn context(self, context: impl fmt::Display) -> Self {
        Error {
            message: format!("{context}: {}", self.message),
        }
    }
}

impl<E: std::error::Error> From<E> for Error {
    fn from(error: E) -> Self {
        // Keep the whole chain: the dead-letter entry is often all an operator gets to see.
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        Error { message }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.message, f)
    }
}

/// Returns early with an [`Error`] built from a format string: `bail!("field {name} is missing")`.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => {
        return ::core::result::Result::Err($crate::Error::msg(::std::format!($($arg)*)))
    };
}
