//! [`AdminError`]: everything `tern admin` and the admin endpoint can report,
//! with the exit code and HTTP status each maps to.

use std::io;
use std::path::PathBuf;

use tern_storage::StoreError;

/// Why an admin command failed.
///
/// The message is written for the person at the terminal; [`run`] prints it
/// after `tern admin: `. [`exit_code`](Self::exit_code) gives the process
/// exit status, [`http_status`](Self::http_status) the endpoint's answer.
///
/// [`run`]: super::run
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// A running broker holds the store's lock.
    #[error(
        "the store at {} is locked by a running broker; \
         use --url http://127.0.0.1:PORT (its admin endpoint)",
        dir.display()
    )]
    Locked { dir: PathBuf },

    /// A running broker holds the store's lock, and the command would
    /// change the store: the admin endpoint is read-only.
    #[error(
        "the store at {} is locked by a running broker; {command} changes the store: \
         stop the broker first",
        dir.display()
    )]
    LockedForChange { dir: PathBuf, command: String },

    /// `--data-dir` names no directory (the store is never created).
    #[error(
        "no store at {}: the directory does not exist (pass the broker's data directory \
         with --data-dir)",
        dir.display()
    )]
    NoSuchDir { dir: PathBuf },

    /// `--data-dir` names a directory that holds no store.
    #[error("{} holds no Tern store (no database files in it)", dir.display())]
    NotAStore { dir: PathBuf },

    /// The store could not be opened (newer schema, corruption, I/O).
    #[error("cannot open the store at {}: {source}", dir.display())]
    Open {
        dir: PathBuf,
        #[source]
        source: StoreError,
    },

    /// The store is damaged: the broker refuses it, and so does `tern
    /// admin` unless asked to read it (`--read-damaged`).
    #[error(
        "{source}; to see what it still holds, add --read-damaged (read-only); \
         to serve it as it is, start the broker once with --accept-store-damage"
    )]
    Damaged {
        #[source]
        source: StoreError,
    },

    /// A store call failed.
    #[error(transparent)]
    Store(#[from] StoreError),

    /// The session or retained message asked for does not exist.
    #[error("{0}")]
    NotFound(String),

    /// The request is invalid (a bad filter or limit, a malformed URL path).
    #[error("{0}")]
    BadRequest(String),

    /// A write command was given `--url`: the endpoint never changes the
    /// store.
    #[error(
        "the admin endpoint is read-only; stop the broker, then run \
         tern admin --data-dir DIR {command}"
    )]
    ReadOnly { command: String },

    /// `--url` is not an `http://HOST:PORT` URL.
    #[error("unsupported URL {url:?}: {reason}")]
    BadUrl { url: String, reason: &'static str },

    /// The admin endpoint could not be reached or the exchange broke off.
    #[error("cannot reach the admin endpoint at {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: io::Error,
    },

    /// The admin endpoint answered with an error status.
    #[error("the admin endpoint at {url} answered {status}: {message}")]
    Http {
        url: String,
        status: u16,
        message: String,
    },

    /// The admin endpoint's answer is not the HTTP or JSON expected.
    #[error("bad response from the admin endpoint at {url}: {reason}")]
    BadResponse { url: String, reason: String },

    /// Writing the output failed (stdout closed, or the HTTP client gone).
    #[error("cannot write the output: {0}")]
    Output(#[from] io::Error),
}

impl AdminError {
    /// The process exit status: 1 when something asked for does not exist
    /// or an operation failed, 2 for usage errors, a locked or missing
    /// store, an unreachable endpoint and refused writes.
    pub fn exit_code(&self) -> u8 {
        match self {
            AdminError::NotFound(_)
            | AdminError::Store(_)
            | AdminError::Http { .. }
            | AdminError::BadResponse { .. }
            | AdminError::Output(_) => 1,
            AdminError::Locked { .. }
            | AdminError::LockedForChange { .. }
            | AdminError::NoSuchDir { .. }
            | AdminError::NotAStore { .. }
            | AdminError::Open { .. }
            | AdminError::Damaged { .. }
            | AdminError::BadRequest(_)
            | AdminError::ReadOnly { .. }
            | AdminError::BadUrl { .. }
            | AdminError::Unreachable { .. } => 2,
        }
    }

    /// The status the admin endpoint answers this error with.
    pub fn http_status(&self) -> u16 {
        match self {
            AdminError::NotFound(_) => 404,
            AdminError::BadRequest(_) => 400,
            _ => 500,
        }
    }

    /// True when the output's reader went away (`tern admin ... | head`):
    /// not worth a message.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, AdminError::Output(e) if e.kind() == io::ErrorKind::BrokenPipe)
    }
}
