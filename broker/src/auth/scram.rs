//! SCRAM-SHA-256 (RFC 5802, RFC 7677) as an MQTT 5 enhanced authentication
//! method: the password never crosses the wire, and the client verifies the
//! server too.
//!
//! ```text
//! CONNECT  method=SCRAM-SHA-256 data="n,,n=user,r=<client nonce>"
//! AUTH 18  data="r=<client nonce><server nonce>,s=<salt>,i=<iterations>"
//! AUTH 18  data="c=biws,r=<nonce>,p=<client proof>"
//! CONNACK  data="v=<server signature>"
//! ```
//!
//! Per user, only the salted keys (StoredKey, ServerKey) are kept; they are
//! derived once at start from the configured password with a fresh random
//! salt. An unknown user gets a well-formed exchange with a made-up salt and
//! fails at the proof, so user names cannot be probed.

use std::collections::HashMap;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::{AuthExchange, AuthMechanism, AuthStep};
use crate::config::UserEntry;

/// PBKDF2 iterations for the salted password (RFC 7677 recommends at least
/// 4096).
pub const ITERATIONS: u32 = 4096;

/// Bytes of randomness in a server nonce and a salt.
const NONCE_LEN: usize = 18;
const SALT_LEN: usize = 16;

/// A client message longer than this is refused (nothing legitimate is).
const MAX_MESSAGE_LEN: usize = 1024;

struct Credentials {
    salt: Vec<u8>,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

/// The SCRAM-SHA-256 mechanism over a fixed set of users.
pub struct ScramSha256 {
    users: Arc<HashMap<String, Credentials>>,
}

impl ScramSha256 {
    /// Derives the keys of every user (PBKDF2, once, at start).
    pub fn new(users: &[UserEntry]) -> ScramSha256 {
        let users = users
            .iter()
            .map(|u| {
                let salt = random_bytes(SALT_LEN);
                let salted = salted_password(u.password.as_bytes(), &salt, ITERATIONS);
                let client_key = hmac(&salted, b"Client Key");
                let credentials = Credentials {
                    salt,
                    stored_key: Sha256::digest(client_key).into(),
                    server_key: hmac(&salted, b"Server Key"),
                };
                (u.name.clone(), credentials)
            })
            .collect();
        ScramSha256 {
            users: Arc::new(users),
        }
    }
}

impl AuthMechanism for ScramSha256 {
    fn name(&self) -> &'static str {
        "SCRAM-SHA-256"
    }

    fn start(&self) -> Box<dyn AuthExchange> {
        Box::new(ScramExchange {
            users: Arc::clone(&self.users),
            state: State::AwaitClientFirst,
        })
    }
}

enum State {
    AwaitClientFirst,
    AwaitClientFinal {
        user: String,
        nonce: String,
        client_first_bare: String,
        server_first: String,
    },
    Done,
}

struct ScramExchange {
    users: Arc<HashMap<String, Credentials>>,
    state: State,
}

impl AuthExchange for ScramExchange {
    fn step(&mut self, data: Option<&[u8]>) -> AuthStep {
        let state = std::mem::replace(&mut self.state, State::Done);
        let Some(text) = data
            .filter(|d| d.len() <= MAX_MESSAGE_LEN)
            .and_then(|d| std::str::from_utf8(d).ok())
        else {
            return AuthStep::Failure;
        };
        match state {
            State::AwaitClientFirst => self.client_first(text),
            State::AwaitClientFinal {
                user,
                nonce,
                client_first_bare,
                server_first,
            } => self.client_final(text, &user, &nonce, &client_first_bare, &server_first),
            State::Done => AuthStep::Failure,
        }
    }
}

impl ScramExchange {
    fn client_first(&mut self, text: &str) -> AuthStep {
        // gs2 header: no channel binding ("n" or "y"), no authzid.
        let bare = match text
            .strip_prefix("n,,")
            .or_else(|| text.strip_prefix("y,,"))
        {
            Some(bare) => bare,
            None => return AuthStep::Failure,
        };
        let (Some(user), Some(client_nonce)) = (attribute(bare, 'n'), attribute(bare, 'r')) else {
            return AuthStep::Failure;
        };
        if client_nonce.is_empty() || client_nonce.contains(',') {
            return AuthStep::Failure;
        }
        let user = user.replace("=2C", ",").replace("=3D", "=");
        let salt = match self.users.get(&user) {
            Some(c) => B64.encode(&c.salt),
            // Unknown user: carry on with a random salt; the proof will fail.
            None => B64.encode(random_bytes(SALT_LEN)),
        };
        let nonce = format!("{client_nonce}{}", B64.encode(random_bytes(NONCE_LEN)));
        let server_first = format!("r={nonce},s={salt},i={ITERATIONS}");
        self.state = State::AwaitClientFinal {
            user,
            nonce,
            client_first_bare: bare.to_owned(),
            server_first: server_first.clone(),
        };
        AuthStep::Continue(Bytes::from(server_first))
    }

    fn client_final(
        &mut self,
        text: &str,
        user: &str,
        nonce: &str,
        client_first_bare: &str,
        server_first: &str,
    ) -> AuthStep {
        let Some((without_proof, proof)) = text.rsplit_once(",p=") else {
            return AuthStep::Failure;
        };
        if attribute(without_proof, 'r') != Some(nonce) {
            return AuthStep::Failure;
        }
        let Some(credentials) = self.users.get(user) else {
            return AuthStep::Failure;
        };
        let Ok(proof) = B64.decode(proof) else {
            return AuthStep::Failure;
        };
        if proof.len() != 32 {
            return AuthStep::Failure;
        }
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let client_signature = hmac(&credentials.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for (i, byte) in client_key.iter_mut().enumerate() {
            *byte = proof[i] ^ client_signature[i];
        }
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        if !constant_time_eq(&stored, &credentials.stored_key) {
            return AuthStep::Failure;
        }
        let server_signature = hmac(&credentials.server_key, auth_message.as_bytes());
        AuthStep::Success {
            user: user.to_owned(),
            data: Some(Bytes::from(format!("v={}", B64.encode(server_signature)))),
        }
    }
}

/// The value of `key=` in a comma-separated SCRAM message.
fn attribute(message: &str, key: char) -> Option<&str> {
    message.split(',').find_map(|part| {
        let mut chars = part.chars();
        (chars.next() == Some(key) && chars.next() == Some('=')).then(|| &part[2..])
    })
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut out = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut out);
    out
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    // The OS generator does not fail on Linux once booted; if it ever did,
    // refusing to start an exchange is the safe outcome, and an all-zero
    // nonce would still not authenticate anyone without the password.
    if getrandom::fill(&mut buf).is_err() {
        tracing::error!("the OS random generator failed");
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677 section 3 test vector (user "user", password "pencil").
    #[test]
    fn rfc7677_vector() {
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let salted = salted_password(b"pencil", &salt, 4096);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let auth_message = "n=user,r=rOprNGfwEbeRWgbNEkqO,\
            r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,\
            c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        let client_signature = hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(client_signature)
            .map(|(a, b)| a ^ b)
            .collect();
        assert_eq!(
            B64.encode(proof),
            "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        let server_signature = hmac(&hmac(&salted, b"Server Key"), auth_message.as_bytes());
        assert_eq!(
            B64.encode(server_signature),
            "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
    }

    #[test]
    fn garbage_fails_without_panicking() {
        let m = ScramSha256::new(&[]);
        for input in [
            &b""[..],
            b"n,,",
            b"x,,n=a,r=b",
            b"n,,n=a",
            &[0xFF; 4],
            &[b'a'; 5000],
        ] {
            let mut e = m.start();
            assert_eq!(e.step(Some(input)), AuthStep::Failure, "{input:?}");
        }
        let mut e = m.start();
        assert_eq!(e.step(None), AuthStep::Failure);
    }
}
