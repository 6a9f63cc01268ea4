//! `Token::decode` on arbitrary bytes: it must never panic, and whatever it accepts must be
//! the one canonical encoding of the token, which must then be safe to verify.
#![no_main]

use cellmesh_core::token::Token;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(token) = Token::decode(data) else {
        return;
    };
    assert_eq!(
        token.to_bytes(),
        data,
        "decode accepted a non-canonical encoding"
    );
    assert_eq!(token.encoded_len(), data.len(), "encoded_len disagrees");
    // Almost every input fails the signature check; what matters is that it does not panic.
    let _ = token.verify(token.claims().not_before, 0);
});
