//! `nolock compare --kernel` without the privilege to use `bpf()` skips the kernel part with one line saying
//! why, and still writes its report (the maps section with our maps measured, the kernel columns empty and
//! the reason in its summary). Run as root, the test drops to the `nobody` user in the child before it starts;
//! run unprivileged, it runs as is.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::Command;

use serde_json::Value;

#[test]
fn kernel_part_skips_cleanly_without_privilege() {
    let dir = std::env::temp_dir().join(format!("nolock-kskip-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nolock"));
    cmd.args(["compare", "--quick", "--kernel", "--only", "maps", "--out"]).arg(&dir);
    // SAFETY: getuid is always safe.
    let root = unsafe { libc::getuid() } == 0;
    if root {
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let out = cmd.output().expect("run nolock compare");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the run succeeds without the kernel part:\n{stdout}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    let maps = report["sections"].as_array().unwrap().iter().find(|s| s["id"] == "maps").unwrap().clone();
    let skip_lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with("kernel: skipped: ")).collect();
    assert_eq!(maps["status"], "ok", "our maps are measured either way");
    let summary = maps["summary"].as_str().unwrap();
    if summary.contains("kernel part skipped") {
        assert_eq!(skip_lines.len(), 1, "one line says why:\n{stdout}");
        assert!(skip_lines[0].contains("bpf(BPF_MAP_CREATE) failed"), "{}", skip_lines[0]);
        assert!(summary.contains("bpf(BPF_MAP_CREATE) failed"));
    } else {
        // Unprivileged bpf() allowed on this kernel (and not root): nothing to skip.
        assert!(!root, "as nobody the kernel part must be skipped:\n{stdout}");
        assert!(skip_lines.is_empty());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
