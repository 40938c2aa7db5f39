//! A real, throw-away PostgreSQL server for the tests (never a mock).
//!
//! `initdb` + `postgres` from Debian's `postgresql` package (or the directory in
//! `KEYFLEET_PG_BIN`), in a temporary directory, listening on 127.0.0.1 at a
//! free port, with `trust` authentication. Root cannot run PostgreSQL, so as
//! root the cluster belongs to the `postgres` user and the server runs under
//! `setpriv --reuid postgres`. The server gets `--pdeathsig INT` (fast
//! shutdown) so it ends with the thread that started it: [`PgServer::start`]
//! for one test, or the keeper thread of [`shared`] (one server per test
//! process, one database per test) that lives as long as the process.
//!
//! When no server can be started, [`shared`] panics if `KEYFLEET_REQUIRE_POSTGRES`
//! is set (CI sets it in `.ci/run`): the PostgreSQL suite must not pass by
//! skipping. Elsewhere it prints why and the test returns early.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The environment variable that makes a missing PostgreSQL a failure.
pub const REQUIRE_ENV: &str = "KEYFLEET_REQUIRE_POSTGRES";

/// One running cluster.
pub struct PgServer {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

fn bin_dir() -> Result<PathBuf, String> {
    if let Some(d) = std::env::var_os("KEYFLEET_PG_BIN") {
        return Ok(PathBuf::from(d));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| {
            format!("no /usr/lib/postgresql ({e}): install Debian's `postgresql` package (scripts/dev deps)")
        })?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, b)| b)
        .ok_or_else(|| "no /usr/lib/postgresql/*/bin/initdb: install `postgresql`".to_owned())
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// `cmd` as the user that may run PostgreSQL, ending with the calling thread.
fn as_pg_user(program: &Path) -> Command {
    let mut c = Command::new("setpriv");
    if is_root() {
        c.args(["--reuid=postgres", "--regid=postgres", "--clear-groups"]);
    }
    c.arg("--pdeathsig=INT").arg("--").arg(program);
    c
}

fn run(mut c: Command, what: &str) -> Result<(), String> {
    let out = c
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Removes the directories of earlier test processes that are gone.
fn sweep_leftovers() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("keyfleet-test-pg-"))
            .and_then(|r| r.split('-').next())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

impl PgServer {
    /// Creates a cluster in a new temporary directory and starts its server.
    pub fn start() -> Result<PgServer, String> {
        static N: AtomicU32 = AtomicU32::new(0);
        sweep_leftovers();
        let bin = bin_dir()?;
        let dir = std::env::temp_dir().join(format!(
            "keyfleet-test-pg-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        if is_root() {
            let mut c = Command::new("chown");
            c.arg("postgres:postgres").arg(&dir);
            run(c, "chown postgres")?;
        }
        let data = dir.join("data");
        let mut c = as_pg_user(&bin.join("initdb"));
        c.args(["--auth=trust", "--username=postgres", "--encoding=UTF8"])
            .args(["--locale=C", "--no-sync", "--no-instructions", "-D"])
            .arg(&data);
        run(c, "initdb")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .port();
        let mut server = PgServer {
            dir,
            port,
            child: None,
        };
        server.launch()?;
        Ok(server)
    }

    /// Starts the server of this cluster (again) and waits until it answers.
    pub fn launch(&mut self) -> Result<(), String> {
        let server = self;
        let bin = bin_dir()?;
        let data = server.dir.join("data");
        let port = server.port;
        let mut c = as_pg_user(&bin.join("postgres"));
        c.arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", server.dir.display()))
            .args(["-c", "fsync=off", "-c", "max_connections=200"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(server.dir.join("server.log"))
                    .map_err(|e| format!("cannot create the server log: {e}"))?,
            );
        server.child = Some(
            c.spawn()
                .map_err(|e| format!("cannot start postgres: {e}"))?,
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match admin(&server.url("postgres"), "SELECT 1") {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    let log =
                        std::fs::read_to_string(server.dir.join("server.log")).unwrap_or_default();
                    return Err(format!("postgres did not answer in 30 s: {e}\n{log}"));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// The URL of database `db` on this server.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// A new empty database; its URL.
    pub fn create_db(&self) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("keyfleet_{}", N.fetch_add(1, Ordering::Relaxed));
        admin(&self.url("postgres"), &format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        self.url(&name)
    }

    /// Stops the server (fast shutdown: open connections are cut); the
    /// cluster stays, [`PgServer::launch`] starts it again.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The server runs as another user: signal it through kill(1) as root.
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `sql` on `url` with a connection of its own (test set-up only), on a
/// thread of its own so that it may be called from inside a tokio test.
pub fn admin(url: &str, sql: &str) -> Result<(), String> {
    let (url, sql) = (url.to_owned(), sql.to_owned());
    std::thread::spawn(move || admin_here(&url, &sql))
        .join()
        .map_err(|_| "the set-up thread panicked".to_owned())?
}

fn admin_here(url: &str, sql: &str) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .map_err(|e| e.to_string())?;
        let task = tokio::spawn(conn);
        let r = client.batch_execute(sql).await.map_err(|e| e.to_string());
        drop(client);
        let _ = task.await;
        r
    })
}

/// The test process's shared server, started on first use by a keeper thread
/// that lives until the process ends. `None` (with the reason printed) when
/// none can be started and `KEYFLEET_REQUIRE_POSTGRES` is not set.
pub fn shared() -> Option<&'static PgServer> {
    static SERVER: OnceLock<Result<PgServer, String>> = OnceLock::new();
    let r = SERVER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(PgServer::start());
            // The server ends with this thread (pdeathsig): keep it.
            loop {
                std::thread::park();
            }
        });
        rx.recv()
            .unwrap_or_else(|_| Err("the keeper thread died".into()))
    });
    match r {
        Ok(s) => Some(s),
        Err(why) if std::env::var_os(REQUIRE_ENV).is_some() => {
            panic!("{REQUIRE_ENV} is set but no PostgreSQL server could be started: {why}")
        }
        Err(why) => {
            eprintln!("skipping the PostgreSQL engine test: no server could be started: {why}");
            None
        }
    }
}

/// A new database on the shared server (see [`shared`]).
pub fn fresh_db() -> Option<String> {
    shared().map(PgServer::create_db)
}
