//! Hidden prompts on the controlling terminal (`/dev/tty`, so that stdin can carry data).
//!
//! For the prompt only, the terminal stops echoing (the newline that ends the line is still
//! echoed) and its interrupt key (Ctrl-C) stops being a signal: it ends the line instead, so
//! that the read returns here, the terminal's settings are put back, and only then does the
//! process interrupt itself as the key would have. A SIGINT delivered while the echo was off
//! would kill the process with the terminal left silent (as rpassword did: it raised SIGINT
//! before restoring the settings). The kernel still does the line editing (erase, kill).

use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Write as _};

use rustix::termios::{self, LocalModes, OptionalActions, SpecialCodeIndex, Termios};
use zeroize::Zeroizing;

/// A terminal reads at most this much as one line (Linux: 4095 and the newline).
const MAX_LINE: usize = 4096;

/// Shows `label` on the terminal and reads one line without echoing it. Ctrl-C restores the
/// terminal and interrupts the process; should it survive (a handler), this returns
/// [`io::ErrorKind::Interrupted`]. Ctrl-D on an empty line gives an empty line.
pub(crate) fn hidden(label: &str) -> io::Result<Zeroizing<String>> {
    let tty = OpenOptions::new().read(true).write(true).open("/dev/tty")?;
    let saved = termios::tcgetattr(&tty)?;
    let interrupt = saved.special_codes[SpecialCodeIndex::VINTR];
    let mut quiet = saved.clone();
    quiet
        .local_modes
        .remove(LocalModes::ECHO | LocalModes::ISIG);
    quiet
        .local_modes
        .insert(LocalModes::ICANON | LocalModes::ECHONL);
    // 0 disables a key (_POSIX_VDISABLE on Linux): then there is no Ctrl-C to catch.
    if interrupt != 0 {
        // An extra end-of-line key: the read returns as soon as it is pressed.
        quiet.special_codes[SpecialCodeIndex::VEOL] = interrupt;
    }
    // Flush: what was typed ahead was typed with the echo on, and is not taken as secret.
    termios::tcsetattr(&tty, OptionalActions::Flush, &quiet)?;
    let read = {
        let _restore = Restore {
            tty: &tty,
            saved: &saved,
        };
        (&tty)
            .write_all(label.as_bytes())
            .and_then(|()| read_line(&tty, interrupt))
    };
    let (line, ended) = match read? {
        Line::Typed(line, ended) => (line, ended),
        Line::Interrupted => {
            let _ = (&tty).write_all(b"\n");
            let me = rustix::process::getpid();
            let _ = rustix::process::kill_process(me, rustix::process::Signal::INT);
            return Err(io::Error::new(io::ErrorKind::Interrupted, "interrupted"));
        }
    };
    if !ended {
        // Ctrl-D: no newline was echoed.
        let _ = (&tty).write_all(b"\n");
    }
    let mut line = line;
    String::from_utf8(std::mem::take(&mut *line))
        .map(Zeroizing::new)
        .map_err(|e| {
            // The bytes are wiped with the error's buffer.
            drop(Zeroizing::new(e.into_bytes()));
            io::Error::new(io::ErrorKind::InvalidData, "what was typed is not UTF-8")
        })
}

/// Puts the terminal's settings back when dropped, on every path out of the prompt.
struct Restore<'a> {
    tty: &'a File,
    saved: &'a Termios,
}

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        // Nothing better to do if this fails: the terminal is going away.
        let _ = termios::tcsetattr(self.tty, OptionalActions::Now, self.saved);
    }
}

enum Line {
    /// What was typed, and whether a newline ended it (else Ctrl-D did).
    Typed(Zeroizing<Vec<u8>>, bool),
    /// The interrupt key was pressed.
    Interrupted,
}

/// One line, up to its newline or the interrupt key (`interrupt`, 0 for none), which are not
/// part of it. The buffer never grows (no copies of the secret left behind).
fn read_line(mut tty: &File, interrupt: u8) -> io::Result<Line> {
    let mut line = Zeroizing::new(Vec::with_capacity(MAX_LINE));
    let mut chunk = Zeroizing::new([0u8; 256]);
    loop {
        let n = match tty.read(&mut chunk[..]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(Line::Typed(line, false));
        }
        for &byte in &chunk[..n] {
            if interrupt != 0 && byte == interrupt {
                return Ok(Line::Interrupted);
            }
            if byte == b'\n' {
                return Ok(Line::Typed(line, true));
            }
            if line.len() == MAX_LINE {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
            }
            line.push(byte);
        }
    }
}
