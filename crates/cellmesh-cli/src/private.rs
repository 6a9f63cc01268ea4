//! Checks that what holds this device's secrets is the user's own, as ssh checks `~/.ssh`:
//! a home directory that another user owns or can write to could have had its keystore,
//! its config (the relay's pin) or the agent socket replaced under the user.

use std::fs::Metadata;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;

use anyhow::{Context as _, Result, bail};
use cellmesh::home::Home;

/// The user this process acts as: the owner of what it creates, and the uid its socket
/// peers see.
pub(crate) fn uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Refuses a home directory that is not the user's own: owned by another uid, or writable by
/// its group or by others. One that does not exist yet passes (it is made mode 0700).
pub(crate) fn check_home(home: &Home) -> Result<()> {
    let dir = home.dir();
    let meta = match std::fs::metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => bail!("cannot read {}: {e}", dir.display()),
    };
    check_owner(dir, &meta).context("use a home of your own (--home DIR)")?;
    if meta.permissions().mode() & 0o022 != 0 {
        bail!(
            "{} can be written by other users (mode {:o}): run `chmod 700 {}`",
            dir.display(),
            meta.permissions().mode() & 0o777,
            dir.display()
        );
    }
    Ok(())
}

/// Refuses a directory that is not a directory of the user's own that only they can enter
/// (mode 0700 or stricter).
pub(crate) fn check_private_dir(dir: &Path, meta: &Metadata) -> Result<()> {
    if !meta.is_dir() {
        bail!("{} is not a directory: remove it", dir.display());
    }
    check_owner(dir, meta)?;
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "{} is open to other users (mode {:o}): run `chmod 700 {}`",
            dir.display(),
            meta.permissions().mode() & 0o777,
            dir.display()
        );
    }
    Ok(())
}

/// Refuses a file another user owns.
pub(crate) fn check_owner(path: &Path, meta: &Metadata) -> Result<()> {
    let me = uid();
    if meta.uid() != me {
        bail!(
            "{} belongs to uid {}, not to you (uid {me})",
            path.display(),
            meta.uid()
        );
    }
    Ok(())
}
