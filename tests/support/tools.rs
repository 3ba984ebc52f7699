//! Outside programs the tests start: found or a failure that says what to install (never a
//! silent skip), and free loopback ports for those that cannot report the one they got.

use std::process::Command;

/// `$env_var`, else `name`, if running it with `probe` succeeds; otherwise the test fails
/// naming the Debian package (which .ci/run installs).
pub fn require(env_var: &str, name: &str, probe: &str, package: &str) -> String {
    let program = std::env::var(env_var).unwrap_or_else(|_| name.to_owned());
    match Command::new(&program).arg(probe).output() {
        Ok(o) if o.status.success() => program,
        _ => panic!(
            "`{program}` not found: install Debian's {package} (`apt-get install {package}`), \
             or point ${env_var} at one; .ci/run installs it"
        ),
    }
}

/// A port the kernel just said is free on 127.0.0.1 (to hand to a program that takes a port
/// number; the caller retries if someone else takes it first).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
