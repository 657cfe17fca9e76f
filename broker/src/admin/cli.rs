//! `tern admin`: the command line, and the two ways it reads the store.
//!
//! Offline (`--data-dir DIR`, the default `data`) it opens the store of a
//! stopped broker; online (`--url http://127.0.0.1:PORT`) it asks a running
//! broker's admin endpoint. Both sit behind [`Backend`] and return the same
//! [`model`](super::model) values, which [`render`] prints, so the output is
//! the same either way. Only the offline backend writes (`delete-session`,
//! `compact`); the endpoint is read-only.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use tern_storage::{OnDamage, SledStore, Store, StoreError};

use super::client::{percent_encode, Client};
use super::error::AdminError;
use super::model::{
    self, QueueView, RetainedRow, RetainedView, SessionRow, SessionView, StatsView,
};
use super::render::{self, Rows};

/// Inspect the broker's durable store: a stopped broker's data directory,
/// or a running broker through its read-only admin endpoint.
#[derive(Args, Debug, Clone)]
pub struct AdminArgs {
    /// Data directory of a STOPPED broker (opened directly; never created).
    #[arg(long, value_name = "DIR", default_value = "data", global = true)]
    pub data_dir: PathBuf,

    /// Admin endpoint of a RUNNING broker, e.g. http://127.0.0.1:8081
    /// (read-only).
    #[arg(long, value_name = "URL", global = true, conflicts_with = "data_dir")]
    pub url: Option<String>,

    /// Open a store the broker refuses as damaged, read-only, to see what
    /// it still holds before accepting the loss (the broker's start keeps
    /// refusing it). Also for a store of an older schema, read without
    /// being upgraded.
    #[arg(long, global = true, conflicts_with = "url")]
    pub read_damaged: bool,

    /// Print one JSON value instead of a table.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: AdminCommand,
}

/// What `tern admin` shows or does.
#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum AdminCommand {
    /// List sessions: client id, protocol, expiry, last seen, queue depth,
    /// in flight, subscriptions.
    Sessions,
    /// Show one session: its record, will, subscriptions and queue counts.
    Session {
        /// The session's client id.
        client_id: String,
    },
    /// List a session's queue in delivery order.
    Queue {
        /// The session's client id.
        client_id: String,
        /// Most entries to show (1 to 10000).
        #[arg(long, default_value_t = model::DEFAULT_QUEUE_LIMIT,
              value_parser = clap::value_parser!(u32).range(1..=i64::from(model::MAX_QUEUE_LIMIT)))]
        limit: u32,
    },
    /// List retained messages whose topic matches an MQTT filter.
    Retained {
        /// Topic filter; `+` and `#` are wildcards.
        #[arg(long, default_value = model::DEFAULT_RETAINED_FILTER)]
        filter: String,
    },
    /// Show one retained message with its payload (UTF-8 text, else base64).
    RetainedShow {
        /// The exact topic.
        topic: String,
    },
    /// Show store statistics: keys, bytes, space amplification, counts.
    Stats,
    /// Write the whole store as one JSON document (payloads in base64).
    Export,
    /// Delete a session and everything it owns (stopped broker only).
    DeleteSession {
        /// The session's client id.
        client_id: String,
    },
    /// Rewrite the store into fresh files that hold only its live data,
    /// then show statistics (stopped broker only; Linux).
    Compact,
}

impl AdminCommand {
    /// Whether the command changes the store.
    fn writes(&self) -> bool {
        matches!(
            self,
            AdminCommand::DeleteSession { .. } | AdminCommand::Compact
        )
    }

    /// The command as typed.
    fn name(&self) -> &'static str {
        match self {
            AdminCommand::Sessions => "sessions",
            AdminCommand::Session { .. } => "session",
            AdminCommand::Queue { .. } => "queue",
            AdminCommand::Retained { .. } => "retained",
            AdminCommand::RetainedShow { .. } => "retained-show",
            AdminCommand::Stats => "stats",
            AdminCommand::Export => "export",
            AdminCommand::DeleteSession { .. } => "delete-session",
            AdminCommand::Compact => "compact",
        }
    }
}

impl AdminArgs {
    /// Parses `tern admin` arguments; the first item is the program name.
    /// For tests and tools; the `tern` binary parses them as a subcommand.
    pub fn try_parse_from<I, T>(args: I) -> Result<AdminArgs, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::FromArgMatches;
        let command = AdminArgs::augment_args(clap::Command::new("tern admin"));
        let matches = command.try_get_matches_from(args)?;
        AdminArgs::from_arg_matches(&matches)
    }
}

/// Runs `tern admin`: output on stdout, errors on stderr after
/// `tern admin: `. Exit status 0 ok, 1 not found or failed, 2 usage, locked
/// or missing store, unreachable endpoint, refused write.
pub fn run(args: AdminArgs) -> ExitCode {
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    let result = execute(&args, &mut out).and_then(|()| out.flush().map_err(AdminError::from));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is_broken_pipe() => ExitCode::SUCCESS,
        Err(e) => {
            // The output so far goes out before the error.
            let _ = out.flush();
            eprintln!("tern admin: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Runs the command of `args`, writing its output to `out`.
pub fn execute(args: &AdminArgs, out: &mut dyn Write) -> Result<(), AdminError> {
    match &args.url {
        Some(url) => dispatch(&mut Online::new(url)?, &args.command, args.json, out),
        None => {
            if args.read_damaged && args.command.writes() {
                return Err(AdminError::BadRequest(format!(
                    "{} changes the store, which --read-damaged opens read-only",
                    args.command.name()
                )));
            }
            let mut backend =
                Offline::open(&args.data_dir, args.read_damaged).map_err(|e| match e {
                    AdminError::Locked { dir } if args.command.writes() => {
                        AdminError::LockedForChange {
                            dir,
                            command: args.command.name().to_owned(),
                        }
                    }
                    other => other,
                })?;
            dispatch(&mut backend, &args.command, args.json, out)
        }
    }
}

/// Runs one command against a backend and renders its answer.
fn dispatch(
    backend: &mut dyn Backend,
    command: &AdminCommand,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), AdminError> {
    match command {
        AdminCommand::Sessions => render::sessions(out, backend.sessions()?, json),
        AdminCommand::Session { client_id } => {
            render::session(out, &backend.session(client_id)?, json)
        }
        AdminCommand::Queue { client_id, limit } => {
            render::queue(out, &backend.queue(client_id, *limit)?, json)
        }
        AdminCommand::Retained { filter } => {
            model::check_retained_filter(filter)?;
            render::retained(out, backend.retained(filter)?, json)
        }
        AdminCommand::RetainedShow { topic } => {
            render::retained_show(out, &backend.retained_show(topic)?, json)
        }
        AdminCommand::Stats => render::stats(out, &backend.stats()?, json),
        AdminCommand::Export => backend.export(out),
        AdminCommand::DeleteSession { client_id } => {
            backend.delete_session(client_id)?;
            render::deleted(out, client_id, json)
        }
        AdminCommand::Compact => render::stats(out, &backend.compact()?, json),
    }
}

/// Where the views come from: the store itself, or the admin endpoint.
trait Backend {
    fn sessions(&self) -> Result<Rows<'_, SessionRow>, AdminError>;
    fn session(&self, client_id: &str) -> Result<SessionView, AdminError>;
    fn queue(&self, client_id: &str, limit: u32) -> Result<QueueView, AdminError>;
    /// `filter` has passed [`model::check_retained_filter`].
    fn retained<'a>(&'a self, filter: &'a str) -> Result<Rows<'a, RetainedRow>, AdminError>;
    fn retained_show(&self, topic: &str) -> Result<RetainedView, AdminError>;
    fn stats(&self) -> Result<StatsView, AdminError>;
    fn export(&self, out: &mut dyn Write) -> Result<(), AdminError>;
    fn delete_session(&self, client_id: &str) -> Result<(), AdminError>;
    /// Rewrites the store into files that hold only its live data.
    fn compact(&mut self) -> Result<StatsView, AdminError>;
}

/// The store of a stopped broker, opened directly.
struct Offline {
    store: SledStore,
}

impl Offline {
    /// Opens the store in `dir`, which must exist and hold a store: an
    /// admin command never creates one. `read_damaged`: read-only, and
    /// opened even when damaged (`OnDamage::Inspect`).
    fn open(dir: &Path, read_damaged: bool) -> Result<Offline, AdminError> {
        if !dir.is_dir() {
            return Err(AdminError::NoSuchDir {
                dir: dir.to_path_buf(),
            });
        }
        if !dir.join("db").is_file() || !dir.join("conf").is_file() {
            return Err(AdminError::NotAStore {
                dir: dir.to_path_buf(),
            });
        }
        let on_damage = if read_damaged {
            OnDamage::Inspect
        } else {
            OnDamage::Refuse
        };
        let store = SledStore::open_with(dir, on_damage).map_err(|e| match e {
            StoreError::Locked { .. } => AdminError::Locked {
                dir: dir.to_path_buf(),
            },
            source @ StoreError::Damaged { .. } => AdminError::Damaged { source },
            source => AdminError::Open {
                dir: dir.to_path_buf(),
                source,
            },
        })?;
        Ok(Offline { store })
    }
}

impl Backend for Offline {
    fn sessions(&self) -> Result<Rows<'_, SessionRow>, AdminError> {
        Ok(Box::new(model::session_rows(&self.store)))
    }

    fn session(&self, client_id: &str) -> Result<SessionView, AdminError> {
        model::session_view(&self.store, client_id)
    }

    fn queue(&self, client_id: &str, limit: u32) -> Result<QueueView, AdminError> {
        model::queue_view(&self.store, client_id, limit)
    }

    fn retained<'a>(&'a self, filter: &'a str) -> Result<Rows<'a, RetainedRow>, AdminError> {
        Ok(Box::new(model::retained_rows(&self.store, filter)))
    }

    fn retained_show(&self, topic: &str) -> Result<RetainedView, AdminError> {
        model::retained_view(&self.store, topic)
    }

    fn stats(&self) -> Result<StatsView, AdminError> {
        Ok(self.store.stats()?.into())
    }

    fn export(&self, out: &mut dyn Write) -> Result<(), AdminError> {
        model::write_export(&self.store, out)
    }

    fn delete_session(&self, client_id: &str) -> Result<(), AdminError> {
        if self.store.session(client_id)?.is_none() {
            return Err(model::no_session(client_id));
        }
        self.store.delete_session(client_id)?;
        Ok(self.store.sync()?)
    }

    fn compact(&mut self) -> Result<StatsView, AdminError> {
        self.store.rewrite()?;
        Ok(self.store.stats()?.into())
    }
}

/// A running broker's admin endpoint.
struct Online {
    client: Client,
}

impl Online {
    fn new(url: &str) -> Result<Online, AdminError> {
        Ok(Online {
            client: Client::new(url)?,
        })
    }

    fn session_path(client_id: &str) -> String {
        format!("/v1/sessions/{}", percent_encode(client_id, false))
    }
}

impl Backend for Online {
    fn sessions(&self) -> Result<Rows<'_, SessionRow>, AdminError> {
        let rows: Vec<SessionRow> = self.client.get_json("/v1/sessions")?;
        Ok(Box::new(rows.into_iter().map(Ok)))
    }

    fn session(&self, client_id: &str) -> Result<SessionView, AdminError> {
        self.client.get_json(&Online::session_path(client_id))
    }

    fn queue(&self, client_id: &str, limit: u32) -> Result<QueueView, AdminError> {
        let path = format!("{}/queue?limit={limit}", Online::session_path(client_id));
        self.client.get_json(&path)
    }

    fn retained<'a>(&'a self, filter: &'a str) -> Result<Rows<'a, RetainedRow>, AdminError> {
        let path = format!("/v1/retained?filter={}", percent_encode(filter, false));
        let rows: Vec<RetainedRow> = self.client.get_json(&path)?;
        Ok(Box::new(rows.into_iter().map(Ok)))
    }

    fn retained_show(&self, topic: &str) -> Result<RetainedView, AdminError> {
        let path = format!("/v1/retained/{}", percent_encode(topic, true));
        self.client.get_json(&path)
    }

    fn stats(&self) -> Result<StatsView, AdminError> {
        self.client.get_json("/v1/stats")
    }

    fn export(&self, out: &mut dyn Write) -> Result<(), AdminError> {
        self.client.get_to("/v1/export", out)
    }

    fn delete_session(&self, client_id: &str) -> Result<(), AdminError> {
        Err(AdminError::ReadOnly {
            command: format!("delete-session {client_id}"),
        })
    }

    fn compact(&mut self) -> Result<StatsView, AdminError> {
        Err(AdminError::ReadOnly {
            command: "compact".to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_parse() {
        let a = AdminArgs::try_parse_from(["tern admin", "sessions"]).unwrap();
        assert_eq!(a.data_dir, PathBuf::from("data"));
        assert!(a.url.is_none() && !a.json);
        let a = AdminArgs::try_parse_from(["x", "queue", "c", "--json", "--limit", "5"]).unwrap();
        assert_eq!(
            a.command,
            AdminCommand::Queue {
                client_id: "c".into(),
                limit: 5
            }
        );
        assert!(a.json);
        let a = AdminArgs::try_parse_from(["x", "--url", "http://h:1", "retained"]).unwrap();
        assert_eq!(a.command, AdminCommand::Retained { filter: "#".into() });
        assert!(AdminArgs::try_parse_from(["x", "queue", "c", "--limit", "0"]).is_err());
        assert!(AdminArgs::try_parse_from(["x", "queue", "c", "--limit", "10001"]).is_err());
        assert!(AdminArgs::try_parse_from([
            "x",
            "--url",
            "http://h:1",
            "--data-dir",
            "d",
            "stats"
        ])
        .is_err());
    }
}
