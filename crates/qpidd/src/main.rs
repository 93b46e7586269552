//! `qpidd`, the broker daemon: reads the options (command line > `QPID_*` environment > config
//! file), sets up logging, takes the data dir, binds the listeners, prints the port on stdout
//! and serves AMQP 0-9-1 until SIGTERM or SIGINT. Run `qpidd --help` for the options.
//!
//! Modules: `options` (the option table and its three sources), `logging` (Qpid-style lines),
//! `listen` (binding), `daemon` (data-dir lock, pidfile, `--daemon`/`--check`/`--quit`),
//! `users_cmd` (`--user-add`/`--user-del`/`--user-list`).

mod daemon;
mod listen;
mod logging;
mod options;
mod users_cmd;

use std::io::{self, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use broker_core::BrokerConfig;
use broker_core::auth::UserDb;
use broker_core::server::{self, Broker};
use tokio::signal::unix::{SignalKind, signal};

use crate::logging::LogHandle;
use crate::options::{Action, Options};

fn main() -> ExitCode {
    let daemon_child = daemon::is_daemon_child();
    if daemon_child {
        let detached = daemon::detach_from_parent();
        if detached.is_err() {
            return report(detached);
        }
    }
    let args: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let env: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    let options = match options::load(&args, &env, |path| std::fs::read_to_string(path)) {
        Ok(o) => o,
        Err(e) => return report(Err(e.into())),
    };
    match options.action {
        Action::Help => {
            print!("{}", options::help_text());
            ExitCode::SUCCESS
        }
        Action::Version => {
            println!("{}", options::version_text());
            ExitCode::SUCCESS
        }
        Action::Check => match daemon::check(&options) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => report(Err(e)),
        },
        Action::Quit => report(daemon::quit(&options)),
        Action::UserAdd => report(users_cmd::user_add(&options)),
        Action::UserDel => report(users_cmd::user_del(&options)),
        Action::UserList => report(users_cmd::user_list(&options)),
        Action::Run if options.daemon && !daemon_child => report(start_daemon(&options, &args)),
        Action::Run => report(run(&options, daemon_child)),
    }
}

/// Exit 0, or log `critical Unexpected error: ...` and exit 1.
fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            logging::critical_error(&format!("{e:#}"));
            ExitCode::FAILURE
        }
    }
}

/// The users the broker authenticates against.
// Wired by the auth module: `broker_core::store::users_file::load(<data-dir>/users)`.
/// The users: `<data-dir>/users` (created with the default guest when missing), or only the
/// built-in guest with `--no-data-dir`.
fn load_users(options: &Options) -> anyhow::Result<UserDb> {
    match &options.data_dir {
        Some(dir) => Ok(broker_core::store::users_file::load(&dir.join("users"))?),
        None => Ok(UserDb::with_default_guest()),
    }
}

/// `--daemon`, parent side: start the background broker, print its port, exit.
fn start_daemon(options: &Options, args: &[String]) -> anyhow::Result<()> {
    logging::init(&options.log)?;
    let pid = daemon::spawn(options, args)?;
    tracing::info!(
        target: "Broker",
        notice = true,
        "Broker daemon started (pid={pid}), pidfile {}",
        options.pidfile.display()
    );
    Ok(())
}

/// Physical memory in bytes, from /proc/meminfo.
fn physical_memory() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| options::parse_meminfo(&t))
}

/// Runs the broker in this process until SIGTERM or SIGINT.
fn run(options: &Options, daemon_child: bool) -> anyhow::Result<()> {
    let log = logging::init(&options.log)?;
    if let Some(file) = &options.config_file {
        tracing::debug!(target: "Broker", "Config file read: {}", file.display());
    }
    let _data_dir_lock = match &options.data_dir {
        Some(dir) => Some(daemon::lock_data_dir(dir)?),
        None => None,
    };
    let memory = physical_memory();
    if memory.is_none() {
        tracing::warn!(target: "Broker", "Physical memory unknown: no memory high watermark");
    }
    let mut config = options.broker_config(memory);
    if let Some(dir) = &options.data_dir {
        config.system_id =
            Some(broker_core::store::system_id::load_or_create(dir).map_err(anyhow::Error::msg)?);
    }
    tracing::debug!(target: "Broker", "Configuration: {config:?}");
    let users = load_users(options)?;
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name("qpidd-worker");
    if options.worker_threads > 0 {
        builder.worker_threads(options.worker_threads);
    }
    let runtime = builder.build().context("cannot start the runtime")?;
    let result = runtime.block_on(serve(options, config, users, log, daemon_child));
    runtime.shutdown_timeout(Duration::from_secs(5));
    result
}

/// Binds, announces the port, serves until a stop signal, then shuts down cleanly.
async fn serve(
    options: &Options,
    config: BrokerConfig,
    users: UserDb,
    log: LogHandle,
    daemon_child: bool,
) -> anyhow::Result<()> {
    // Handlers first, so a signal sent as soon as the port is printed stops us cleanly.
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;

    // The store is recovered before the broker listens: no client sees a half-recovered
    // broker, and a store that refuses to start leaves no port printed.
    let broker = Broker::new(config, users);
    broker.mgmt.set_log_control(Arc::new(log.clone()));
    if let Some(dir) = &options.data_dir {
        let store = broker_core::store::Store::open(&broker, dir, options.store)
            .map_err(anyhow::Error::msg)?;
        broker.set_store(store);
    }
    let (listeners, port) = listen::bind(&options.interfaces, options.port).await?;
    let pidfile = if options.daemon || options.pidfile_explicit {
        Some(daemon::Pidfile::create(&options.pidfile)?)
    } else {
        None
    };
    let pid = std::process::id();
    tracing::info!(target: "Broker", notice = true, "Broker (pid={pid}) start-up");
    for listener in &listeners {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(target: "Network", notice = true, "Listening on TCP {addr}");
        }
    }
    {
        let mut stdout = io::stdout().lock();
        writeln!(stdout, "{port}")
            .and_then(|()| stdout.flush())
            .context("cannot print the port")?;
    }
    if daemon_child {
        log.stop_stderr();
        daemon::detach_stdio()?;
    }

    let reopen = log.clone();
    tokio::spawn(async move {
        while sighup.recv().await.is_some() {
            match reopen.reopen() {
                Ok(Some(path)) => {
                    tracing::info!(target: "Broker", "SIGHUP: reopened log file {}", path.display())
                }
                Ok(None) => tracing::debug!(target: "Broker", "SIGHUP: no log file to reopen"),
                Err(e) => tracing::error!(target: "Broker", "SIGHUP: {e}"),
            }
        }
    });
    let shutdown = async move {
        let name = tokio::select! {
            _ = sigterm.recv() => "SIGTERM",
            _ = sigint.recv() => "SIGINT",
        };
        tracing::info!(target: "Broker", notice = true, "Received {name}, shutting down");
    };

    let store = broker.store().cloned();
    if broker.config.ha.enabled() {
        let ha = ha_replication::HaReplication::new(tokio::runtime::Handle::current());
        broker.set_ha_module(ha.clone());
        ha.start(&broker, options.data_dir.as_deref())
            .map_err(anyhow::Error::msg)?;
    }
    server::run(broker, listeners, shutdown)
        .await
        .context("the broker stopped on an error")?;
    // The last round (the dequeues of the last acks) is on disk before the process exits.
    if let Some(store) = store {
        store.shutdown();
    }
    tracing::info!(target: "Broker", notice = true, "Broker (pid={pid}) shut-down");
    if let Some(pidfile) = &pidfile {
        pidfile.remove();
    }
    Ok(())
}
