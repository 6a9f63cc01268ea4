//! `cellmesh`: the command-line tool. A thin layer over the `cellmesh` library: it parses
//! arguments, asks for secrets, prints results, and maps failures to exit codes
//! (0 success, 1 failure, 2 usage error).

#![forbid(unsafe_code)]
// Output goes through `out`, whose writes fail as errors: the print macros panic instead.
#![deny(clippy::print_stdout, clippy::print_stderr, clippy::dbg_macro)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::fmt::Write as _;
use std::fs;
use std::io::{self, IsTerminal as _, Read as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, Result, anyhow, bail};
use cellmesh::core::id::{CellId, NodeId};
use cellmesh::core::keystore::{KdfParams, Passphrase};
use cellmesh::core::mnemonic::Mnemonic;
use cellmesh::core::token::attr;
use cellmesh::home::{Created, Home, Keystore};
use clap::{Args, Parser, Subcommand};
pub(crate) use out::Printer;
use serde_json::json;
use zeroize::Zeroizing;

mod agent;
mod demo;
mod mail;
mod node;
mod out;
mod private;
mod tty;

/// End-to-end encrypted messaging between cells.
#[derive(Parser)]
#[command(name = "cellmesh", version, about, long_about = None)]
struct Cli {
    /// Home directory holding this device's keystore [default: the per-user data directory].
    #[arg(long, global = true, env = "CELLMESH_HOME", value_name = "DIR")]
    home: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new cell: prints its 12 recovery words once, then its Cell ID.
    CreateCell {
        #[command(flatten)]
        secrets: SecretArgs,
        /// Replace a cell that already exists in this home (it is lost unless you have its words).
        #[arg(long)]
        force: bool,
        /// Print one JSON object (with `cell_id`, `node_id`, `mnemonic`).
        #[arg(long)]
        json: bool,
    },
    /// Restore a cell on this device from its 12 words (read from a hidden prompt, or from
    /// stdin when it is not a terminal), with a new key for this device.
    ConnectCell {
        #[command(flatten)]
        secrets: SecretArgs,
        /// Replace a different cell that already exists in this home.
        #[arg(long)]
        force: bool,
        /// Register this device with the relay at ADDR (`HOST:PORT`, `tls://HOST:PORT`,
        /// `ws://HOST[:PORT][/PATH]` or `wss://HOST[:PORT][/PATH]`; a private CA for TLS from
        /// CELLMESH_RELAY_CA) and remember it for `send` and `listen` (also CELLMESH_RELAY).
        #[arg(long, value_name = "ADDR", env = "CELLMESH_RELAY")]
        relay: Option<mail::RelayTarget>,
        /// Print one JSON object (with `cell_id`, `node_id`).
        #[arg(long)]
        json: bool,
    },
    /// Show this device's Cell ID, node ID and the cell's devices known here.
    Whoami {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Revoke one of this cell's devices: hands the signed revocation to the relay (which
    /// then refuses the device and gives the revocation to every sender) and prints it, for
    /// `import-revocation` elsewhere.
    RevokeDevice {
        /// The device's node ID (`node1...`): one of this cell's devices, as this home or
        /// the relay's directory of the cell knows them.
        node_id: NodeId,
        #[command(flatten)]
        secrets: PassphraseArgs,
        /// Allow revoking this very device.
        #[arg(long)]
        force: bool,
        /// Revoke a node ID that neither this home nor the relay knows as a device of this
        /// cell (one that never registered anywhere this home can see).
        #[arg(long)]
        unconfirmed: bool,
        #[command(flatten)]
        relay: mail::RelayAddr,
        /// Print one JSON object (with `revoked`, `revocation`, `relay`, `relay_status`
        /// and `relay_code`).
        #[arg(long)]
        json: bool,
    },
    /// Keep a revocation (printed by `revoke-device` on any device of any cell) so that nodes
    /// started from this home refuse the revoked device.
    ImportRevocation {
        /// The revocation token in base64, or `-` to read it from stdin.
        token: String,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Run a node in the foreground: listen, join others, print one line per event.
    Node(node::NodeArgs),
    /// Run a relay: devices behind NAT join it; it forwards sealed messages between cells and
    /// stores them for devices that are offline.
    Relay(mail::RelayArgs),
    /// Receive messages from other cells through the relay; one line per message.
    Listen(mail::ListenArgs),
    /// Send a message to a cell through the relay: waits until a device of it acknowledges it
    /// (`delivered`) or the relay stored it for later (`queued`).
    Send(mail::SendArgs),
    /// Run a self-contained demonstration in a temporary directory and exit.
    Demo,
}

/// Where the keystore passphrase comes from: `--passphrase-file`, else `CELLMESH_PASSPHRASE`,
/// else a hidden prompt on the terminal.
#[derive(Args)]
pub(crate) struct PassphraseArgs {
    /// File whose first line is the keystore passphrase.
    #[arg(long, value_name = "FILE")]
    passphrase_file: Option<PathBuf>,
}

/// The keystore passphrase and the optional BIP39 passphrase, for commands that derive a cell.
#[derive(Args)]
pub(crate) struct SecretArgs {
    #[command(flatten)]
    keystore: PassphraseArgs,
    /// File whose first line is the optional BIP39 passphrase (the "25th word"); also
    /// `CELLMESH_SEED_PASSPHRASE`. The same words with another seed passphrase are another cell.
    #[arg(long, value_name = "FILE")]
    seed_passphrase_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(io::stderr)
        // Its own complaint about a failed write would be an eprintln!, which panics.
        .log_internal_errors(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CELLMESH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A reader that went away (`cellmesh listen | head -n 1`) is not told why.
            let closed = e
                .downcast_ref::<out::OutputError>()
                .is_some_and(out::OutputError::stdout_closed);
            if !closed {
                // Nothing more can be done if stderr fails too: the exit code still says it.
                let _ = out::stderr(&format!("error: {}\n", node::printable(&format!("{e:#}"))));
            }
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let home = || -> Result<Home> {
        match &cli.home {
            Some(dir) => Ok(Home::new(dir)),
            None => Ok(Home::new(Home::default_dir()?)),
        }
    };
    // For every command that uses the keystore's secrets, writes the keystore or serves the
    // socket: the home must be the user's own (whoami reads only public data).
    let private = || -> Result<Home> {
        let home = home()?;
        private::check_home(&home)?;
        Ok(home)
    };
    match &cli.command {
        Command::CreateCell {
            secrets,
            force,
            json,
        } => create_cell(&private()?, secrets, *force, *json),
        Command::ConnectCell {
            secrets,
            force,
            relay,
            json,
        } => connect_cell(&private()?, secrets, *force, relay.clone(), *json),
        Command::Whoami { json } => whoami(&home()?, *json),
        Command::RevokeDevice {
            node_id,
            secrets,
            force,
            unconfirmed,
            relay,
            json,
        } => {
            let home = private()?;
            let mut unlocked = unlock(&home, secrets)?;
            let how = mail::Revoke {
                node: *node_id,
                force: *force,
                unconfirmed: *unconfirmed,
                json: *json,
            };
            mail::revoke_device(&home, &mut unlocked, relay, how)
        }
        Command::ImportRevocation { token, json } => import_revocation(&private()?, token, *json),
        Command::Node(args) => node::run(&private()?, args),
        Command::Relay(args) => mail::relay(&private()?, args),
        Command::Listen(args) => mail::listen(&private()?, args),
        Command::Send(args) => mail::send(&private()?, args),
        Command::Demo => demo::run(),
    }
}

fn create_cell(home: &Home, args: &SecretArgs, force: bool, json: bool) -> Result<()> {
    if !force && let Ok(existing) = home.load() {
        bail!(
            "{} already holds cell {}; pass --force to replace it (only its 12 words can bring it back)",
            home.keystore_path().display(),
            existing.cell
        );
    }
    let seed_passphrase = seed_passphrase(args)?;
    let passphrase = keystore_passphrase(&args.keystore, true)?;
    let mnemonic = cellmesh::new_mnemonic();
    let prepared = home.prepare(&mnemonic, &seed_passphrase, &passphrase, KdfParams::DEFAULT)?;
    // The words are shown (written and flushed) before the keystore is: a cell whose words
    // were never shown could not be restored anywhere else.
    show_words(home, prepared.keystore(), &mnemonic, json).map_err(|e| {
        anyhow!(
            "{:#}: the recovery words could not be shown, so no cell was created",
            anyhow!(e)
        )
    })?;
    let keystore = match home.commit(prepared, force) {
        Ok(Created::New(k) | Created::AlreadyPresent(k)) => k,
        Err(e) => {
            return Err(anyhow!(e).context("the words shown belong to no cell: it was not kept"));
        }
    };
    if !json {
        print_ids(home, &keystore)?;
    }
    Ok(())
}

/// The recovery words of a cell about to be created: one JSON object with the ids, or the
/// words with a warning on stderr.
fn show_words(
    home: &Home,
    keystore: &Keystore,
    mnemonic: &Mnemonic,
    json: bool,
) -> Result<(), out::OutputError> {
    if json {
        let shown = json!({
            "cell_id": keystore.cell.to_string(),
            "node_id": keystore.node.to_string(),
            "mnemonic": mnemonic.phrase().as_str(),
            "home": home.dir(),
        });
        return out::stdout(&Zeroizing::new(format!("{shown}\n")));
    }
    out::stderr(
        "Your recovery phrase is below. Write it down and keep it offline.\n\
         It is shown only this once; it is the only way to restore this cell on another\n\
         device, and anyone who has it can act as this cell.\n\n",
    )?;
    // Room for all of it at once: growing the string would leave copies of words behind.
    let mut words = Zeroizing::new(String::with_capacity(1024));
    for (i, word) in mnemonic.words().enumerate() {
        let sep = if i % 4 == 3 { "\n" } else { "" };
        // Writing to a String cannot fail.
        let _ = write!(words, "{:>4}. {word:<10}{sep}", i + 1);
    }
    words.push('\n');
    out::stdout(&words)
}

fn connect_cell(
    home: &Home,
    args: &SecretArgs,
    force: bool,
    relay: Option<mail::RelayTarget>,
    json: bool,
) -> Result<()> {
    let phrase = read_mnemonic()?;
    let mnemonic = Mnemonic::parse(&phrase).context("recovery phrase refused")?;
    let seed_passphrase = seed_passphrase(args)?;
    let cell = mnemonic.derive(&seed_passphrase).cell_id();
    let existing = home.load().ok();
    let reuse = matches!(&existing, Some(k) if k.cell == cell && !force);
    let passphrase = match (reuse, &relay) {
        (true, None) => None,
        (true, Some(_)) => Some(keystore_passphrase(&args.keystore, false)?),
        (false, _) => Some(keystore_passphrase(&args.keystore, true)?),
    };
    let (keystore, fresh) = match &passphrase {
        _ if reuse => (existing.context("keystore vanished")?, false),
        None => bail!("a passphrase is needed"),
        Some(p) => match home.create(&mnemonic, &seed_passphrase, p, KdfParams::DEFAULT, force) {
            Ok(Created::New(k)) => (k, true),
            Ok(Created::AlreadyPresent(k)) => (k, false),
            Err(e) => return Err(e).context("cannot connect this device"),
        },
    };
    let relay_node = match (relay, &passphrase) {
        (Some(addr), Some(p)) => {
            let unlocked = home.unlock(p)?;
            let node = mail::register(home, &unlocked, &addr)?;
            Some((addr, node))
        }
        _ => None,
    };
    if json {
        let shown = json!({
            "cell_id": keystore.cell.to_string(),
            "node_id": keystore.node.to_string(),
            "home": home.dir(),
            "new_device": fresh,
            "relay": relay_node.as_ref().map(|(a, _)| a.to_string()),
            "relay_node": relay_node.as_ref().map(|(_, n)| n.to_string()),
        });
        out::stdout(&format!("{shown}\n"))?;
        return Ok(());
    }
    if fresh {
        out::stdout(&format!(
            "Connected this device to cell {}.\n",
            keystore.cell.short()
        ))?;
    } else {
        out::stdout(&format!(
            "This device already holds cell {}.\n",
            keystore.cell.short()
        ))?;
    }
    print_ids(home, &keystore)?;
    if let Some((addr, node)) = relay_node {
        out::stdout(&format!("Registered at relay {addr} ({node}).\n"))?;
    }
    Ok(())
}

fn whoami(home: &Home, json: bool) -> Result<()> {
    let k = home.load()?;
    if json {
        let devices: Vec<_> = k
            .devices
            .iter()
            .map(|d| {
                json!({
                    "node_id": d.node.to_string(),
                    "this_device": d.node == k.node,
                    "revoked": d.revoked,
                    "certified_until": d.identity.as_ref().map(|t| t.claims().expires_at.0),
                })
            })
            .collect();
        let shown = json!({
            "cell_id": k.cell.to_string(),
            "node_id": k.node.to_string(),
            "home": home.dir(),
            "devices": devices,
        });
        out::stdout(&format!("{shown}\n"))?;
        return Ok(());
    }
    let mut text = ids(home, &k);
    text.push_str("Devices:\n");
    for d in &k.devices {
        let mut notes = Vec::new();
        if d.node == k.node {
            notes.push("this device");
        }
        if d.revoked {
            notes.push("revoked");
        }
        text.push_str(&format!("  {}  {}\n", d.node, notes.join(", ")));
    }
    out::stdout(&text)?;
    Ok(())
}

fn import_revocation(home: &Home, token: &str, json: bool) -> Result<()> {
    let text = if token == "-" {
        read_stdin(64 * 1024, "the revocation")?
    } else {
        Zeroizing::new(token.to_string())
    };
    let bytes = data_encoding::BASE64
        .decode(text.trim().as_bytes())
        .context("the revocation is not base64")?;
    let token = cellmesh::core::token::Token::decode(&bytes).context("not a cellmesh token")?;
    let names_node = token.claims().key_attribute(attr::NODE).is_some();
    let (issuer, revoked) = home.import_revocation(token)?;
    // A cell revokes its devices (node ids); a realm's issuer may revoke a whole cell.
    let revoked = if names_node {
        NodeId::from_key(revoked).to_string()
    } else {
        CellId::from_key(revoked).to_string()
    };
    let issuer = CellId::from_key(issuer);
    Printer { json }.line(
        json!({"issuer": issuer.to_string(), "revoked": revoked}),
        format!("Kept: {issuer} revoked {revoked}. Nodes started from this home refuse it."),
    )?;
    Ok(())
}

fn print_ids(home: &Home, k: &Keystore) -> Result<(), out::OutputError> {
    out::stdout(&ids(home, k))
}

fn ids(home: &Home, k: &Keystore) -> String {
    format!(
        "Cell ID:  {}\nNode ID:  {}  (this device)\nKeystore: {}\n",
        k.cell,
        k.node,
        home.keystore_path().display()
    )
}

/// Unlocks this home's keystore with the passphrase from `args`, which is then dropped.
pub(crate) fn unlock(home: &Home, args: &PassphraseArgs) -> Result<cellmesh::home::Unlocked> {
    // A home without a cell says so before anyone is asked for a passphrase.
    home.load()?;
    let passphrase = keystore_passphrase(args, false)?;
    Ok(home.unlock(&passphrase)?)
}

/// The keystore passphrase: `--passphrase-file`, `CELLMESH_PASSPHRASE`, or a hidden prompt
/// (asked twice when `confirm`).
pub(crate) fn keystore_passphrase(args: &PassphraseArgs, confirm: bool) -> Result<Passphrase> {
    let text = if let Some(file) = &args.passphrase_file {
        first_line(file)?
    } else if let Ok(p) = std::env::var("CELLMESH_PASSPHRASE") {
        Zeroizing::new(p)
    } else {
        let p = prompt("Keystore passphrase: ")?;
        if confirm && prompt("Repeat passphrase: ")? != p {
            bail!("the two passphrases differ");
        }
        p
    };
    if text.is_empty() {
        bail!("the keystore passphrase must not be empty");
    }
    Ok(Passphrase::new(text.to_string()))
}

fn seed_passphrase(args: &SecretArgs) -> Result<Zeroizing<String>> {
    match &args.seed_passphrase_file {
        Some(file) => first_line(file),
        None => Ok(Zeroizing::new(
            std::env::var("CELLMESH_SEED_PASSPHRASE").unwrap_or_default(),
        )),
    }
}

fn read_mnemonic() -> Result<Zeroizing<String>> {
    if io::stdin().is_terminal() {
        return prompt("Recovery phrase (12 words): ");
    }
    read_stdin(4096, "the recovery phrase")
}

/// At most `limit` bytes of stdin, as text.
fn read_stdin(limit: u64, what: &str) -> Result<Zeroizing<String>> {
    let mut text = Zeroizing::new(String::new());
    io::stdin()
        .take(limit)
        .read_to_string(&mut text)
        .with_context(|| format!("cannot read {what} from stdin"))?;
    Ok(text)
}

fn prompt(label: &str) -> Result<Zeroizing<String>> {
    tty::hidden(label).map_err(|e| match e.kind() {
        io::ErrorKind::Interrupted => anyhow!("interrupted"),
        _ => anyhow!(
            "cannot ask on the terminal ({e}): for the passphrase set CELLMESH_PASSPHRASE or pass --passphrase-file FILE; pipe the words on stdin"
        ),
    })
}

fn first_line(path: &Path) -> Result<Zeroizing<String>> {
    let text = Zeroizing::new(
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?,
    );
    Ok(Zeroizing::new(
        text.lines().next().unwrap_or_default().to_string(),
    ))
}
