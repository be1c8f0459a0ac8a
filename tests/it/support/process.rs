//! The `loader` binary as a child process: run to completion, or in the background and
//! stopped with SIGTERM or SIGKILL, its output drained as it comes.

use std::process::{Command, Output};

use super::aws_settings;

/// The `loader` binary pointed at a database and a queue: how every test runs it
/// ([`TestEnv::cli`](super::TestEnv::cli), [`TestDb::cli`](super::TestDb::cli), or
/// [`Cli::new`] for another role's URL).
#[derive(Debug, Clone)]
pub struct Cli {
    url: String,
    queue: String,
}

impl Cli {
    pub fn new(url: &str, queue: &str) -> Self {
        Self { url: url.to_owned(), queue: queue.to_owned() }
    }

    /// `loader ARGS`, not yet started (to change its environment first).
    pub fn command(&self, args: &[&str]) -> Command {
        let aws = aws_settings();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_loader"));
        cmd.args(args)
            .env("DATABASE_URL", &self.url)
            .env("SQS_QUEUE", &self.queue)
            .env("AWS_ENDPOINT_URL", aws.endpoint_url.unwrap())
            .env("AWS_REGION", aws.region.unwrap())
            .env("RUST_LOG", "warn,loader=debug");
        cmd
    }

    /// Runs `loader ARGS` to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("running the loader binary")
    }

    /// Runs `loader ARGS`, asserts it exited 0, and returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "loader {args:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// Starts `loader ARGS` in the background.
    pub fn spawn(&self, args: &[&str]) -> Running {
        spawn(self.command(args))
    }
}

/// A `loader` process running in the background. Its output is drained as it comes (a full
/// pipe would block the process), and returned by [`terminate`].
pub struct Running {
    child: std::process::Child,
    stdout: std::thread::JoinHandle<Vec<u8>>,
    stderr: std::thread::JoinHandle<Vec<u8>>,
}

/// Starts a [`Cli::command`] (perhaps with settings changed) in the background.
pub fn spawn(mut command: Command) -> Running {
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting the loader binary");
    let drain = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    Running { child, stdout, stderr }
}

/// Kills the process with SIGKILL (no chance to clean up) and reaps it.
pub fn kill_9(running: Running) {
    let Running { mut child, stdout, stderr } = running;
    child.kill().expect("SIGKILL");
    child.wait().unwrap();
    let _ = (stdout.join(), stderr.join());
}

/// Sends SIGTERM and waits for the process; returns its output.
pub fn terminate(running: Running) -> Output {
    signal(running, "TERM")
}

/// Sends the signal named (`TERM`, `INT`, ...) and waits for the process; returns its output.
pub fn signal(running: Running, name: &str) -> Output {
    let Running { mut child, stdout, stderr } = running;
    let status =
        Command::new("kill").args([&format!("-{name}"), &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let status = child.wait().unwrap();
    Output { status, stdout: stdout.join().unwrap(), stderr: stderr.join().unwrap() }
}

/// Sends SIGTERM, asserts a clean exit (0), and returns stdout.
pub fn terminate_ok(running: Running) -> String {
    let out = terminate(running);
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits for the process to end by itself, asserts a clean exit (0), and returns its stdout
/// followed by its stderr.
pub fn wait_ok(running: Running) -> String {
    let Running { mut child, stdout, stderr } = running;
    let status = child.wait().unwrap();
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    let stderr = String::from_utf8_lossy(&stderr);
    assert!(status.success(), "exit {status:?}: {stderr}");
    format!("{}{stderr}", String::from_utf8_lossy(&stdout))
}

/// [`wait_ok`] within `within`, waiting without blocking the test's runtime; kills the process
/// and panics, naming `what`, when it takes longer (a liveness check).
pub async fn wait_ok_within(running: Running, within: std::time::Duration, what: &str) -> String {
    let Running { mut child, stdout, stderr } = running;
    let deadline = std::time::Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = stderr.join().unwrap();
            panic!("{what} took over {within:?}:\n{}", String::from_utf8_lossy(&stderr));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    let stderr = String::from_utf8_lossy(&stderr);
    assert!(status.success(), "{what}: exit {status:?}: {stderr}");
    format!("{}{stderr}", String::from_utf8_lossy(&stdout))
}
