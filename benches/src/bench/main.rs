//! tern-bench: an MQTT load generator, independent of the broker it
//! measures. See `tern-bench --help` and docs/performance.md.

mod args;
mod client;
mod procfs;
mod relay;
mod report;
mod run;
mod sink;
mod wire;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = args::Args::parse();
    let plan = match args.plan() {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("tern-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tern-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json = args.json;
    let outcome = runtime.block_on(run::run(args, plan, threads));
    // Connections still open are closed with the process; do not wait for
    // tasks blocked on a broker that stopped reading.
    runtime.shutdown_background();
    match outcome {
        Ok(run::Outcome::Throughput(r)) => print_report(&r, r.text(), json),
        Ok(run::Outcome::Conn(r)) => print_report(&r, r.text(), json),
        Ok(run::Outcome::Sink(r)) => print_report(&r, r.text(), json),
        Ok(run::Outcome::Relay(r)) => print_report(&r, r.text(), json),
        Err(e) => {
            eprintln!("tern-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Prints a run's report: as one line of JSON with `--json`, else as
/// `text`.
fn print_report<R: serde::Serialize>(report: &R, text: String, json: bool) -> ExitCode {
    if json {
        println!("{}", serde_json::to_string(report).expect("serialisable"));
    } else {
        print!("{text}");
    }
    ExitCode::SUCCESS
}
