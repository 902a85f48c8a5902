//! The command line: every option has an env var, and bad options and
//! missing files fail with a message that says what to change.

use std::process::Command;

fn embark() -> Command {
    Command::new(env!("CARGO_BIN_EXE_embark"))
}

#[test]
fn help_lists_the_env_var_of_every_option() {
    let out = embark().args(["up", "--help"]).output().expect("run embark");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for var in ["EMBARK_LISTEN", "EMBARK_DATA_DIR", "EMBARK_CACHE_BYTES", "EMBARK_MODELS_DIR", "EMBARK_OOV"] {
        assert!(help.contains(var), "{var} missing from:\n{help}");
    }
}

#[test]
fn bad_options_fail_with_a_clear_message() {
    let out = embark().args(["serve", "--cache-bytes", "lots"]).output().expect("run embark");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected a number of bytes"));

    let data = tempfile::tempdir().expect("tempdir");
    let out = embark()
        .args(["up", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--models-dir"])
        .arg(data.path().join("no-models"))
        .arg("--data-dir")
        .arg(data.path())
        .output()
        .expect("run embark");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is missing") && err.contains("scripts/setup-models.sh"), "{err}");
}
