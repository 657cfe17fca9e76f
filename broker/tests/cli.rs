//! The `tern` binary: embedded defaults, config errors, signals.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TERN: &str = env!("CARGO_BIN_EXE_tern");

/// Kills the child on drop so a failing test leaves no process behind.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn temp_file(name: &str, contents: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tern-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

#[test]
fn bad_config_is_refused_naming_file_and_key() {
    let err = refused_config(&temp_file("bad.toml", "[limits]\nmax_packet_size = 3\n"));
    assert!(
        err.contains("bad.toml") && err.contains("limits.max_packet_size"),
        "{err}"
    );
    let err = refused_config(&temp_file("typo.toml", "[limit]\nmax_packet_size = 3000\n"));
    assert!(err.contains("typo.toml") && err.contains("limit"), "{err}");
    let err = refused_config(std::path::Path::new("/nonexistent/tern.toml"));
    assert!(err.contains("/nonexistent/tern.toml"), "{err}");
}

/// Runs `tern serve --config path`, asserts it exits with status 2, and
/// returns what it printed on stderr.
fn refused_config(path: &std::path::Path) -> String {
    let out = Command::new(TERN)
        .args(["serve", "--config"])
        .arg(path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn serve_without_config_says_so_and_stops_on_sigterm() {
    // The embedded default keeps its store in `data/` under the working
    // directory: run in a directory of our own.
    let cwd = std::env::temp_dir().join(format!("tern-cli-{}-serve", std::process::id()));
    let _ = std::fs::remove_dir_all(&cwd);
    std::fs::create_dir_all(&cwd).unwrap();
    let (mut running, log) = serve_in(&cwd);
    let (port, lines) = tcp_port(&log);
    assert!(
        logged(&lines, &["embedded default", "anonymous"]),
        "{lines:#?}"
    );
    // It serves MQTT: a CONNECT gets a CONNACK.
    let mut s = connect_and_expect_connack(port);

    let status = Command::new("kill")
        .args(["-TERM", &running.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let status = exit_status(&mut running);
    assert!(status.success(), "exit status {status}");
    // The connection was closed by the broker.
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut rest);
    assert!(logged(&lines, &["durable state restored"]), "{lines:#?}");
    assert!(cwd.join("data").join("db").exists(), "no store in data/");
    std::fs::remove_dir_all(&cwd).unwrap();
}

#[test]
fn a_second_broker_on_the_same_data_dir_is_refused() {
    let dir = std::env::temp_dir().join(format!("tern-cli-{}-locked", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let serve = |dir: &std::path::Path| {
        let mut cmd = Command::new(TERN);
        cmd.args(["serve", "--bind", "127.0.0.1:0", "--ws-bind", "127.0.0.1:0"])
            .args(["--admin-bind", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    };
    let mut first = Running(serve(&dir).spawn().unwrap());
    // Keep reading the first broker's log while the test runs.
    let first_log = drain(&mut first);
    wait_for_line(&first_log, "listener ready");

    // The second refuses at once; should it ever start, the guard kills it.
    let mut second = Running(serve(&dir).spawn().unwrap());
    let second_log = drain(&mut second);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = second.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the second broker did not refuse"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(1));
    let err: Vec<String> = second_log.iter().collect();
    assert!(
        logged(&err, &["cannot open the store", "locked"]),
        "{err:#?}"
    );
    assert!(
        first.0.try_wait().unwrap().is_none(),
        "the first broker died"
    );
    drop(first);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Starts `tern serve` with the embedded default in `cwd`, on ports of
/// its own choosing; returns it with its log lines.
fn serve_in(cwd: &std::path::Path) -> (Running, std::sync::mpsc::Receiver<String>) {
    serve_with(cwd, &[])
}

/// Starts `tern serve` in `cwd` with `args` added, on ports of its own
/// choosing; returns it with its log lines.
fn serve_with(
    cwd: &std::path::Path,
    args: &[&std::ffi::OsStr],
) -> (Running, std::sync::mpsc::Receiver<String>) {
    let child = Command::new(TERN)
        .args(["serve", "--bind", "127.0.0.1:0", "--ws-bind", "127.0.0.1:0"])
        .args(["--admin-bind", "127.0.0.1:0"])
        .args(args)
        .current_dir(cwd)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut running = Running(child);
    let log = drain(&mut running);
    (running, log)
}

/// Waits for the MQTT/TCP listener's line in `log`; returns its port and
/// the lines logged until then.
fn tcp_port(log: &std::sync::mpsc::Receiver<String>) -> (u16, Vec<String>) {
    let lines = wait_for_line(log, "MQTT/TCP listener ready addr=127.0.0.1:");
    let port = lines
        .last()
        .and_then(|l| l.split("listener ready addr=127.0.0.1:").nth(1))
        .and_then(|rest| rest.trim().parse::<u16>().ok())
        .unwrap_or_else(|| panic!("no port in {lines:#?}"));
    (port, lines)
}

/// Waits (10 s at most) for the broker to exit after a signal.
fn exit_status(running: &mut Running) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = running.0.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "broker did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads a child's stderr on a thread of its own, line by line, so the
/// child never writes into a full or closed pipe.
fn drain(child: &mut Running) -> std::sync::mpsc::Receiver<String> {
    let stderr = child.0.stderr.take().expect("stderr is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Whether one of `lines` contains every one of `words`.
fn logged(lines: &[String], words: &[&str]) -> bool {
    lines.iter().any(|l| words.iter().all(|w| l.contains(w)))
}

/// Waits (10 s at most) for a log line containing `needle`; returns the
/// lines read so far, that one included.
fn wait_for_line(log: &std::sync::mpsc::Receiver<String>, needle: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(line) = log.recv_timeout(Duration::from_millis(100)) {
            let found = line.contains(needle);
            lines.push(line);
            if found {
                return lines;
            }
        }
    }
    panic!("no line with {needle:?} in {lines:#?}");
}

/// A SIGTERM that comes as soon as the listeners are ready (a supervisor
/// stopping a broker it has just started) still shuts down cleanly: the
/// signal handlers are in place before any listener opens.
#[test]
fn a_sigterm_right_after_start_is_a_clean_shutdown() {
    let cwd = std::env::temp_dir().join(format!("tern-cli-{}-early", std::process::id()));
    for _ in 0..5 {
        let _ = std::fs::remove_dir_all(&cwd);
        std::fs::create_dir_all(&cwd).unwrap();
        let (mut running, log) = serve_in(&cwd);
        wait_for_line(&log, "MQTT/TCP listener ready");
        let pid = libc::pid_t::try_from(running.0.id()).unwrap();
        // SAFETY: kill(2) takes plain integers; `pid` is our own child, not
        // yet reaped (`running` waits for it below or on drop).
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let status = exit_status(&mut running);
        assert!(
            status.success(),
            "exit status {status}: killed, not shut down"
        );
    }
    let _ = std::fs::remove_dir_all(&cwd);
}

#[test]
fn the_broker_outlives_its_log_reader() {
    let dir = std::env::temp_dir().join(format!("tern-cli-{}-nolog", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let child = Command::new(TERN)
        .args(["serve", "--bind", "127.0.0.1:0", "--ws-bind", "127.0.0.1:0"])
        .args([
            "--admin-bind",
            "127.0.0.1:0",
            "--log-level",
            "debug",
            "--data-dir",
        ])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut running = Running(child);
    let stderr = running.0.stderr.take().unwrap();
    let mut port = None;
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        if let Some(rest) = line.split("MQTT/TCP listener ready addr=127.0.0.1:").nth(1) {
            port = rest.trim().parse::<u16>().ok();
            break;
        }
    }
    // The reader is gone (the pipe is closed); every log line from now on
    // fails to be written. A connection logs at debug level.
    let port = port.expect("a listener line");
    for _ in 0..3 {
        connect_and_expect_connack(port);
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        running.0.try_wait().unwrap().is_none(),
        "the broker exited when its log pipe closed"
    );
    drop(running);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Sends an MQTT 3.1.1 CONNECT (client id "a") to 127.0.0.1:`port` and
/// asserts the CONNACK accepts it; returns the open connection.
fn connect_and_expect_connack(port: u16) -> std::net::TcpStream {
    let (s, connack) = connect_speaking(port, 4);
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);
    s
}

/// A clean-session CONNECT of client `a` at protocol `level`; returns the
/// connection and the 4-byte CONNACK it got.
fn connect_speaking(port: u16, level: u8) -> (std::net::TcpStream, [u8; 4]) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&[
        0x10, 0x0D, 0, 4, b'M', b'Q', b'T', b'T', level, 0x02, 0, 60, 0, 1, b'a',
    ])
    .unwrap();
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).unwrap();
    (s, connack)
}

/// An MQTT 3.1.1 CONNECT with a user name and password; returns the open
/// connection and the CONNACK's return code.
fn connect_as(port: u16, user: &str, password: &str) -> (std::net::TcpStream, u8) {
    use std::io::{Read, Write};
    let field = |s: &str| {
        let mut f = u16::try_from(s.len()).unwrap().to_be_bytes().to_vec();
        f.extend_from_slice(s.as_bytes());
        f
    };
    let mut body = field("MQTT");
    body.extend_from_slice(&[4, 0xC2, 0, 60]);
    for part in ["reloader", user, password] {
        body.extend(field(part));
    }
    let mut packet = vec![0x10, u8::try_from(body.len()).unwrap()];
    packet.extend(body);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&packet).unwrap();
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).unwrap();
    assert_eq!(connack[..2], [0x20, 0x02]);
    (s, connack[3])
}

fn send_signal(running: &Running, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(running.0.id()).unwrap();
    // SAFETY: kill(2) takes plain integers; `pid` is our own child, not
    // yet reaped (`running` waits for it on drop).
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
}

/// SIGHUP puts the config file's `[auth]` in force: a client whose password
/// changed is disconnected and new connections need the new password; a
/// file that no longer loads changes nothing.
#[test]
fn sighup_reloads_auth_from_the_config_file() {
    use std::io::Read;
    let users = |password: &str| {
        format!("[auth]\nallow_anonymous = false\n[[auth.users]]\nname = \"u\"\npassword = \"{password}\"\n")
    };
    let config = temp_file("reload.toml", &users("old"));
    let data = config.with_file_name("reload-data");
    let (mut running, log) = serve_with(
        config.parent().unwrap(),
        &[
            "--config".as_ref(),
            config.as_os_str(),
            "--durability".as_ref(),
            "memory".as_ref(),
            "--data-dir".as_ref(),
            data.as_os_str(),
        ],
    );
    let (port, _) = tcp_port(&log);

    let (mut before, code) = connect_as(port, "u", "old");
    assert_eq!(code, 0);
    std::fs::write(&config, users("new")).unwrap();
    send_signal(&running, libc::SIGHUP);
    wait_for_line(&log, "[auth] reloaded");
    let mut rest = Vec::new();
    assert!(
        before.read_to_end(&mut rest).is_ok(),
        "the old password's connection is closed"
    );
    assert_eq!(
        connect_as(port, "u", "old").1,
        4,
        "bad user name or password"
    );
    assert_eq!(connect_as(port, "u", "new").1, 0);

    std::fs::write(&config, "[auth]\nallow_anonymous = 3\n").unwrap();
    send_signal(&running, libc::SIGHUP);
    wait_for_line(&log, "[auth] not reloaded");
    assert_eq!(connect_as(port, "u", "new").1, 0, "the rules in force stay");

    send_signal(&running, libc::SIGTERM);
    assert!(exit_status(&mut running).success());
    let _ = std::fs::remove_dir_all(config.parent().unwrap());
}

/// A client repeating a mistake cannot flood the log: each kind of refusal
/// is logged at most 20 times a second, and the next line after a burst
/// says how many it left out, so the lines and the `suppressed` counts
/// still add up to every refusal.
#[test]
fn a_flood_of_refused_connections_is_logged_in_a_few_lines() {
    const ATTEMPTS: usize = 500;
    const LINE: &str = "refused: unsupported protocol version";
    let dir = temp_file("flood", "").parent().unwrap().to_path_buf();
    let (mut running, log) = serve_in(&dir);
    let (port, _) = tcp_port(&log);
    // Protocol level 9: refused with the 3.1.1 CONNACK 0x01.
    let refused = || assert_eq!(connect_speaking(port, 9).1, [0x20, 0x02, 0x00, 0x01]);
    let started = Instant::now();
    for _ in 0..ATTEMPTS {
        refused();
    }
    let elapsed = started.elapsed();
    // One more in a later window: its line reports those left out.
    std::thread::sleep(Duration::from_millis(1100));
    refused();
    // Every refusal logged its line before its CONNACK; the log's reader
    // may lag a little.
    let mut lines = Vec::new();
    while let Ok(line) = log.recv_timeout(Duration::from_millis(500)) {
        lines.push(line);
    }
    let refusals: Vec<&String> = lines.iter().filter(|l| l.contains(LINE)).collect();
    let windows = usize::try_from(elapsed.as_secs()).unwrap() + 2;
    assert!(
        refusals.len() <= 20 * windows,
        "{} lines for {ATTEMPTS} refusals in {elapsed:?}",
        refusals.len()
    );
    let suppressed: usize = refusals
        .iter()
        .filter_map(|l| l.split("suppressed=").nth(1))
        .map(|rest| {
            rest.split_whitespace()
                .next()
                .unwrap()
                .parse::<usize>()
                .unwrap()
        })
        .sum();
    assert_eq!(refusals.len() + suppressed, ATTEMPTS + 1, "{refusals:#?}");
    assert!(refusals.last().unwrap().contains("suppressed="));

    send_signal(&running, libc::SIGTERM);
    assert!(exit_status(&mut running).success());
    let _ = std::fs::remove_dir_all(dir);
}

/// Sends PINGREQ and expects the next packet to be its PINGRESP: what was
/// sent before it was handled, and nothing else was coming.
fn ping(s: &mut std::net::TcpStream) {
    use std::io::{Read, Write};
    s.write_all(&[0xC0, 0]).unwrap();
    let mut pingresp = [0u8; 2];
    s.read_exact(&mut pingresp).unwrap();
    assert_eq!(pingresp, [0xD0, 0]);
}

/// A store that lost writes it had synced (here: its engine files put back
/// as they were one restart earlier, as when the engine's recovery stops at
/// a damaged record) is refused with a line that says what to do; once the
/// damage is accepted the broker serves what the store still holds, and the
/// next start is a normal one.
#[test]
fn a_damaged_store_is_refused_until_the_damage_is_accepted() {
    use std::io::{Read, Write};
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let data_arg = [std::ffi::OsStr::new("--data-dir"), data.as_os_str()];
    // Publishes a retained message on `topic` and stops the broker cleanly.
    let retain = |topic: &str| {
        let (mut running, log) = serve_with(root.path(), &data_arg);
        let mut s = connect_and_expect_connack(tcp_port(&log).0);
        let mut publish = vec![0x31, 2 + topic.len() as u8 + 1, 0, topic.len() as u8];
        publish.extend_from_slice(topic.as_bytes());
        publish.push(b'1');
        s.write_all(&publish).unwrap();
        // PINGRESP: the PUBLISH before it was handled.
        ping(&mut s);
        send_signal(&running, libc::SIGTERM);
        assert!(exit_status(&mut running).success());
    };
    retain("kept");
    let before = root.path().join("before");
    copy_engine_files(&data, &before);
    retain("lost");
    let after = root.path().join("after");
    std::fs::rename(&data, &after).unwrap();
    copy_engine_files(&before, &data);
    std::fs::copy(after.join("synced-commit"), data.join("synced-commit")).unwrap();

    let (mut refused, log) = serve_with(root.path(), &data_arg);
    assert_eq!(exit_status(&mut refused).code(), Some(1));
    let lines: Vec<String> = log.iter().collect();
    assert!(
        logged(&lines, &["is damaged"]) && logged(&lines, &["--accept-store-damage"]),
        "{lines:#?}"
    );

    // `tern admin` refuses it too, saying how to look at it; read-only it
    // shows what is left, refuses to change it, and leaves it refused.
    let admin = |args: &[&str]| {
        let out = Command::new(TERN)
            .arg("admin")
            .args(data_arg)
            .args(args)
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    let (code, _, err) = admin(&["retained"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("is damaged") && err.contains("--read-damaged"),
        "{err}"
    );
    let (code, out, err) = admin(&["--read-damaged", "retained", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("\"kept\"") && !out.contains("\"lost\""),
        "{out}"
    );
    let (code, _, err) = admin(&["--read-damaged", "delete-session", "anyone"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("read-only"), "{err}");
    assert_eq!(admin(&["retained"]).0, Some(2), "still refused");

    let accept = [
        data_arg[0],
        data_arg[1],
        std::ffi::OsStr::new("--accept-store-damage"),
    ];
    let (mut accepted, log) = serve_with(root.path(), &accept);
    let (port, lines) = tcp_port(&log);
    assert!(logged(&lines, &["ERROR", "is damaged"]), "{lines:#?}");
    let mut s = connect_and_expect_connack(port);
    s.write_all(&[0x82, 6, 0, 1, 0, 1, b'#', 0]).unwrap();
    let mut suback = [0u8; 5];
    s.read_exact(&mut suback).unwrap();
    assert_eq!(suback, [0x90, 3, 0, 1, 0]);
    let mut retained = [0u8; 2 + 2 + 4 + 1];
    s.read_exact(&mut retained).unwrap();
    assert_eq!(&retained[4..], b"kept1");
    // Nothing else was retained: the next packet is the PINGRESP.
    ping(&mut s);
    send_signal(&accepted, libc::SIGTERM);
    assert!(exit_status(&mut accepted).success());

    // The store as it is now is the reference: a plain start works.
    let (mut plain, log) = serve_with(root.path(), &data_arg);
    tcp_port(&log);
    send_signal(&plain, libc::SIGTERM);
    assert!(exit_status(&mut plain).success());

    // Without its record of the last synced commit the store opens, and
    // the log says that it could not be checked.
    std::fs::remove_file(data.join("synced-commit")).unwrap();
    let (_running, log) = serve_with(root.path(), &data_arg);
    let lines = wait_for_line(&log, "cannot be checked at this start");
    assert!(lines.last().unwrap().contains("WARN"), "{lines:#?}");
    tcp_port(&log);
}

/// Copies the storage engine's files of `from` into `to` (everything but
/// the store's record of its last synced commit).
fn copy_engine_files(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() && path.file_name().is_some_and(|n| n != "synced-commit") {
            std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        }
    }
}

/// A store whose files make the storage engine panic as it recovers (sled
/// 0.34 does on much damage) is refused with an error that says so and what
/// to do; the panic itself is one error line of the log, not raw text.
#[test]
fn an_unreadable_store_is_refused_and_its_panic_logged() {
    use tern_storage::{Batch, MessageRecord, QueueEntry, SledStore, Store, StoreError};
    let root = tempfile::tempdir().unwrap();
    let pristine = root.path().join("pristine");
    {
        let store = SledStore::open(&pristine).unwrap();
        for id in 1..=3000u64 {
            let mut b = Batch::new();
            b.put_message(MessageRecord {
                id,
                topic: bytes::Bytes::from(format!("t/{id}")),
                payload: bytes::Bytes::from(vec![1u8; 200]),
                qos: 1,
                retain: false,
                properties: bytes::Bytes::new(),
                expires_at: None,
            })
            .put_queue_entry(QueueEntry {
                client_id: "c".into(),
                seq: id,
                message_id: id,
                qos: 1,
                packet_id: None,
                state: tern_storage::DeliveryState::Pending,
                dup: false,
                retain: false,
                subscription_ids: Vec::new(),
                weight: Some(204),
                shared: None,
            });
            store.apply(&b).unwrap();
            if id % 10 == 0 {
                store.sync().unwrap();
            }
        }
    }
    // A copy of the store with 16 bytes inverted at `percent` of its log.
    let damaged = |name: &str, percent: usize| {
        let dir = root.path().join(name);
        copy_engine_files(&pristine, &dir);
        std::fs::copy(pristine.join("synced-commit"), dir.join("synced-commit")).unwrap();
        let mut log = std::fs::read(dir.join("db")).unwrap();
        let at = log.iter().rposition(|&b| b != 0).unwrap() * percent / 100;
        for b in &mut log[at..at + 16] {
            *b ^= 0xFF;
        }
        std::fs::write(dir.join("db"), &log).unwrap();
        dir
    };
    // Where such damage makes sled panic depends on its layout: find a
    // place on copies first (opening one changes it).
    let percent = [5, 10, 55, 60, 65, 70, 80, 85]
        .into_iter()
        .find(|&p| {
            matches!(
                SledStore::open(damaged(&format!("probe-{p}"), p)),
                Err(StoreError::Unreadable { .. })
            )
        })
        .expect("some damage makes the storage engine panic");
    let data = damaged("data", percent);

    let data_arg = [std::ffi::OsStr::new("--data-dir"), data.as_os_str()];
    let (mut refused, log) = serve_with(root.path(), &data_arg);
    assert_eq!(exit_status(&mut refused).code(), Some(1));
    let lines: Vec<String> = log.iter().collect();
    assert!(logged(&lines, &["ERROR", "panic:"]), "{lines:#?}");
    assert!(logged(&lines, &["ERROR", "cannot be read"]), "{lines:#?}");
    assert!(
        logged(&lines, &["ERROR", "restore the directory from a backup"]),
        "{lines:#?}"
    );
    assert!(
        !lines.iter().any(|l| l.starts_with("thread ")),
        "{lines:#?}"
    );
}
