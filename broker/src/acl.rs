//! Topic permissions (`[[auth.acl]]`): which client may publish to which
//! topics, and subscribe to which filters.
//!
//! Without rules every client may do everything (and nothing here runs).
//! With rules, everything not allowed by one is refused, and a rule with
//! `permission = "deny"` takes back what allow rules give, whatever the
//! order of the rules (as Mosquitto's `deny` lines do):
//!
//! - a PUBLISH to topic T needs an allow rule with `publish` (or `all`)
//!   access whose filter matches T, and no such deny rule matching T (a
//!   will's topic is checked at CONNECT);
//! - a SUBSCRIBE to filter F (the filter of `$share/{group}/F`) needs an
//!   allow rule with `subscribe` (or `all`) access whose filter *covers* F:
//!   matches every topic F can match (`a/#` covers `a/+/c`; `a/+` does not
//!   cover `a/#`); and no such deny rule that covers F (F would receive
//!   nothing).
//! - A deny rule that only overlaps F (`a/secret` against `a/#`) leaves
//!   the subscription allowed and is checked per delivery: the session
//!   keeps its client's [`DeniedTopics`] and the broker skips a message
//!   whose topic one of them matches. Without deny rules for a client
//!   deliveries need no check: a subscription only ever receives topics
//!   its filter matches.
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

/// Whether a rule gives or takes back access.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    #[default]
    Allow,
    /// Takes back what allow rules give, whatever their order.
    Deny,
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
    /// Allow (the default) or deny.
    #[serde(default)]
    pub permission: Permission,
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
        match self.permission {
            Permission::Allow => self.allow_filter(user, client_id),
            Permission::Deny => self.deny_filter(user, client_id),
        }
    }

    /// An allow rule's filter. A substitution that would widen the rule
    /// makes it not apply: it would give more than it says.
    fn allow_filter(&self, user: Option<&str>, client_id: &str) -> Option<String> {
        let mut filter = String::with_capacity(self.topic.len());
        for (i, level) in self.topic.split('/').enumerate() {
            if i > 0 {
                filter.push('/');
            }
            let value = substitute(level, user, client_id)?;
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

    /// A deny rule's filter: the substitution is literal (a client id `a/b`
    /// in `devices/%c/#` denies `devices/a/b/#`, a `+` in it denies more),
    /// and where it leaves no valid filter the rule widens to `#` from the
    /// first broken level on. A deny rule must never deny less than it
    /// says. A `%u` with no user does not apply: such a client has no
    /// user's topics to keep it from.
    fn deny_filter(&self, user: Option<&str>, client_id: &str) -> Option<String> {
        let mut substituted = String::with_capacity(self.topic.len());
        for (i, level) in self.topic.split('/').enumerate() {
            if i > 0 {
                substituted.push('/');
            }
            substituted.push_str(substitute(level, user, client_id)?);
        }
        let mut filter = String::with_capacity(substituted.len());
        for (i, level) in substituted.split('/').enumerate() {
            if i > 0 {
                filter.push('/');
            }
            if level == "#" || (level != "+" && level.contains(['+', '#'])) {
                filter.push('#');
                break;
            }
            filter.push_str(level);
        }
        if filter.is_empty() {
            filter.push('#');
        }
        Some(filter)
    }
}

/// What a rule's filter level stands for: `%u` the user (`None` without
/// one), `%c` the client id, anything else itself.
fn substitute<'a>(level: &'a str, user: Option<&'a str>, client_id: &'a str) -> Option<&'a str> {
    match level {
        "%u" => user,
        "%c" => Some(client_id),
        other => Some(other),
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
            let (publish, subscribe) = match rule.permission {
                Permission::Allow => (&mut acl.publish, &mut acl.subscribe),
                Permission::Deny => (&mut acl.deny_publish, &mut acl.deny_subscribe),
            };
            match rule.access {
                Access::Publish => publish.push(filter),
                Access::Subscribe => subscribe.push(filter),
                Access::All => {
                    publish.push(filter.clone());
                    subscribe.push(filter);
                }
            }
        }
        // Order and repetition mean nothing (a deny rule wins wherever it
        // stands): in a canonical form, two rule sets that say the same
        // compile equal, and a reload that only reorders rules changes no
        // client's permissions (auth_rules.rs).
        for list in [
            &mut acl.publish,
            &mut acl.subscribe,
            &mut acl.deny_publish,
            &mut acl.deny_subscribe,
        ] {
            list.sort_unstable();
            list.dedup();
        }
        acl
    }

    /// What a session owned by `user` may not receive (see
    /// [`ClientAcl::denied_topics`]), for a session restored from the store.
    pub fn denied_topics(&self, user: Option<&str>, client_id: &str) -> Option<Box<DeniedTopics>> {
        self.for_client(user, client_id).denied_topics()
    }
}

/// What one client may do: the filters of the rules that apply to it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ClientAcl {
    /// The user they were compiled for.
    user: Option<Box<str>>,
    publish: Vec<Box<str>>,
    subscribe: Vec<Box<str>>,
    deny_publish: Vec<Box<str>>,
    deny_subscribe: Vec<Box<str>>,
}

impl ClientAcl {
    /// The user these permissions were compiled for.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// Whether the client may publish to `topic`.
    pub fn may_publish(&self, topic: &str) -> bool {
        !self.deny_publish.iter().any(|f| filter_matches(f, topic))
            && self.publish.iter().any(|f| filter_matches(f, topic))
    }

    /// Whether the client may subscribe to `filter` (not shared: pass the
    /// filter of a `$share/{group}/{filter}`). A deny rule that covers it
    /// refuses it; one that only overlaps it is left to the deliveries
    /// ([`denied_topics`](Self::denied_topics)).
    pub fn may_subscribe(&self, filter: &str) -> bool {
        !self.deny_subscribe.iter().any(|f| filter_covers(f, filter))
            && self.subscribe.iter().any(|f| filter_covers(f, filter))
    }

    /// The topics this client may not receive, for its session to keep:
    /// `None` when no deny rule with `subscribe` access applies to it (the
    /// usual case, which costs deliveries nothing).
    pub fn denied_topics(&self) -> Option<Box<DeniedTopics>> {
        (!self.deny_subscribe.is_empty()).then(|| {
            Box::new(DeniedTopics {
                filters: self.deny_subscribe.clone().into_boxed_slice(),
            })
        })
    }
}

/// The filters of the deny rules with `subscribe` access that apply to one
/// session's client: a message whose topic one of them matches is not
/// delivered to it, whatever its subscriptions (see the module doc). Fixed
/// for the session's life: it is resumed only by the user it was made for,
/// and only by a client whose rules give the same list (a restart or a
/// reload of `[auth]` may change them; see auth_rules.rs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeniedTopics {
    filters: Box<[Box<str>]>,
}

impl DeniedTopics {
    /// Whether a message published to `topic` may not be delivered. Out of
    /// line and cold: the delivery path only tests whether there is a list.
    #[cold]
    #[inline(never)]
    pub fn contains(&self, topic: &str) -> bool {
        self.filters.iter().any(|f| filter_matches(f, topic))
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
            permission: Permission::Allow,
        }
    }

    fn deny(user: Option<&str>, client_id: Option<&str>, topic: &str, access: Access) -> AclRule {
        AclRule {
            permission: Permission::Deny,
            ..rule(user, client_id, topic, access)
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
    fn a_deny_rule_takes_back_what_allow_rules_give_whatever_the_order() {
        let acl = Acl::from_rules(&[
            rule(None, None, "#", Access::All),
            deny(None, None, "test/nosubscribe", Access::Subscribe),
            deny(None, None, "secret/#", Access::All),
            deny(Some("guest"), None, "devices/+/cmd", Access::Publish),
            rule(None, None, "$SYS/#", Access::Subscribe),
        ])
        .unwrap();
        let anyone = acl.for_client(None, "c1");
        assert!(!anyone.may_subscribe("test/nosubscribe"));
        assert!(anyone.may_publish("test/nosubscribe"), "subscribe only");
        assert!(
            anyone.may_subscribe("test/+"),
            "overlaps: left to deliveries"
        );
        assert!(anyone.may_subscribe("#"));
        assert!(!anyone.may_subscribe("secret/#"));
        assert!(!anyone.may_subscribe("secret/a/+"), "covered");
        assert!(!anyone.may_publish("secret/a"));
        assert!(anyone.may_publish("devices/d1/cmd"), "the deny is guest's");
        assert!(
            anyone.may_subscribe("$SYS/broker/uptime"),
            "`#` rules never reach `$`"
        );
        let denied = anyone
            .denied_topics()
            .expect("deny rules with subscribe access");
        assert!(denied.contains("test/nosubscribe"));
        assert!(denied.contains("secret/a/b"));
        assert!(!denied.contains("test/other"));
        assert!(!denied.contains("devices/d1/cmd"));
        let guest = acl.for_client(Some("guest"), "c2");
        assert!(!guest.may_publish("devices/d1/cmd"));
        assert!(guest.may_subscribe("devices/d1/cmd"), "publish only");

        let only_deny = Acl::from_rules(&[deny(None, None, "a", Access::All)]).unwrap();
        let client = only_deny.for_client(None, "c");
        assert!(
            !client.may_publish("b"),
            "with rules, nothing allowed is refused"
        );
        let allow_only = Acl::from_rules(&[rule(None, None, "#", Access::All)]).unwrap();
        assert!(allow_only.for_client(None, "c").denied_topics().is_none());
    }

    #[test]
    fn a_deny_substitution_never_denies_less_than_it_says() {
        let acl = Acl::from_rules(&[
            rule(None, None, "#", Access::All),
            deny(None, None, "devices/%c/admin", Access::All),
            deny(None, None, "users/%u/#", Access::Subscribe),
        ])
        .unwrap();
        let denied = |user: Option<&str>, client_id: &str| {
            acl.for_client(user, client_id)
                .deny_subscribe
                .iter()
                .map(|f| f.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(denied(Some("u"), "d1"), ["devices/d1/admin", "users/u/#"]);
        // Literal: a `/` in the id denies exactly its own (deeper) topic.
        assert_eq!(denied(None, "a/b"), ["devices/a/b/admin"]);
        // A wildcard in the id denies more, never less.
        assert_eq!(denied(None, "+"), ["devices/+/admin"]);
        assert_eq!(denied(None, "x#"), ["devices/#"]);
        assert_eq!(denied(None, "#"), ["devices/#"]);
        assert_eq!(denied(Some("a+b"), "d"), ["devices/d/admin", "users/#"]);
        // No user: no user's topics to keep it from.
        assert_eq!(denied(None, "d1"), ["devices/d1/admin"]);
        let own = Acl::from_rules(&[deny(None, None, "%c/#", Access::All)]).unwrap();
        let sys = own.for_client(None, "$SYS");
        assert!(!sys.may_subscribe("$SYS/#"));
        assert!(sys.denied_topics().unwrap().contains("$SYS/broker/uptime"));
    }

    #[test]
    fn no_rules_means_no_acl_and_bad_filters_are_reported() {
        assert!(Acl::from_rules(&[]).is_none());
        assert!(rule(None, None, "a/#/b", Access::All).problem().is_some());
        assert!(rule(None, None, "a/%c/#", Access::All).problem().is_none());
    }
}
