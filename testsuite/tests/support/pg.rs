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
        let cluster = Cluster {
            bin,
            data: data.clone(),
            as_postgres,
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
        for attempt in 0..5 {
            let port = free_port();
            let opts = format!(
                "-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off \
                 -c synchronous_commit=off -c full_page_writes=off -c max_connections=100"
            );
            let out = cluster.run(
                "pg_ctl",
                &["-D", &d, "-l", &log, "-o", &opts, "-w", "-t", "30", "start"],
            );
            if out.status.success() {
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

impl Drop for PgServer {
    fn drop(&mut self) {
        match &self.own {
            // The whole cluster goes; its folder is removed with the temp dir.
            Some(cluster) => cluster.stop(),
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
