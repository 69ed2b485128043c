//! One error type for orchestration: a one-line message (what, why, how to fix,
//! with the device path) and the exit code it maps to.

use crate::exit;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Process exit code (see [`crate::exit`]).
    pub code: u8,
    pub message: String,
    /// The codes of a preflight's blockers (as `check --json` names them), each once,
    /// in order: kept with the refusal for an agent to act on. Empty otherwise.
    pub blockers: Vec<String>,
}

impl Failure {
    pub fn new(code: u8, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
            blockers: Vec::new(),
        }
    }
    /// With the codes of the blockers it reports (duplicates dropped).
    pub fn with_codes(mut self, codes: &[&str]) -> Failure {
        for c in codes {
            if !self.blockers.iter().any(|b| b == c) {
                self.blockers.push(c.to_string());
            }
        }
        self
    }
    /// A general failure (exit 1).
    pub fn failed(message: impl Into<String>) -> Failure {
        Failure::new(exit::FAILED, message)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

impl From<crate::lock::LockError> for Failure {
    fn from(e: crate::lock::LockError) -> Failure {
        let code = match e {
            crate::lock::LockError::Busy { .. } => exit::BUSY,
            crate::lock::LockError::Io { .. } | crate::lock::LockError::OpenToOthers { .. } => {
                exit::FAILED
            }
        };
        Failure::new(code, e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, Failure>;

/// Runs an external tool, returning its stdout; failures carry its stderr on one line.
pub fn run_tool(cmd: &mut std::process::Command, why: &str) -> Result<String> {
    // The program and its arguments (not the environment, which Debug shows first:
    // "cannot run LC_ALL=C resize2fs ...").
    let shown = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let out = cmd.output().map_err(|e| {
        Failure::failed(format!(
            "cannot run {shown} ({e}) to {why}; install it (util-linux, e2fsprogs)"
        ))
    })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let err = err.trim().replace('\n', " | ");
        return Err(Failure::failed(format!(
            "{shown} failed ({}) while trying to {why}: {err}",
            out.status
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
