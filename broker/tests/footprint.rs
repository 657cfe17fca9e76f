//! What an idle connection costs in memory, pinned so that it cannot grow
//! unnoticed (the target: at most 2 KiB of RSS per idle connection; the
//! account is in docs/performance.md).
//!
//! A connection's task is the state of `connection::serve_tcp` (or
//! `websocket::serve_ws`) at its steady await. tokio allocates a task as one
//! cell aligned to 128 bytes: the future plus 104 bytes of its own, rounded
//! up to the next 128. Up to 664 bytes the cell is 768 bytes; 8 bytes more
//! make it 896.

use std::mem::size_of_val;
use std::net::SocketAddr;

use tern::{Broker, Config};
use tokio::net::{TcpListener, TcpStream};

/// What tokio adds to a future in its task cell.
const TASK_HEADER: usize = 104;

/// An accepted connection (and its client end, kept open while measured).
async fn accepted() -> (TcpStream, TcpStream, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (stream, peer) = listener.accept().await.unwrap();
    (client, stream, peer)
}

/// Fails when a connection future of `size` bytes no longer fits in a task
/// cell of `cell` bytes.
fn assert_fits(what: &str, size: usize, cell: usize) {
    println!("{what} connection future: {size} bytes");
    let budget = cell - TASK_HEADER;
    assert!(
        size <= budget,
        "a {what} connection's future is {size} bytes, over its budget of {budget}: \
         its task cell no longer fits in {cell} bytes (see -Zprint-type-sizes for what grew)"
    );
}

#[tokio::test]
async fn a_connection_task_fits_in_768_bytes() {
    let (_client, stream, peer) = accepted().await;
    let task = tern::connection::serve_tcp(Broker::new(Config::default()), stream, peer);
    assert_fits("TCP", size_of_val(&task), 768);
}

/// A WebSocket connection's task: the same connection future, with the
/// frame decoder and the shared write side instead of two borrowed socket
/// halves. The upgrade (tungstenite's handshake) is boxed and gone once it
/// is done.
#[tokio::test]
async fn a_websocket_connection_task_fits_in_896_bytes() {
    let (_client, stream, peer) = accepted().await;
    let task = tern::websocket::serve_ws(Broker::new(Config::default()), stream, peer);
    assert_fits("WebSocket", size_of_val(&task), 896);
}
