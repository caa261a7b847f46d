//! PTX tokens: identifiers (opcodes with their dotted modifiers, directives,
//! `%` registers, labels, `::` sub-qualifiers), numbers, strings and
//! punctuation; comments are dropped.

use crate::EmuError;

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Tok {
    Ident(String),
    Num(String),
    Str(String),
    Punct(char),
}

#[derive(Debug, Clone)]
pub(crate) struct Token {
    pub tok: Tok,
    pub line: u32,
}

fn ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || matches!(c, '_' | '$' | '%' | '.')
}

fn ident_cont(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '$' | '.')
}

pub(crate) fn lex(src: &str) -> Result<Vec<Token>, EmuError> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let mut line = 1u32;
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
            continue;
        }
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c == '/' && chars.get(i + 1) == Some(&'/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
            continue;
        }
        if c == '/' && chars.get(i + 1) == Some(&'*') {
            i += 2;
            loop {
                if i + 1 >= chars.len() {
                    return Err(EmuError::Parse {
                        line,
                        msg: "unterminated /* comment".into(),
                    });
                }
                if chars[i] == '\n' {
                    line += 1;
                }
                if chars[i] == '*' && chars[i + 1] == '/' {
                    i += 2;
                    break;
                }
                i += 1;
            }
            continue;
        }
        if c == '"' {
            let start = i + 1;
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\n' {
                    return Err(EmuError::Parse {
                        line,
                        msg: "unterminated string".into(),
                    });
                }
                i += 1;
            }
            let s: String = chars[start..i].iter().collect();
            i += 1;
            out.push(Token { tok: Tok::Str(s), line });
            continue;
        }
        if c.is_ascii_digit() {
            let start = i;
            let radix_prefix = c == '0'
                && chars
                    .get(i + 1)
                    .is_some_and(|n| matches!(n, 'x' | 'X' | 'f' | 'F' | 'd' | 'D' | 'b' | 'B'));
            if radix_prefix {
                i += 2;
                while i < chars.len() && chars[i].is_ascii_alphanumeric() {
                    i += 1;
                }
            } else {
                while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                    i += 1;
                }
                if i < chars.len() && matches!(chars[i], 'e' | 'E') {
                    i += 1;
                    if i < chars.len() && matches!(chars[i], '+' | '-') {
                        i += 1;
                    }
                    while i < chars.len() && chars[i].is_ascii_digit() {
                        i += 1;
                    }
                }
                if i < chars.len() && chars[i] == 'U' {
                    i += 1;
                }
            }
            out.push(Token {
                tok: Tok::Num(chars[start..i].iter().collect()),
                line,
            });
            continue;
        }
        if ident_start(c) {
            let start = i;
            i += 1;
            loop {
                if i < chars.len() && ident_cont(chars[i]) {
                    i += 1;
                } else if i + 1 < chars.len() && chars[i] == ':' && chars[i + 1] == ':' {
                    i += 2;
                } else {
                    break;
                }
            }
            out.push(Token {
                tok: Tok::Ident(chars[start..i].iter().collect()),
                line,
            });
            continue;
        }
        if "{}[](),;:+-<>@!|=".contains(c) {
            out.push(Token {
                tok: Tok::Punct(c),
                line,
            });
            i += 1;
            continue;
        }
        return Err(EmuError::Parse {
            line,
            msg: format!("unexpected character {c:?}"),
        });
    }
    Ok(out)
}
