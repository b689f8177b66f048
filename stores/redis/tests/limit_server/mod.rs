//! A redis-server of the test's own: on a free loopback port, no persistence, in a temporary
//! directory, killed when dropped.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

/// The redis-server binary: `FLOWLINE_REDIS_SERVER`, else the one on the `PATH`.
fn binary() -> String {
    std::env::var("FLOWLINE_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into())
}

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Server {
    /// Starts a server on a free port (another free port if that one was taken meanwhile).
    pub fn start() -> Server {
        for _ in 0..5 {
            let mut s = Server {
                port: free_port(),
                child: None,
                dir: tempfile::tempdir().unwrap(),
            };
            if s.spawn() {
                return s;
            }
        }
        panic!("could not start redis-server on a free port");
    }

    /// Starts the server again on its port (after [`stop`](Server::stop)).
    pub fn restart(&mut self) {
        assert!(
            self.spawn(),
            "redis-server did not come back on {}",
            self.port
        );
    }

    fn spawn(&mut self) -> bool {
        let child = Command::new(binary())
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "no", "--dir"])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server not found (scripts/test installs it)");
        self.child = Some(child);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return false; // exited: the port was taken
            }
            if let Ok(c) = redis::Client::open(self.url()) {
                if let Ok(mut con) = c.get_connection() {
                    if redis::cmd("PING").query::<String>(&mut con).is_ok() {
                        return true;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        false
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).unwrap()
    }

    /// Kills the server (the port stays this server's, for `restart`).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}
