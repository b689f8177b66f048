//! A PostgreSQL server for a test or a benchmark: its own cluster (`initdb` in a temporary
//! folder, on a free loopback port), stopped and removed when the guard drops — even when
//! the test fails — or the server named by `FLOWLINE_PG_URL` when that is set. Each caller
//! gets a database of its own ([`PgServer::database`]).
//!
//! The server refuses to run as root: as root, the cluster belongs to the `postgres` user
//! (`runuser`). The binaries are found on `PATH` or under `/usr/lib/postgresql/*/bin`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use flowline_postgres::tokio_postgres;

/// A running server; dropping it stops the server it started and removes its files.
pub struct PgServer {
    /// Connection settings of the maintenance database (`key=value` form).
    admin: tokio_postgres::Config,
    own: Option<Cluster>,
    made: Vec<String>,
}

struct Cluster {
    bin: PathBuf,
    data: PathBuf,
    as_postgres: bool,
    /// The server's options and log file, for starting it again after a stop.
    opts: String,
    log: String,
    _dir: tempfile::TempDir,
}

fn find_bin() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .find(|p| p.join("initdb").is_file() && p.join("pg_ctl").is_file())
    });
    if let Some(p) = on_path {
        // Prefer the real folder: `postgres` must sit beside `initdb`.
        return std::fs::canonicalize(p.join("initdb"))
            .ok()
            .and_then(|f| f.parent().map(Path::to_path_buf))
            .unwrap_or(p);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .filter(|b| b.join("initdb").is_file())
                .collect()
        })
        .unwrap_or_default();
    found.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found.pop().expect(
        "PostgreSQL binaries not found (initdb on PATH or under /usr/lib/postgresql/*/bin); \
         scripts/test installs them, or set FLOWLINE_PG_URL",
    )
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    l.local_addr().expect("local addr").port()
}

impl Cluster {
    fn run(&self, tool: &str, args: &[&str]) -> std::process::Output {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        cmd.args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()))
    }

    fn stop(&self) {
        let data = self.data.to_string_lossy().into_owned();
        let _ = self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
    }
}

impl PgServer {
    /// The server of `FLOWLINE_PG_URL`, or a new cluster of its own.
    pub fn start() -> PgServer {
        if let Ok(url) = std::env::var("FLOWLINE_PG_URL") {
            let admin = url.parse().expect("FLOWLINE_PG_URL does not parse");
            return PgServer {
                admin,
                own: None,
                made: Vec::new(),
            };
        }
        let bin = find_bin();
        let as_postgres = is_root();
        let dir = tempfile::Builder::new()
            .prefix("flowline-pg-")
            .tempdir()
            .expect("temp dir");
        if as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .is_ok_and(|s| s.success());
            assert!(
                ok,
                "cannot give {} to the postgres user",
                dir.path().display()
            );
        }
        let data = dir.path().join("data");
        let mut cluster = Cluster {
            bin,
            data: data.clone(),
            as_postgres,
            opts: String::new(),
            log: String::new(),
            _dir: dir,
        };
        let d = data.to_string_lossy().into_owned();
        let out = cluster.run(
            "initdb",
            &[
                "-D",
                &d,
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let sock = cluster._dir.path().to_string_lossy().into_owned();
        let log = cluster
            ._dir
            .path()
            .join("log")
            .to_string_lossy()
            .into_owned();
        // The port may be taken between finding it and the server binding it: try again.
        // `authentication_timeout`: a shutdown waits for every connection still owing its
        // startup packet, and under a loaded CPU a client that gave up on a connection
        // still in the listen queue leaves one half-open (its close never reaches the
        // server), which the default would make a restart wait 60 s for.
        for attempt in 0..5 {
            let port = free_port();
            let opts = format!(
                "-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off \
                 -c synchronous_commit=off -c full_page_writes=off -c max_connections=100 \
                 -c authentication_timeout=5s"
            );
            let out = cluster.run(
                "pg_ctl",
                &["-D", &d, "-l", &log, "-o", &opts, "-w", "-t", "30", "start"],
            );
            if out.status.success() {
                cluster.opts = opts;
                cluster.log = log;
                let admin = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres")
                    .parse()
                    .expect("config");
                return PgServer {
                    admin,
                    own: Some(cluster),
                    made: Vec::new(),
                };
            }
            cluster.stop();
            eprintln!(
                "pg_ctl start failed (attempt {attempt}): {}; log: {}",
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        panic!("could not start a PostgreSQL server");
    }

    fn admin_sql(&self, sql: &str) {
        let config = self.admin.clone();
        let sql = sql.to_string();
        // Its own thread and runtime: callers may be inside a runtime already.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let (client, conn) = config
                    .connect(tokio_postgres::NoTls)
                    .await
                    .expect("connect to the test server");
                let task = tokio::spawn(conn);
                client.batch_execute(&sql).await.expect("admin statement");
                drop(client);
                let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
            })
        })
        .join()
        .expect("admin thread");
    }

    /// A new, empty database on the server; returns its connection string.
    pub fn database(&mut self) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "flowline_test_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        self.admin_sql(&format!("CREATE DATABASE {name}"));
        self.made.push(name.clone());
        self.url_of(&name)
    }

    fn url_of(&self, db: &str) -> String {
        let c = &self.admin;
        let mut parts = Vec::new();
        if let Some(tokio_postgres::config::Host::Tcp(h)) = c.get_hosts().first() {
            parts.push(format!("host={h}"));
        }
        #[cfg(unix)]
        if let Some(tokio_postgres::config::Host::Unix(p)) = c.get_hosts().first() {
            parts.push(format!("host={}", p.display()));
        }
        if let Some(p) = c.get_ports().first() {
            parts.push(format!("port={p}"));
        }
        if let Some(u) = c.get_user() {
            parts.push(format!("user={u}"));
        }
        if let Some(pw) = c.get_password() {
            parts.push(format!(
                "password='{}'",
                String::from_utf8_lossy(pw)
                    .replace('\\', "\\\\")
                    .replace('\'', "\\'")
            ));
        }
        parts.push(format!("dbname={db}"));
        parts.join(" ")
    }
}

/// Faults of the server, for the tests that a run rides them out. They need the test's own
/// cluster (not `FLOWLINE_PG_URL`).
impl PgServer {
    fn cluster(&self) -> &Cluster {
        self.own
            .as_ref()
            .expect("server faults need the test's own cluster: unset FLOWLINE_PG_URL")
    }

    fn pg_ctl(&self, args: &[&str]) {
        let c = self.cluster();
        let d = c.data.to_string_lossy().into_owned();
        let mut all = vec!["-D", &d, "-l", &c.log, "-w", "-t", "30"];
        all.extend_from_slice(args);
        let out = c.run("pg_ctl", &all);
        if !out.status.success() {
            let log = std::fs::read_to_string(&c.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let ps = Command::new("ps")
                .args(["-eo", "pid,ppid,stat,wchan:20,args"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let ss = Command::new("ss")
                .args(["-tanpe"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let port = c.opts.split_whitespace().nth(1).unwrap_or("?").to_string();
            let ss: Vec<&str> = ss
                .lines()
                .filter(|l| l.contains(&format!(":{port}")))
                .collect();
            panic!(
                "pg_ctl {args:?} failed: {}\nsockets:\n{}\nserver log (last lines, newest first):\n{}\nprocesses:\n{}",
                String::from_utf8_lossy(&out.stderr),
                ss.join("\n"),
                tail.join("\n"),
                ps.lines()
                    .filter(|l| l.contains("postgres"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }

    /// Whether faults can be injected (the server is the test's own).
    pub fn is_own(&self) -> bool {
        self.own.is_some()
    }

    /// Closes every connection to database `db` from the server's side
    /// (`pg_terminate_backend`); returns how many.
    pub fn terminate_connections(&self, db_url: &str) -> usize {
        let db = db_name(db_url);
        let config = self.admin.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let (client, conn) = config
                    .connect(tokio_postgres::NoTls)
                    .await
                    .expect("connect to the test server");
                let task = tokio::spawn(conn);
                let row = client
                    .query_one(
                        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
                         WHERE datname = $1 AND pid <> pg_backend_pid()",
                        &[&db],
                    )
                    .await
                    .expect("pg_terminate_backend");
                drop(client);
                let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
                row.get::<_, i64>(0) as usize
            })
        })
        .join()
        .expect("admin thread")
    }

    /// `pg_ctl restart -m fast`: the server ends every session and starts again on the same
    /// port.
    pub fn restart_fast(&self) {
        let opts = self.cluster().opts.clone();
        self.pg_ctl(&["-m", "fast", "-o", &opts, "restart"]);
    }

    /// `pg_ctl stop -m fast`: the server ends every session and is gone until
    /// [`start_again`](PgServer::start_again).
    pub fn stop_fast(&self) {
        self.pg_ctl(&["-m", "fast", "stop"]);
    }

    /// Starts the stopped server again, on the same port.
    pub fn start_again(&self) {
        let opts = self.cluster().opts.clone();
        self.pg_ctl(&["-o", &opts, "start"]);
    }

    /// The server's processes: the postmaster and its children.
    fn processes(&self) -> Vec<u32> {
        let pid_file = self.cluster().data.join("postmaster.pid");
        let text = std::fs::read_to_string(&pid_file).unwrap_or_default();
        let Some(main) = text
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<u32>().ok())
        else {
            return Vec::new();
        };
        let mut pids = vec![main];
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            // `pid (comm) state ppid ...`: the command may hold spaces, the last `)` ends it.
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(main) {
                pids.push(pid);
            }
        }
        pids
    }

    /// Sends `sig` to each of `pids`; the first (the postmaster) must take it, a child may
    /// have ended meanwhile.
    fn signal(&self, sig: &str, pids: &[u32]) {
        for (i, pid) in pids.iter().enumerate() {
            let ok = Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(pid.to_string())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok || i > 0, "kill -{sig} {pid} (the postmaster) failed");
        }
    }

    /// Freezes the server (SIGSTOP to the postmaster and its children): connections stay
    /// open and nothing answers. Returns the frozen processes, for [`thaw`](PgServer::thaw).
    pub fn freeze(&self) -> Vec<u32> {
        let pids = self.processes();
        assert!(!pids.is_empty(), "no server processes to freeze");
        self.signal("STOP", &pids);
        pids
    }

    /// Resumes the processes [`freeze`](PgServer::freeze) stopped.
    pub fn thaw(&self, pids: &[u32]) {
        self.signal("CONT", pids);
    }
}

/// The `dbname` of a `key=value` connection string.
fn db_name(url: &str) -> String {
    let config: tokio_postgres::Config = url.parse().expect("connection string");
    config.get_dbname().expect("a database name").to_string()
}

impl Drop for PgServer {
    fn drop(&mut self) {
        match &self.own {
            // The whole cluster goes; its folder is removed with the temp dir. A server a
            // failed test left frozen is resumed first, so that it can stop.
            Some(cluster) => {
                let frozen = self.processes();
                if !frozen.is_empty() {
                    let _ = Command::new("kill")
                        .arg("-CONT")
                        .args(frozen.iter().map(u32::to_string))
                        .stderr(Stdio::null())
                        .status();
                }
                cluster.stop()
            }
            None => {
                for db in std::mem::take(&mut self.made) {
                    let sql = format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)");
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        self.admin_sql(&sql)
                    }));
                }
            }
        }
    }
}
