//! `cellmesh demo`: the whole system so far, on one machine, in a temporary directory, with
//! no configuration. Everything it shows goes through the same library calls the commands use.

use anyhow::{Context as _, Result, bail};
use cellmesh::core::device::{self, BindError};
use cellmesh::core::keystore::{KdfParams, Passphrase};
use cellmesh::core::mnemonic::Mnemonic;
use cellmesh::core::token::DEFAULT_SKEW;
use cellmesh::home::{Created, Home, HomeError, Unlocked};

const PASSPHRASE: &str = "demo passphrase";

pub fn run() -> Result<()> {
    let tmp = tempfile::tempdir().context("cannot create a temporary directory")?;
    let laptop = Home::new(tmp.path().join("laptop"));
    let phone = Home::new(tmp.path().join("phone"));
    let pass = || Passphrase::new(PASSPHRASE.into());

    step("1. create-cell on the first device (\"laptop\")");
    let words = cellmesh::new_mnemonic();
    let a = created(laptop.create(&words, "", &pass(), KdfParams::DEFAULT, false)?);
    println!("   recovery phrase: {}", words.phrase().as_str());
    println!("   (a throwaway demo cell; a real cell's words are shown once and never stored)");
    println!("   cell id  {}", a.cell);
    println!("   node id  {}  (laptop)", a.node);

    step("2. connect-cell on a second device (\"phone\") from the same 12 words");
    let typed = Mnemonic::parse(&words.phrase()).context("the words did not parse")?;
    let b = created(phone.create(&typed, "", &pass(), KdfParams::DEFAULT, false)?);
    println!("   cell id  {}", b.cell);
    println!("   node id  {}  (phone)", b.node);
    if a.cell != b.cell || a.node == b.node {
        bail!("restore did not give the same cell with a new device key");
    }
    println!("   same Cell ID, a different node key on each device");

    step("3. each device proves it acts for the cell (node token <-> identity token)");
    let mut laptop_keys = laptop.unlock(&pass())?;
    let phone_keys = phone.unlock(&pass())?;
    for (name, keys) in [("laptop", &laptop_keys), ("phone", &phone_keys)] {
        let binding = bind(keys, &device::Revocations::new())?;
        println!(
            "   {name:<6}  {} acts for {}  (both tokens verified)",
            binding.node().short(),
            binding.cell().short()
        );
    }

    step("4. the laptop revokes the phone; verifiers now refuse it");
    let revocation = laptop.revoke(&mut laptop_keys, b.node, false)?;
    println!(
        "   revocation token {} ({} bytes, signed by the cell)",
        revocation.fingerprint(),
        revocation.encoded_len()
    );
    match bind(&phone_keys, &laptop_keys.keystore.revocations()) {
        Err(e) => println!("   phone refused: {e}"),
        Ok(_) => bail!("a revoked device was accepted"),
    }
    for d in &laptop.load()?.devices {
        let state = if d.revoked { "revoked" } else { "active" };
        println!("   device {}  {state}", d.node.short());
    }

    step("5. the keystore at rest");
    let stored = std::fs::read_to_string(laptop.keystore_path())?;
    let has_words = stored.contains(words.phrase().as_str());
    println!(
        "   {} bytes, mode {:o}, contains the recovery words: {}",
        stored.len(),
        file_mode(&laptop.keystore_path())?,
        if has_words { "YES" } else { "no" }
    );
    match laptop.unlock(&Passphrase::new("wrong".into())) {
        Err(HomeError::Keystore(e)) => println!("   wrong passphrase: {e}"),
        _ => bail!("a wrong passphrase was not refused"),
    }

    println!("\nDemo finished; its temporary homes are deleted.");
    Ok(())
}

fn bind(keys: &Unlocked, revocations: &device::Revocations) -> Result<device::DeviceBinding> {
    let now = cellmesh::now();
    let s = &keys.secrets;
    let node = device::node_token(&s.node, s.cell.cell_id(), now, &mut cellmesh::OsRng)?
        .sign(&s.node.signing)?
        .verify(now, DEFAULT_SKEW)?;
    let identity = keys
        .keystore
        .devices
        .iter()
        .find(|d| d.node == keys.keystore.node)
        .and_then(|d| d.identity.clone())
        .context("this device's identity token is missing")?
        .verify(now, DEFAULT_SKEW)?;
    device::bind(&node, &identity, revocations).map_err(|e: BindError| e.into())
}

fn created(c: Created) -> cellmesh::home::Keystore {
    match c {
        Created::New(k) | Created::AlreadyPresent(k) => k,
    }
}

fn step(title: &str) {
    println!("\n{title}");
}

fn file_mode(path: &std::path::Path) -> Result<u32> {
    use std::os::unix::fs::PermissionsExt as _;
    Ok(std::fs::metadata(path)?.permissions().mode() & 0o777)
}
