//! The GPU node's scripts run only there; here they are checked to parse,
//! and the GPU check's summary of the card's utilisation is checked against
//! `nvidia-smi dmon -s u -o T`'s format (both header spellings it has had).

use std::path::Path;
use std::process::Command;

fn script(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
}

#[test]
fn the_gpu_scripts_parse() {
    for name in ["gpu-check.sh", "gpu-bundle.sh"] {
        let out = Command::new("bash")
            .arg("-n")
            .arg(script(name))
            .output()
            .expect("bash runs");
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn summary(log: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("dmon.log");
    std::fs::write(&file, log).expect("written");
    let out = Command::new("bash")
        .arg(script("gpu-check.sh"))
        .arg("--dmon-summary")
        .arg(&file)
        .output()
        .expect("bash runs");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_string()
}

#[test]
fn the_utilisation_summary_reads_nvidia_smi_dmon() {
    // As an H200's driver 580 prints it; a `-` where an engine has no
    // reading (no NVENC) is not a sample of that engine.
    let log = "\
#Time        gpu     sm    mem    enc    dec    jpg    ofa
#HH:MM:SS    Idx      %      %      %      %      %      %
 19:02:01      0      0      0      -      0      0      0
 19:02:02      0     12      3      -     45      0      0
 19:02:03      0     21      5      -     97      0      0
#Time        gpu     sm    mem    enc    dec    jpg    ofa
 19:02:04      0      7      1      -     50      0      0
";
    let want = "utilisation over 4 s (mean / peak %): sm 10 / 21 dec 48 / 97 enc -";
    assert_eq!(summary(log), want);
    assert_eq!(summary(&log.replace("#Time", "# Time")), want);
    assert_eq!(
        summary("nvidia-smi: not supported\n"),
        "utilisation: no samples"
    );
}

#[test]
fn the_gpu_check_names_its_parts_and_refuses_others() {
    let out = Command::new("bash")
        .arg(script("gpu-check.sh"))
        .args(["4", "everything"])
        .output()
        .expect("bash runs");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("transcoding|captions|all"), "{err}");
}
