//! Rendering of the admin views: aligned tables for people, JSON for
//! scripts and for the endpoint's bodies.
//!
//! JSON layout is fixed here so that every producer writes the same bytes:
//! a single object is pretty-printed; a list is an array with one compact
//! element per line, written as the rows arrive (so a long list streams).

use std::io::{self, Write};

use serde::Serialize;

use super::error::AdminError;
use super::model::{
    PayloadEncoding, QueueView, RetainedRow, RetainedView, SessionRow, SessionView, State,
    StatsView, SubscriptionView,
};

/// Rows of a list view, read lazily (from the store) or from a response.
pub type Rows<'a, T> = Box<dyn Iterator<Item = Result<T, AdminError>> + 'a>;

/// Writes `value` compact, on one line, without a newline.
pub fn write_compact<T: Serialize>(out: &mut dyn Write, value: &T) -> io::Result<()> {
    serde_json::to_writer(out, value).map_err(io::Error::from)
}

/// Writes `value` pretty-printed, then a newline.
pub fn write_pretty<T: Serialize>(out: &mut dyn Write, value: &T) -> io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, value).map_err(io::Error::from)?;
    out.write_all(b"\n")
}

/// Starts the next element of a JSON array: the comma before it unless it
/// is the first, then a new line indented by `indent`.
pub fn array_separator(out: &mut dyn Write, first: &mut bool, indent: &str) -> io::Result<()> {
    if !std::mem::replace(first, false) {
        out.write_all(b",")?;
    }
    out.write_all(b"\n")?;
    out.write_all(indent.as_bytes())
}

/// Writes the rows as a JSON array, one element per line, as they arrive.
pub fn write_json_array<T: Serialize>(
    out: &mut dyn Write,
    rows: impl Iterator<Item = Result<T, AdminError>>,
) -> Result<(), AdminError> {
    out.write_all(b"[")?;
    let mut first = true;
    for row in rows {
        let row = row?;
        array_separator(out, &mut first, "  ")?;
        write_compact(out, &row)?;
    }
    out.write_all(if first { b"]\n" } else { b"\n]\n" })?;
    Ok(())
}

/// How a column's cells line up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Align {
    Left,
    Right,
}

/// A table: a header line, then rows, columns padded to their widest cell
/// and separated by two spaces.
struct Table {
    header: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[(&'static str, Align)]) -> Table {
        Table {
            header: header.to_vec(),
            rows: Vec::new(),
        }
    }

    fn push(&mut self, row: Vec<String>) {
        self.rows.push(row);
    }

    fn widths(&self) -> Vec<usize> {
        let mut widths: Vec<usize> = self.header.iter().map(|(h, _)| h.len()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        widths
    }

    fn write(&self, out: &mut dyn Write) -> io::Result<()> {
        let widths = self.widths();
        let header: Vec<String> = self.header.iter().map(|(h, _)| h.to_string()).collect();
        self.write_line(out, &widths, &header)?;
        for row in &self.rows {
            self.write_line(out, &widths, row)?;
        }
        Ok(())
    }

    fn write_line(
        &self,
        out: &mut dyn Write,
        widths: &[usize],
        cells: &[String],
    ) -> io::Result<()> {
        let mut line = String::new();
        let last = cells.len().saturating_sub(1);
        for (i, ((cell, width), (_, align))) in
            cells.iter().zip(widths).zip(&self.header).enumerate()
        {
            if i > 0 {
                line.push_str("  ");
            }
            let pad = width.saturating_sub(cell.chars().count());
            match align {
                Align::Right => {
                    line.extend(std::iter::repeat_n(' ', pad));
                    line.push_str(cell);
                }
                Align::Left if i == last => line.push_str(cell),
                Align::Left => {
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
        }
        writeln!(out, "{}", line.trim_end())
    }
}

/// A record shown as `field  value` lines, fields aligned.
fn write_fields(out: &mut dyn Write, fields: &[(&str, String)]) -> io::Result<()> {
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (key, value) in fields {
        writeln!(out, "{key:<width$}  {value}")?;
    }
    Ok(())
}

/// The `sessions` view.
pub fn sessions(
    out: &mut dyn Write,
    rows: Rows<'_, SessionRow>,
    json: bool,
) -> Result<(), AdminError> {
    if json {
        return write_json_array(out, rows);
    }
    use Align::{Left, Right};
    let mut table = Table::new(&[
        ("CLIENT ID", Left),
        ("PROTOCOL", Left),
        ("EXPIRY", Right),
        ("LAST SEEN", Left),
        ("QUEUE", Right),
        ("IN FLIGHT", Right),
        ("SUBS", Right),
        ("WILL", Left),
    ]);
    for row in rows {
        let r = row?;
        table.push(vec![
            r.client_id,
            protocol(r.protocol_level),
            interval(r.expiry_interval),
            unix_seconds(r.last_seen),
            r.queue_depth.to_string(),
            r.inflight.to_string(),
            r.subscriptions.to_string(),
            yes_no(r.has_will),
        ]);
    }
    Ok(table.write(out)?)
}

/// The `session` view.
pub fn session(out: &mut dyn Write, s: &SessionView, json: bool) -> Result<(), AdminError> {
    if json {
        return Ok(write_pretty(out, s)?);
    }
    let will = match &s.will {
        Some(w) => format!(
            "{} (QoS {}, {}, delay {}, {} bytes)",
            w.topic,
            w.qos,
            if w.retain { "retained" } else { "not retained" },
            interval(w.delay_interval),
            w.payload_size
        ),
        None => "none".to_owned(),
    };
    write_fields(
        out,
        &[
            ("client id", s.client_id.clone()),
            ("protocol", protocol(s.protocol_level)),
            ("expiry interval", interval(s.expiry_interval)),
            ("created", unix_seconds(s.created_at)),
            ("last seen", unix_seconds(s.last_seen)),
            ("queue depth", s.queue_depth.to_string()),
            ("in flight", s.inflight.to_string()),
            ("incoming QoS 2", s.incoming_qos2.to_string()),
            ("will", will),
            ("subscriptions", s.subscriptions.len().to_string()),
        ],
    )?;
    if !s.subscriptions.is_empty() {
        writeln!(out)?;
        subscriptions(out, &s.subscriptions)?;
    }
    Ok(())
}

fn subscriptions(out: &mut dyn Write, subs: &[SubscriptionView]) -> io::Result<()> {
    use Align::{Left, Right};
    let mut table = Table::new(&[
        ("FILTER", Left),
        ("QOS", Right),
        ("NO LOCAL", Left),
        ("RETAIN AS PUBLISHED", Left),
        ("RETAIN HANDLING", Right),
        ("ID", Right),
    ]);
    for s in subs {
        table.push(vec![
            s.filter.clone(),
            s.qos.to_string(),
            yes_no(s.no_local),
            yes_no(s.retain_as_published),
            s.retain_handling.to_string(),
            s.subscription_id.map_or_else(dash, |id| id.to_string()),
        ]);
    }
    table.write(out)
}

/// The `queue` view.
pub fn queue(out: &mut dyn Write, q: &QueueView, json: bool) -> Result<(), AdminError> {
    if json {
        return Ok(write_pretty(out, q)?);
    }
    use Align::{Left, Right};
    let mut table = Table::new(&[
        ("SEQ", Right),
        ("MESSAGE", Right),
        ("QOS", Right),
        ("STATE", Left),
        ("PACKET ID", Right),
        ("DUP", Left),
        ("RETAIN", Left),
        ("SIZE", Right),
        ("TOPIC", Left),
        ("SHARED", Left),
    ]);
    for e in &q.entries {
        let (size, topic) = match &e.message {
            Some(m) => (m.payload_size.to_string(), m.topic.clone()),
            None => (dash(), "(message missing)".to_owned()),
        };
        table.push(vec![
            e.seq.to_string(),
            e.message_id.to_string(),
            e.qos.to_string(),
            state(e.state).to_owned(),
            e.packet_id.map_or_else(dash, |id| id.to_string()),
            yes_no(e.dup),
            yes_no(e.retain),
            size,
            topic,
            e.shared.clone().unwrap_or_else(dash),
        ]);
    }
    table.write(out)?;
    if q.truncated {
        writeln!(
            out,
            "(the first {} entries; the queue holds more: use --limit N)",
            q.limit
        )?;
    }
    Ok(())
}

/// The `retained` view.
pub fn retained(
    out: &mut dyn Write,
    rows: Rows<'_, RetainedRow>,
    json: bool,
) -> Result<(), AdminError> {
    if json {
        return write_json_array(out, rows);
    }
    use Align::{Left, Right};
    let mut table = Table::new(&[
        ("TOPIC", Left),
        ("MESSAGE", Right),
        ("QOS", Right),
        ("SIZE", Right),
        ("EXPIRES", Left),
    ]);
    for row in rows {
        let r = row?;
        let (qos, size, expires) = match &r.message {
            Some(m) => (
                m.qos.to_string(),
                m.payload_size.to_string(),
                m.expires_at.map_or_else(|| "never".to_owned(), unix_millis),
            ),
            None => (dash(), dash(), "(message missing)".to_owned()),
        };
        table.push(vec![r.topic, r.message_id.to_string(), qos, size, expires]);
    }
    Ok(table.write(out)?)
}

/// The `retained-show` view.
pub fn retained_show(out: &mut dyn Write, r: &RetainedView, json: bool) -> Result<(), AdminError> {
    if json {
        return Ok(write_pretty(out, r)?);
    }
    let encoding = match r.payload_encoding {
        PayloadEncoding::Utf8 => "UTF-8",
        PayloadEncoding::Base64 => "base64, not UTF-8",
    };
    write_fields(
        out,
        &[
            ("topic", r.topic.clone()),
            ("message id", r.message_id.to_string()),
            ("qos", r.qos.to_string()),
            (
                "expires",
                r.expires_at.map_or_else(|| "never".to_owned(), unix_millis),
            ),
            ("payload size", format!("{} bytes", r.payload_size)),
        ],
    )?;
    writeln!(out, "payload ({encoding}):")?;
    writeln!(out, "{}", r.payload)?;
    Ok(())
}

/// The `stats` view (also printed after `compact`).
pub fn stats(out: &mut dyn Write, s: &StatsView, json: bool) -> Result<(), AdminError> {
    if json {
        return Ok(write_pretty(out, s)?);
    }
    let amplification = s
        .space_amplification
        .map_or_else(|| "n/a".to_owned(), |a| format!("{a:.2}"));
    Ok(write_fields(
        out,
        &[
            ("keys", s.keys.to_string()),
            ("live bytes", s.live_bytes.to_string()),
            ("disk bytes", s.disk_bytes.to_string()),
            ("space amplification", amplification),
            ("sessions", s.sessions.to_string()),
            ("subscriptions", s.subscriptions.to_string()),
            ("messages", s.messages.to_string()),
            ("queue entries", s.queue_entries.to_string()),
            ("retained", s.retained.to_string()),
        ],
    )?)
}

/// The answer of `delete-session`.
pub fn deleted(out: &mut dyn Write, client_id: &str, json: bool) -> Result<(), AdminError> {
    if json {
        let body = super::model::Deleted {
            deleted_session: client_id.to_owned(),
        };
        return Ok(write_pretty(out, &body)?);
    }
    Ok(writeln!(out, "deleted session {client_id:?}")?)
}

fn dash() -> String {
    "-".to_owned()
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_owned()
}

fn state(s: State) -> &'static str {
    match s {
        State::Pending => "pending",
        State::AwaitingAck => "awaiting-ack",
        State::AwaitingComp => "awaiting-comp",
    }
}

/// The MQTT version of a protocol level.
fn protocol(level: u8) -> String {
    match level {
        3 => "3.1".to_owned(),
        4 => "3.1.1".to_owned(),
        5 => "5".to_owned(),
        other => format!("level {other}"),
    }
}

/// An interval in seconds as `1d2h3m4s`; `u32::MAX` (MQTT's "never
/// expires") as `never`.
fn interval(secs: u32) -> String {
    if secs == u32::MAX {
        return "never".to_owned();
    }
    if secs == 0 {
        return "0s".to_owned();
    }
    let parts = [
        (secs / 86_400, "d"),
        (secs % 86_400 / 3_600, "h"),
        (secs % 3_600 / 60, "m"),
        (secs % 60, "s"),
    ];
    parts
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect()
}

/// Unix milliseconds as an RFC 3339 UTC time with milliseconds.
fn unix_millis(ms: u64) -> String {
    let (secs, millis) = (ms / 1000, ms % 1000);
    let (date, time) = civil(secs);
    format!("{date}T{time}.{millis:03}Z")
}

/// Unix seconds as an RFC 3339 UTC time.
fn unix_seconds(secs: u64) -> String {
    let (date, time) = civil(secs);
    format!("{date}T{time}Z")
}

/// Splits Unix seconds into `YYYY-MM-DD` and `hh:mm:ss` (UTC, proleptic
/// Gregorian; Howard Hinnant's `civil_from_days`).
fn civil(secs: u64) -> (String, String) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        format!("{year:04}-{month:02}-{day:02}"),
        format!("{:02}:{:02}:{:02}", rem / 3_600, rem % 3_600 / 60, rem % 60),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(unix_seconds(0), "1970-01-01T00:00:00Z");
        assert_eq!(unix_seconds(1_714_564_800), "2024-05-01T12:00:00Z");
        assert_eq!(unix_seconds(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(unix_millis(1_714_564_800_123), "2024-05-01T12:00:00.123Z");
        // Far-future values print without panicking.
        let _ = unix_seconds(u64::MAX);
    }

    #[test]
    fn intervals_are_compact() {
        assert_eq!(interval(0), "0s");
        assert_eq!(interval(90), "1m30s");
        assert_eq!(interval(3_600), "1h");
        assert_eq!(interval(86_400 + 7_200 + 5), "1d2h5s");
        assert_eq!(interval(u32::MAX), "never");
    }

    #[test]
    fn tables_align_columns() {
        let mut t = Table::new(&[
            ("NAME", Align::Left),
            ("N", Align::Right),
            ("X", Align::Left),
        ]);
        t.push(vec!["a".into(), "100".into(), "x".into()]);
        t.push(vec!["long-name".into(), "2".into(), "y".into()]);
        let mut out = Vec::new();
        t.write(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "NAME         N  X\na          100  x\nlong-name    2  y\n"
        );
    }

    #[test]
    fn json_arrays_put_one_element_per_line() {
        let mut out = Vec::new();
        write_json_array(&mut out, [Ok(1), Ok(2)].into_iter()).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "[\n  1,\n  2\n]\n");
        let mut out = Vec::new();
        write_json_array::<u8>(&mut out, std::iter::empty()).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "[]\n");
    }
}
