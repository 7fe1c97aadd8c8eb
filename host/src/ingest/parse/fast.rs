//! The fast path for the usual event object: `key`, `value`, optionally `id` and `headers`, in any
//! order, with strings outside the value free of escapes; the value may be any JSON. Takes an NDJSON
//! body (splitting its lines as it goes), one line, or a JSON array of such objects in one pass over
//! the bytes, strings scanned eight bytes at a time: a 1000-line NDJSON body of 256-byte string values
//! parsed in 210–370 ns a line through serde_json's derived deserializer, 145–180 ns with this path a
//! line at a time (UTF-8 check and line splitting included in both; README, Benchmarks), and ~56 ns
//! against ~90 ns a line with the body taken whole (a throwaway timing loop, release build).
//!
//! Invariant: whatever this accepts, serde_json accepts with the same result. It is stricter, never
//! looser: on anything else (escapes in a key, id or header, a `null`, an unknown or repeated field,
//! invalid JSON, nesting deeper than [`MAX_DEPTH`], a `\u` escape naming a surrogate) it answers `None`
//! (for a body: stops at that line) and the caller parses the rest with serde_json, which gives the
//! result or the error message. Tests compare the two on generated and mutated lines, arrays and
//! bodies.

use std::borrow::Cow;
use std::collections::BTreeMap;

use super::Event;
use crate::log::PayloadRef;

/// Nesting accepted inside a value before handing the line to serde_json (whose limit is 128).
const MAX_DEPTH: usize = 64;

/// The event in `line` (one event object), if the fast path can take it.
pub(super) fn event(line: &str) -> Option<Event<'_>> {
    let mut c = Cursor::new(line);
    c.ws();
    let event = c.event()?;
    c.ws();
    (c.at == c.bytes.len()).then_some(event)
}

/// Where [`ndjson`] stopped: the first line it could not take.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Stopped {
    /// The byte at which that line starts.
    pub at: usize,
    /// Its index (0-based) among the body's lines.
    pub line: usize,
}

/// The events of an NDJSON body, line by line, for as many lines as the fast path can take, and where
/// it stopped if it did not take them all: the caller parses the rest line by line. Lines holding only
/// spaces, tabs and `\r` are skipped, as [`super::ndjson`] skips blank lines. Splitting the lines as it
/// parses spares a pass over the body.
pub(super) fn ndjson(text: &str) -> (Vec<Event<'_>>, Option<Stopped>) {
    let mut c = Cursor::new(text);
    // An event may not span lines.
    c.newline_is_space = false;
    let mut events = Vec::new();
    let mut line = 0;
    loop {
        let start = c.at;
        c.ws();
        let taken = match c.peek() {
            None => return (events, None),
            Some(b'\n') => true,
            Some(_) => match c.event() {
                Some(event) => {
                    c.ws();
                    let ends = matches!(c.peek(), None | Some(b'\n'));
                    ends.then(|| events.push(event)).is_some()
                }
                None => false,
            },
        };
        if !taken {
            return (events, Some(Stopped { at: start, line }));
        }
        // Past the line's `\n` (or the end of the body, where the next turn stops).
        c.at = (c.at + 1).min(text.len());
        line += 1;
    }
}

/// The events of `text`, a JSON array of event objects, if the fast path can take every one.
pub(super) fn array(text: &str) -> Option<Vec<Event<'_>>> {
    let mut c = Cursor::new(text);
    let mut events = Vec::new();
    c.ws();
    c.list(b'[', b']', |c| {
        events.push(c.event()?);
        Some(())
    })?;
    c.ws();
    (c.at == c.bytes.len()).then_some(events)
}

struct Cursor<'a> {
    text: &'a str,
    bytes: &'a [u8],
    at: usize,
    /// Whether `\n` is whitespace (JSON), or ends a line (NDJSON).
    newline_is_space: bool,
}

impl<'a> Cursor<'a> {
    fn new(text: &'a str) -> Self {
        Self {
            text,
            bytes: text.as_bytes(),
            at: 0,
            newline_is_space: true,
        }
    }

    /// One event object at the cursor; the cursor ends right after its `}`.
    fn event(&mut self) -> Option<Event<'a>> {
        let (mut key, mut value, mut id, mut headers) = (None, None, None, None);
        self.plain_object(|c, field| match field {
            "key" => once(&mut key, c.plain_string()?),
            "id" => once(&mut id, c.plain_string()?),
            "headers" => once(&mut headers, c.headers()?),
            "value" => {
                let start = c.at;
                c.value(0)?;
                once(&mut value, c.text.get(start..c.at)?)
            }
            _ => None,
        })?;
        let id = match id {
            // serde_json would accept it; `check_id` then refuses it with its own message.
            Some(id) if id.is_empty() || id.len() > super::MAX_ID_BYTES => return None,
            other => other,
        };
        Some(Event {
            key: key.map(Cow::Borrowed),
            value: PayloadRef::Json(value?.as_bytes()),
            headers: headers.unwrap_or_default(),
            id: id.map(Cow::Borrowed),
        })
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.at += 1)
    }

    /// JSON whitespace, as serde_json skips it (but not a line's end in NDJSON).
    fn ws(&mut self) {
        loop {
            match self.peek() {
                Some(b' ' | b'\t' | b'\r') => self.at += 1,
                Some(b'\n') if self.newline_is_space => self.at += 1,
                _ => return,
            }
        }
    }

    /// After a member or element: `,` (more follow) or `close` (true: the object or array ended).
    fn comma_or(&mut self, close: u8) -> Option<bool> {
        match self.peek()? {
            b',' => {
                self.at += 1;
                self.ws();
                Some(false)
            }
            b if b == close => {
                self.at += 1;
                Some(true)
            }
            _ => None,
        }
    }

    /// A string without escapes; returns its contents.
    fn plain_string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.at;
        self.at = start + special_byte(self.bytes.get(start..)?)?;
        self.eat(b'"')?;
        // Quotes are ASCII, so both ends are character boundaries.
        self.text.get(start..self.at - 1)
    }

    /// An object whose keys are plain strings; `member` reads the value of each.
    fn plain_object(
        &mut self,
        mut member: impl FnMut(&mut Self, &'a str) -> Option<()>,
    ) -> Option<()> {
        self.list(b'{', b'}', |c| {
            let name = c.plain_string()?;
            c.ws();
            c.eat(b':')?;
            c.ws();
            member(c, name)
        })
    }

    /// `open`, items read by `item` and separated by commas, `close`: an object's members or an array's
    /// elements.
    fn list(
        &mut self,
        open: u8,
        close: u8,
        mut item: impl FnMut(&mut Self) -> Option<()>,
    ) -> Option<()> {
        self.eat(open)?;
        self.ws();
        if self.eat(close).is_some() {
            return Some(());
        }
        loop {
            item(self)?;
            self.ws();
            if self.comma_or(close)? {
                return Some(());
            }
        }
    }

    /// A headers object of plain strings, read the way serde_json reads it into the map: sorted by
    /// name, the last of repeated names winning.
    fn headers(&mut self) -> Option<Vec<(String, String)>> {
        let mut headers = BTreeMap::new();
        self.plain_object(|c, name| {
            headers.insert(name.to_owned(), c.plain_string()?.to_owned());
            Some(())
        })?;
        Some(headers.into_iter().collect())
    }

    /// Any string, escapes validated.
    fn string(&mut self) -> Option<()> {
        self.eat(b'"')?;
        loop {
            self.at += special_byte(self.bytes.get(self.at..)?)?;
            match self.peek()? {
                b'"' => {
                    self.at += 1;
                    return Some(());
                }
                b'\\' => {
                    self.at += 1;
                    match self.peek()? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.at += 1,
                        b'u' => {
                            let hex = self.text.get(self.at + 1..self.at + 5)?;
                            let unit = u16::from_str_radix(hex, 16).ok()?;
                            // `from_str_radix` takes a sign; a JSON escape does not.
                            if hex.starts_with('+') || (0xD800..=0xDFFF).contains(&unit) {
                                return None;
                            }
                            self.at += 5;
                        }
                        _ => return None,
                    }
                }
                // A control character.
                _ => return None,
            }
        }
    }

    /// One JSON value of any kind, validated; the cursor ends right after it.
    fn value(&mut self, depth: usize) -> Option<()> {
        match self.peek()? {
            b'"' => self.string(),
            b'{' => {
                let depth = nested(depth)?;
                self.list(b'{', b'}', |c| {
                    c.string()?;
                    c.ws();
                    c.eat(b':')?;
                    c.ws();
                    c.value(depth)
                })
            }
            b'[' => {
                let depth = nested(depth)?;
                self.list(b'[', b']', |c| c.value(depth))
            }
            b't' => self.literal("true"),
            b'f' => self.literal("false"),
            b'n' => self.literal("null"),
            _ => self.number(),
        }
    }

    fn literal(&mut self, word: &str) -> Option<()> {
        self.bytes
            .get(self.at..)?
            .starts_with(word.as_bytes())
            .then(|| self.at += word.len())
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`
    fn number(&mut self) -> Option<()> {
        self.eat(b'-');
        match self.peek()? {
            b'0' => self.at += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.eat(b'.').is_some() {
            self.peek().filter(u8::is_ascii_digit)?;
            self.digits();
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.at += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.at += 1;
            }
            self.peek().filter(u8::is_ascii_digit)?;
            self.digits();
        }
        Some(())
    }

    fn digits(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.at += 1;
        }
    }
}

/// Fills `slot` unless it is filled already (a repeated field, which serde_json refuses).
fn once<T>(slot: &mut Option<T>, value: T) -> Option<()> {
    slot.is_none().then(|| *slot = Some(value))
}

fn nested(depth: usize) -> Option<usize> {
    (depth < MAX_DEPTH).then_some(depth + 1)
}

/// Index of the first `"`, `\` or control character (below 0x20) in `bytes`: where a string's plain
/// run ends. Eight bytes at a time (SWAR): a value string is most of an event's bytes.
fn special_byte(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Flags a zero byte; a flag above a true zero may be spurious, the lowest flag never is.
    let zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let mut chunks = bytes.chunks_exact(8);
    let mut at = 0;
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let v = u64::from_le_bytes(word);
        // Bytes below 0x20: subtracting 0x20 borrows into the high bit only for them (and for bytes
        // at or above 0xA0, which `!v` masks out).
        let control = v.wrapping_sub(ONES * 0x20) & !v & HIGH;
        let found =
            zero(v ^ (ONES * u64::from(b'"'))) | zero(v ^ (ONES * u64::from(b'\\'))) | control;
        if found != 0 {
            return Some(at + found.trailing_zeros() as usize / 8);
        }
        at += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .map(|i| at + i)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: deterministic, so a failure reproduces.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn pick<'a>(&mut self, options: &[&'a str]) -> &'a str {
            options[self.below(options.len())]
        }
    }

    fn ws(rng: &mut Rng) -> &'static str {
        rng.pick(&["", "", "", " ", "\t", " \r ", "\n"])
    }

    fn string(rng: &mut Rng) -> String {
        let mut out = String::from("\"");
        for _ in 0..rng.below(24) {
            out.push_str(rng.pick(&[
                "a",
                "Z",
                "0",
                " ",
                "é",
                "日本",
                "\\\"",
                "\\\\",
                "\\/",
                "\\n",
                "\\t",
                "\\u0041",
                "\\u00e9",
                "\\uD83D\\uDE00",
                "\\ud800",
                "\\x",
                "\\u12",
                "\u{1}",
                "'",
                "{",
                ",",
            ]));
        }
        out.push('"');
        out
    }

    fn value(rng: &mut Rng, depth: usize) -> String {
        let kind = if depth > 3 {
            rng.below(4)
        } else {
            rng.below(7)
        };
        match kind {
            0 => string(rng),
            1 => rng
                .pick(&[
                    "0",
                    "-0",
                    "12",
                    "-3.25",
                    "1e9",
                    "2.5E-3",
                    "1E+2",
                    "007",
                    "1.",
                    "-",
                    ".5",
                    "1e",
                    "123456789012345678901234567890",
                ])
                .to_string(),
            2 => rng
                .pick(&["true", "false", "null", "nul", "True"])
                .to_string(),
            3 => "\"plain text of a value\"".repeat(1 + rng.below(2)),
            4 => {
                let items: Vec<String> = (0..rng.below(4)).map(|_| value(rng, depth + 1)).collect();
                format!("[{}{}]", ws(rng), items.join(&format!("{},", ws(rng))))
            }
            _ => {
                let members: Vec<String> = (0..rng.below(4))
                    .map(|_| {
                        format!(
                            "{}{}:{}{}",
                            string(rng),
                            ws(rng),
                            ws(rng),
                            value(rng, depth + 1)
                        )
                    })
                    .collect();
                format!("{{{}}}", members.join(","))
            }
        }
    }

    fn line(rng: &mut Rng) -> String {
        let mut fields = vec![format!("\"value\"{}:{}{}", ws(rng), ws(rng), value(rng, 0))];
        if rng.below(3) > 0 {
            let key = if rng.below(4) == 0 {
                string(rng)
            } else {
                format!("\"k{}\"", rng.below(1000))
            };
            fields.push(format!("\"key\":{key}"));
        }
        if rng.below(2) == 0 {
            let id = rng.pick(&["\"id-1\"", "\"\"", "null", "7", "\"a\\u0062\""]);
            fields.push(format!("\"id\":{id}"));
        }
        if rng.below(3) == 0 {
            let headers: Vec<String> = (0..rng.below(5))
                .map(|_| {
                    let name = rng.pick(&[
                        "\"a\"",
                        "\"b\"",
                        "\"a\"",
                        "\"b\"",
                        "\"trace\"",
                        "\"\"",
                        "\"n\\u0041\"",
                        "1",
                    ]);
                    let value = rng.pick(&[
                        "\"v\"", "\"\"", "\"x y\"", "\"w\"", "\"v\"", "\"\\n\"", "null", "2",
                    ]);
                    format!("{name}{}:{}{value}", ws(rng), ws(rng))
                })
                .collect();
            fields.push(format!("\"headers\":{}{{{}}}", ws(rng), headers.join(",")));
        }
        if rng.below(8) == 0 {
            fields.push(
                rng.pick(&["\"headers\":null", "\"extra\":1", "\"key\":\"again\""])
                    .into(),
            );
        }
        let n = fields.len();
        for i in 0..n {
            let j = i + rng.below(n - i);
            fields.swap(i, j);
        }
        format!(
            "{}{{{}{}}}{}",
            ws(rng),
            fields.join(&format!(",{}", ws(rng))),
            ws(rng),
            ws(rng)
        )
    }

    fn mutate(rng: &mut Rng, line: &str) -> String {
        let mut chars: Vec<char> = line.chars().collect();
        for _ in 0..1 + rng.below(3) {
            let at = rng.below(chars.len() + 1);
            let c = rng.pick(&[
                "\"", "\\", "{", "}", "[", "]", ",", ":", " ", "0", "e", "-", "u", "\u{7}",
            ]);
            match rng.below(3) {
                0 if at < chars.len() => {
                    chars.remove(at);
                }
                1 if at < chars.len() => chars[at] = c.chars().next().unwrap_or(' '),
                _ => chars.insert(at, c.chars().next().unwrap_or(' ')),
            }
        }
        chars.into_iter().collect()
    }

    /// What a differential run saw: generated texts serde_json accepted, and texts the fast path
    /// took among the generated and among the mutated ones.
    #[derive(Default)]
    struct Seen {
        valid: usize,
        fast_valid: usize,
        fast_mutated: usize,
    }

    /// Runs `rounds` texts from `generate` (every other one mutated) through `compare`, which parses a
    /// text both ways, asserts that whatever the fast path took serde_json took the same way, and
    /// answers (serde_json accepted it, the fast path took it). Fails unless serde_json accepted more
    /// than `min_valid` generated texts and the fast path took more than `min_fast_mutated` mutated ones.
    fn differential(
        seed: u64,
        rounds: usize,
        (min_valid, min_fast_mutated): (usize, usize),
        generate: impl Fn(&mut Rng) -> String,
        mut compare: impl FnMut(&str) -> (bool, bool),
    ) {
        let mut rng = Rng(seed);
        let mut seen = Seen::default();
        for i in 0..rounds {
            let generated = generate(&mut rng);
            let mutated = i % 2 == 1;
            let text = if mutated {
                mutate(&mut rng, &generated)
            } else {
                generated
            };
            let (serde_ok, fast_took) = compare(&text);
            seen.valid += usize::from(!mutated && serde_ok);
            seen.fast_valid += usize::from(!mutated && fast_took);
            seen.fast_mutated += usize::from(mutated && fast_took);
        }
        // The comparison means something only if both sides saw plenty of texts.
        assert!(
            seen.valid > min_valid,
            "{} generated texts were valid",
            seen.valid
        );
        assert!(
            seen.fast_valid > seen.valid / 4,
            "fast path took {} of {} valid texts",
            seen.fast_valid,
            seen.valid
        );
        assert!(
            seen.fast_mutated > min_fast_mutated,
            "fast path took {} mutated texts",
            seen.fast_mutated
        );
    }

    /// Whatever the fast path accepts, serde_json accepts with the same event.
    #[test]
    fn agrees_with_serde_json_wherever_it_answers() {
        let mut with_headers = 0;
        differential(0x9E37_79B9_7F4A_7C15, 60_000, (5_000, 500), line, |text| {
            let by_serde = super::super::serde_event(text);
            let fast = event(text);
            if let Some(e) = &fast {
                assert_eq!(Ok(e), by_serde.as_ref(), "line {text:?}");
                with_headers += usize::from(!e.headers.is_empty());
            }
            (by_serde.is_ok(), fast.is_some())
        });
        assert!(
            with_headers > 200,
            "fast path took {with_headers} lines with headers"
        );
    }

    /// A JSON array body through serde_json alone.
    fn serde_array(text: &str) -> Result<Vec<Event<'_>>, String> {
        let items: Vec<&serde_json::value::RawValue> =
            serde_json::from_str(text).map_err(|e| e.to_string())?;
        items
            .iter()
            .map(|raw| super::super::serde_event(raw.get()))
            .collect()
    }

    /// The same for arrays of events (`application/json` bodies).
    #[test]
    fn arrays_agree_with_serde_json_wherever_they_answer() {
        let body = |rng: &mut Rng| {
            let lines: Vec<String> = (0..rng.below(5)).map(|_| line(rng)).collect();
            format!("{}[{}]{}", ws(rng), lines.join(","), ws(rng))
        };
        differential(0x2545_F491_4F6C_DD1D, 20_000, (2_000, 100), body, |text| {
            let by_serde = serde_array(text);
            let fast = array(text);
            if let Some(events) = &fast {
                assert_eq!(Ok(events), by_serde.as_ref(), "body {text:?}");
            }
            (by_serde.is_ok(), fast.is_some())
        });
    }

    /// A whole NDJSON body answers what parsing it one line at a time answers: the same events, or the
    /// same error naming the same line, wherever the fast path stopped.
    #[test]
    fn ndjson_bodies_agree_with_parsing_line_by_line() {
        let body = |rng: &mut Rng| {
            let separator = rng.pick(&["\n", "\r\n"]);
            let lines: Vec<String> = (0..rng.below(6))
                .map(|_| match rng.below(6) {
                    0 => rng.pick(&["", " ", "\t\r", "\r", " \u{a0} "]).to_string(),
                    _ => line(rng),
                })
                .collect();
            format!("{}{}", lines.join(separator), rng.pick(&["", "\n", "\r\n"]))
        };
        differential(0x5851_F42D_4C95_7F2D, 20_000, (1_000, 50), body, |text| {
            let whole = super::super::ndjson(text.as_bytes());
            let mut events = Vec::new();
            let by_line = super::super::by_line(text, 0, &mut events).map(|()| events);
            assert_eq!(whole, by_line, "body {text:?}");
            let (_, stopped) = ndjson(text);
            (by_line.is_ok(), stopped.is_none())
        });
    }

    #[test]
    fn ndjson_stops_at_the_first_line_it_cannot_take() {
        let text = "{\"value\":1}\r\n \t\n{\"key\":\"a\\u0041\",\"value\":2}\n{\"value\":3}\n";
        let (events, stopped) = ndjson(text);
        assert_eq!(events.len(), 1);
        assert_eq!(stopped, Some(Stopped { at: 16, line: 2 }));
        // An event may not span lines, though JSON would allow it.
        let (events, stopped) = ndjson("{\"value\":\n1}\n");
        assert!(events.is_empty());
        assert_eq!(stopped, Some(Stopped { at: 0, line: 0 }));
        assert_eq!(ndjson(" \n\n"), (vec![], None));
    }

    #[test]
    fn takes_the_usual_event_and_borrows_it() {
        let line = r#"{"key":"user-1","value":{"n":[1,2.5e3,true,null],"s":"a\"b"},"id":"e-7"}"#;
        let e = event(line).expect("fast path");
        assert!(matches!(e.key, Some(Cow::Borrowed("user-1"))));
        assert_eq!(
            e.value,
            PayloadRef::Json(br#"{"n":[1,2.5e3,true,null],"s":"a\"b"}"#)
        );
        assert!(matches!(e.id, Some(Cow::Borrowed("e-7"))));
        let with_headers = r#"{"value":1,"headers":{"b":"2","a":"1","b":"3"}}"#;
        let e = event(with_headers).expect("fast path");
        assert_eq!(
            e.headers,
            vec![("a".into(), "1".into()), ("b".into(), "3".into())]
        );
        // Left to serde_json: escapes outside the value, nulls, surrogate escapes, depth.
        for other in [
            r#"{"key":"a\u0041","value":1}"#,
            r#"{"value":1,"headers":{"h":"\n"}}"#,
            r#"{"value":1,"headers":null}"#,
            r#"{"key":null,"value":1}"#,
            r#"{"value":"\ud800"}"#,
            &format!("{{\"value\":{}{}}}", "[".repeat(70), "]".repeat(70)),
        ] {
            assert!(event(other).is_none(), "{other}");
        }
    }

    #[test]
    fn finds_the_first_special_byte_in_any_position() {
        for len in 0..40 {
            for at in 0..len {
                for special in [b'"', b'\\', 0x00, 0x1f] {
                    let mut bytes = vec![b'x'; len];
                    // Non-ASCII and boundary bytes around it must not be taken for specials.
                    for (i, b) in bytes.iter_mut().enumerate() {
                        *b = [b'x', 0xA0, 0x20, 0xFF, 0x7F, 0x21][i % 6];
                    }
                    bytes[at] = special;
                    assert_eq!(special_byte(&bytes), Some(at), "len {len} at {at}");
                }
            }
            assert_eq!(special_byte(&vec![0xC3; len]), None);
        }
    }
}
