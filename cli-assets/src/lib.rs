//! Man pages and shell completion scripts made from a binary's own clap
//! definition, so they always match the options it accepts. Each binary
//! flattens [`AssetsCommand`] into its subcommands: a visible
//! `completions SHELL`, and a hidden `generate-assets --out DIR` that
//! `scripts/package.sh` runs to fill the Debian packages. With the man
//! pages of the command line goes the section-5 page of the binary's
//! configuration file ([`config_page`]).

pub mod config_page;

use backy_common::config_reference::ConfigReference;
use clap_complete::Shell;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum AssetsError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing to stdout: {0}")]
    Stdout(#[source] std::io::Error),
}

/// The subcommands this crate adds to a binary (`#[command(flatten)]`).
#[derive(clap::Subcommand, Debug, Clone)]
pub enum AssetsCommand {
    /// Print a shell completion script to stdout
    #[command(after_help = "\
Examples:
  source <(backy-client completions bash)
  backy-client completions zsh > ~/.zfunc/_backy-client
  backy-client completions fish > ~/.config/fish/completions/backy-client.fish

The Debian packages install these for bash, zsh and fish already.")]
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Write the man pages and completion scripts under DIR (packaging)
    #[command(hide = true)]
    GenerateAssets {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

impl AssetsCommand {
    /// Runs the subcommand for the binary whose full definition is `cmd`
    /// and whose configuration file `config` describes.
    pub fn run(&self, cmd: clap::Command, config: &ConfigReference) -> Result<(), AssetsError> {
        match self {
            AssetsCommand::Completions { shell } => {
                // Made whole first: clap_complete panics on a write error,
                // and a reader may go away (`| head`), which is no error.
                let mut text = Vec::new();
                completions(cmd, *shell, &mut text);
                let mut out = std::io::stdout().lock();
                match out.write_all(&text).and_then(|()| out.flush()) {
                    Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(AssetsError::Stdout(e)),
                    _ => Ok(()),
                }
            }
            AssetsCommand::GenerateAssets { out } => {
                for path in generate(cmd, config, out)? {
                    println!("{}", path.display());
                }
                Ok(())
            }
        }
    }
}

/// The shells whose scripts the packages ship, with where each one's
/// script goes under `completions/` (named as the shell looks it up).
pub const PACKAGED_SHELLS: [(Shell, &str); 3] = [
    (Shell::Bash, "bash/{}"),
    (Shell::Zsh, "zsh/_{}"),
    (Shell::Fish, "fish/{}.fish"),
];

/// Writes the completion script of `cmd` for `shell` into `out`.
pub fn completions(mut cmd: clap::Command, shell: Shell, out: &mut Vec<u8>) {
    let name = cmd.get_name().to_string();
    let mut text = Vec::new();
    clap_complete::generate(shell, &mut cmd, name.clone(), &mut text);
    if shell == Shell::Bash {
        text = fix_bash_names(&text, &name);
    }
    out.extend_from_slice(&text);
}

/// clap_complete's bash script for a hyphenated binary (`backy-client`)
/// dispatches to `backy__client__subcmd__push` but names the case arm
/// `backy__subcmd__client__subcmd__push`, so nothing after a subcommand
/// completes: the arms get the dispatcher's names.
fn fix_bash_names(script: &[u8], name: &str) -> Vec<u8> {
    let text = String::from_utf8_lossy(script);
    let arm = name.replace('-', "__subcmd__");
    let dispatched = name.replace('-', "__");
    if arm == dispatched {
        return script.to_vec();
    }
    text.replace(&format!("{arm}__subcmd__"), &format!("{dispatched}__subcmd__"))
        .replace(&format!("        {arm})"), &format!("        {dispatched})"))
        .into_bytes()
}

/// Writes `out/man/NAME.1` for the binary and `NAME-SUB.1` for each of its
/// visible subcommands, `out/man/PAGE.5` for its configuration file, and
/// `out/completions/{bash,zsh,fish}/...`; returns the files written.
pub fn generate(
    cmd: clap::Command,
    config: &ConfigReference,
    out: &Path,
) -> Result<Vec<PathBuf>, AssetsError> {
    let name = cmd.get_name().to_string();
    let mut written = Vec::new();
    let man = out.join("man");
    create_dir(&man)?;
    // As clap_mangen::generate_to, plus the manual's name; `help` is no page
    // (but is completed: it exists).
    let mut pages = cmd.clone().disable_help_subcommand(true);
    pages.build();
    man_pages(&pages, &man, &mut written)?;
    let version = cmd.get_version().unwrap_or_default();
    let path = man.join(format!("{}.5", config.page));
    write(&path, config_page::render(config, version).as_bytes())?;
    written.push(path);
    for (shell, pattern) in PACKAGED_SHELLS {
        let path = out.join("completions").join(pattern.replace("{}", &name));
        if let Some(dir) = path.parent() {
            create_dir(dir)?;
        }
        let mut text = Vec::new();
        completions(cmd.clone(), shell, &mut text);
        write(&path, &text)?;
        written.push(path);
    }
    Ok(written)
}

fn man_pages(cmd: &clap::Command, dir: &Path, written: &mut Vec<PathBuf>) -> Result<(), AssetsError> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        man_pages(sub, dir, written)?;
    }
    let page = clap_mangen::Man::new(cmd.clone()).manual("backy");
    let path = dir.join(page.get_filename());
    let mut text = Vec::new();
    page.render(&mut text).map_err(|source| AssetsError::Io {
        what: "rendering man page",
        path: path.clone(),
        source,
    })?;
    write(&path, &text)?;
    written.push(path);
    Ok(())
}

fn create_dir(dir: &Path) -> Result<(), AssetsError> {
    std::fs::create_dir_all(dir).map_err(|source| AssetsError::Io {
        what: "creating",
        path: dir.to_path_buf(),
        source,
    })
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), AssetsError> {
    std::fs::write(path, bytes).map_err(|source| AssetsError::Io {
        what: "writing",
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use backy_common::config_reference::CLIENT;
    use clap::{CommandFactory, Parser, Subcommand};

    /// A binary shaped like backy's: global options, subcommands, and
    /// these assets flattened in.
    #[derive(Parser)]
    #[command(name = "demo", version, about = "A demo")]
    struct Cli {
        /// Be loud
        #[arg(long, global = true)]
        loud: bool,
        #[command(subcommand)]
        command: Command,
    }

    #[derive(Subcommand)]
    enum Command {
        /// Do a thing
        Push {
            /// The job
            job: String,
        },
        #[command(flatten)]
        Assets(AssetsCommand),
    }

    #[test]
    fn writes_a_page_per_visible_command_and_three_completions() {
        let dir = tempfile::tempdir().unwrap();
        let written = generate(Cli::command(), &CLIENT, dir.path()).unwrap();
        let mut names: Vec<String> = written
            .iter()
            .map(|p| p.strip_prefix(dir.path()).unwrap().display().to_string())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "completions/bash/demo",
                "completions/fish/demo.fish",
                "completions/zsh/_demo",
                "man/backy-client.yaml.5",
                "man/demo-completions.1",
                "man/demo-push.1",
                "man/demo.1",
            ]
        );
        let top = std::fs::read_to_string(dir.path().join("man/demo.1")).unwrap();
        assert!(top.starts_with(".ie"), "roff: {top}");
        assert!(top.contains(".TH demo 1  \"demo 0.1.0\" backy"), "{top}");
        assert!(top.contains("demo\\-push(1)"), "{top}");
        assert!(
            !top.contains("generate"),
            "the hidden command is not listed: {top}"
        );
        let push = std::fs::read_to_string(dir.path().join("man/demo-push.1")).unwrap();
        assert!(push.contains("The job") && push.contains("\\-\\-loud"), "{push}");
        let bash = std::fs::read_to_string(dir.path().join("completions/bash/demo")).unwrap();
        assert!(
            bash.contains("complete -F _demo") && bash.contains("push"),
            "{bash}"
        );
    }

    #[test]
    fn the_subcommands_parse() {
        let cli = Cli::try_parse_from(["demo", "completions", "fish"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Assets(AssetsCommand::Completions { shell: Shell::Fish })
        ));
        let cli = Cli::try_parse_from(["demo", "generate-assets", "--out", "/x"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Assets(AssetsCommand::GenerateAssets { .. })
        ));
        assert!(Cli::try_parse_from(["demo", "completions", "tcsh"]).is_err());
        Cli::command().debug_assert();
    }
}
