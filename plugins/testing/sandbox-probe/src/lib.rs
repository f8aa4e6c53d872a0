//! `sandbox-probe` (test plugin): tries to reach outside the sandbox and
//! records what happened, so a test can check that nothing got through.
//!
//! On each batch it writes, under `probe/`:
//! * `file`: reading `/etc/passwd`;
//! * `dir`: listing `/`;
//! * `env`: how many environment variables it sees, and `args` likewise;
//! * `tcp`: connecting to `127.0.0.1:<config tcp_port>`;
//!
//! each as `ok: ...` or `error: ...`. It also prints one line to stdout and
//! one to stderr (they must reach the broker's log), then acks everything.
//! Using `std::fs` and `std::net` makes the component import
//! `wasi:filesystem` and `wasi:sockets`, which the broker links empty.

use msmq_plugin::{state, Batch, Config, Outcome, Plugin};

struct Probe {
    tcp_port: u16,
}

fn describe<T>(result: std::io::Result<T>, ok: impl FnOnce(T) -> String) -> String {
    match result {
        Ok(value) => format!("ok: {}", ok(value)),
        Err(e) => format!("error: {e}"),
    }
}

impl Plugin for Probe {
    fn init(config: Config) -> Result<Self, String> {
        let tcp_port = config
            .get_or("tcp_port", "9")
            .parse()
            .map_err(|e| format!("tcp_port: {e}"))?;
        Ok(Probe { tcp_port })
    }

    fn handle(&mut self, batch: &Batch) -> Vec<Outcome> {
        let file = describe(std::fs::read_to_string("/etc/passwd"), |s| {
            format!("read {} bytes", s.len())
        });
        let dir = describe(std::fs::read_dir("/"), |d| {
            format!("{} entries", d.count())
        });
        let env = format!("{} variables", std::env::vars_os().count());
        let args = format!("{} arguments", std::env::args_os().count());
        let tcp = describe(
            std::net::TcpStream::connect(("127.0.0.1", self.tcp_port)),
            |s| format!("connected from {:?}", s.local_addr().ok()),
        );
        println!("sandbox-probe: hello on stdout");
        eprintln!("sandbox-probe: hello on stderr");
        let writes = [
            ("probe/file", file),
            ("probe/dir", dir),
            ("probe/env", env),
            ("probe/args", args),
            ("probe/tcp", tcp),
        ];
        match state::put_all(&writes) {
            Ok(()) => vec![Outcome::Ack; batch.len()],
            Err(_) => vec![Outcome::retry(100); batch.len()],
        }
    }
}

msmq_plugin::export_plugin!(Probe);
