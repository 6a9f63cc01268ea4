//! Property tests of the frame splitter and the session message codec: round trips, exact
//! lengths, truncation and trailing bytes, and arbitrary input.

use std::sync::OnceLock;

use bytes::Bytes;
use cellmesh_core::codec::DecodeError;
use cellmesh_core::testing::{START, TestNode};
use cellmesh_core::token::Token;
use cellmesh_core::wire::{
    CloseCode, FrameType, LEN_PREFIX, MAX_FRAME, MAX_HANDSHAKE, MAX_PAYLOAD, Message, NackCode,
    put_frame, put_frame_header, split_frame,
};
use proptest::prelude::*;

/// Real signed tokens: node and identity tokens of three test nodes.
fn tokens() -> &'static [Token] {
    static TOKENS: OnceLock<Vec<Token>> = OnceLock::new();
    TOKENS.get_or_init(|| {
        (1..=3)
            .map(|seed| TestNode::new(seed, START.timestamp()))
            .flat_map(|n| [n.node_token, n.identity])
            .collect()
    })
}

fn token() -> impl Strategy<Value = Token> {
    (0..tokens().len()).prop_map(|i| tokens()[i].clone())
}

/// Reasons as `encode` leaves them: at most 255 bytes (longer ones are tested separately).
fn reason() -> impl Strategy<Value = String> {
    "\\PC{0,60}".prop_filter("fits in 255 bytes", |s| s.len() <= 255)
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        token().prop_map(|identity| Message::Join { identity }),
        token().prop_map(|identity| Message::Ack { identity }),
        (any::<u8>(), reason()).prop_map(|(c, reason)| Message::Nack {
            // Only the canonical value per wire code round-trips: `Other(1)` is sent as 1,
            // which reads back as `Unauthenticated`.
            code: NackCode::from_code(c),
            reason,
        }),
        (token(), token()).prop_map(|(node, identity)| Message::Update {
            node: Box::new(node),
            identity: Box::new(identity),
        }),
        any::<u64>().prop_map(Message::Ping),
        any::<u64>().prop_map(Message::Pong),
        proptest::collection::vec(any::<u8>(), 0..600).prop_map(|d| Message::Data(d.into())),
        (any::<u8>(), reason()).prop_map(|(c, reason)| Message::Close {
            code: CloseCode::from_code(c),
            reason,
        }),
    ]
}

fn encode(msg: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    msg.encode(&mut out);
    out
}

fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    Message::decode(Bytes::copy_from_slice(bytes))
}

fn frame_type() -> impl Strategy<Value = FrameType> {
    prop_oneof![
        Just(FrameType::Hello),
        Just(FrameType::Response),
        Just(FrameType::Finish),
        Just(FrameType::Session),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn messages_round_trip_with_exact_lengths(msg in message()) {
        let bytes = encode(&msg);
        prop_assert_eq!(bytes.len(), msg.encoded_len());
        prop_assert_eq!(decode(&bytes), Ok(msg));
    }

    #[test]
    fn every_truncation_is_refused_or_is_another_data_message(msg in message()) {
        let bytes = encode(&msg);
        for n in 0..bytes.len() {
            let cut = decode(&bytes[..n]);
            match &msg {
                // DATA's body is the rest of the plaintext: a shorter plaintext is a shorter,
                // different payload (the AEAD tag, not the codec, protects its length).
                Message::Data(d) if n > 0 => {
                    prop_assert_eq!(cut, Ok(Message::Data(d.slice(..n - 1))));
                }
                _ => prop_assert_eq!(cut, Err(DecodeError::Truncated), "prefix of {} bytes", n),
            }
        }
    }

    #[test]
    fn trailing_bytes_are_refused_except_in_data(
        msg in message(),
        extra in proptest::collection::vec(any::<u8>(), 1..40),
    ) {
        let mut bytes = encode(&msg);
        bytes.extend_from_slice(&extra);
        match (&msg, decode(&bytes)) {
            (Message::Data(d), Ok(Message::Data(got))) => {
                prop_assert_eq!(&got[..d.len()], &d[..]);
                prop_assert_eq!(&got[d.len()..], &extra[..]);
            }
            // Fixed-size and length-prefixed messages end where their fields end; tokens (the
            // tail of JOIN, ACK and UPDATE) refuse trailing bytes themselves.
            (Message::Data(_), other) => prop_assert!(false, "data decoded as {:?}", other),
            (_, got) => prop_assert_eq!(got, Err(DecodeError::Trailing(extra.len()))),
        }
    }

    #[test]
    fn long_reasons_are_cut_to_255_bytes_on_a_character_boundary(
        reason in "\\PC{60,200}",
        close in any::<bool>(),
    ) {
        let msg = if close {
            Message::Close { code: CloseCode::Normal, reason: reason.clone() }
        } else {
            Message::Nack { code: NackCode::Busy, reason: reason.clone() }
        };
        let bytes = encode(&msg);
        prop_assert_eq!(bytes.len(), msg.encoded_len());
        let got = match decode(&bytes) {
            Ok(Message::Close { reason, .. } | Message::Nack { reason, .. }) => reason,
            other => return Err(TestCaseError::fail(format!("{other:?}"))),
        };
        prop_assert!(got.len() <= 255 && reason.starts_with(&got));
        // The cut is the longest prefix that fits: the next character would not.
        if got.len() < reason.len() {
            let next = reason[got.len()..].chars().next().map_or(0, char::len_utf8);
            prop_assert!(got.len() + next > 255);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_whatever_decodes_is_canonical(
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
        kind in 0u8..=9,
    ) {
        // Half the inputs start with a valid message type, to get past the first byte.
        for input in [bytes.clone(), [&[kind][..], &bytes].concat()] {
            if let Ok(msg) = decode(&input) {
                prop_assert_eq!(msg.encoded_len(), input.len());
                prop_assert_eq!(encode(&msg), input);
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_frame_splitter(
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
        len in 0u32..400,
        code in prop_oneof![Just(1u8), Just(2), Just(3), Just(16), any::<u8>()],
    ) {
        // Raw bytes mostly fail on the length prefix; a plausible prefix gets further.
        let framed = [&len.to_be_bytes()[..], &[code], &bytes].concat();
        for input in [&bytes[..], &framed[..]] {
            if let Ok(Some((kind, body))) = split_frame(input) {
                let declared = u32::from_be_bytes(input[..4].try_into().unwrap()) as usize;
                prop_assert_eq!(kind.code(), input[LEN_PREFIX]);
                prop_assert_eq!(body.clone(), LEN_PREFIX + 1..LEN_PREFIX + declared);
                prop_assert!(body.end <= input.len(), "{:?}", body);
            }
        }
    }

    #[test]
    fn frames_split_one_by_one_and_never_early(
        frames in proptest::collection::vec(
            (frame_type(), proptest::collection::vec(any::<u8>(), 0..200)),
            1..6,
        ),
    ) {
        let mut stream = Vec::new();
        for (kind, body) in &frames {
            let start = stream.len();
            put_frame(&mut stream, *kind, body);
            // Every strict prefix of a frame (even behind whole frames) waits for more.
            for n in start..stream.len() {
                prop_assert_eq!(split_frame(&stream[start..n]), Ok(None));
            }
        }
        let mut rest = &stream[..];
        for (kind, body) in &frames {
            let (got, range) = split_frame(rest).unwrap().expect("a whole frame");
            prop_assert_eq!(got, *kind);
            prop_assert_eq!(&rest[range.clone()], &body[..]);
            rest = &rest[range.end..];
        }
        prop_assert_eq!(split_frame(rest), Ok(None));
        prop_assert!(rest.is_empty());
    }
}

#[test]
fn unknown_message_types_are_refused() {
    for t in (0..=255u8).filter(|t| !(1..=8).contains(t)) {
        assert_eq!(
            decode(&[t, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(DecodeError::Invalid("message type"))
        );
    }
    assert_eq!(decode(&[]), Err(DecodeError::Truncated));
}

#[test]
fn data_is_limited_to_max_payload() {
    let mut bytes = vec![0u8; 1 + MAX_PAYLOAD];
    bytes[0] = 7;
    assert!(matches!(decode(&bytes), Ok(Message::Data(d)) if d.len() == MAX_PAYLOAD));
    bytes.push(0);
    assert!(matches!(
        decode(&bytes),
        Err(DecodeError::TooLarge { field: "data", .. })
    ));
}

#[test]
fn oversized_frames_are_refused_from_their_header_alone() {
    // A session frame may be MAX_FRAME long; one byte more is refused on the 4-byte prefix.
    let mut ok = Vec::new();
    put_frame_header(&mut ok, FrameType::Session, MAX_FRAME - 1);
    assert_eq!(split_frame(&ok), Ok(None));
    let mut big = Vec::new();
    put_frame_header(&mut big, FrameType::Session, MAX_FRAME);
    assert!(matches!(
        split_frame(&big[..LEN_PREFIX]),
        Err(DecodeError::TooLarge { field: "frame", .. })
    ));
    // Handshake frames are limited to Noise's 65535 bytes, refused once the type byte is in.
    let mut hs = Vec::new();
    put_frame_header(&mut hs, FrameType::Hello, MAX_HANDSHAKE);
    assert_eq!(split_frame(&hs), Ok(None));
    let mut hs = Vec::new();
    put_frame_header(&mut hs, FrameType::Finish, MAX_HANDSHAKE + 1);
    assert_eq!(split_frame(&hs[..LEN_PREFIX]), Ok(None));
    assert!(matches!(
        split_frame(&hs),
        Err(DecodeError::TooLarge {
            field: "handshake message",
            ..
        })
    ));
    // A zero length (no type byte) and an unknown type are refused.
    assert_eq!(
        split_frame(&[0, 0, 0, 0]),
        Err(DecodeError::Invalid("empty frame"))
    );
    assert_eq!(
        split_frame(&[0, 0, 0, 1, 4]),
        Err(DecodeError::Invalid("frame type"))
    );
}
