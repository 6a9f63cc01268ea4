//! A device's home directory and the encrypted keystore in it.
//!
//! ```text
//! $CELLMESH_HOME/               (mode 0700)
//!   keystore.json               (mode 0600, replaced atomically: write temp → fsync → rename → fsync dir)
//!     cell_id, node_id          public, bound into the ciphertext as associated data
//!     devices[]                 identity tokens this cell issued that this device knows of
//!     revocations[]             signed revocations this device knows of
//!     secrets                   Argon2id parameters, salt, nonce, ChaCha20-Poly1305 ciphertext
//!   config.json                 (mode 0600, replaced atomically too) the CLI's relay settings
//!   state.redb                  (mode 0600) the device's state: sessions, duplicate memory,
//!                               unacknowledged sends (crate::state)
//!   agent/mailbox.sock          (directory 0700, socket 0600) served by a running `cellmesh listen`
//! ```
//!
//! The mnemonic is never written: it is shown once by `create-cell` and is the only way to
//! restore the cell elsewhere. Public data is readable without the passphrase (so `whoami`
//! needs none); the secrets need it.

use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use cellmesh_core::Timestamp;
use cellmesh_core::device::{self, Revocations};
use cellmesh_core::id::{CellId, NodeId};
use cellmesh_core::keys::{KeyPair, PublicKey};
use cellmesh_core::keystore::{self, DeviceSecrets, KdfParams, KeystoreError, Passphrase, Sealed};
use cellmesh_core::mnemonic::Mnemonic;
use cellmesh_core::token::{DEFAULT_SKEW, Token, TokenError, TokenKind, attr};
use data_encoding::BASE64;
use rand_core::OsRng;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Name of the keystore file inside a home directory.
pub const KEYSTORE_FILE: &str = "keystore.json";
const LOCK_FILE: &str = "keystore.lock";
const FORMAT: &str = "cellmesh-keystore";
const VERSION: u32 = 1;

/// Something went wrong with a home directory.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum HomeError {
    /// There is no cell in this home yet.
    #[error("no cell in {0}: run `cellmesh create-cell` or `cellmesh connect-cell` first")]
    NoCell(PathBuf),
    /// A different cell is already here and replacing it was not asked for.
    #[error(
        "{path} already holds cell {cell}; refusing to replace it (only its 12 words can bring it back)"
    )]
    CellExists {
        /// The keystore.
        path: PathBuf,
        /// The cell it holds.
        cell: CellId,
    },
    /// Wrong passphrase, or sealing failed.
    #[error(transparent)]
    Keystore(#[from] KeystoreError),
    /// The keystore file is not one this version can read.
    #[error("keystore {path} is damaged or not a cellmesh keystore: {reason}")]
    Corrupt {
        /// The keystore.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A file operation failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// To which path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A token could not be made.
    #[error("cannot make a token: {0}")]
    Token(#[from] TokenError),
    /// The request makes no sense for this cell.
    #[error("{0}")]
    Misuse(String),
    /// No home directory was given and the platform has no per-user data directory.
    #[error("no home directory: set CELLMESH_HOME or pass --home")]
    NoDefault,
}

/// A device's home directory.
#[derive(Clone, Debug)]
pub struct Home {
    dir: PathBuf,
}

/// What [`Home::create`] did.
#[derive(Debug)]
pub enum Created {
    /// A new keystore was written.
    New(Keystore),
    /// This home already held the same cell; nothing was changed.
    AlreadyPresent(Keystore),
}

/// A keystore made by [`Home::prepare`]: sealed, in memory, not written yet.
#[derive(Debug)]
pub struct Prepared {
    keystore: Keystore,
}

impl Prepared {
    /// Its public part: the cell and the new device's node id.
    pub fn keystore(&self) -> &Keystore {
        &self.keystore
    }
}

/// The public part of a keystore: readable without the passphrase.
#[derive(Clone, Debug)]
pub struct Keystore {
    /// The cell.
    pub cell: CellId,
    /// This device.
    pub node: NodeId,
    /// When this device joined the cell.
    pub created_at: Timestamp,
    /// Devices of this cell this home knows of, this one first.
    pub devices: Vec<KnownDevice>,
    revocation_tokens: Vec<Token>,
    sealed: Sealed,
}

/// A device of the cell, as this home knows it.
#[derive(Clone, Debug)]
pub struct KnownDevice {
    /// The device.
    pub node: NodeId,
    /// The cell's identity token certifying it, if this home has seen it.
    pub identity: Option<Token>,
    /// Whether the cell has revoked it.
    pub revoked: bool,
}

/// A keystore whose secrets have been decrypted.
#[derive(Debug)]
pub struct Unlocked {
    /// The public part.
    pub keystore: Keystore,
    /// The cell's and this device's secret keys.
    pub secrets: DeviceSecrets,
}

impl Home {
    /// The home at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The per-user default: `$XDG_DATA_HOME/cellmesh` or the platform's equivalent.
    pub fn default_dir() -> Result<PathBuf, HomeError> {
        dirs::data_dir()
            .map(|d| d.join("cellmesh"))
            .ok_or(HomeError::NoDefault)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The keystore file.
    pub fn keystore_path(&self) -> PathBuf {
        self.dir.join(KEYSTORE_FILE)
    }

    /// Reads the public part of the keystore.
    pub fn load(&self) -> Result<Keystore, HomeError> {
        let path = self.keystore_path();
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(HomeError::NoCell(self.dir.clone()));
            }
            Err(source) => return Err(io_error("read", &path, source)),
        };
        let file: KeystoreFile = serde_json::from_str(&text).map_err(|e| corrupt(&path, e))?;
        file.into_keystore()
            .map_err(|reason| corrupt(&path, reason))
    }

    /// Writes `name` in this home (created mode 0700 if need be) as [`KEYSTORE_FILE`] is
    /// written: a temporary file in the same directory, mode 0600, synced, renamed over
    /// `name`, and the directory synced. A crash leaves the old file or the new one, never a
    /// mixture, and never a file others can read.
    pub fn write_file(&self, name: &str, bytes: &[u8]) -> Result<(), HomeError> {
        write_atomic(&self.dir, name, bytes)
    }

    /// Whether a keystore exists here.
    pub fn exists(&self) -> bool {
        self.keystore_path().exists()
    }

    /// Puts the cell of `mnemonic` (with BIP39 passphrase `seed_passphrase`) on this device:
    /// a fresh random node key, an identity token by which the cell certifies it, all sealed
    /// under `passphrase`. If this home already holds the same cell, nothing changes; if it
    /// holds another, this fails unless `replace` is set. A replaced keystore's revocations
    /// (those that verify) are kept. [`Home::prepare`] and [`Home::commit`] do the same in
    /// two steps.
    pub fn create(
        &self,
        mnemonic: &Mnemonic,
        seed_passphrase: &str,
        passphrase: &Passphrase,
        kdf: KdfParams,
        replace: bool,
    ) -> Result<Created, HomeError> {
        // Checked before the slow sealing too; commit checks again under the lock.
        let cell = mnemonic.derive(seed_passphrase).cell_id();
        match self.load() {
            Ok(existing) if existing.cell == cell && !replace => {
                return Ok(Created::AlreadyPresent(existing));
            }
            Ok(existing) if !replace => return Err(self.cell_exists(existing.cell)),
            Err(HomeError::NoCell(_)) | Ok(_) => {}
            Err(_) if replace => {}
            Err(e) => return Err(e),
        }
        let prepared = self.prepare(mnemonic, seed_passphrase, passphrase, kdf)?;
        self.commit(prepared, replace)
    }

    /// The first step of [`Home::create`]: makes the keystore (a fresh random node key, the
    /// cell's identity token for it, all sealed under `passphrase`) in memory and writes
    /// nothing, so that the caller can show the recovery words before the cell exists on
    /// disk. [`Home::commit`] writes it; dropping it leaves no trace.
    pub fn prepare(
        &self,
        mnemonic: &Mnemonic,
        seed_passphrase: &str,
        passphrase: &Passphrase,
        kdf: KdfParams,
    ) -> Result<Prepared, HomeError> {
        let cell = mnemonic.derive(seed_passphrase);
        let node = KeyPair::generate(&mut OsRng);
        let node_id = NodeId::from_key(node.signing.public());
        let now = crate::now();
        let identity = device::identity_token(&cell, node_id, now, &mut OsRng)?;
        let secrets = DeviceSecrets { cell, node };
        let header = header(secrets.cell.cell_id(), node_id);
        let sealed = keystore::seal(&secrets, passphrase, kdf, &header, &mut OsRng)?;
        let keystore = Keystore {
            cell: secrets.cell.cell_id(),
            node: node_id,
            created_at: now,
            devices: vec![KnownDevice {
                node: node_id,
                identity: Some(identity),
                revoked: false,
            }],
            revocation_tokens: Vec::new(),
            sealed,
        };
        Ok(Prepared { keystore })
    }

    /// The second step of [`Home::create`]: writes `prepared`, with the checks of `create`
    /// made under the home's lock. If this home holds the same cell and `replace` is not set,
    /// nothing is written and the keystore here is returned.
    pub fn commit(&self, prepared: Prepared, replace: bool) -> Result<Created, HomeError> {
        let mut keystore = prepared.keystore;
        let _lock = self.lock()?;
        match self.load() {
            Ok(existing) if existing.cell == keystore.cell && !replace => {
                return Ok(Created::AlreadyPresent(existing));
            }
            Ok(existing) if !replace => return Err(self.cell_exists(existing.cell)),
            // Revocations are signed statements about devices (of the replaced cell, or of
            // others') that stay true whichever cell this home holds: they are kept.
            Ok(existing) => {
                keystore.revocation_tokens = existing.valid_revocation_tokens();
                keystore.mark_revoked();
            }
            Err(HomeError::NoCell(_)) => {}
            // A damaged keystore is replaced whole.
            Err(e) if replace => drop(e),
            Err(e) => return Err(e),
        }
        self.save(&keystore)?;
        Ok(Created::New(keystore))
    }

    fn cell_exists(&self, cell: CellId) -> HomeError {
        HomeError::CellExists {
            path: self.keystore_path(),
            cell,
        }
    }

    /// Decrypts the secrets. A wrong passphrase fails with
    /// [`KeystoreError::WrongPassphraseOrCorrupt`] and changes nothing.
    pub fn unlock(&self, passphrase: &Passphrase) -> Result<Unlocked, HomeError> {
        let keystore = self.load()?;
        let secrets = keystore::open(
            &keystore.sealed,
            passphrase,
            &header(keystore.cell, keystore.node),
        )?;
        if secrets.cell.cell_id() != keystore.cell
            || NodeId::from_key(secrets.node.signing.public()) != keystore.node
        {
            return Err(corrupt(&self.keystore_path(), "keys do not match ids"));
        }
        Ok(Unlocked { keystore, secrets })
    }

    /// Has the cell revoke `node`, records the revocation, and returns it for distribution.
    /// Revoking this very device needs `allow_self`.
    pub fn revoke(
        &self,
        unlocked: &mut Unlocked,
        node: NodeId,
        allow_self: bool,
    ) -> Result<Token, HomeError> {
        if node == unlocked.keystore.node && !allow_self {
            return Err(HomeError::Misuse(format!(
                "{node} is this device; revoke it from another device, or insist"
            )));
        }
        let token = device::revocation(&unlocked.secrets.cell, node, crate::now(), &mut OsRng)?;
        let _lock = self.lock()?;
        // Re-read under the lock: another command may have changed the file since unlock.
        let mut keystore = self.load()?;
        keystore.revocation_tokens.push(token.clone());
        keystore.mark_revoked();
        self.save(&keystore)?;
        unlocked.keystore = keystore;
        Ok(token)
    }

    /// Verifies a revocation (of any cell, or by a realm's issuer) and keeps it, so nodes
    /// started from this home honour it. Returns (issuer, revoked key); importing one twice
    /// changes nothing.
    pub fn import_revocation(&self, token: Token) -> Result<(PublicKey, PublicKey), HomeError> {
        let verified = token
            .verify(crate::now(), DEFAULT_SKEW)
            .map_err(|e| HomeError::Misuse(format!("revocation refused: {e}")))?;
        let entry = Revocations::new()
            .insert(&verified)
            .map_err(|e| HomeError::Misuse(format!("not a revocation: {e}")))?;
        let _lock = self.lock()?;
        let mut keystore = self.load()?;
        if keystore
            .revocation_tokens
            .iter()
            .all(|t| t.fingerprint() != token.fingerprint())
        {
            keystore.revocation_tokens.push(token);
            keystore.mark_revoked();
            self.save(&keystore)?;
        }
        Ok(entry)
    }

    /// An exclusive lock on this home for a read-modify-write of the keystore, held until
    /// the returned file is dropped, so two commands cannot lose each other's changes.
    fn lock(&self) -> Result<fs::File, HomeError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| io_error("create directory", &self.dir, e))?;
        let path = self.dir.join(LOCK_FILE);
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io_error("open", &path, e))?;
        file.lock().map_err(|e| io_error("lock", &path, e))?;
        Ok(file)
    }

    fn save(&self, keystore: &Keystore) -> Result<(), HomeError> {
        let json = serde_json::to_vec_pretty(&KeystoreFile::from(keystore))
            .map_err(|e| corrupt(&self.keystore_path(), e))?;
        write_atomic(&self.dir, KEYSTORE_FILE, &json)
    }
}

impl Keystore {
    /// The revocations this home holds, as signed tokens.
    pub fn revocation_tokens(&self) -> &[Token] {
        &self.revocation_tokens
    }

    /// Every revocation this home holds, verified, for handing to a verifier. Each speaks only
    /// for its own issuer (a cell for its devices, a realm's issuer for its members), so holding
    /// another cell's revocations is safe.
    pub fn revocations(&self) -> Revocations {
        let mut set = Revocations::new();
        let now = crate::now();
        for token in &self.revocation_tokens {
            if let Ok(verified) = token.verify(now, DEFAULT_SKEW) {
                let _ = set.insert(&verified);
            }
        }
        set
    }

    /// The revocation tokens that verify now (a token that does not is no use to a
    /// verifier), once each.
    fn valid_revocation_tokens(&self) -> Vec<Token> {
        let now = crate::now();
        let mut kept: Vec<Token> = Vec::new();
        for token in &self.revocation_tokens {
            let verifies = token
                .verify(now, DEFAULT_SKEW)
                .is_ok_and(|v| Revocations::new().insert(&v).is_ok());
            if verifies && kept.iter().all(|t| t.fingerprint() != token.fingerprint()) {
                kept.push(token.clone());
            }
        }
        kept
    }

    fn mark_revoked(&mut self) {
        let revocations = self.revocations();
        for d in &mut self.devices {
            d.revoked = revocations.is_revoked(self.cell, d.node);
        }
        for (issuer, key) in revocations.iter() {
            if issuer != self.cell.key() {
                continue;
            }
            let node = NodeId::from_key(key);
            if !self.devices.iter().any(|d| d.node == node) {
                // A revoked device this home never saw: keep it visible as revoked.
                self.devices.push(KnownDevice {
                    node,
                    identity: None,
                    revoked: true,
                });
            }
        }
    }
}

/// The public data bound into the ciphertext, so ids cannot be swapped under it.
fn header(cell: CellId, node: NodeId) -> Vec<u8> {
    format!("{cell}|{node}").into_bytes()
}

fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), HomeError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io_error("create directory", dir, e))?;
    let path = dir.join(name);
    let mut tmp =
        tempfile::NamedTempFile::new_in(dir).map_err(|e| io_error("create a file in", dir, e))?;
    let write = |tmp: &mut tempfile::NamedTempFile| -> io::Result<()> {
        tmp.as_file()
            .set_permissions(fs::Permissions::from_mode(0o600))?;
        tmp.write_all(bytes)?;
        tmp.as_file().sync_all()
    };
    write(&mut tmp).map_err(|e| io_error("write", tmp.path(), e))?;
    tmp.persist(&path)
        .map_err(|e| io_error("replace", &path, e.error))?;
    // The rename is durable only once the directory entry is.
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("sync", dir, e))
}

fn io_error(action: &'static str, path: &Path, source: io::Error) -> HomeError {
    HomeError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn corrupt(path: &Path, reason: impl ToString) -> HomeError {
    HomeError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// The keystore as it is stored: JSON, byte strings in base64.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeystoreFile {
    format: String,
    version: u32,
    cell_id: String,
    node_id: String,
    created_at: u64,
    devices: Vec<String>,
    revocations: Vec<String>,
    secrets: SecretsFile,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretsFile {
    kdf: String,
    memory_kib: u32,
    iterations: u32,
    lanes: u32,
    salt: String,
    aead: String,
    nonce: String,
    ciphertext: String,
}

const KDF_NAME: &str = "argon2id-v19";
const AEAD_NAME: &str = "chacha20-poly1305";

impl From<&Keystore> for KeystoreFile {
    fn from(k: &Keystore) -> Self {
        let b64 = |t: &Token| BASE64.encode(&t.to_bytes());
        Self {
            format: FORMAT.into(),
            version: VERSION,
            cell_id: k.cell.to_string(),
            node_id: k.node.to_string(),
            created_at: k.created_at.0,
            devices: k
                .devices
                .iter()
                .filter_map(|d| d.identity.as_ref().map(b64))
                .collect(),
            revocations: k.revocation_tokens.iter().map(b64).collect(),
            secrets: SecretsFile {
                kdf: KDF_NAME.into(),
                memory_kib: k.sealed.params.memory_kib,
                iterations: k.sealed.params.iterations,
                lanes: k.sealed.params.lanes,
                salt: BASE64.encode(&k.sealed.salt),
                aead: AEAD_NAME.into(),
                nonce: BASE64.encode(&k.sealed.nonce),
                ciphertext: BASE64.encode(&k.sealed.ciphertext),
            },
        }
    }
}

impl KeystoreFile {
    fn into_keystore(self) -> Result<Keystore, String> {
        if self.format != FORMAT {
            return Err(format!("format is {:?}", self.format));
        }
        if self.version != VERSION {
            return Err(format!("version {} is not supported", self.version));
        }
        let s = self.secrets;
        if s.kdf != KDF_NAME || s.aead != AEAD_NAME {
            return Err(format!("unsupported algorithms {}/{}", s.kdf, s.aead));
        }
        let cell: CellId = self.cell_id.parse().map_err(|e| format!("cell_id: {e}"))?;
        let node: NodeId = self.node_id.parse().map_err(|e| format!("node_id: {e}"))?;
        let token = |b64: &String| -> Result<Token, String> {
            let bytes = BASE64.decode(b64.as_bytes()).map_err(|e| e.to_string())?;
            Token::decode(&bytes).map_err(|e| format!("token: {e}"))
        };
        let mut devices = Vec::new();
        for b64 in &self.devices {
            let identity = token(b64)?;
            let claims = identity.claims();
            let named = claims.key_attribute(attr::NODE);
            match (claims.kind, named) {
                (TokenKind::Identity, Some(key)) if claims.issuer == cell.key() => {
                    devices.push(KnownDevice {
                        node: NodeId::from_key(key),
                        identity: Some(identity),
                        revoked: false,
                    })
                }
                _ => return Err("a device entry is not an identity token of this cell".into()),
            }
        }
        let revocation_tokens = self
            .revocations
            .iter()
            .map(token)
            .collect::<Result<Vec<_>, _>>()?;
        let bytes = |field: &str, b64: &str| {
            BASE64
                .decode(b64.as_bytes())
                .map_err(|e| format!("{field}: {e}"))
        };
        let sealed = Sealed {
            params: KdfParams {
                memory_kib: s.memory_kib,
                iterations: s.iterations,
                lanes: s.lanes,
            },
            salt: bytes("salt", &s.salt)?
                .try_into()
                .map_err(|_| "salt has the wrong length")?,
            nonce: bytes("nonce", &s.nonce)?
                .try_into()
                .map_err(|_| "nonce has the wrong length")?,
            ciphertext: bytes("ciphertext", &s.ciphertext)?,
        };
        let mut keystore = Keystore {
            cell,
            node,
            created_at: Timestamp(self.created_at),
            devices,
            revocation_tokens,
            sealed,
        };
        // This device first.
        keystore.devices.sort_by_key(|d| d.node != node);
        keystore.mark_revoked();
        Ok(keystore)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: KdfParams = KdfParams {
        memory_kib: 256,
        iterations: 1,
        lanes: 1,
    };

    fn pass(s: &str) -> Passphrase {
        Passphrase::new(s.into())
    }

    /// A new cell in `home`, passphrase "pw".
    fn fresh(home: &Home) -> Keystore {
        match home
            .create(
                &Mnemonic::generate(&mut OsRng),
                "",
                &pass("pw"),
                FAST,
                false,
            )
            .unwrap()
        {
            Created::New(k) | Created::AlreadyPresent(k) => k,
        }
    }

    #[test]
    fn create_restore_unlock_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            Home::new(dir.path().join("a")),
            Home::new(dir.path().join("b")),
        );
        let words = Mnemonic::generate(&mut OsRng);
        let Created::New(ka) = a.create(&words, "", &pass("pw"), FAST, false).unwrap() else {
            panic!("expected a new keystore")
        };
        let restored = Mnemonic::parse(&words.phrase()).unwrap();
        let Created::New(kb) = b.create(&restored, "", &pass("pw2"), FAST, false).unwrap() else {
            panic!("expected a new keystore")
        };
        assert_eq!(ka.cell, kb.cell);
        assert_ne!(ka.node, kb.node);
        assert!(matches!(
            a.create(&words, "", &pass("pw"), FAST, false).unwrap(),
            Created::AlreadyPresent(_)
        ));
        let other = Mnemonic::generate(&mut OsRng);
        assert!(matches!(
            a.create(&other, "", &pass("pw"), FAST, false),
            Err(HomeError::CellExists { .. })
        ));

        let before = fs::read(a.keystore_path()).unwrap();
        assert!(matches!(
            a.unlock(&pass("wrong")),
            Err(HomeError::Keystore(KeystoreError::WrongPassphraseOrCorrupt))
        ));
        assert_eq!(fs::read(a.keystore_path()).unwrap(), before);

        let mut unlocked = a.unlock(&pass("pw")).unwrap();
        assert!(matches!(
            a.revoke(&mut unlocked, ka.node, false),
            Err(HomeError::Misuse(_))
        ));
        a.revoke(&mut unlocked, kb.node, false).unwrap();
        let reloaded = a.load().unwrap();
        assert_eq!(reloaded.devices.len(), 2);
        assert_eq!(reloaded.devices[0].node, ka.node);
        assert!(!reloaded.devices[0].revoked);
        assert!(reloaded.devices[1].revoked && reloaded.devices[1].node == kb.node);
        assert!(reloaded.revocations().is_revoked(ka.cell, kb.node));
        // Still unlockable after the rewrite.
        a.unlock(&pass("pw")).unwrap();
    }

    #[test]
    fn prepare_writes_nothing_and_commit_checks_again() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(dir.path().join("h"));
        let words = Mnemonic::generate(&mut OsRng);
        let prepared = home.prepare(&words, "", &pass("pw"), FAST).unwrap();
        assert!(!home.exists(), "prepare wrote the keystore");
        let ids = (prepared.keystore().cell, prepared.keystore().node);
        // Another cell arrived meanwhile: commit refuses to replace it unless asked.
        let other = fresh(&home);
        assert!(matches!(
            home.commit(prepared, false),
            Err(HomeError::CellExists { cell, .. }) if cell == other.cell
        ));
        let prepared = home.prepare(&words, "", &pass("pw"), FAST).unwrap();
        let Created::New(k) = home.commit(prepared, true).unwrap() else {
            panic!("expected a new keystore")
        };
        assert_eq!(k.cell, ids.0);
        assert_eq!(home.load().unwrap().node, k.node);
        home.unlock(&pass("pw")).unwrap();
    }

    #[test]
    fn concurrent_writers_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(dir.path());
        fresh(&home);
        let tokens: Vec<Token> = (0..16)
            .map(|_| {
                let cell = Mnemonic::generate(&mut OsRng).derive("");
                let node = NodeId::from_key(KeyPair::generate(&mut OsRng).signing.public());
                device::revocation(&cell, node, crate::now(), &mut OsRng).unwrap()
            })
            .collect();
        std::thread::scope(|scope| {
            for chunk in tokens.chunks(4) {
                let home = home.clone();
                scope.spawn(move || {
                    for t in chunk {
                        home.import_revocation(t.clone()).unwrap();
                    }
                });
            }
        });
        assert_eq!(home.load().unwrap().revocation_tokens().len(), 16);
    }

    #[test]
    fn swapped_ids_are_detected_on_unlock() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            Home::new(dir.path().join("a")),
            Home::new(dir.path().join("b")),
        );
        fresh(&a);
        let kb = fresh(&b);
        let text = fs::read_to_string(a.keystore_path()).unwrap();
        let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
        json["node_id"] = kb.node.to_string().into();
        fs::write(a.keystore_path(), json.to_string()).unwrap();
        assert!(
            a.load().is_ok(),
            "a swapped node id alone passes the structural checks"
        );
        fs::write(a.keystore_path(), json.to_string()).unwrap();
        assert!(matches!(
            a.unlock(&pass("pw")),
            Err(HomeError::Keystore(KeystoreError::WrongPassphraseOrCorrupt))
        ));
    }
}
