//! What an idle connection costs in memory, pinned so that it cannot grow
//! unnoticed (the target: at most 2 KiB of RSS per idle connection; the
//! account is in docs/performance.md).
//!
//! A connection's task is the state of `connection::serve_tcp` at its
//! steady await. tokio allocates a task as one cell aligned to 128 bytes:
//! the future plus 104 bytes of its own, rounded up to the next 128. Up to
//! 664 bytes the cell is 768 bytes; 8 bytes more make it 896.

use std::mem::size_of_val;

use tern::{Broker, Config};
use tokio::net::{TcpListener, TcpStream};

/// The largest connection future whose task cell is still 768 bytes.
const TASK_FUTURE_BUDGET: usize = 768 - 104;

#[tokio::test]
async fn a_connection_task_fits_in_768_bytes() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (stream, peer) = listener.accept().await.unwrap();
    let task = tern::connection::serve_tcp(Broker::new(Config::default()), stream, peer);
    let size = size_of_val(&task);
    println!("TCP connection future: {size} bytes");
    assert!(
        size <= TASK_FUTURE_BUDGET,
        "a connection's future is {size} bytes, over its budget of {TASK_FUTURE_BUDGET}: \
         its task cell no longer fits in 768 bytes (see -Zprint-type-sizes for what grew)"
    );
    drop(task);
    drop(client);
}

/// A WebSocket connection's task: the same connection future, plus the
/// frame decoder and encoder instead of two borrowed socket halves. The
/// upgrade (tungstenite's handshake) is boxed and gone once it is done.
#[tokio::test]
async fn a_websocket_connection_task_fits_in_896_bytes() {
    const WS_TASK_FUTURE_BUDGET: usize = 896 - 104;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (stream, peer) = listener.accept().await.unwrap();
    let task = tern::websocket::serve_ws(Broker::new(Config::default()), stream, peer);
    let size = size_of_val(&task);
    println!("WebSocket connection future: {size} bytes");
    assert!(
        size <= WS_TASK_FUTURE_BUDGET,
        "a WebSocket connection's future is {size} bytes, over its budget of \
         {WS_TASK_FUTURE_BUDGET}: its task cell no longer fits in 896 bytes"
    );
    drop(task);
    drop(client);
}
