//! Primitives shared by every binary codec in the core.
//!
//! Every wire type follows one contract: `encode` appends to a `Vec<u8>`, `encoded_len` says
//! exactly how many bytes that is, and `decode` takes a whole buffer and either returns the
//! value or a [`DecodeError`]; it never panics and never allocates more than the input allows.
//! All integers are big-endian and fixed-width, so every value has exactly one encoding.

use thiserror::Error;

/// Why a buffer could not be decoded. The input is at fault in every case.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The buffer ended before the value did.
    #[error("input truncated")]
    Truncated,
    /// Bytes followed a complete value.
    #[error("{0} trailing bytes after a complete value")]
    Trailing(usize),
    /// The input, or a field of it, is larger than the format allows.
    #[error("{field} is too large ({len} > {max})")]
    TooLarge {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A version this implementation does not speak.
    #[error("unsupported version {0}")]
    UnsupportedVersion(u8),
    /// A field holds a value the format forbids, or a value that has a shorter/canonical form.
    #[error("invalid {0}")]
    Invalid(&'static str),
}

/// A cursor over an input buffer that checks every read.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Starts reading `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    /// How many bytes are left.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Takes the next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// Takes the next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    /// Reads one byte.
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    /// Reads a big-endian `u16`.
    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    /// Reads a big-endian `u32`.
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    /// Reads a big-endian `u64`.
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// Reads a presence flag, which must be exactly 0 or 1.
    pub fn flag(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::Invalid(field)),
        }
    }

    /// Reads a `u8` length and that many bytes, refusing lengths above `max`.
    pub fn bytes8(&mut self, field: &'static str, max: usize) -> Result<&'a [u8], DecodeError> {
        let len = usize::from(self.u8()?);
        check_len(field, len, max)?;
        self.bytes(len)
    }

    /// Reads a `u16` length and that many bytes, refusing lengths above `max`.
    pub fn bytes16(&mut self, field: &'static str, max: usize) -> Result<&'a [u8], DecodeError> {
        let len = usize::from(self.u16()?);
        check_len(field, len, max)?;
        self.bytes(len)
    }

    /// Succeeds only if the whole buffer was consumed.
    pub fn finish(self) -> Result<(), DecodeError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }
}

/// Fails with [`DecodeError::TooLarge`] when `len > max`.
pub fn check_len(field: &'static str, len: usize, max: usize) -> Result<(), DecodeError> {
    if len > max {
        return Err(DecodeError::TooLarge { field, len, max });
    }
    Ok(())
}

/// Appends a `u8` length prefix and `bytes`. Callers have bounded `bytes` to 255 already.
pub fn put_bytes8(out: &mut Vec<u8>, bytes: &[u8]) {
    debug_assert!(bytes.len() <= usize::from(u8::MAX));
    out.push(bytes.len() as u8);
    out.extend_from_slice(bytes);
}

/// Appends a `u16` length prefix and `bytes`. Callers have bounded `bytes` to 65535 already.
pub fn put_bytes16(out: &mut Vec<u8>, bytes: &[u8]) {
    debug_assert!(bytes.len() <= usize::from(u16::MAX));
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_refuses_short_and_trailing_input() {
        let mut r = Reader::new(&[0, 1, 2]);
        assert_eq!(r.u16().unwrap(), 1);
        assert_eq!(r.u16(), Err(DecodeError::Truncated));
        assert_eq!(Reader::new(&[9]).finish(), Err(DecodeError::Trailing(1)));
        assert_eq!(Reader::new(&[2]).flag("f"), Err(DecodeError::Invalid("f")));
        let mut r = Reader::new(&[5, 1, 2, 3, 4, 5]);
        assert!(matches!(
            r.bytes8("x", 4),
            Err(DecodeError::TooLarge { .. })
        ));
    }
}
