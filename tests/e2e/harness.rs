//! Starting, killing and restarting a real broker process.

use anyhow::{bail, Context};
use msmq_client::{Client, ClientOptions, FetchLimits, Message};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const MSMQ: &str = env!("CARGO_BIN_EXE_msmq");

/// A broker process with its own data directory.
pub struct TestBroker {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    /// host:port of the metrics endpoint.
    pub http: Option<String>,
    extra_args: Vec<String>,
    /// Storage fault injection on (`MSMQ_STORAGE_FAULTS=1`).
    faults: bool,
    child: Option<Child>,
}

impl TestBroker {
    /// Start on a free loopback port.
    pub fn start() -> anyhow::Result<TestBroker> {
        Self::start_with(&[])
    }

    /// Start with extra `msmq serve` flags.
    pub fn start_with(extra: &[&str]) -> anyhow::Result<TestBroker> {
        Self::start_inner(extra, false)
    }

    /// Start over the fault-injecting storage backend; faults are switched
    /// by files in [`TestBroker::faults_dir`].
    pub fn start_with_faults(extra: &[&str]) -> anyhow::Result<TestBroker> {
        Self::start_inner(extra, true)
    }

    /// Start with its data directory inside `parent` (a filesystem the test
    /// made, say).
    pub fn start_in(parent: &std::path::Path, extra: &[&str]) -> anyhow::Result<TestBroker> {
        Self::start_at(tempfile::tempdir_in(parent)?, extra, false)
    }

    fn start_inner(extra: &[&str], faults: bool) -> anyhow::Result<TestBroker> {
        Self::start_at(tempfile::tempdir()?, extra, faults)
    }

    fn start_at(
        dir: tempfile::TempDir,
        extra: &[&str],
        faults: bool,
    ) -> anyhow::Result<TestBroker> {
        let mut broker = TestBroker {
            dir,
            addr: "127.0.0.1:0".parse()?,
            http: None,
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            faults,
            child: None,
        };
        broker.spawn()?;
        Ok(broker)
    }

    pub fn faults_dir(&self) -> PathBuf {
        self.data_dir().join("faults")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Bytes of every log segment file in the data directory.
    pub fn segment_bytes(&self) -> u64 {
        let mut total = 0;
        let mut dirs = vec![self.data_dir().join("segments")];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                match entry.metadata() {
                    Ok(m) if m.is_dir() => dirs.push(entry.path()),
                    Ok(m) => total += m.len(),
                    Err(_) => {}
                }
            }
        }
        total
    }

    pub fn cert(&self) -> PathBuf {
        self.data_dir().join("tls").join("cert.pem")
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("broker.log"))?;
        let mut child = Command::new(MSMQ)
            .arg("serve")
            .arg("--listen")
            .arg(self.addr.to_string())
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--http", "127.0.0.1:0"])
            .args(&self.extra_args)
            .env("MSMQ_LOG", "info")
            .env("MSMQ_STORAGE_FAULTS", if self.faults { "1" } else { "0" })
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("spawning msmq serve")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) if !line.is_empty() => line,
            _ => {
                let _ = child.kill();
                bail!("broker did not start; log:\n{}", self.log());
            }
        };
        // "msmq listening on ADDR (certificate …)"
        let addr = line
            .split_whitespace()
            .nth(3)
            .context("unexpected first line")?
            .parse()?;
        self.addr = addr;
        self.http = line
            .split("metrics http://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .map(str::to_string);
        self.child = Some(child);
        Ok(())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default()
    }

    /// SIGKILL: no chance to flush anything.
    /// The broker's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("broker not running")?;
        signal(child.id(), "TERM")?;
        for _ in 0..300 {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        bail!("broker did not exit within 15 s of SIGTERM")
    }

    /// Start again on the same port and data directory.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.spawn()
    }

    pub fn options(&self) -> ClientOptions {
        ClientOptions::default()
            .server(self.addr.to_string())
            .ca_file(self.cert())
    }

    pub async fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::connect(self.options()).await?)
    }

    /// The admin token of a broker with `--auth`, and a client using it.
    pub async fn admin(&self) -> anyhow::Result<(String, Client)> {
        let token = self.admin_token()?;
        let client = Client::connect(self.options().token(&token)).await?;
        Ok((token, client))
    }

    /// The admin token a broker with `--auth` wrote at its first start.
    pub fn admin_token(&self) -> anyhow::Result<String> {
        let path = self.data_dir().join("admin.token");
        Ok(std::fs::read_to_string(&path)
            .with_context(|| path.display().to_string())?
            .trim()
            .to_string())
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Send the signal named `sig` ("TERM", "INT", "HUP", "KILL") to `pid`
/// (directly, so the tests need no `kill` program).
pub fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
    let number = match sig {
        "TERM" => libc::SIGTERM,
        "INT" => libc::SIGINT,
        "HUP" => libc::SIGHUP,
        "KILL" => libc::SIGKILL,
        other => bail!("unknown signal {other}"),
    };
    let pid = libc::pid_t::try_from(pid)?;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let result = unsafe { libc::kill(pid, number) };
    anyhow::ensure!(
        result == 0,
        "kill -{sig} {pid}: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// Every message of a partition from `from` to its current end.
pub async fn read_all(
    client: &Client,
    topic: &str,
    partition: u32,
    from: u64,
) -> anyhow::Result<Vec<Message>> {
    let mut out = Vec::new();
    let mut offset = from;
    loop {
        let limits = FetchLimits {
            max_messages: 5000,
            max_bytes: 8 * 1024 * 1024,
            max_wait_ms: 0,
        };
        let fetched = client.fetch(topic, partition, offset, limits).await?;
        if fetched.messages.is_empty() {
            return Ok(out);
        }
        for m in fetched.messages {
            anyhow::ensure!(
                m.offset == offset,
                "gap: expected offset {offset}, got {}",
                m.offset
            );
            offset += 1;
            out.push(m);
        }
    }
}

/// `msmq` as a CLI client of `broker`, with every stream piped.
fn cli_command(broker: &TestBroker, args: &[&str]) -> Command {
    let mut command = Command::new(MSMQ);
    command
        .args(args)
        .env("MSMQ_SERVER", broker.addr.to_string())
        .env("MSMQ_CA", broker.cert())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Run `msmq` as a CLI client against `broker`.
pub fn cli(
    broker: &TestBroker,
    args: &[&str],
    stdin: Option<&str>,
) -> anyhow::Result<std::process::Output> {
    use std::io::Write;
    let mut child = cli_command(broker, args).spawn()?;
    let mut input = child.stdin.take().context("stdin")?;
    if let Some(text) = stdin {
        input.write_all(text.as_bytes())?;
    }
    drop(input);
    Ok(child.wait_with_output()?)
}

/// A CLI client left running: its stdout arrives line by line.
pub struct CliProcess {
    pub child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl CliProcess {
    pub fn spawn(broker: &TestBroker, args: &[&str]) -> anyhow::Result<CliProcess> {
        use std::os::unix::process::CommandExt;
        let mut command = cli_command(broker, args);
        // The tests signal the child as a terminal or a service manager
        // would; a launcher that ignores them (`nohup`, a background job)
        // must not pass that on, since msmq keeps an ignored signal ignored.
        // SAFETY: signal(2) is async-signal-safe, as pre_exec requires.
        unsafe {
            command.pre_exec(|| {
                for sig in [libc::SIGHUP, libc::SIGINT, libc::SIGTERM] {
                    libc::signal(sig, libc::SIG_DFL);
                }
                Ok(())
            });
        }
        let mut child = command.spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Ok(CliProcess { child, lines })
    }

    /// The next line of stdout, or `None` at its end or after `timeout`.
    pub fn line(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Send `sig` and wait up to `timeout` for the exit; then the rest of
    /// stdout and all of stderr.
    pub fn stop(
        mut self,
        sig: &str,
        timeout: Duration,
    ) -> anyhow::Result<(std::process::ExitStatus, Vec<String>, String)> {
        use std::io::Read;
        signal(self.child.id(), sig)?;
        let deadline = std::time::Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if std::time::Instant::now() >= deadline {
                let _ = self.child.kill();
                bail!("msmq did not exit within {timeout:?} of SIG{sig}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut rest = Vec::new();
        while let Some(line) = self.line(Duration::from_secs(5)) {
            rest.push(line);
        }
        let mut stderr = String::new();
        if let Some(mut err) = self.child.stderr.take() {
            err.read_to_string(&mut stderr)?;
        }
        Ok((status, rest, stderr))
    }
}

impl Drop for CliProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
