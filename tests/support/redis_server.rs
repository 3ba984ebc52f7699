//! A real `redis-server` on an ephemeral loopback port, started and stopped by the test.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// With TLS: its port (beside the plain one the test itself uses) and the certificate
    /// and key files.
    tls: Option<(u16, String, String, String)>,
}

fn binary() -> String {
    super::tools::require("REDIS_SERVER", "redis-server", "--version", "redis-server")
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(None)
    }

    /// Also serving TLS (`tls_url`) with a certificate for `localhost` from `ca`.
    pub fn start_tls(ca: &super::tls::TestCa) -> RedisServer {
        let (cert, key) = ca.leaf_for("redis", &["localhost"]);
        Self::start_with(Some((cert, key, ca.ca_file())))
    }

    fn start_with(tls: Option<(String, String, String)>) -> RedisServer {
        let mut dir = tempfile::tempdir().unwrap();
        for _ in 0..10 {
            let port = super::tools::free_port();
            let mut server = RedisServer {
                port,
                child: None,
                dir,
                tls: tls
                    .clone()
                    .map(|(c, k, ca)| (super::tools::free_port(), c, k, ca)),
            };
            if server.spawn() {
                return server;
            }
            dir = server.into_dir();
        }
        panic!("redis-server did not start on any of 10 ports");
    }

    fn into_dir(mut self) -> tempfile::TempDir {
        self.kill();
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }

    fn spawn(&mut self) -> bool {
        let child = Command::new(binary())
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            // For tests that make Redis slow (DEBUG SLEEP).
            .args(["--enable-debug-command", "local"])
            .args(match &self.tls {
                Some((port, cert, key, ca)) => vec![
                    "--tls-port".to_owned(),
                    port.to_string(),
                    "--tls-cert-file".to_owned(),
                    cert.clone(),
                    "--tls-key-file".to_owned(),
                    key.clone(),
                    "--tls-ca-cert-file".to_owned(),
                    ca.clone(),
                    "--tls-auth-clients".to_owned(),
                    "no".to_owned(),
                ],
                None => Vec::new(),
            })
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(mut c) = self.client().get_connection() {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return true;
                }
            }
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// The TLS port's URL (`start_tls`), by the certificate's name.
    pub fn tls_url(&self) -> String {
        let (port, ..) = self.tls.as_ref().expect("started without TLS");
        format!("rediss://localhost:{port}/0")
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).unwrap()
    }

    /// SIGKILL: Redis vanishes mid-conversation.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        assert!(
            self.spawn(),
            "redis-server did not restart on port {}",
            self.port
        );
    }

    /// Every key under `prefix` with its value.
    pub fn dump(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        let mut c = self.client().get_connection().unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query(&mut c)
            .unwrap();
        keys.into_iter()
            .filter_map(|k| {
                let v: Option<Vec<u8>> = redis::cmd("GET").arg(&k).query(&mut c).ok()?;
                Some((k, v?))
            })
            .collect()
    }

    pub fn set(&self, key: &str, value: &[u8]) {
        let mut c = self.client().get_connection().unwrap();
        let _: () = redis::cmd("SET").arg(key).arg(value).query(&mut c).unwrap();
    }

    /// Runs one command and ignores its answer.
    pub fn command(&self, args: &[&str]) {
        let mut c = self.client().get_connection().unwrap();
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        let _: redis::Value = cmd.query(&mut c).unwrap();
    }

    pub fn pttl(&self, key: &str) -> i64 {
        let mut c = self.client().get_connection().unwrap();
        redis::cmd("PTTL").arg(key).query(&mut c).unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
