//! `tidings`: the relay daemon and the admin tool ([`tidings_relay::cli`]). Parses flags and
//! environment, installs the tracing subscriber, runs the command and maps its failure to an
//! exit code: 0 ok, 1 failure at run time, 2 bad configuration or usage.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tidings_relay::cli::{self, Cli, LogFormat};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// See the `mimalloc` feature in Cargo.toml.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // One crypto provider for the process (ring, as async-nats uses), so rustls never has to
    // guess between providers.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("TIDINGS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tokio_postgres=warn"));
    // Log lines go through a thread of their own and are dropped (counted) when stderr does not
    // drain: a reader that stops reading must never block the runtime, or SIGTERM.
    let (mut stderr, _flush_on_exit) = tracing_appender::non_blocking(std::io::stderr());
    // Whatever TIDINGS_LOG says, never lapin's trace events (they show the AMQP handshake
    // frames, the SASL response with the password among them, as bytes) nor its warning for
    // each returned message (it carries the whole message, payload included: the sink reports
    // unroutable messages itself).
    let lapin_guard = tracing_subscriber::filter::filter_fn(|m| {
        !m.target().starts_with("lapin")
            || (*m.level() <= tracing::Level::DEBUG && m.target() != "lapin::returned_messages")
    });
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(stderr.clone());
    match cli.log_format() {
        LogFormat::Text => tracing_subscriber::registry()
            .with(layer.with_filter(filter).with_filter(lapin_guard))
            .init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(layer.json().with_filter(filter).with_filter(lapin_guard))
            .init(),
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(cli::run(cli));
    // Work still blocked on a pipe nobody reads (or a DNS lookup) must not keep the process.
    runtime.shutdown_timeout(Duration::from_millis(500));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            let _ = writeln!(stderr, "error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}
