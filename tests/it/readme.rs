//! The README's tutorial, run literally: every `sh` block between `<!-- tutorial: begin -->` and
//! `<!-- tutorial: end -->` is executed in order, as a user would type it, and every `output ...` line
//! of its `text` blocks must appear in `procd dev`'s output. So the README cannot drift from the
//! product.
//!
//! What the test adds, and only that: `procd` on PATH is the binary under test; `procd dev` and
//! `procd serve` (which run until Ctrl-C) are started in the background with `--listen 127.0.0.1:0
//! --admin-listen 127.0.0.1:0`, and stopped with SIGINT (exit code 0) when the tutorial starts the
//! next one or ends; `localhost:8080` in a command becomes the data plane's real address, and the
//! CLI finds the server through `PROCD_URL`/`PROCD_ADMIN_URL`; after a command that edits `src/`
//! while `procd dev` runs, it waits for the `deployed` line that follows. The crate builds in its own
//! `target/` (as in the tutorial), so this test compiles the SDK's dependencies each run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::dev::Dev;
use crate::harness::{TestHost, TestResult};

const README: &str = include_str!("../../README.md");
/// A step that builds (cargo test, cargo wasm, the first `procd dev` build) from a cold target.
const STEP_TIMEOUT: Duration = Duration::from_secs(900);
/// An event through the handler to `procd dev`'s output, or a rebuild after an edit.
const OUTPUT_TIMEOUT: Duration = Duration::from_secs(180);

#[derive(Debug)]
enum Block {
    Shell(String),
    Text(String),
}

/// The fenced blocks of the tutorial, in order.
fn tutorial() -> TestResult<Vec<Block>> {
    let start = README
        .find("<!-- tutorial: begin -->")
        .ok_or("README has no tutorial: begin marker")?;
    let end = README
        .find("<!-- tutorial: end -->")
        .ok_or("README has no tutorial: end marker")?;
    let mut blocks = Vec::new();
    let mut lines = README[start..end].lines();
    while let Some(line) = lines.next() {
        let Some(lang) = line.strip_prefix("```") else {
            continue;
        };
        let body: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
        let body = body.join("\n");
        blocks.push(match lang {
            "sh" => Block::Shell(body),
            _ => Block::Text(body),
        });
    }
    Ok(blocks)
}

/// The tutorial's state: where the user is, and what runs in the background.
struct Tutorial {
    path_env: String,
    cwd: PathBuf,
    background: Option<(String, Dev)>,
}

impl Tutorial {
    fn stop_background(&mut self) -> TestResult {
        if let Some((what, mut bg)) = self.background.take() {
            let code = bg.interrupt()?;
            if code != 0 {
                return Err(format!("`{what}` exited {code} on SIGINT: {}", bg.stderr()).into());
            }
        }
        Ok(())
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(&self.cwd)
            .env("PATH", &self.path_env)
            .env("RUST_LOG", "warn")
            // The tutorial's paths (`target/wasm32-wasip2/...`) assume cargo's default target dir.
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_BUILD_TARGET");
        if let Some((_, bg)) = &self.background {
            cmd.env("PROCD_URL", &bg.data_url)
                .env("PROCD_ADMIN_URL", &bg.admin_url);
        }
        cmd
    }

    /// Runs one command of the tutorial.
    fn run(&mut self, command: &str) -> TestResult {
        if let Some(dir) = command.strip_prefix("cd ") {
            self.cwd = self.cwd.join(dir.trim());
            return Ok(());
        }
        if command == "procd dev" || command == "procd serve" {
            self.stop_background()?;
            let mut cmd = self.command("procd");
            cmd.args(command.split_whitespace().skip(1)).args([
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ]);
            let mut bg = Dev::spawn(cmd)?;
            if command == "procd dev" {
                bg.wait_for(|l| l.contains("watching for changes"), STEP_TIMEOUT)?;
                if !bg.seen.iter().any(|l| l.contains("deployed ")) {
                    return Err(format!("procd dev deployed nothing: {:?}", bg.seen).into());
                }
            }
            self.background = Some((command.to_string(), bg));
            return Ok(());
        }
        let command_line = match &self.background {
            Some((_, bg)) => {
                let addr = bg.data_url.trim_start_matches("http://");
                command.replace("localhost:8080", addr)
            }
            None => command.to_string(),
        };
        let mut child = self
            .command("bash")
            .args(["-ec", &command_line])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let deadline = Instant::now() + STEP_TIMEOUT;
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(format!("`{command}` took longer than {STEP_TIMEOUT:?}").into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output()?;
        // Shown with --nocapture: what the user would see.
        eprintln!("$ {command}\n{}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            return Err(format!(
                "`{command}` failed in {}:\n{}\n{}",
                self.cwd.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        if command.contains("src/")
            && let Some((what, bg)) = &mut self.background
            && what == "procd dev"
        {
            bg.wait_for(|l| l.contains("deployed "), OUTPUT_TIMEOUT)?;
        }
        Ok(())
    }

    /// Waits until `procd dev` printed `line` (before or after this call).
    fn expect_output(&mut self, line: &str) -> TestResult {
        let Some((_, bg)) = &mut self.background else {
            return Err(format!("the README shows {line:?} but nothing runs").into());
        };
        if bg.seen.iter().any(|l| l == line) {
            return Ok(());
        }
        bg.wait_for(|l| l == line, OUTPUT_TIMEOUT).map(|_| ())
    }
}

fn binary_dir(tmp: &Path) -> TestResult<PathBuf> {
    let bin = tmp.join("bin");
    std::fs::create_dir_all(&bin)?;
    std::os::unix::fs::symlink(TestHost::binary(), bin.join("procd"))?;
    Ok(bin)
}

#[tokio::test]
async fn the_readme_tutorial_works_as_written() -> TestResult {
    let blocks = tutorial()?;
    assert!(
        blocks
            .iter()
            .filter(|b| matches!(b, Block::Shell(_)))
            .count()
            >= 5,
        "the tutorial lost its commands: {blocks:?}"
    );
    let tmp = tempfile::tempdir()?;
    let bin = binary_dir(tmp.path())?;
    let path_env = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut tutorial = Tutorial {
        path_env,
        cwd: tmp.path().to_path_buf(),
        background: None,
    };
    for block in &blocks {
        match block {
            Block::Shell(body) => {
                for line in body.lines().map(str::trim) {
                    if line.is_empty() || line.starts_with('#') {
                        continue;
                    }
                    for command in line.split(" && ") {
                        tutorial.run(command.trim())?;
                    }
                }
            }
            Block::Text(body) => {
                for line in body.lines().filter(|l| l.starts_with("output ")) {
                    tutorial.expect_output(line)?;
                }
            }
        }
    }
    tutorial.stop_background()?;
    Ok(())
}

/// The long flags in `procd COMMAND --help`, without the global and standard ones.
fn flags_of(command: &str) -> TestResult<Vec<String>> {
    let out = Command::new(TestHost::binary())
        .args([command, "--help"])
        .output()?;
    if !out.status.success() {
        return Err(format!("procd {command} --help failed").into());
    }
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut flags: Vec<String> = help
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("--")))
        .map(|w| w.trim_end_matches(',').to_string())
        .filter(|f| !["--url", "--admin-url", "--help", "--version"].contains(&f.as_str()))
        .collect();
    flags.dedup();
    Ok(flags)
}

#[test]
fn the_readme_documents_every_flag_of_new_dev_and_status() -> TestResult {
    let start = README
        .find("<!-- dev-runner section")
        .ok_or("README has no dev-runner section")?;
    let section = &README[start..];
    for command in ["new", "dev", "status"] {
        let flags = flags_of(command)?;
        assert!(!flags.is_empty(), "procd {command} --help lists no flags");
        for flag in flags {
            assert!(
                section.contains(&format!("`{flag}")),
                "README does not document procd {command} {flag}"
            );
        }
    }
    Ok(())
}

const CLI_BEGIN: &str = "<!-- cli-reference: begin -->";
const CLI_END: &str = "<!-- cli-reference: end -->";

/// `procd ARGS --help`, as a user without `PROCD_*` variables sees it.
fn help_of(args: &[&str]) -> TestResult<String> {
    let out = Command::new(TestHost::binary())
        .args(args)
        .arg("--help")
        .env_remove("PROCD_URL")
        .env_remove("PROCD_ADMIN_URL")
        .output()?;
    if !out.status.success() {
        return Err(format!("procd {} --help failed", args.join(" ")).into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The subcommands a help text lists under `Commands:` (without `help`).
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

/// The README's CLI reference: every command's `--help`, verbatim.
fn cli_reference() -> TestResult<String> {
    let mut out = String::new();
    let mut section = |args: &[&str]| -> TestResult<String> {
        let help = help_of(args)?;
        let name = if args.is_empty() {
            "procd".to_string()
        } else {
            format!("procd {}", args.join(" "))
        };
        out.push_str(&format!(
            "\n#### `{name}`\n\n```text\n{}\n```\n",
            help.trim_end()
        ));
        Ok(help)
    };
    let top = section(&[])?;
    for command in subcommands(&top) {
        let help = section(&[&command])?;
        for sub in subcommands(&help) {
            section(&[&command, &sub])?;
        }
    }
    Ok(out)
}

#[test]
fn the_readme_cli_reference_is_the_help_output() -> TestResult {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme = std::fs::read_to_string(&path)?;
    let begin = readme
        .find(CLI_BEGIN)
        .ok_or("README has no CLI reference")?
        + CLI_BEGIN.len();
    let end = readme
        .find(CLI_END)
        .ok_or("README's CLI reference has no end")?;
    let expected = cli_reference()?;
    if std::env::var_os("PROCD_BLESS").is_some() {
        let updated = format!("{}{expected}\n{}", &readme[..begin], &readme[end..]);
        std::fs::write(&path, updated)?;
        return Ok(());
    }
    let documented = readme[begin..end].trim_end_matches('\n');
    if documented != expected.trim_end_matches('\n') {
        let first = documented
            .lines()
            .zip(expected.lines())
            .find(|(a, b)| a != b)
            .map(|(a, b)| format!("README: {a:?}\n--help: {b:?}"))
            .unwrap_or_else(|| "one is longer than the other".into());
        return Err(format!(
            "the README's CLI reference is not the --help output ({first}); regenerate it with \
             PROCD_BLESS=1 cargo test -p procd --test it readme::the_readme_cli_reference"
        )
        .into());
    }
    Ok(())
}
