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
    assert!(
        size <= TASK_FUTURE_BUDGET,
        "a connection's future is {size} bytes, over its budget of {TASK_FUTURE_BUDGET}: \
         its task cell no longer fits in 768 bytes (see -Zprint-type-sizes for what grew)"
    );
    drop(task);
    drop(client);
}
