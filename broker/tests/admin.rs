//! `tern admin`: offline views of a stopped broker's store, the locked and
//! missing store errors, the read-only admin endpoint (same output through
//! `--url`, bad requests answered, writes refused), the write commands, and
//! the `tern admin` subcommand of the binary.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tern::admin::{execute, serve_admin, AdminArgs, AdminError, AdminSources};
use tern_storage::{
    Batch, DeliveryState, MessageRecord, QueueEntry, RetainedRecord, SessionRecord,
    SharedGroupRecord, SledStore, Store, SubscriptionRecord, WillRecord,
};

const TERN: &str = env!("CARGO_BIN_EXE_tern");

fn session(client_id: &str, protocol_level: u8, expiry_interval: u32) -> SessionRecord {
    SessionRecord {
        client_id: client_id.into(),
        protocol_level,
        expiry_interval,
        will: None,
        created_at: 1_714_564_800,
        last_seen: 1_714_568_400,
        connected: false,
        owner: None,
    }
}

fn subscription(client_id: &str, filter: &str, qos: u8, id: Option<u32>) -> SubscriptionRecord {
    SubscriptionRecord {
        client_id: client_id.into(),
        filter: filter.into(),
        qos,
        no_local: false,
        retain_as_published: false,
        retain_handling: 0,
        subscription_id: id,
    }
}

fn message(id: u64, topic: &str, payload: &'static [u8]) -> MessageRecord {
    MessageRecord {
        id,
        topic: Bytes::copy_from_slice(topic.as_bytes()),
        payload: Bytes::from_static(payload),
        qos: 1,
        retain: false,
        properties: Bytes::new(),
        expires_at: None,
    }
}

fn entry(client_id: &str, seq: u64, message_id: u64, state: DeliveryState) -> QueueEntry {
    QueueEntry {
        client_id: client_id.into(),
        seq,
        message_id,
        qos: 1,
        packet_id: (state != DeliveryState::Pending).then_some(10),
        state,
        dup: false,
        retain: false,
        subscription_ids: vec![7],
        weight: Some(100),
        shared: None,
    }
}

fn retained(topic: &str, message_id: u64) -> RetainedRecord {
    RetainedRecord {
        topic: topic.into(),
        message_id,
    }
}

/// A store with three sessions (alpha and beta each queue message 1, which
/// is stored once), subscriptions, a will, an incoming QoS 2 id and four
/// retained messages, one of them binary.
fn build_store(dir: &Path) {
    let store = SledStore::open(dir).unwrap();
    let mut alpha = session("alpha", 5, 3600);
    alpha.will = Some(WillRecord {
        topic: Bytes::from_static(b"clients/alpha/gone"),
        payload: Bytes::from_static(b"bye"),
        qos: 1,
        retain: true,
        delay_interval: 10,
        properties: Bytes::new(),
    });
    let mut b = Batch::new();
    b.put_session(alpha)
        .put_session(session("beta", 4, u32::MAX))
        .put_session(session("gamma", 5, 60))
        .put_subscription(subscription("alpha", "a/+", 1, Some(7)))
        .put_subscription(subscription("alpha", "b/#", 2, None))
        .put_subscription(subscription("beta", "a/b", 1, None))
        .put_message(message(1, "a/b", b"hello"))
        .put_queue_entry(entry("alpha", 1, 1, DeliveryState::AwaitingAck))
        .put_queue_entry(QueueEntry {
            shared: Some(SharedGroupRecord {
                group: "workers".into(),
                filter: "a/b".into(),
            }),
            ..entry("beta", 1, 1, DeliveryState::Pending)
        })
        .add_incoming_qos2("alpha", 42)
        .put_message(message(2, "a/b", b"retained a/b"))
        .put_message(message(3, "a/c", &[0xff, 0x00, 0x01]))
        .put_message(message(4, "a/b/c", b"deep"))
        .put_message(message(5, "x/y", b"other"))
        .put_retained(retained("a/b", 2))
        .put_retained(retained("a/c", 3))
        .put_retained(retained("a/b/c", 4))
        .put_retained(retained("x/y", 5));
    store.apply(&b).unwrap();
    store.sync().unwrap();
}

fn args(source: &[&str], command: &[&str]) -> AdminArgs {
    let all = ["tern admin"].iter().chain(source).chain(command);
    AdminArgs::try_parse_from(all).unwrap()
}

fn offline(dir: &Path) -> Vec<String> {
    vec!["--data-dir".into(), dir.to_str().unwrap().into()]
}

/// Runs a command; its output, or the error.
fn run_with(source: &[String], command: &[&str]) -> Result<String, AdminError> {
    let source: Vec<&str> = source.iter().map(String::as_str).collect();
    let mut out = Vec::new();
    execute(&args(&source, command), &mut out)?;
    Ok(String::from_utf8(out).unwrap())
}

fn ok(source: &[String], command: &[&str]) -> String {
    run_with(source, command).unwrap_or_else(|e| panic!("{command:?}: {e}"))
}

fn json(source: &[String], command: &[&str]) -> Value {
    let mut with_json = command.to_vec();
    with_json.push("--json");
    serde_json::from_str(&ok(source, &with_json)).unwrap()
}

/// Every read-only command whose output must not depend on the mode.
const READ_COMMANDS: &[&[&str]] = &[
    &["sessions"],
    &["session", "alpha"],
    &["session", "beta"],
    &["queue", "alpha"],
    &["queue", "beta", "--limit", "1"],
    &["retained"],
    &["retained", "--filter", "a/+"],
    &["retained", "--filter", "a/#"],
    &["retained-show", "a/b"],
    &["retained-show", "a/c"],
    &["export"],
];

#[test]
fn offline_views() {
    let dir = tempfile::tempdir().unwrap();
    build_store(dir.path());
    let src = offline(dir.path());

    let table = ok(&src, &["sessions"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(
        lines[0].starts_with("CLIENT ID") && lines[0].contains("QUEUE"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("alpha ") && lines[1].contains("1h"),
        "{table}"
    );
    assert!(
        lines[2].starts_with("beta ") && lines[2].contains("never"),
        "{table}"
    );
    assert!(lines[3].starts_with("gamma "), "{table}");

    let rows = json(&src, &["sessions"]);
    let depth = |id: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["client_id"] == id)
            .map(|r| {
                (
                    r["queue_depth"].as_u64(),
                    r["inflight"].as_u64(),
                    r["subscriptions"].as_u64(),
                )
            })
    };
    assert_eq!(depth("alpha"), Some((Some(1), Some(1), Some(2))));
    assert_eq!(depth("beta"), Some((Some(1), Some(0), Some(1))));
    assert_eq!(depth("gamma"), Some((Some(0), Some(0), Some(0))));

    let alpha = json(&src, &["session", "alpha"]);
    assert_eq!(alpha["protocol_level"], 5);
    assert_eq!(alpha["incoming_qos2"], 1);
    assert_eq!(alpha["will"]["topic"], "clients/alpha/gone");
    assert_eq!(alpha["will"]["delay_interval"], 10);
    assert_eq!(alpha["subscriptions"][0]["filter"], "a/+");
    assert_eq!(alpha["subscriptions"][0]["subscription_id"], 7);
    assert_eq!(alpha["subscriptions"][1]["qos"], 2);
    let text = ok(&src, &["session", "alpha"]);
    assert!(
        text.contains("clients/alpha/gone (QoS 1, retained, delay 10s, 3 bytes)"),
        "{text}"
    );
    assert!(text.contains("incoming QoS 2   1"), "{text}");

    let err = run_with(&src, &["session", "nobody"]).unwrap_err();
    assert!(matches!(err, AdminError::NotFound(_)), "{err}");
    assert_eq!(err.exit_code(), 1);
    assert!(matches!(
        run_with(&src, &["queue", "nobody"]),
        Err(AdminError::NotFound(_))
    ));
    assert!(matches!(
        run_with(&src, &["retained-show", "a"]),
        Err(AdminError::NotFound(_))
    ));

    let queue = json(&src, &["queue", "alpha"]);
    assert_eq!(queue["truncated"], false);
    let e = &queue["entries"][0];
    assert_eq!(
        (e["seq"].as_u64(), e["message_id"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(
        (e["state"].as_str(), e["packet_id"].as_u64()),
        (Some("awaiting_ack"), Some(10))
    );
    assert_eq!(e["message"]["topic"], "a/b");
    assert_eq!(e["message"]["payload_size"], 5);
    assert!(e.get("shared").is_none(), "{e}");
    let text = ok(&src, &["queue", "beta"]);
    let row = text.lines().nth(1).unwrap();
    assert!(row.contains("pending"), "{text}");
    assert!(row.ends_with("$share/workers/a/b"), "{text}");
    let beta = json(&src, &["queue", "beta"]);
    assert_eq!(beta["entries"][0]["shared"], "$share/workers/a/b");

    let topics = |filter: &str| -> Vec<String> {
        let rows = json(&src, &["retained", "--filter", filter]);
        rows.as_array()
            .unwrap()
            .iter()
            .map(|r| r["topic"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(topics("a/+"), ["a/b", "a/c"]);
    assert_eq!(topics("a/#"), ["a/b", "a/b/c", "a/c"]);
    assert_eq!(topics("#"), ["a/b", "a/b/c", "a/c", "x/y"]);
    assert_eq!(topics("+/y"), ["x/y"]);
    assert!(topics("z/#").is_empty());
    let text = ok(&src, &["retained", "--filter", "a/+"]);
    assert_eq!(text.lines().count(), 3, "{text}");
    let err = run_with(&src, &["retained", "--filter", "a/#/b"]).unwrap_err();
    assert!(matches!(err, AdminError::BadRequest(_)), "{err}");
    assert_eq!(err.exit_code(), 2);

    let shown = json(&src, &["retained-show", "a/b"]);
    assert_eq!(
        (
            shown["payload_encoding"].as_str(),
            shown["payload"].as_str()
        ),
        (Some("utf8"), Some("retained a/b"))
    );
    let shown = json(&src, &["retained-show", "a/c"]);
    assert_eq!(
        (
            shown["payload_encoding"].as_str(),
            shown["payload"].as_str()
        ),
        (Some("base64"), Some("/wAB"))
    );

    let stats = json(&src, &["stats"]);
    assert_eq!(
        (
            stats["sessions"].as_u64(),
            stats["messages"].as_u64(),
            stats["queue_entries"].as_u64()
        ),
        (Some(3), Some(5), Some(2))
    );
    assert_eq!(
        (stats["retained"].as_u64(), stats["subscriptions"].as_u64()),
        (Some(4), Some(3))
    );
    assert!(stats["disk_bytes"].as_u64().unwrap() > 0);
    assert!(ok(&src, &["stats"]).contains("space amplification"));

    let export: Value = serde_json::from_str(&ok(&src, &["export"])).unwrap();
    assert_eq!(export["format"], "tern-export");
    let sessions = export["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 3);
    assert_eq!(sessions[0]["client_id"], "alpha");
    assert_eq!(sessions[0]["incoming_qos2"][0], 42);
    assert_eq!(sessions[0]["will"]["payload"], "Ynll");
    assert_eq!(sessions[0]["queue"][0]["message_id"], 1);
    assert_eq!(sessions[1]["queue"][0]["message_id"], 1);
    assert_eq!(sessions[1]["queue"][0]["shared"], "$share/workers/a/b");
    assert_eq!(sessions[1]["queue"][0]["weight"], 100);
    assert_eq!(sessions[2]["queue"].as_array().unwrap().len(), 0);
    assert_eq!(export["retained"].as_array().unwrap().len(), 4);
    let ids: Vec<u64> = export["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ids,
        [1, 2, 3, 4, 5],
        "message 1 once, though two queues hold it"
    );
    assert_eq!(export["messages"][0]["payload"], "aGVsbG8=");
}

#[test]
fn locked_and_missing_stores() {
    let dir = tempfile::tempdir().unwrap();
    build_store(dir.path());
    let held = SledStore::open(dir.path()).unwrap();
    let err = run_with(&offline(dir.path()), &["sessions"]).unwrap_err();
    assert!(matches!(err, AdminError::Locked { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("locked by a running broker") && message.contains("use --url"),
        "{message}"
    );
    assert!(message.contains(dir.path().to_str().unwrap()), "{message}");
    assert_eq!(err.exit_code(), 2);
    drop(held);

    let missing = dir.path().join("missing");
    let err = run_with(&offline(&missing), &["sessions"]).unwrap_err();
    assert!(matches!(err, AdminError::NoSuchDir { .. }), "{err}");
    assert!(err.to_string().contains(missing.to_str().unwrap()), "{err}");
    assert_eq!(err.exit_code(), 2);
    assert!(!missing.exists(), "no store is created");

    let empty = tempfile::tempdir().unwrap();
    let err = run_with(&offline(empty.path()), &["stats"]).unwrap_err();
    assert!(matches!(err, AdminError::NotAStore { .. }), "{err}");
    assert_eq!(
        std::fs::read_dir(empty.path()).unwrap().count(),
        0,
        "nothing written"
    );
}

/// The admin endpoint of a store, on a runtime of its own; stops on drop.
struct Endpoint {
    url: String,
    shutdown: tokio::sync::watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
    runtime: tokio::runtime::Runtime,
}

impl Endpoint {
    fn start(store: Arc<dyn Store>) -> Endpoint {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (shutdown, rx) = tokio::sync::watch::channel(false);
        let task = runtime.spawn(serve_admin(listener, AdminSources::of_store(store), rx));
        Endpoint {
            url,
            shutdown,
            task: Some(task),
            runtime,
        }
    }

    fn source(&self) -> Vec<String> {
        vec!["--url".into(), self.url.clone()]
    }

    fn addr(&self) -> &str {
        self.url.strip_prefix("http://").unwrap()
    }

    /// Sends raw bytes; returns the status code and the whole response.
    fn raw(&self, request: &[u8]) -> (u16, String) {
        let mut stream = TcpStream::connect(self.addr()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        // The server may answer (and close) before it has read everything.
        let _ = stream.write_all(request);
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response);
        let response = String::from_utf8_lossy(&response).into_owned();
        let status = response
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status in {response:?}"));
        (status, response)
    }

    fn stop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.task.take() {
            self.runtime
                .block_on(async { tokio::time::timeout(Duration::from_secs(10), task).await })
                .expect("serve_admin stops on shutdown")
                .unwrap();
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Removes the fields that depend on the directory's size on disk, which
/// reopening the store may change.
fn without_disk_figures(mut stats: Value) -> Value {
    let map = stats.as_object_mut().unwrap();
    map.remove("disk_bytes");
    map.remove("space_amplification");
    stats
}

#[test]
fn endpoint_serves_the_same_views() {
    let dir = tempfile::tempdir().unwrap();
    build_store(dir.path());
    let src = offline(dir.path());
    let expected: Vec<(String, String)> = READ_COMMANDS
        .iter()
        .map(|c| (ok(&src, c), ok(&src, &[c, &["--json"][..]].concat())))
        .collect();
    let stats_offline = without_disk_figures(json(&src, &["stats"]));

    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
    let mut endpoint = Endpoint::start(store);
    let url = endpoint.source();
    for (command, (table, json_out)) in READ_COMMANDS.iter().zip(&expected) {
        assert_eq!(&ok(&url, command), table, "{command:?}");
        assert_eq!(
            &ok(&url, &[command, &["--json"][..]].concat()),
            json_out,
            "{command:?} --json"
        );
    }
    assert_eq!(without_disk_figures(json(&url, &["stats"])), stats_offline);
    assert!(ok(&url, &["stats"]).contains("space amplification"));

    // Errors come back typed, with the same exit codes.
    let err = run_with(&url, &["session", "nobody"]).unwrap_err();
    assert!(
        matches!(err, AdminError::NotFound(_)) && err.exit_code() == 1,
        "{err}"
    );
    assert!(err.to_string().contains("nobody"), "{err}");
    let err = run_with(&url, &["retained-show", "a"]).unwrap_err();
    assert!(matches!(err, AdminError::NotFound(_)), "{err}");

    // The endpoint never writes.
    for command in [&["delete-session", "alpha"][..], &["compact"]] {
        let err = run_with(&url, command).unwrap_err();
        assert!(matches!(err, AdminError::ReadOnly { .. }), "{err}");
        assert!(
            err.to_string().contains("read-only") && err.to_string().contains("--data-dir"),
            "{err}"
        );
        assert_eq!(err.exit_code(), 2);
    }
    assert!(ok(&url, &["sessions"]).contains("alpha"));

    // Raw requests.
    let (status, response) = endpoint.raw(b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 405);
    assert!(response.contains("Allow: GET"), "{response}");
    let (status, response) = endpoint.raw(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 404);
    assert!(
        response.contains("application/json") && response.contains("\"error\""),
        "{response}"
    );
    assert_eq!(
        endpoint.raw(b"GET /v1/sessions/nobody HTTP/1.1\r\n\r\n").0,
        404
    );
    assert_eq!(
        endpoint
            .raw(b"GET /v1/sessions/nobody/queue HTTP/1.1\r\n\r\n")
            .0,
        404
    );
    assert_eq!(endpoint.raw(b"\x16\x03\x01garbage\r\n\r\n").0, 400);
    assert_eq!(
        endpoint.raw(b"GET /v1/sessions/%zz HTTP/1.1\r\n\r\n").0,
        400
    );
    assert_eq!(
        endpoint.raw(b"GET /v1/sessions/%FF%FE HTTP/1.1\r\n\r\n").0,
        400
    );
    assert_eq!(
        endpoint.raw(b"GET /v1/sessions/\xff HTTP/1.1\r\n\r\n").0,
        400
    );
    assert_eq!(
        endpoint
            .raw(b"GET /v1/retained?filter=a/%23/b HTTP/1.1\r\n\r\n")
            .0,
        400
    );
    assert_eq!(
        endpoint
            .raw(b"GET /v1/sessions/alpha/queue?limit=10001 HTTP/1.1\r\n\r\n")
            .0,
        400
    );
    let huge = format!(
        "GET /v1/stats HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(16 * 1024)
    );
    assert_eq!(endpoint.raw(huge.as_bytes()).0, 400);
    let (status, response) = endpoint.raw(b"GET /v1/sessions HTTP/1.1\r\n\r\n");
    assert_eq!(status, 200);
    assert!(
        response.contains("Transfer-Encoding: chunked") && response.contains("alpha"),
        "{response}"
    );
    let (status, response) = endpoint.raw(b"GET /v1/retained/a%2Fb HTTP/1.1\r\n\r\n");
    assert_eq!(status, 200);
    assert!(response.contains("retained a/b"), "{response}");

    // A client that connects and sends nothing is answered 408, not held.
    let mut idle = TcpStream::connect(endpoint.addr()).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = String::new();
    let _ = idle.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");

    endpoint.stop();
    let err = run_with(&url, &["sessions"]).unwrap_err();
    assert!(matches!(err, AdminError::Unreachable { .. }), "{err}");
    assert_eq!(err.exit_code(), 2);
}

#[test]
fn bad_urls_are_refused() {
    for url in [
        "https://127.0.0.1:8090",
        "127.0.0.1:8090",
        "http://127.0.0.1:notaport",
    ] {
        let err = run_with(&["--url".into(), url.into()], &["sessions"]).unwrap_err();
        assert!(matches!(err, AdminError::BadUrl { .. }), "{url}: {err}");
        assert_eq!(err.exit_code(), 2);
    }
}

#[test]
fn delete_session_and_compact_offline() {
    let dir = tempfile::tempdir().unwrap();
    build_store(dir.path());
    let src = offline(dir.path());

    assert_eq!(
        ok(&src, &["delete-session", "alpha"]),
        "deleted session \"alpha\"\n"
    );
    let err = run_with(&src, &["delete-session", "alpha"]).unwrap_err();
    assert!(matches!(err, AdminError::NotFound(_)), "{err}");
    let table = ok(&src, &["sessions"]);
    assert!(
        !table.contains("alpha") && table.contains("beta"),
        "{table}"
    );
    assert!(matches!(
        run_with(&src, &["session", "alpha"]),
        Err(AdminError::NotFound(_))
    ));
    // Message 1 stays: beta's queue still references it.
    assert_eq!(
        json(&src, &["queue", "beta"])["entries"][0]["message"]["topic"],
        "a/b"
    );

    let text = ok(&src, &["compact"]);
    assert!(
        text.contains("keys") && text.contains("space amplification"),
        "{text}"
    );
    let stats = json(&src, &["compact"]);
    assert_eq!(
        (stats["sessions"].as_u64(), stats["queue_entries"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(stats["subscriptions"], 1);
    // Rewritten into fresh files, in place: the store reads as before, and
    // nothing is left beside it.
    assert!(ok(&src, &["sessions"]).contains("beta"));
    let mut beside = dir.path().as_os_str().to_owned();
    beside.push(tern_storage::REWRITE_SUFFIX);
    assert!(!Path::new(&beside).exists());
}

/// `compact` with the default, relative data directory (`data`, whose
/// parent is the working directory): the store is rewritten and the old
/// files go.
#[test]
fn compact_takes_a_relative_data_dir() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    build_store(&dir);
    {
        // 2,000 retained messages of 2 KiB set and cleared: space to give back.
        let store = SledStore::open(&dir).unwrap();
        let mut set = Batch::new();
        let mut clear = Batch::new();
        for id in 100..2100u64 {
            let topic = format!("bulk/{id}");
            let mut m = message(id, "bulk", &[7; 2048]);
            m.topic = Bytes::from(topic.clone());
            set.put_message(m).put_retained(retained(&topic, id));
            clear.delete_retained(topic);
        }
        store.apply(&set).unwrap();
        store.apply(&clear).unwrap();
        store.sync().unwrap();
    }
    let before = ok(&offline(&dir), &["sessions"]);
    let out = Command::new(TERN)
        .current_dir(root.path())
        .args(["admin", "--data-dir", "data", "compact"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!root.path().join("data.rewrite").exists());
    assert_eq!(ok(&offline(&dir), &["sessions"]), before);
}

#[test]
fn the_binary_runs_admin() {
    let dir = tempfile::tempdir().unwrap();
    build_store(dir.path());
    let tern = |args: &[&str]| {
        Command::new(TERN)
            .arg("admin")
            .arg("--data-dir")
            .arg(dir.path())
            .args(args)
            .output()
            .unwrap()
    };
    let out = tern(&["sessions"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        ok(&offline(dir.path()), &["sessions"])
    );

    let out = tern(&["session", "nobody"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("tern admin: ") && err.contains("nobody"),
        "{err}"
    );

    let held = SledStore::open(dir.path()).unwrap();
    let out = tern(&["stats"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("locked by a running broker") && err.contains("use --url"),
        "{err}"
    );
    // The endpoint is read-only: a command that changes the store is told
    // to wait for the broker to stop, not sent there.
    let out = tern(&["compact"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("compact changes the store") && !err.contains("--url"),
        "{err}"
    );
    drop(held);

    let out = Command::new(TERN)
        .args(["admin", "--url", "http://127.0.0.1:1", "compact"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("read-only"));
}

/// Lists larger than one streamed chunk (64 KiB) arrive whole through the
/// endpoint, and a queue view stops at its limit.
#[test]
fn long_lists_stream_and_queues_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = SledStore::open(dir.path()).unwrap();
        let mut b = Batch::new();
        for i in 0..1500 {
            b.put_session(session(&format!("client-{i:05}"), 5, 3600));
        }
        b.put_message(message(1, "q/t", b"x"));
        for seq in 1..=150 {
            b.put_queue_entry(entry("client-00000", seq, 1, DeliveryState::Pending));
        }
        store.apply(&b).unwrap();
        store.sync().unwrap();
    }
    let src = offline(dir.path());
    let commands: &[&[&str]] = &[
        &["sessions", "--json"],
        &["sessions"],
        &["export"],
        &["queue", "client-00000"],
        &["queue", "client-00000", "--json", "--limit", "10000"],
    ];
    let expected: Vec<String> = commands.iter().map(|c| ok(&src, c)).collect();
    assert!(expected[0].len() > 3 * 64 * 1024, "{}", expected[0].len());
    assert!(expected[3].ends_with("use --limit N)\n"), "{}", expected[3]);
    assert_eq!(expected[3].lines().count(), 1 + 100 + 1);
    let queue: Value = serde_json::from_str(&expected[4]).unwrap();
    assert_eq!(queue["entries"].as_array().unwrap().len(), 150);
    assert_eq!(queue["truncated"], false);

    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
    let endpoint = Endpoint::start(store);
    for (command, expected) in commands.iter().zip(&expected) {
        assert_eq!(&ok(&endpoint.source(), command), expected, "{command:?}");
    }
}
