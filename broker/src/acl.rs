//! Topic permissions (`[[auth.acl]]`): which client may publish to which
//! topics, and subscribe to which filters.
//!
//! Without rules every client may do everything (and nothing here runs).
//! With rules, everything not allowed by one is refused:
//!
//! - a PUBLISH to topic T needs a rule with `publish` (or `all`) access
//!   whose filter matches T (a will's topic is checked at CONNECT);
//! - a SUBSCRIBE to filter F (the filter of `$share/{group}/F`) needs a rule
//!   with `subscribe` (or `all`) access whose filter *covers* F: matches
//!   every topic F can match (`a/#` covers `a/+/c`; `a/+` does not cover
//!   `a/#`). Deliveries then need no check: a subscription only ever
//!   receives topics its filter matches.
//!
//! A rule applies to a client when its `user` and `client_id` (each
//! optional) are the client's. The user is the one the client proved: by
//! password (`[[auth.users]]`), or by enhanced authentication; a user name
//! no password was checked against is no user here. In its filter a level
//! that is exactly `%u` or `%c` stands for the client's user or client id;
//! a rule whose `%u` has no user, or whose substitution contains `/`, `+`
//! or `#` (which would widen it) or puts a `$` first, does not apply.
//!
//! A session belongs to the user that made it (`Session::owner`, kept in
//! its record): it is resumed only by that user, and only while it holds no
//! subscription the rules now refuse (`connection::may_resume`). A client
//! that re-authenticates (MQTT 5 AUTH) as another user is disconnected.
//!
//! The rules that apply to a client are compiled once at CONNECT into a
//! [`ClientAcl`] (substitutions done), so a check is a walk over a few short
//! filters: no lock, no allocation.

use serde::Deserialize;
use tern_router::{filter_covers, filter_matches, validate_filter};

/// What a rule allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    Publish,
    Subscribe,
    /// Both.
    All,
}

/// One `[[auth.acl]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclRule {
    /// Applies only to this user name (unset: to every client, anonymous
    /// ones included).
    pub user: Option<String>,
    /// Applies only to this client id (unset: to every client).
    pub client_id: Option<String>,
    /// An MQTT filter; a level `%u` or `%c` stands for the user name or the
    /// client id.
    pub topic: String,
    pub access: Access,
}

impl AclRule {
    /// Why the rule cannot be used, if it cannot (for config validation).
    pub fn problem(&self) -> Option<String> {
        validate_filter(&self.topic)
            .err()
            .map(|e| format!("topic {:?} is not a valid filter: {e}", self.topic))
    }

    /// The rule's filter for this client, or `None` if the rule does not
    /// apply to it.
    fn filter_for(&self, user: Option<&str>, client_id: &str) -> Option<String> {
        if self.user.as_deref().is_some_and(|u| Some(u) != user)
            || self.client_id.as_deref().is_some_and(|c| c != client_id)
        {
            return None;
        }
        let mut filter = String::with_capacity(self.topic.len());
        for (i, level) in self.topic.split('/').enumerate() {
            if i > 0 {
                filter.push('/');
            }
            let value = match level {
                "%u" => user?,
                "%c" => client_id,
                other => other,
            };
            // A substitution must not widen the rule (`/`, `+`, `#`), nor
            // reach the broker's own topics (`$` at the first level).
            if level != value
                && (value.contains(['/', '+', '#'])
                    || value.is_empty()
                    || (i == 0 && value.starts_with('$')))
            {
                return None;
            }
            filter.push_str(value);
        }
        Some(filter)
    }
}

/// The configured rules. `None` in the broker when there are none.
#[derive(Debug)]
pub struct Acl {
    rules: Vec<AclRule>,
}

impl Acl {
    /// The rules, or `None` when there are none (everything is allowed).
    pub fn from_rules(rules: &[AclRule]) -> Option<Acl> {
        (!rules.is_empty()).then(|| Acl {
            rules: rules.to_vec(),
        })
    }

    /// What the client `client_id` may do; `user` is who it proved to be
    /// (see `handshake::Authenticated::user`), `None` if it proved nothing.
    pub fn for_client(&self, user: Option<&str>, client_id: &str) -> ClientAcl {
        let mut acl = ClientAcl {
            user: user.map(Box::from),
            ..ClientAcl::default()
        };
        for rule in &self.rules {
            let Some(filter) = rule.filter_for(user, client_id) else {
                continue;
            };
            let filter: Box<str> = filter.into();
            match rule.access {
                Access::Publish => acl.publish.push(filter),
                Access::Subscribe => acl.subscribe.push(filter),
                Access::All => {
                    acl.publish.push(filter.clone());
                    acl.subscribe.push(filter);
                }
            }
        }
        acl
    }
}

/// What one client may do: the filters of the rules that apply to it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ClientAcl {
    /// The user they were compiled for.
    user: Option<Box<str>>,
    publish: Vec<Box<str>>,
    subscribe: Vec<Box<str>>,
}

impl ClientAcl {
    /// The user these permissions were compiled for.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// Whether the client may publish to `topic`.
    pub fn may_publish(&self, topic: &str) -> bool {
        self.publish.iter().any(|f| filter_matches(f, topic))
    }

    /// Whether the client may subscribe to `filter` (not shared: pass the
    /// filter of a `$share/{group}/{filter}`).
    pub fn may_subscribe(&self, filter: &str) -> bool {
        self.subscribe.iter().any(|f| filter_covers(f, filter))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(user: Option<&str>, client_id: Option<&str>, topic: &str, access: Access) -> AclRule {
        AclRule {
            user: user.map(str::to_owned),
            client_id: client_id.map(str::to_owned),
            topic: topic.to_owned(),
            access,
        }
    }

    #[test]
    fn rules_apply_by_user_and_client_id_with_substitution() {
        let acl = Acl::from_rules(&[
            rule(None, None, "public/#", Access::All),
            rule(None, None, "devices/%c/#", Access::Publish),
            rule(Some("ops"), None, "devices/#", Access::Subscribe),
            rule(None, None, "users/%u/inbox", Access::Subscribe),
        ])
        .unwrap();
        let device = acl.for_client(None, "d1");
        assert!(device.may_publish("devices/d1/temp"));
        assert!(!device.may_publish("devices/d2/temp"));
        assert!(device.may_publish("public/x"));
        assert!(device.may_subscribe("public/+/x"));
        assert!(!device.may_subscribe("devices/d1/#"), "publish only");
        assert!(!device.may_subscribe("#"));
        let ops = acl.for_client(Some("ops"), "console");
        assert!(ops.may_subscribe("devices/+/temp"));
        assert!(ops.may_subscribe("devices/#"));
        assert!(ops.may_publish("devices/console/x"), "its own devices/%c/#");
        assert!(!ops.may_publish("devices/d1/x"));
        assert!(ops.may_subscribe("users/ops/inbox"));
        assert!(!ops.may_subscribe("users/+/inbox"));
        // No user name: %u rules do not apply.
        assert!(!device.may_subscribe("users//inbox"));
    }

    #[test]
    fn a_substitution_cannot_widen_a_rule() {
        let acl = Acl::from_rules(&[rule(None, None, "devices/%c/#", Access::Publish)]).unwrap();
        let own = Acl::from_rules(&[rule(None, None, "%c/#", Access::All)]).unwrap();
        assert!(own.for_client(None, "d1").may_subscribe("d1/x"));
        assert!(
            !own.for_client(None, "$SYS").may_subscribe("$SYS/#"),
            "a client id cannot reach the broker's topics"
        );
        for sneaky in ["a/b", "+", "#", ""] {
            let client = acl.for_client(None, sneaky);
            assert!(!client.may_publish("devices/a/b/x"), "{sneaky:?}");
            assert!(!client.may_publish("devices/x/y"), "{sneaky:?}");
        }
    }

    #[test]
    fn no_rules_means_no_acl_and_bad_filters_are_reported() {
        assert!(Acl::from_rules(&[]).is_none());
        assert!(rule(None, None, "a/#/b", Access::All).problem().is_some());
        assert!(rule(None, None, "a/%c/#", Access::All).problem().is_none());
    }
}
