//! The README's demo commands, run as a user would: `payments-demo` on NATS (the main job), and
//! with `--broker rabbitmq`, `--broker redis` and `--broker http` when those features are on
//! (`cargo test --workspace --all-features` turns them on). Each must print its OK line and
//! exit 0. One test, the demos one after the other, in a database of the test's own (`DEMO_DB`),
//! dropped at the end.
//! (`--broker kafka` needs a Kafka broker: `examples/kafka-demo.sh` starts one; the Kafka chaos
//! test covers that story.)

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_payments-demo");

/// Runs the demo with `args`; returns (exit code, stdout, stderr), killing it after `limit`.
fn demo(args: &[&str], db: &str, limit: Duration) -> (Option<i32>, String, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .env("DEMO_DB", db)
        .env_remove("TIDINGS_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drained on threads of their own, so a chatty demo never blocks on a full pipe.
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    // Waited for on a thread; killed if it outlives `limit`.
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait().ok().and_then(|s| s.code()));
    });
    let code = rx.recv_timeout(limit).unwrap_or_else(|_| {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        None
    });
    (code, out.join().unwrap(), err.join().unwrap())
}

#[test]
fn every_demo_the_readme_shows_tells_its_story_to_the_end() {
    let mut brokers = vec!["nats"];
    if cfg!(feature = "rabbitmq") {
        brokers.push("rabbitmq");
    }
    if cfg!(feature = "redis") {
        brokers.push("redis");
    }
    if cfg!(feature = "http") {
        brokers.push("http");
    }
    let db = format!("tidings_demo_test_{}", std::process::id());
    for broker in brokers {
        let (code, out, err) = demo(&["--broker", broker], &db, Duration::from_secs(180));
        assert_eq!(code, Some(0), "--broker {broker}:\n{out}\n{err}");
        assert!(
            out.contains("OK: every payment has exactly one membership card"),
            "--broker {broker}:\n{out}\n{err}"
        );
    }
    let dropped = Command::new("psql")
        .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-qc"])
        .arg(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .status()
        .unwrap();
    assert!(dropped.success(), "drop {db}");
}
