//! Who may connect and what they may do: the `[auth]` section in force.
//!
//! An [`AuthRules`] holds the users, the anonymous rule, the enhanced
//! authentication mechanisms over those users and the compiled ACL, as one
//! value: a connection's handshake takes the current one once
//! ([`Broker::auth_rules`](crate::broker::Broker::auth_rules)) and decides
//! everything with it, so a reload never mixes old users with new rules.
//!
//! `tern serve` reloads `[auth]` from its configuration file on SIGHUP
//! ([`Broker::reload_auth`](crate::broker::Broker::reload_auth)). New
//! connections use the new rules at once. A client already connected keeps
//! running if the new rules would let it in with the same credentials and
//! give it the same permissions (its compiled [`ClientAcl`] is equal), and
//! is disconnected (MQTT 5: 0x87 Not authorized) otherwise, so that it
//! reconnects under the new rules. The broker does not keep the passwords
//! clients sent, so it judges their credentials by the user's entry: a user
//! whose entry is gone or whose password changed is disconnected, and sent
//! nothing more than its DISCONNECT (a client whose permissions changed is
//! first written what was already queued for it). A will
//! is checked against the rules in force when it is published
//! (`Broker::publish_will_of`).

use std::sync::Arc;

use crate::acl::{Acl, ClientAcl};
use crate::auth::Authenticator;
use crate::config::{AuthConfig, UserEntry};

/// The `[auth]` rules in force. See the module documentation.
#[derive(Debug)]
pub struct AuthRules {
    pub config: AuthConfig,
    pub authenticator: Authenticator,
    /// `None` without `[[auth.acl]]` rules: everything is allowed.
    pub acl: Option<Acl>,
}

/// How a connected client was let in, kept with its connection so that a
/// reload can judge it again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Login {
    /// The user it proved (`Authenticated::proven`), the ACL's `%u`.
    pub user: Option<Arc<str>>,
    pub by: Credential,
}

/// What a client's admission rested on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Credential {
    /// No user name; let in by `allow_anonymous`.
    #[default]
    Anonymous,
    /// A user name nothing was checked against (no users configured and
    /// `allow_anonymous`).
    Unchecked,
    /// A user name and password checked against `[[auth.users]]`.
    Password,
    /// MQTT 5 enhanced authentication over `[[auth.users]]`.
    Enhanced,
    /// A client certificate on MQTT/TLS (`listeners.tls_client_ca`); `[auth]`
    /// does not judge it.
    Certificate,
}

impl AuthRules {
    /// The rules of `config`.
    pub fn new(config: &AuthConfig) -> AuthRules {
        AuthRules {
            config: config.clone(),
            authenticator: Authenticator::from_config(config),
            acl: Acl::from_rules(&config.acl),
        }
    }

    /// The permissions of `client_id` logged in as `user`; `None` without
    /// ACL rules.
    pub fn client_acl(&self, user: Option<&str>, client_id: &str) -> Option<ClientAcl> {
        self.acl.as_ref().map(|acl| acl.for_client(user, client_id))
    }

    /// Why `next` would not let a client in that these rules let in as
    /// `login`, or give it other permissions; `None` if it may stay.
    pub fn revoked_by(
        &self,
        next: &AuthRules,
        login: &Login,
        client_id: &str,
    ) -> Option<Revocation> {
        let user = login.user.as_deref();
        let admitted = match login.by {
            Credential::Anonymous => next.config.allow_anonymous,
            Credential::Unchecked => next.config.users.is_empty() && next.config.allow_anonymous,
            Credential::Password | Credential::Enhanced => user.is_some_and(|name| {
                let entries = |users: &[UserEntry]| -> Vec<String> {
                    let mut passwords: Vec<String> = users
                        .iter()
                        .filter(|u| u.name == name)
                        .map(|u| u.password.clone())
                        .collect();
                    passwords.sort();
                    passwords
                };
                let now = entries(&next.config.users);
                !now.is_empty() && now == entries(&self.config.users)
            }),
            Credential::Certificate => true,
        };
        if !admitted {
            return Some(Revocation::Credentials);
        }
        if self.client_acl(user, client_id) != next.client_acl(user, client_id) {
            return Some(Revocation::Permissions);
        }
        None
    }
}

/// Why a reload disconnects a connected client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revocation {
    /// The new rules would not let it in: it is sent nothing more but its
    /// DISCONNECT (what was queued for it stays with its session, see
    /// `ConnectionControl::close_withholding`).
    Credentials,
    /// It would get other permissions: it reconnects under them, after
    /// what was already queued for it is written.
    Permissions,
}

impl std::fmt::Display for Revocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Revocation::Credentials => "its credentials are no longer accepted",
            Revocation::Permissions => "its permissions changed",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn rules(toml: &str) -> AuthRules {
        AuthRules::new(&Config::from_toml(toml).unwrap().auth)
    }

    fn login(user: Option<&str>, by: Credential) -> Login {
        Login {
            user: user.map(Arc::from),
            by,
        }
    }

    const USERS: &str = "[auth]\nallow_anonymous = true\n\
        [[auth.users]]\nname = \"a\"\npassword = \"1\"\n\
        [[auth.users]]\nname = \"b\"\npassword = \"2\"\n";

    #[test]
    fn credentials_are_judged_by_the_user_entry() {
        let before = rules(USERS);
        let after = rules(
            "[auth]\nallow_anonymous = false\n\
             [[auth.users]]\nname = \"a\"\npassword = \"1\"\n\
             [[auth.users]]\nname = \"b\"\npassword = \"changed\"\n",
        );
        let a = login(Some("a"), Credential::Password);
        assert_eq!(before.revoked_by(&after, &a, "c"), None);
        let b = login(Some("b"), Credential::Enhanced);
        assert_eq!(
            before.revoked_by(&after, &b, "c"),
            Some(Revocation::Credentials)
        );
        let anonymous = login(None, Credential::Anonymous);
        assert_eq!(
            before.revoked_by(&after, &anonymous, "c"),
            Some(Revocation::Credentials)
        );
        assert_eq!(before.revoked_by(&before, &anonymous, "c"), None);
        let gone = rules("[auth]\nallow_anonymous = true\n");
        assert!(before.revoked_by(&gone, &a, "c").is_some());
        let certificate = login(Some("device-1"), Credential::Certificate);
        assert_eq!(before.revoked_by(&gone, &certificate, "c"), None);
    }

    #[test]
    fn a_user_name_nothing_checked_stays_only_while_nothing_is_checked() {
        let open = rules("[auth]\nallow_anonymous = true\n");
        let unchecked = login(None, Credential::Unchecked);
        assert_eq!(open.revoked_by(&open, &unchecked, "c"), None);
        assert!(open.revoked_by(&rules(USERS), &unchecked, "c").is_some());
    }

    #[test]
    fn only_clients_whose_permissions_change_are_revoked() {
        let before = rules(&format!(
            "{USERS}[[auth.acl]]\nuser = \"a\"\ntopic = \"a/#\"\naccess = \"all\"\n"
        ));
        let after = rules(&format!(
            "{USERS}[[auth.acl]]\nuser = \"a\"\ntopic = \"a/#\"\naccess = \"all\"\n\
             [[auth.acl]]\nuser = \"b\"\ntopic = \"b/#\"\naccess = \"all\"\n"
        ));
        let a = login(Some("a"), Credential::Password);
        let b = login(Some("b"), Credential::Password);
        assert_eq!(before.revoked_by(&after, &a, "c"), None);
        assert_eq!(
            before.revoked_by(&after, &b, "c"),
            Some(Revocation::Permissions)
        );
        // Rules where there were none (or none where there were) change
        // everybody's.
        let open = rules(USERS);
        assert!(open.revoked_by(&before, &a, "c").is_some());
        // The same rules in another order, one repeated: nobody's change.
        let reordered = rules(&format!(
            "{USERS}[[auth.acl]]\nuser = \"b\"\ntopic = \"b/#\"\naccess = \"all\"\n\
             [[auth.acl]]\nuser = \"a\"\ntopic = \"a/#\"\naccess = \"all\"\n\
             [[auth.acl]]\nuser = \"b\"\ntopic = \"b/#\"\naccess = \"all\"\n"
        ));
        assert_eq!(after.revoked_by(&reordered, &b, "c"), None);
    }
}
