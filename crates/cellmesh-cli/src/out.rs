//! Everything the CLI prints goes through here, so that a write that fails (a closed pipe, a
//! full disk, a terminal gone) is an error the command stops on, never a panic: each write is
//! flushed at once, and its error is an [`OutputError`].
//!
//! `main` prints an [`OutputError`] as one line on stderr (when stderr still works) and
//! exits 1; stdout closed by its reader (`cellmesh listen | head -n 1`) exits 1 without a
//! line. That needs SIGPIPE ignored, as Rust's runtime sets it before `main`: keep it so,
//! or a closed pipe kills the process mid-command instead. A command that must undo or explain something when its output fails (`create-cell`)
//! makes its own error instead.

use std::fmt;
use std::io::{self, Write as _};

use serde_json::Value;

/// Writing to stdout or stderr failed.
#[derive(Debug)]
pub(crate) struct OutputError {
    stream: &'static str,
    source: io::Error,
}

impl OutputError {
    /// Whether stdout's reader went away: nobody is left to tell.
    pub(crate) fn stdout_closed(&self) -> bool {
        self.stream == "stdout" && self.source.kind() == io::ErrorKind::BrokenPipe
    }
}

impl fmt::Display for OutputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot write to {}", self.stream)
    }
}

impl std::error::Error for OutputError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Writes `text` to stdout as it is and flushes it.
pub(crate) fn stdout(text: &str) -> Result<(), OutputError> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|source| OutputError {
            stream: "stdout",
            source,
        })
}

/// Writes `text` to stderr as it is (stderr is not buffered).
pub(crate) fn stderr(text: &str) -> Result<(), OutputError> {
    let mut err = io::stderr().lock();
    err.write_all(text.as_bytes())
        .and_then(|()| err.flush())
        .map_err(|source| OutputError {
            stream: "stderr",
            source,
        })
}

/// Prints one result per line: a JSON object (`--json`) or a line of text.
#[derive(Clone, Copy)]
pub(crate) struct Printer {
    pub(crate) json: bool,
}

impl Printer {
    /// Returns once the line is written and flushed.
    pub(crate) fn line(&self, json: Value, text: impl fmt::Display) -> Result<(), OutputError> {
        if self.json {
            stdout(&format!("{json}\n"))
        } else {
            stdout(&format!("{text}\n"))
        }
    }
}
