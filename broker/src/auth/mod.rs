//! MQTT 5 enhanced authentication: the AUTH packet exchange, behind a small
//! mechanism trait.
//!
//! A client names a method in CONNECT (Authentication Method) and may send
//! initial data; the broker and the client then trade AUTH packets (reason
//! 0x18, continue) until the mechanism says yes (CONNACK 0x00) or no (CONNACK
//! 0x87). After CONNECT, a client may start again with AUTH 0x19
//! (re-authenticate); success is then AUTH 0x00, failure DISCONNECT 0x87.
//!
//! Mechanisms know nothing of packets: they turn the client's data into the
//! next step. Built in: SCRAM-SHA-256 ([`scram`]) against the configured
//! user list.

pub mod scram;

use bytes::Bytes;

use crate::config::AuthConfig;

/// One step of an exchange, as the mechanism decides it.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthStep {
    /// Send this data to the client in AUTH 0x18 and wait for its answer.
    Continue(Bytes),
    /// Authenticated as this user; send the data (if any) in the final
    /// CONNACK or AUTH 0x00.
    Success { user: String, data: Option<Bytes> },
    /// Refused.
    Failure,
}

/// An authentication method a client may name in CONNECT.
pub trait AuthMechanism: Send + Sync {
    /// The Authentication Method string, e.g. `SCRAM-SHA-256`.
    fn name(&self) -> &'static str;
    /// Begins an exchange for one connection.
    fn start(&self) -> Box<dyn AuthExchange>;
}

/// The state of one exchange in progress.
pub trait AuthExchange: Send {
    /// Feeds the client's Authentication Data (from CONNECT or AUTH).
    fn step(&mut self, data: Option<&[u8]>) -> AuthStep;
}

/// The mechanisms this broker offers.
pub struct Authenticator {
    mechanisms: Vec<Box<dyn AuthMechanism>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.mechanisms.iter().map(|m| m.name()).collect();
        f.debug_struct("Authenticator")
            .field("mechanisms", &names)
            .finish()
    }
}

impl Authenticator {
    /// The built-in mechanisms over the configured users.
    pub fn from_config(config: &AuthConfig) -> Authenticator {
        Authenticator {
            mechanisms: vec![Box::new(scram::ScramSha256::new(&config.users))],
        }
    }

    /// Starts an exchange for `method`, or `None` if it is not offered.
    pub fn start(&self, method: &[u8]) -> Option<Box<dyn AuthExchange>> {
        self.mechanisms
            .iter()
            .find(|m| m.name().as_bytes() == method)
            .map(|m| m.start())
    }
}
