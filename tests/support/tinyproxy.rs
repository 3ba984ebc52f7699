//! A real forward proxy, Debian's `tinyproxy`, on an ephemeral loopback port with its own
//! config and log in a tempdir. It opens its outgoing connections from 127.0.0.2, so an
//! upstream can tell a tunnelled connection (peer 127.0.0.2) from a direct one (127.0.0.1),
//! and its log lists every CONNECT it served.

use std::net::{IpAddr, Ipv4Addr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The source address of connections tinyproxy makes (its `Bind`).
pub const VIA_PROXY: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

pub struct Tinyproxy {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

fn binary() -> String {
    super::tools::require("TINYPROXY", "tinyproxy", "-v", "tinyproxy")
}

impl Tinyproxy {
    /// Open to loopback clients, every CONNECT port allowed (no `ConnectPort` line).
    pub fn start() -> Tinyproxy {
        Tinyproxy::start_with("")
    }

    /// Only for clients that send `Proxy-Authorization: Basic` with `user` and `password`.
    pub fn with_basic_auth(user: &str, password: &str) -> Tinyproxy {
        Tinyproxy::start_with(&format!("BasicAuth {user} {password}\n"))
    }

    fn start_with(extra: &str) -> Tinyproxy {
        let bin = binary();
        for _ in 0..10 {
            let port = super::tools::free_port();
            let dir = tempfile::tempdir().unwrap();
            let conf = dir.path().join("tinyproxy.conf");
            std::fs::write(
                &conf,
                format!(
                    "Port {port}\nListen 127.0.0.1\nBind {VIA_PROXY}\nAllow 127.0.0.1\n\
                     LogFile \"{}\"\nLogLevel Connect\nMaxClients 100\nTimeout 60\n{extra}",
                    dir.path().join("tinyproxy.log").display()
                ),
            )
            .unwrap();
            let child = Command::new(&bin)
                .arg("-d")
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("cannot start tinyproxy");
            let mut proxy = Tinyproxy {
                port,
                child: Some(child),
                dir,
            };
            if proxy.wait_ready() {
                return proxy;
            }
            proxy.kill();
        }
        panic!("tinyproxy did not start on any of 10 ports");
    }

    /// Ready once its log says the config is loaded and it accepts connections.
    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                return false;
            }
            if self.log().contains("Reloading config file finished")
                && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `http://127.0.0.1:<port>`, without credentials.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `http://user:password@127.0.0.1:<port>`.
    pub fn url_with(&self, user: &str, password: &str) -> String {
        format!("http://{user}:{password}@127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tinyproxy.log")).unwrap_or_default()
    }

    /// Every request line tinyproxy logged (`CONNECT 127.0.0.1:443 HTTP/1.1`, `POST http://…`).
    pub fn requests(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter_map(|l| l.split_once("): ").filter(|_| l.contains("Request ")))
            .map(|(_, request)| request.to_owned())
            .collect()
    }

    /// How many CONNECTs to `target` (`host:port`) it was asked for.
    pub fn connects_to(&self, target: &str) -> usize {
        let line = format!("CONNECT {target} HTTP/1.1");
        self.requests().iter().filter(|r| **r == line).count()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        self.kill();
    }
}
