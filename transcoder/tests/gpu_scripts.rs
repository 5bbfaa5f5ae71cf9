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

/// Each session-search step's line against the dmon samples of its last
/// seconds: which engine was busy at which load, per backend.
#[test]
fn each_step_gets_the_utilisation_of_its_own_seconds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dmon = dir.path().join("dmon.log");
    let steps = dir.path().join("steps.log");
    // NVDEC busier as the sessions grow; no NVENC on the card.
    std::fs::write(
        &dmon,
        "\
#Time        gpu     sm    mem    enc    dec    jpg    ofa
#HH:MM:SS    Idx      %      %      %      %      %      %
 19:02:01      0      2      0      -     10      0      0
 19:02:02      0      4      0      -     20      0      0
 19:02:03      0      6      0      -     30      0      0
 19:02:04      0      8      0      -     40      0      0
 19:02:05      0     10      0      -     90      0      0
 19:02:06      0     12      0      -     96      0      0
",
    )
    .expect("written");
    std::fs::write(
        &steps,
        "\
GPU: NVIDIA H200
[4 s, 19:02:04 UTC] H.264 cuda, a CUDA context per decoder: 6 sessions, 0 of 540 frames late, 1.31 cores, decode / scale / encode 1.4 / 0.6 / 5.0 ms a frame
| a table row | 1 | 2 |
[6 s, 19:02:06 UTC] H.264 cuda, a CUDA context per decoder: 8 sessions, 28 of 720 frames late, 1.70 cores, decode / scale / encode 1.4 / 0.6 / 5.0 ms a frame
[9 s, 19:02:09 UTC] H.264 cpu: 1 sessions, 0 of 90 frames late, 0.20 cores, decode / scale / encode 1.4 / 0.6 / 5.0 ms a frame
",
    )
    .expect("written");
    let out = Command::new("bash")
        .arg(script("gpu-check.sh"))
        .arg("--step-summary")
        .arg(&steps)
        .arg(&dmon)
        .arg("2")
        .output()
        .expect("bash runs");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [
            "19:02:04 H.264 cuda, a CUDA context per decoder: 6 sessions: sm 7 dec 35 enc -",
            "19:02:06 H.264 cuda, a CUDA context per decoder: 8 sessions: sm 11 dec 93 enc -",
            "19:02:09 H.264 cpu: 1 sessions: sm - dec - enc -",
        ]
    );
}
