//! `backy-server`: stores revisions of VM disks sent by `backy-client`.

use anyhow::Context;
use backy_common::config::{ServerConfig, DEFAULT_SERVER_CONFIG};
use backy_server::{serve, storage};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "backy-server",
    version,
    about = "Stores block-level backups of VM disks as reflinked revisions",
    after_help = "Examples:\n  backy-server --config /etc/backy/server.yaml\n  backy-server --config server.yaml check-config"
)]
struct Cli {
    /// Server configuration (YAML).
    #[arg(long, short, env = "BACKY_SERVER_CONFIG", default_value = DEFAULT_SERVER_CONFIG)]
    config: PathBuf,
    /// Log more (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(long, short, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default).
    Serve,
    /// Validate the configuration and exit.
    CheckConfig,
}

fn load(path: &PathBuf) -> anyhow::Result<ServerConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(ServerConfig::from_yaml(&text, &path.display().to_string())?)
}

fn main() {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = run(cli) {
        eprintln!("backy-server: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let config = load(&cli.config)?;
    if let Some(Command::CheckConfig) = cli.command {
        println!(
            "{}: OK ({} jobs, {} schedules)",
            cli.config.display(),
            config.jobs.len(),
            config.schedules.len()
        );
        return Ok(());
    }
    let mode = storage::probe_storage(&config.base_dir)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(serve(config, mode, cli.config))
}
