//! The fault drill's short run (`scripts/drill.sh --short` runs the same
//! on release builds): KFC killed mid-fill, the store paused, poison
//! messages of each kind, and hostile requests (64 MiB of empty keys, 10k
//! streams on one connection), each on real processes and ending with no
//! key lost, no Lookup error and every service ready again.

use std::{process::Command, time::Duration};

use embark_tests::binary;

#[test]
fn the_short_fault_drill_loses_nothing() -> anyhow::Result<()> {
    let bin = binary("drill");
    let dir = bin.parent().expect("a directory").to_owned();
    let mut child = Command::new(&bin)
        .args(["--short", "--bin-dir"])
        .arg(&dir)
        .env("EMBARK_MODELS_DIR", embark_tests::models_dir())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // Bounded: the short drill takes well under a minute here.
    let started = std::time::Instant::now();
    while child.try_wait()?.is_none() {
        if started.elapsed() > Duration::from_secs(600) {
            let _ = child.kill();
            anyhow::bail!("the drill did not finish in 10 minutes");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    anyhow::ensure!(out.status.success(), "the drill failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for scenario in ["kfc-kill-9", "store-paused", "poison", "big-requests"] {
        let line = stdout.lines().find(|l| l.starts_with(scenario)).unwrap_or_else(|| panic!("no {scenario} line"));
        assert!(line.contains("lost   0") && line.contains("lookup errors   0"), "{line}");
    }
    Ok(())
}
