//! Real `quictun` processes for the binary's tests: spawn one, read its stdout lines, signal
//! it, kill it on drop; a temporary directory; plain HTTP/1.1 requests on fresh connections.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_quictun");
pub const WAIT: Duration = Duration::from_secs(30);

/// A child process whose stdout lines arrive on a channel; killed on drop. Its stderr is read
/// as it comes (a process whose log fills the pipe would block on its next line), and returned
/// by [`Proc::wait_exit`].
pub struct Proc {
    /// The process (taken when it is waited for).
    pub child: Option<Child>,
    /// Its stdout, line by line.
    pub lines: mpsc::Receiver<String>,
    /// Its stderr, whole, once the process has closed it.
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Proc {
    pub fn spawn(args: &[&str], dir: &Path) -> Self {
        let mut command = Command::new(BIN);
        command.args(args);
        Self::spawn_command(command, dir)
    }

    /// `quictun args…` under a shell that first sets its open-file limit to `files`.
    pub fn spawn_with_file_limit(files: u32, args: &[&str], dir: &Path) -> Self {
        let mut command = Command::new("sh");
        command.arg("-c").arg(format!("ulimit -n {files} && exec \"$0\" \"$@\"")).arg(BIN).args(args);
        Self::spawn_command(command, dir)
    }

    pub fn spawn_command(mut command: Command, dir: &Path) -> Self {
        if !command.get_envs().any(|(key, _)| key == "RUST_LOG") {
            command.env("RUST_LOG", "warn");
        }
        if !command.get_envs().any(|(key, _)| key == "QUICTUN_TOKEN") {
            command.env_remove("QUICTUN_TOKEN");
        }
        let mut child = command.current_dir(dir).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut stderr = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = stderr.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        });
        Self { child: Some(child), lines, stderr: Some(stderr) }
    }

    /// The first stdout line containing `needle`.
    pub fn line_with(&self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => continue,
                Err(_) => panic!("no output line containing {needle:?}"),
            }
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends SIGTERM (a graceful stop, as systemd and Kubernetes send).
    pub fn terminate(&self) {
        signal(&self.pid().to_string(), "TERM");
    }

    /// Waits for exit (bounded: the process is killed after [`WAIT`]) and returns the status code
    /// and stderr.
    pub fn wait_exit(mut self) -> (i32, String) {
        let mut child = self.child.take().unwrap();
        let pid = child.id();
        let stderr = self.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let err = stderr.join().unwrap_or_default();
            let _ = tx.send((child.wait().map(|s| s.code().unwrap_or(-1)), err));
        });
        match rx.recv_timeout(WAIT) {
            Ok((status, err)) => (status.unwrap(), err),
            Err(_) => {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                panic!("process {pid} did not exit within {WAIT:?}");
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("quictun-cli-{}-{}", std::process::id(), fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `dir/relay.toml`: every listener on a free loopback port, then `relay_keys` (more keys
/// of `[relay]`) and `rest` (sections); returns its path.
pub fn loopback_relay_config(dir: &Path, relay_keys: &str, rest: &str) -> std::path::PathBuf {
    let config = dir.join("relay.toml");
    let listeners = "quic_listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
                     grpc_listen = \"127.0.0.1:0\"\n";
    std::fs::write(&config, format!("[relay]\n{listeners}{relay_keys}{rest}")).unwrap();
    config
}

/// `GET path` on a fresh connection; the I/O error when the server refused or closed it.
pub fn try_http_get(addr: &str, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(WAIT))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// `GET path` for `host` on a fresh connection.
pub fn http_get_host(addr: &str, host: &str, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

pub fn signal(pid: &str, name: &str) {
    assert!(Command::new("kill").args([&format!("-{name}"), pid]).status().unwrap().success(), "kill -{name} {pid}");
}

/// The value of one sample (`name{labels} value`) in a metrics text, when present.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(sample)?.strip_prefix(' ')?.trim().parse().ok())
}
