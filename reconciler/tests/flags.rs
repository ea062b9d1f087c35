//! Flags that would let the reconciler follow what it must not: refused before it starts,
//! with the flag and the value named.

use std::process::Output;

fn run(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_replset-reconciler"))
        // Never reached: the flags are refused first.
        .arg("etcd://127.0.0.1:1/flags-test")
        .args(args)
        .env_remove("RECONCILER_REPLSET")
        .env_remove("RECONCILER_SERVICE")
        .env_remove("RECONCILER_PORT")
        .output()
        .expect("runs")
}

fn assert_flag_error(out: &Output, flag: &str, value: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(flag), "{stderr}");
    assert!(stderr.contains(value), "{stderr}");
}

#[test]
fn a_set_name_that_is_not_a_key_segment_is_a_flag_error() {
    // `rs0/leader` would put the set's keys under the election keys of rs0.
    let out = run(&["--service", "mongo", "--replset", "rs0/leader"]);
    assert_flag_error(&out, "--replset", "rs0/leader");
    assert!(String::from_utf8_lossy(&out.stderr).contains("letters, digits"));
    // In a list too.
    let out = run(&["--service", "a,b", "--replset", "rs0,rs1&w=0"]);
    assert_flag_error(&out, "--replset", "rs1&w=0");
}

#[test]
fn port_zero_is_a_flag_error() {
    let out = run(&["--service", "mongo", "--replset", "rs0", "--port", "0"]);
    assert_flag_error(&out, "--port", "0");
}
