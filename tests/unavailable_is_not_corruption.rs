//! A permission error (iOS data protection while the device is locked, a sandbox, an immutable
//! file) is reported as `Unavailable`, never as corruption, and never moves or deletes anything.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{TempStore, TestResult};
use waybill::{ErrorKind, NewTransfer, Store};

/// Makes a file refuse writes for the test's lifetime: mode 0400 for an ordinary user, the
/// immutable attribute for root (who ignores modes). Restores it on drop.
struct ReadOnly {
    path: PathBuf,
    immutable: bool,
}

impl ReadOnly {
    fn new(path: &Path) -> std::io::Result<Option<Self>> {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o400))?;
        if std::fs::OpenOptions::new().write(true).open(path).is_err() {
            return Ok(Some(ReadOnly {
                path: path.into(),
                immutable: false,
            }));
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let ok = Command::new("chattr")
            .arg("+i")
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        Ok(ok.then(|| ReadOnly {
            path: path.into(),
            immutable: true,
        }))
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        if self.immutable {
            let _ = Command::new("chattr").arg("-i").arg(&self.path).status();
        }
        let _ = std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o600));
    }
}

#[test]
fn permission_denied_is_unavailable_and_touches_nothing() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let id = store.create(NewTransfer::download("https://example.com/a"))?;
    let dir = t.root().join("transfers").join(id.to_string());
    let Some(guard) = ReadOnly::new(&dir.join("state"))? else {
        eprintln!("skipped: cannot make a file unwritable here (root without chattr support)");
        return Ok(());
    };
    let err = store
        .complete(id, Some(200))
        .expect_err("state is not writable");
    assert!(matches!(err.kind(), ErrorKind::Unavailable { .. }), "{err}");
    assert!(!err.is_corrupt());
    assert!(err.to_string().contains("unavailable"), "{err}");
    let scan = store.scan()?;
    assert!(scan.corrupt.is_empty(), "never treated as corruption");
    assert!(dir.join("manifest").exists() && dir.join("state").exists());
    drop(guard);
    assert!(
        store.complete(id, Some(200)).is_ok(),
        "works again once access returns"
    );
    Ok(())
}
