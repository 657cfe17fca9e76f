//! Topic names and topic filters: validation, shared-subscription parsing and
//! the reference matcher.
//!
//! Everything here is a pure function over `&str`; nothing allocates. The
//! rules are those of MQTT 5.0 section 4.7 (topic names and filters) and 4.8.2
//! (shared subscriptions):
//!
//! * a topic name is non-empty, at most [`MAX_TOPIC_LEN`] bytes, contains no
//!   U+0000 and no wildcard character;
//! * a topic filter is non-empty, at most [`MAX_TOPIC_LEN`] bytes, contains no
//!   U+0000, uses `+` only as a whole level and `#` only as the whole last
//!   level;
//! * a filter whose first level is `$share` is a shared subscription
//!   `$share/{group}/{filter}`: the group is non-empty and contains none of
//!   `+`, `#`, `/`; the inner filter is non-empty and itself valid;
//! * a filter whose first level is a wildcard (`+` or `#`) never matches a
//!   topic name starting with `$` (MQTT-4.7.2-1).
//!
//! [`filter_matches`] is the reference (naive) matcher. The trie in
//! [`crate::Router`] and [`crate::RetainedStore`] must agree with it; the
//! property tests check exactly that.

/// Maximum length in bytes of a topic name or filter: MQTT encodes strings
/// with a 16-bit length prefix, so nothing longer can appear on the wire.
pub const MAX_TOPIC_LEN: usize = 65_535;

/// The first level that marks a shared subscription (MQTT 5.0 section 4.8.2).
pub const SHARE_PREFIX: &str = "$share";

/// Why a topic name or topic filter was rejected.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum TopicError {
    /// The topic name or filter is the empty string.
    #[error("topic name or filter is empty")]
    Empty,
    /// Longer than [`MAX_TOPIC_LEN`] bytes.
    #[error("topic is {0} bytes long, the maximum is 65535")]
    TooLong(usize),
    /// Contains the null character U+0000.
    #[error("topic contains the null character U+0000")]
    NullCharacter,
    /// A topic name (as opposed to a filter) contains `+` or `#`.
    #[error("topic name contains a wildcard character ('+' or '#')")]
    WildcardInTopicName,
    /// `#` is not the whole last level of the filter.
    #[error("'#' must be the whole last level of a topic filter")]
    InvalidMultiLevelWildcard,
    /// `+` is not a whole level of the filter.
    #[error("'+' must occupy a whole level of a topic filter")]
    InvalidSingleLevelWildcard,
    /// The group of a `$share/{group}/{filter}` is empty or contains `+`, `#` or `/`.
    #[error("shared subscription group name is empty or contains '+', '#' or '/'")]
    InvalidShareName,
    /// A `$share/{group}` filter lacks its `/{filter}` part, or the part is empty.
    #[error("shared subscription has no topic filter after the group name")]
    MissingSharedFilter,
}

/// Checks the length and null-character rules common to names and filters.
fn check_common(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong(s.len()));
    }
    if s.contains('\0') {
        return Err(TopicError::NullCharacter);
    }
    Ok(())
}

/// Validates a topic name as used in PUBLISH: non-empty, at most 65535 bytes,
/// no U+0000, no `+` or `#`.
pub fn validate_topic_name(topic: &str) -> Result<(), TopicError> {
    check_common(topic)?;
    if topic.contains(['+', '#']) {
        return Err(TopicError::WildcardInTopicName);
    }
    Ok(())
}

/// The levels of a topic name or filter: its parts between `/` (`a//b` has
/// three). A shared filter's are those of the filter after its group.
pub fn topic_levels(topic: &str) -> usize {
    let filter = parse_shared(topic).map_or(topic, |(_, f)| f);
    filter.bytes().filter(|&b| b == b'/').count() + 1
}

/// Validates the level structure of a non-shared filter (already known to be
/// non-empty and free of U+0000).
fn check_filter_levels(filter: &str) -> Result<(), TopicError> {
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let is_last = levels.peek().is_none();
        if level.contains('#') && (level != "#" || !is_last) {
            return Err(TopicError::InvalidMultiLevelWildcard);
        }
        if level.contains('+') && level != "+" {
            return Err(TopicError::InvalidSingleLevelWildcard);
        }
    }
    Ok(())
}

/// Validates a topic filter as used in SUBSCRIBE and UNSUBSCRIBE, including
/// shared filters `$share/{group}/{filter}`.
pub fn validate_filter(filter: &str) -> Result<(), TopicError> {
    check_common(filter)?;
    let first = filter.split('/').next().unwrap_or(filter);
    if first != SHARE_PREFIX {
        return check_filter_levels(filter);
    }
    // "$share" or "$share/..."; everything after "$share/".
    let rest = filter.get(SHARE_PREFIX.len() + 1..).unwrap_or("");
    let Some((group, inner)) = rest.split_once('/') else {
        // "$share" or "$share/group": no filter part at all.
        return if rest.contains(['+', '#']) {
            Err(TopicError::InvalidShareName)
        } else {
            Err(TopicError::MissingSharedFilter)
        };
    };
    if group.is_empty() || group.contains(['+', '#']) {
        return Err(TopicError::InvalidShareName);
    }
    if inner.is_empty() {
        return Err(TopicError::MissingSharedFilter);
    }
    check_filter_levels(inner)
}

/// Splits a shared filter `$share/{group}/{filter}` into `(group, filter)`.
///
/// Returns `None` for anything that is not of that shape (in particular for
/// every non-shared filter). This is a syntactic split only: the group and
/// filter are not validated beyond being non-empty; use [`validate_filter`]
/// for that.
pub fn parse_shared(filter: &str) -> Option<(&str, &str)> {
    let rest = filter.strip_prefix(SHARE_PREFIX)?.strip_prefix('/')?;
    let (group, inner) = rest.split_once('/')?;
    if group.is_empty() || inner.is_empty() {
        return None;
    }
    Some((group, inner))
}

/// Whether the (non-shared) `filter` matches the topic name `topic`.
///
/// Implements MQTT matching: `+` matches exactly one level (possibly empty),
/// `#` matches the parent level and any number of child levels (so
/// `sport/#` matches `sport`), and a filter whose first level is a wildcard
/// does not match a topic starting with `$`. Never panics, whatever the input;
/// the result for invalid filters or topic names is unspecified.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut filter_levels = filter.split('/');
    let mut topic_levels = topic.split('/');
    loop {
        match (filter_levels.next(), topic_levels.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(f), Some(t)) => {
                if f != t {
                    return false;
                }
            }
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether the filter `outer` matches every topic the filter `inner`
/// matches (so a permission to subscribe to `outer` covers a subscription
/// to `inner`): `a/#` covers `a/+/c` and `a`, `a/+` covers `a/b` but not
/// `a/#` nor `a/+/c`, and a filter whose first level is a wildcard covers
/// no filter that starts with `$`. Both are (non-shared) filters; the
/// result for invalid ones is unspecified, and it never panics.
pub fn filter_covers(outer: &str, inner: &str) -> bool {
    if inner.starts_with('$') && (outer.starts_with('+') || outer.starts_with('#')) {
        return false;
    }
    let mut outer_levels = outer.split('/');
    let mut inner_levels = inner.split('/');
    let mut first = true;
    loop {
        match (outer_levels.next(), inner_levels.next()) {
            (Some("#"), _) => return true,
            // `inner`'s `#` matches its parent level and any more levels;
            // below the first level that parent is a topic `+/#` does not
            // match, at the first level there is none (a topic has a level).
            (Some(o), Some("#")) => {
                return first && o == "+" && outer_levels.next() == Some("#");
            }
            (Some("+"), Some(_)) => {}
            (Some(o), Some(i)) => {
                // A literal covers only the same literal, not `+`.
                if o != i || i == "+" {
                    return false;
                }
            }
            (None, None) => return true,
            _ => return false,
        }
        first = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `filter_covers` against its definition, over every filter of up to
    /// three levels and every topic of up to four from a small alphabet
    /// (`z` stands for any level no filter names).
    #[test]
    fn covers_is_exactly_inclusion_of_matched_topics() {
        fn all(parts: &[&str], max: usize) -> Vec<String> {
            let mut out: Vec<String> = parts.iter().map(|p| p.to_string()).collect();
            let mut last = out.clone();
            for _ in 1..max {
                let next: Vec<String> = last
                    .iter()
                    .flat_map(|s| parts.iter().map(move |p| format!("{s}/{p}")))
                    .collect();
                out.extend(next.iter().cloned());
                last = next;
            }
            out
        }
        let filters: Vec<String> = all(&["a", "b", "+", "#", "$s"], 3)
            .into_iter()
            .filter(|f| validate_filter(f).is_ok())
            .collect();
        let topics = all(&["a", "b", "z", "$s", ""], 4);
        for outer in &filters {
            for inner in &filters {
                let included = topics
                    .iter()
                    .all(|t| !filter_matches(inner, t) || filter_matches(outer, t));
                assert_eq!(
                    filter_covers(outer, inner),
                    included,
                    "{outer} covers {inner}?"
                );
            }
        }
    }

    #[test]
    fn topic_names() {
        assert_eq!(validate_topic_name("sport/tennis"), Ok(()));
        assert_eq!(validate_topic_name("/"), Ok(()));
        assert_eq!(validate_topic_name("$SYS/x"), Ok(()));
        assert_eq!(validate_topic_name(""), Err(TopicError::Empty));
        assert_eq!(
            validate_topic_name("a/+"),
            Err(TopicError::WildcardInTopicName)
        );
        assert_eq!(
            validate_topic_name("a#"),
            Err(TopicError::WildcardInTopicName)
        );
        assert_eq!(validate_topic_name("a\0b"), Err(TopicError::NullCharacter));
        let long = "a".repeat(MAX_TOPIC_LEN + 1);
        assert_eq!(
            validate_topic_name(&long),
            Err(TopicError::TooLong(MAX_TOPIC_LEN + 1))
        );
        assert_eq!(validate_topic_name(&long[1..]), Ok(()));
    }

    #[test]
    fn filters_from_spec() {
        for ok in [
            "sport/tennis/#",
            "sport/#",
            "#",
            "sport/tennis/player1/#",
            "+",
            "+/tennis/#",
            "sport/+/player1",
            "/+",
            "+/+",
            "/",
            "$SYS/#",
            "a//b",
            "$share/g/#",
            "$share/g/+/x",
            "$share/g/$SYS/x",
            "$share/g//",
            "$sharex/+",
        ] {
            assert_eq!(validate_filter(ok), Ok(()), "{ok}");
        }
        let bad = [
            ("", TopicError::Empty),
            ("sport/tennis#", TopicError::InvalidMultiLevelWildcard),
            (
                "sport/tennis/#/ranking",
                TopicError::InvalidMultiLevelWildcard,
            ),
            ("#/", TopicError::InvalidMultiLevelWildcard),
            ("##", TopicError::InvalidMultiLevelWildcard),
            ("sport+", TopicError::InvalidSingleLevelWildcard),
            ("+a/b", TopicError::InvalidSingleLevelWildcard),
            ("a/\0", TopicError::NullCharacter),
            ("$share//x", TopicError::InvalidShareName),
            ("$share/g", TopicError::MissingSharedFilter),
            ("$share/g/", TopicError::MissingSharedFilter),
            ("$share", TopicError::MissingSharedFilter),
            ("$share/", TopicError::MissingSharedFilter),
            ("$share/g+/x", TopicError::InvalidShareName),
            ("$share/#/x", TopicError::InvalidShareName),
            ("$share/g#", TopicError::InvalidShareName),
            ("$share/g/a#", TopicError::InvalidMultiLevelWildcard),
            ("$share/g/a+", TopicError::InvalidSingleLevelWildcard),
        ];
        for (filter, err) in bad {
            assert_eq!(validate_filter(filter), Err(err), "{filter:?}");
        }
    }

    #[test]
    fn shared_parsing() {
        assert_eq!(parse_shared("$share/g/a/b"), Some(("g", "a/b")));
        assert_eq!(parse_shared("$share/g/#"), Some(("g", "#")));
        assert_eq!(parse_shared("$share/g"), None);
        assert_eq!(parse_shared("$share//x"), None);
        assert_eq!(parse_shared("$share/g/"), None);
        assert_eq!(parse_shared("$sharex/g/x"), None);
        assert_eq!(parse_shared("a/b"), None);
        assert_eq!(parse_shared("$share"), None);
    }

    #[test]
    fn matching_from_spec() {
        let yes = [
            ("sport/tennis/player1/#", "sport/tennis/player1"),
            ("sport/tennis/player1/#", "sport/tennis/player1/ranking"),
            (
                "sport/tennis/player1/#",
                "sport/tennis/player1/score/wimbledon",
            ),
            ("sport/#", "sport"),
            ("#", "sport/tennis"),
            ("#", "/"),
            ("sport/tennis/+", "sport/tennis/player1"),
            ("sport/+", "sport/"),
            ("+/+", "/finance"),
            ("/+", "/finance"),
            ("+", "a"),
            ("+", ""),
            ("$SYS/#", "$SYS/x"),
            ("$SYS/#", "$SYS"),
            ("$SYS/monitor/+", "$SYS/monitor/Clients"),
            ("a//b", "a//b"),
            ("a/+/b", "a//b"),
        ];
        for (f, t) in yes {
            assert!(filter_matches(f, t), "{f} should match {t}");
        }
        let no = [
            ("sport/tennis/+", "sport/tennis/player1/ranking"),
            ("sport/+", "sport"),
            ("+", "/finance"),
            ("#", "$SYS/x"),
            ("#", "$SYS"),
            ("+/monitor/Clients", "$SYS/monitor/Clients"),
            ("+", "$x"),
            ("sport", "sport/tennis"),
            ("sport/tennis", "sport"),
            ("a/b", "a/c"),
        ];
        for (f, t) in no {
            assert!(!filter_matches(f, t), "{f} should not match {t}");
        }
    }
}
