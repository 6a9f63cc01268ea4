//! The cost of identities: signing, verifying, encoding and decoding a node token, deriving
//! a cell's keys from its recovery phrase, and sealing a keystore with the default Argon2id
//! parameters.
//!
//! `cargo bench -p cellmesh-core --bench identity`. The floor of token sign and verify is one
//! Ed25519 signature or strict verification, measured under `reference/` on a message about
//! the size of a node token's signed core.

use std::hint::black_box;
use std::time::Duration;

use cellmesh_core::Timestamp;
use cellmesh_core::device;
use cellmesh_core::id::CellId;
use cellmesh_core::keys::{KeyPair, SigningSecret};
use cellmesh_core::keystore::{self, DeviceSecrets, KdfParams, Passphrase};
use cellmesh_core::mnemonic::Mnemonic;
use cellmesh_core::token::{Claims, DEFAULT_SKEW, Token, attr};
use criterion::{BatchSize, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore as _, SeedableRng as _};

/// 2027-01-15, when every token here is issued and verified.
const NOW: Timestamp = Timestamp(1_800_000_000);
const REFERENCE_MESSAGE_LEN: usize = 200;

fn rng() -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(0x6365_6c6c_6d65_7368)
}

/// A node token as a device presents it: self-signed, naming its cell, with the hostname and
/// port it listens on.
fn node_claims(rng: &mut ChaCha20Rng) -> (KeyPair, Claims) {
    let cell = Mnemonic::generate(rng).derive("");
    let node = KeyPair::generate(rng);
    let claims = device::node_token(&node, cell.cell_id(), NOW, rng)
        .and_then(|c| c.with_attribute(attr::HOSTNAME, "node-7.mesh.example.net"))
        .and_then(|c| c.with_attribute(attr::PORT, 4433u16.to_be_bytes().to_vec()))
        .expect("valid node claims");
    (node, claims)
}

fn token(c: &mut Criterion) {
    let mut rng = rng();
    let (node, claims) = node_claims(&mut rng);
    let token = claims.clone().sign(&node.signing).expect("signs");
    let bytes = token.to_bytes();

    let mut g = c.benchmark_group("token");
    g.throughput(Throughput::Elements(1));
    g.bench_function("sign", |bench| {
        bench.iter_batched(
            || claims.clone(),
            |claims| claims.sign(black_box(&node.signing)).expect("signs"),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("verify", |bench| {
        bench.iter(|| {
            black_box(&token)
                .verify(black_box(NOW), DEFAULT_SKEW)
                .expect("valid token")
        })
    });
    g.bench_function("encode", |bench| {
        bench.iter(|| black_box(&token).to_bytes())
    });
    g.bench_function("decode", |bench| {
        bench.iter(|| Token::decode(black_box(&bytes)).expect("canonical token"))
    });
    g.finish();
}

fn derive(c: &mut Criterion) {
    let mut rng = rng();
    let mnemonic = Mnemonic::generate(&mut rng);

    let mut g = c.benchmark_group("derive");
    g.throughput(Throughput::Elements(1));
    g.bench_function("mnemonic_to_cell_keys", |bench| {
        bench.iter(|| black_box(&mnemonic).derive(black_box("")))
    });

    // One seal is a whole Argon2id run (64 MiB, t = 3): a few samples of one iteration each.
    let secrets = DeviceSecrets {
        cell: mnemonic.derive(""),
        node: KeyPair::generate(&mut rng),
    };
    let passphrase = Passphrase::new("correct horse battery staple".into());
    let cell_id = secrets.cell.cell_id();
    let header = header(cell_id);
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .measurement_time(Duration::from_secs(3));
    g.bench_function("keystore_argon2id_default", |bench| {
        bench.iter(|| {
            keystore::seal(
                black_box(&secrets),
                black_box(&passphrase),
                KdfParams::DEFAULT,
                black_box(&header),
                &mut rng,
            )
            .expect("seals")
        })
    });
    g.finish();
}

/// What the runtime binds beside the ciphertext: here, just the Cell ID.
fn header(cell: CellId) -> Vec<u8> {
    cell.key().as_bytes().to_vec()
}

fn reference(c: &mut Criterion) {
    let mut rng = rng();
    let key = SigningSecret::generate(&mut rng);
    let public = key.public();
    let mut message = vec![0u8; REFERENCE_MESSAGE_LEN];
    rng.fill_bytes(&mut message);
    let signature = key.sign(b"", &message);

    let mut g = c.benchmark_group("reference");
    g.throughput(Throughput::Elements(1));
    g.bench_function("ed25519_sign_200b", |bench| {
        bench.iter(|| key.sign(b"", black_box(&message)))
    });
    g.bench_function("ed25519_verify_200b", |bench| {
        bench.iter(|| {
            public
                .verify(b"", black_box(&message), black_box(&signature))
                .expect("valid signature")
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = token, derive, reference
}
criterion_main!(benches);
