//! A Redis server of its own for each test that needs one (Debian's `redis-server`), which a
//! test may stop and start again on the same port.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `redis-server` on a free loopback port, with nothing persisted; killed when
/// dropped.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// `None`, with a note on stderr, when `redis-server` is not installed outside CI.
    ///
    /// # Panics
    /// If it is missing while `CI` is set (`.ci/run` installs it), or does not start.
    #[allow(clippy::panic, clippy::expect_used)]
    pub fn start() -> Option<Self> {
        if Command::new(binary()).arg("--version").output().is_err() {
            if std::env::var_os("CI").is_some() {
                panic!("CI is set but redis-server is not installed: `.ci/run` installs Debian's redis-server");
            }
            eprintln!("redis-server is not installed: this test is skipped");
            return None;
        }
        let port =
            TcpListener::bind("127.0.0.1:0").and_then(|listener| listener.local_addr()).expect("a free port").port();
        let dir = tempfile::tempdir().expect("a temporary folder");
        let mut server = Self { child: None, port, dir };
        server.restart();
        Some(server)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills it at once, as a crash or a lost host would (its data is gone).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes it (SIGSTOP): connections stay open and every command waits unanswered, as
    /// on a server that hangs.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    #[allow(clippy::expect_used)]
    fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let sent = Command::new("kill").args([signal, &child.id().to_string()]).status().expect("kill runs");
            assert!(sent.success(), "kill {signal} failed");
        }
    }

    /// Starts it (again) on its port, empty, and waits until it answers.
    ///
    /// # Panics
    /// If it does not answer within 10 s.
    #[allow(clippy::panic, clippy::expect_used)]
    pub fn restart(&mut self) {
        self.stop();
        let child = Command::new(binary())
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if self.ping() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not answer within 10 s", self.port);
    }

    fn ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
        let mut reply = [0_u8; 7];
        stream.write_all(b"PING\r\n").is_ok() && stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn binary() -> PathBuf {
    PathBuf::from("redis-server")
}
