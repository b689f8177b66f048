//! A `redis-server` of its own for a test, an example or a benchmark: started in a temporary
//! folder on a free loopback port, killed and removed when the guard drops (even when the
//! test fails). It can be killed and started again on the same port and folder, to test
//! what survives a restart (with AOF on).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `redis-server`; dropping it kills the server and removes its folder.
///
/// ```no_run
/// let server = flowline_redis::test_server::RedisServer::start(true);
/// println!("{}", server.url());
/// ```
pub struct RedisServer {
    port: u16,
    aof: bool,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    l.local_addr().expect("local addr").port()
}

fn binary() -> PathBuf {
    std::env::var_os("FLOWLINE_REDIS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("redis-server"))
}

impl RedisServer {
    /// Starts a server; `aof` turns the append-only file on (fsync on every write, so a
    /// killed server loses nothing it acknowledged). Panics when `redis-server` cannot be
    /// started (`scripts/test` installs it; `FLOWLINE_REDIS_SERVER` names another binary).
    ///
    /// ```no_run
    /// let server = flowline_redis::test_server::RedisServer::start(false);
    /// # drop(server);
    /// ```
    pub fn start(aof: bool) -> RedisServer {
        let dir = tempfile::Builder::new()
            .prefix("flowline-redis-")
            .tempdir()
            .expect("temp dir");
        let mut s = RedisServer {
            port: free_port(),
            aof,
            dir,
            child: None,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let aof = if self.aof { "yes" } else { "no" };
        let child = Command::new(binary())
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", aof, "--appendfsync", "always"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e} (scripts/test installs redis-server)",
                    binary().display()
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::{Read, Write};
                // Up and done loading (a server replaying its AOF answers LOADING).
                let mut buf = [0u8; 64];
                let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
                if c.write_all(b"PING\r\n").is_ok()
                    && c.read(&mut buf)
                        .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not come up on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The URL to connect to, `redis://127.0.0.1:PORT/`.
    ///
    /// ```no_run
    /// let s = flowline_redis::test_server::RedisServer::start(false);
    /// assert!(s.url().starts_with("redis://127.0.0.1:"));
    /// ```
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A client of this server.
    ///
    /// ```no_run
    /// let s = flowline_redis::test_server::RedisServer::start(false);
    /// let client = s.client();
    /// # drop(client);
    /// ```
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("a loopback URL is valid")
    }

    /// Kills the server (SIGKILL: no shutdown, no final save).
    ///
    /// ```no_run
    /// let mut s = flowline_redis::test_server::RedisServer::start(true);
    /// s.kill();
    /// s.restart();
    /// ```
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes the server (`SIGSTOP`): connections stay open, nothing is answered, until
    /// [`thaw`](Self::thaw). Its clock runs on meanwhile, as a real server's would.
    ///
    /// ```no_run
    /// let s = flowline_redis::test_server::RedisServer::start(false);
    /// s.freeze();
    /// s.thaw();
    /// ```
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Lets a frozen server run again (`SIGCONT`).
    ///
    /// ```no_run
    /// let s = flowline_redis::test_server::RedisServer::start(false);
    /// s.freeze();
    /// s.thaw();
    /// ```
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let Some(child) = &self.child else {
            panic!("redis-server is not running")
        };
        let ok = Command::new("kill")
            .arg(sig)
            .arg(child.id().to_string())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {} failed", child.id());
    }

    /// Starts the server again on the same port and folder (after [`kill`](Self::kill));
    /// with AOF on, it comes back with every write it acknowledged.
    ///
    /// ```no_run
    /// let mut s = flowline_redis::test_server::RedisServer::start(true);
    /// s.kill();
    /// s.restart();
    /// ```
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
