//! `qpid-perftest`: a PerfTest-style AMQP 0-9-1 load generator whose hot paths write
//! pre-encoded frames and read deliveries straight off tokio sockets, so that the broker, not
//! the tool, is what gets measured. See `qpid-perftest --help` and `docs/benchmarks.md`.
//!
//! Modules: `cli` (flags), `raw_conn` (handshake and frame IO), `frames` (hot-path codec),
//! `producer` and `consumer` (raw hot paths), `lapin_client` (`--client lapin`), `setup`
//! (declare/delete through lapin), `shared` (run state), `tracking` (loss and duplicates),
//! `procstat` (/proc), `run` (the phases of a run), `report` (JSON and text).

mod cli;
mod consumer;
mod frames;
mod lapin_client;
mod procstat;
mod producer;
mod raw_conn;
mod report;
mod run;
mod setup;
mod shared;
mod tracking;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("qpid-perftest: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run::run(&args)) {
        Ok(report) => {
            if args.json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.to_text());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("qpid-perftest: {e:#}");
            ExitCode::FAILURE
        }
    }
}
