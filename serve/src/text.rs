//! A request's generated text, built token by token: incremental
//! detokenisation and the request's `stop` strings.
//!
//! Byte-level BPE tokens can end inside a UTF-8 character, and some
//! decoders change a token's text by what precedes it, so a token's text is
//! the difference between two decodes of a short window ([`Detokenizer`]:
//! the scheme of `TextStream`, windowed so a token costs the same at any
//! length, and with a `flush` for the end). A stop string may be split over
//! tokens, so text that could still become one is held back
//! ([`StopStrings`]) until the next tokens decide it.

use ouroc_runtime::Tokenizer;

/// Incremental text of a token sequence.
#[derive(Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    /// Start of the window decoded: the tokens before it are printed and
    /// cannot change the window's text.
    prefix_offset: usize,
    /// Tokens up to here are printed.
    read_offset: usize,
}

impl Detokenizer {
    /// The new text `id` completes ("" while a character is unfinished).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String, String> {
        self.ids.push(id);
        let printed = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let text = tok.decode(&self.ids[self.prefix_offset..])?;
        // A trailing U+FFFD is a character whose bytes are still to come.
        if text.len() <= printed.len() || text.ends_with('\u{FFFD}') || !text.starts_with(&printed) {
            return Ok(String::new());
        }
        let new = text[printed.len()..].to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(new)
    }

    /// The text not yet returned, unfinished characters as U+FFFD (as a
    /// full decode shows them): at the end of the generation.
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<String, String> {
        let printed = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let text = tok.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(text.get(printed.len()..).unwrap_or_default().to_string())
    }
}

/// What a piece of text gives the client.
#[derive(Debug, PartialEq, Eq)]
pub struct Released {
    /// Text to send now.
    pub text: String,
    /// A stop string was reached: the text ends before it, and so does the
    /// generation.
    pub stopped: bool,
}

/// The generated text checked against the request's stop strings.
#[derive(Default)]
pub struct StopStrings {
    stops: Vec<String>,
    /// Text received but not released: the longest end of it that a stop
    /// string starts with.
    held: String,
}

impl StopStrings {
    /// Stop strings must not be empty (an empty one would match at once).
    pub fn new(stops: Vec<String>) -> StopStrings {
        debug_assert!(stops.iter().all(|s| !s.is_empty()));
        StopStrings {
            stops,
            held: String::new(),
        }
    }

    /// Append `text`; releases what can no longer be part of a stop string.
    pub fn push(&mut self, text: &str) -> Released {
        self.held.push_str(text);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            // Any occurrence started in the held text: what was released
            // never ended with the start of a stop string.
            let text = self.held[..at].to_string();
            self.held.clear();
            return Released { text, stopped: true };
        }
        let keep = self.partial_match_len();
        let text = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        Released { text, stopped: false }
    }

    /// The generation ended without a stop string: the held text.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Bytes of the longest end of the held text that is the beginning of
    /// a stop string (a whole stop string was ruled out).
    fn partial_match_len(&self) -> usize {
        let h = &self.held;
        (1..=h.len())
            .rev()
            .filter(|&n| h.is_char_boundary(h.len() - n))
            .find(|&n| self.stops.iter().any(|s| s.starts_with(&h[h.len() - n..])))
            .unwrap_or(0)
    }
}

/// A request's text: detokenised, then cut at its stop strings.
pub struct TextOutput {
    detok: Detokenizer,
    stops: StopStrings,
}

impl TextOutput {
    pub fn new(stops: Vec<String>) -> TextOutput {
        TextOutput {
            detok: Detokenizer::default(),
            stops: StopStrings::new(stops),
        }
    }

    /// A generated token.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Released, String> {
        let text = self.detok.push(tok, id)?;
        Ok(self.stops.push(&text))
    }

    /// The generation ended (a stop token or the token limit): the rest of
    /// the text, which may still reach a stop string.
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<Released, String> {
        let rest = self.detok.flush(tok)?;
        let mut released = self.stops.push(&rest);
        if !released.stopped {
            released.text.push_str(&self.stops.finish());
        }
        Ok(released)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `pieces` pushed in turn; the text released by each, then the rest.
    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool, String) {
        let mut s = StopStrings::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        for p in pieces {
            let r = s.push(p);
            out.push(r.text);
            if r.stopped {
                return (out, true, String::new());
            }
        }
        (out, false, s.finish())
    }

    #[test]
    fn a_stop_string_split_over_pieces_is_held_back_then_cut() {
        let (out, stopped, _) = run(&["END"], &["abc E", "N", "D tail"]);
        assert_eq!(out, ["abc ", "", ""]);
        assert!(stopped);
    }

    #[test]
    fn a_false_start_is_released_when_ruled_out() {
        let (out, stopped, rest) = run(&["END"], &["x EN", "Y E"]);
        assert_eq!(out, ["x ", "ENY "]);
        assert!(!stopped);
        assert_eq!(rest, "E");
    }

    #[test]
    fn the_earliest_of_several_stop_strings_wins() {
        let (out, stopped, _) = run(&["bb", "ab"], &["xxabb"]);
        assert_eq!(out, ["xx"]);
        assert!(stopped);
    }

    #[test]
    fn an_overlapping_start_keeps_the_longest_candidate() {
        // "aab" starts at the second `a` of "aaab": the first is released.
        let (out, stopped, _) = run(&["aab"], &["a", "a", "a", "b"]);
        assert_eq!(out, ["", "", "a", ""]);
        assert!(stopped);
    }

    #[test]
    fn multibyte_text_is_cut_on_character_boundaries() {
        let (out, stopped, rest) = run(&["é!"], &["café", " ok"]);
        assert_eq!(out, ["caf", "é ok"]);
        assert!(!stopped);
        assert_eq!(rest, "");
    }

    fn fixture_tokenizer() -> Tokenizer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mha-r4");
        Tokenizer::load(&dir).expect("fixture tokenizer")
    }

    #[test]
    fn incremental_text_equals_the_full_decode() {
        let tok = fixture_tokenizer();
        let text = "def f(x):\n    return x * 2  # é ü ✓";
        let ids = tok.encode(text).unwrap();
        let mut d = Detokenizer::default();
        let mut out = String::new();
        for &id in &ids {
            out.push_str(&d.push(&tok, id).unwrap());
        }
        out.push_str(&d.flush(&tok).unwrap());
        assert_eq!(out, tok.decode(&ids).unwrap());
    }

    #[test]
    fn text_output_stops_inside_a_token_sequence() {
        let tok = fixture_tokenizer();
        let ids = tok.encode("alpha beta gamma").unwrap();
        let mut t = TextOutput::new(vec!["ta g".into()]);
        let mut out = String::new();
        let mut stopped = false;
        for &id in &ids {
            let r = t.push(&tok, id).unwrap();
            out.push_str(&r.text);
            if r.stopped {
                stopped = true;
                break;
            }
        }
        assert!(stopped);
        assert_eq!(out, "alpha be");
    }
}
