//! Subscription filters (part of the protocol: the expressions a group
//! subscribes with), evaluated on the broker so filtered-out messages
//! never cross the network.
//!
//! Two kinds, combinable (both must match):
//! - a tag expression: `*` (everything) or `TagA || TagB || …`;
//! - a SQL92-style expression over headers: comparisons `= <> != < <= > >=`
//!   (numeric when both sides are numbers, else text), `AND`, `OR`, `NOT`,
//!   parentheses, `IN ('a', 'b')`, `BETWEEN x AND y`, `IS [NOT] NULL`,
//!   `TRUE`/`FALSE`; `'text'` literals, numbers, header names as bare words
//!   (`amount`, `region`, `msmq.key`…). A missing header is NULL and every
//!   comparison with NULL is false.
//!
//! Invariant: parsing never panics; any input either parses or gives an
//! error naming the position.

use crate::Message;

/// Longest filter expression accepted, in bytes.
pub const FILTER_BYTES_MAX: usize = 4096;
/// Deepest nesting of parentheses and NOTs.
const DEPTH_MAX: usize = 64;

/// A compiled subscription filter.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    tags: Option<Vec<String>>,
    sql: Option<Expr>,
}

impl Filter {
    /// Compile; `None` parts match everything.
    pub fn compile(tags: Option<&str>, sql: Option<&str>) -> Result<Filter, String> {
        let tags = match tags.map(str::trim) {
            None | Some("") | Some("*") => None,
            Some(t) => {
                if t.len() > FILTER_BYTES_MAX {
                    return Err(format!("tag filter longer than {FILTER_BYTES_MAX} bytes"));
                }
                let list: Vec<String> = t.split("||").map(|s| s.trim().to_string()).collect();
                if let Some(bad) = list
                    .iter()
                    .find(|s| s.is_empty() || s.contains(char::is_whitespace))
                {
                    return Err(format!(
                        "bad tag {bad:?} in tag filter {t:?}; write TagA || TagB"
                    ));
                }
                Some(list)
            }
        };
        let sql = match sql.map(str::trim) {
            None | Some("") => None,
            Some(s) => {
                if s.len() > FILTER_BYTES_MAX {
                    return Err(format!("SQL filter longer than {FILTER_BYTES_MAX} bytes"));
                }
                Some(Parser::new(s)?.parse()?)
            }
        };
        Ok(Filter { tags, sql })
    }

    pub fn matches_all(&self) -> bool {
        self.tags.is_none() && self.sql.is_none()
    }

    pub fn matches(&self, m: &Message) -> bool {
        if let Some(tags) = &self.tags {
            match &m.tag {
                Some(tag) if tags.iter().any(|t| t == tag) => {}
                _ => return false,
            }
        }
        match &self.sql {
            Some(expr) => expr.eval(m) == Some(true),
            None => true,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Value {
    Text(String),
    Number(f64),
    Bool(bool),
}

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Header(String),
    Literal(Value),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Compare(Box<Expr>, Cmp, Box<Expr>),
    In(Box<Expr>, Vec<Value>, bool),
    Between(Box<Expr>, Box<Expr>, Box<Expr>, bool),
    IsNull(Box<Expr>, bool),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

fn header_value(m: &Message, name: &str) -> Option<Value> {
    let text = match name {
        "msmq.tag" => m.tag.clone()?,
        "msmq.key" => String::from_utf8_lossy(m.key.as_ref()?).into_owned(),
        _ => m.headers.iter().find(|h| h.name == name)?.value.clone(),
    };
    Some(match text.parse::<f64>() {
        Ok(n) if n.is_finite() => Value::Number(n),
        _ => Value::Text(text),
    })
}

fn compare(a: &Value, op: Cmp, b: &Value) -> Option<bool> {
    let ord = match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.partial_cmp(y)?,
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        (Value::Text(x), Value::Text(y)) => x.cmp(y),
        (Value::Number(x), Value::Text(y)) | (Value::Text(y), Value::Number(x)) => {
            // A number against text: compare as text only for (in)equality.
            let eq = x.to_string() == *y;
            return match op {
                Cmp::Eq => Some(eq),
                Cmp::Ne => Some(!eq),
                _ => None,
            };
        }
        _ => return None,
    };
    use std::cmp::Ordering::*;
    Some(match op {
        Cmp::Eq => ord == Equal,
        Cmp::Ne => ord != Equal,
        Cmp::Lt => ord == Less,
        Cmp::Le => ord != Greater,
        Cmp::Gt => ord == Greater,
        Cmp::Ge => ord != Less,
    })
}

impl Expr {
    fn value(&self, m: &Message) -> Option<Value> {
        match self {
            Expr::Header(name) => header_value(m, name),
            Expr::Literal(v) => Some(v.clone()),
            other => other.eval(m).map(Value::Bool),
        }
    }

    /// Three-valued: `None` is SQL's UNKNOWN (a NULL was involved).
    fn eval(&self, m: &Message) -> Option<bool> {
        match self {
            Expr::Header(_) | Expr::Literal(_) => match self.value(m)? {
                Value::Bool(b) => Some(b),
                _ => None,
            },
            Expr::Not(e) => e.eval(m).map(|b| !b),
            Expr::And(a, b) => match (a.eval(m), b.eval(m)) {
                (Some(false), _) | (_, Some(false)) => Some(false),
                (Some(true), Some(true)) => Some(true),
                _ => None,
            },
            Expr::Or(a, b) => match (a.eval(m), b.eval(m)) {
                (Some(true), _) | (_, Some(true)) => Some(true),
                (Some(false), Some(false)) => Some(false),
                _ => None,
            },
            Expr::Compare(a, op, b) => compare(&a.value(m)?, *op, &b.value(m)?),
            Expr::In(e, list, negated) => {
                let v = e.value(m)?;
                let found = list.iter().any(|x| compare(&v, Cmp::Eq, x) == Some(true));
                Some(found != *negated)
            }
            Expr::Between(e, lo, hi, negated) => {
                let v = e.value(m)?;
                let inside =
                    compare(&v, Cmp::Ge, &lo.value(m)?)? && compare(&v, Cmp::Le, &hi.value(m)?)?;
                Some(inside != *negated)
            }
            Expr::IsNull(e, negated) => Some(e.value(m).is_none() != *negated),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Text(String),
    Number(f64),
    Op(&'static str),
    LParen,
    RParen,
    Comma,
}

struct Parser {
    tokens: Vec<(usize, Token)>,
    at: usize,
    depth: usize,
}

fn tokenize(s: &str) -> Result<Vec<(usize, Token)>, String> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let start = i;
        match c {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'(' => {
                out.push((start, Token::LParen));
                i += 1
            }
            b')' => {
                out.push((start, Token::RParen));
                i += 1
            }
            b',' => {
                out.push((start, Token::Comma));
                i += 1
            }
            b'\'' => {
                let mut text = String::new();
                i += 1;
                loop {
                    match b.get(i) {
                        None => return Err(format!("unterminated string starting at {start}")),
                        Some(b'\'') if b.get(i + 1) == Some(&b'\'') => {
                            text.push('\'');
                            i += 2;
                        }
                        Some(b'\'') => {
                            i += 1;
                            break;
                        }
                        Some(_) => {
                            let ch = s[i..].chars().next().ok_or("bad text")?;
                            text.push(ch);
                            i += ch.len_utf8();
                        }
                    }
                }
                out.push((start, Token::Text(text)));
            }
            b'=' => {
                out.push((start, Token::Op("=")));
                i += 1
            }
            b'<' | b'>' | b'!' => {
                let two = s.get(i..i + 2).unwrap_or("");
                let op = match two {
                    "<=" => "<=",
                    ">=" => ">=",
                    "<>" => "<>",
                    "!=" => "<>",
                    _ if c == b'<' => "<",
                    _ if c == b'>' => ">",
                    _ => return Err(format!("unexpected '!' at {start}")),
                };
                i += if op.len() == 2 || two == "!=" { 2 } else { 1 };
                out.push((start, Token::Op(op)));
            }
            b'0'..=b'9' | b'-' | b'.' => {
                i += 1;
                while i < b.len()
                    && (b[i].is_ascii_digit() || b[i] == b'.' || b[i] == b'e' || b[i] == b'E')
                {
                    i += 1;
                }
                let text = &s[start..i];
                let n: f64 = text
                    .parse()
                    .map_err(|_| format!("bad number {text:?} at {start}"))?;
                out.push((start, Token::Number(n)));
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                while i < b.len()
                    && (b[i].is_ascii_alphanumeric() || matches!(b[i], b'_' | b'.' | b'-'))
                {
                    i += 1;
                }
                out.push((start, Token::Word(s[start..i].to_string())));
            }
            _ => {
                let ch = s[i..].chars().next().unwrap_or('?');
                return Err(format!("unexpected {ch:?} at {start}"));
            }
        }
    }
    Ok(out)
}

impl Parser {
    fn new(s: &str) -> Result<Parser, String> {
        Ok(Parser {
            tokens: tokenize(s)?,
            at: 0,
            depth: 0,
        })
    }

    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at).map(|(_, t)| t)
    }

    fn pos(&self) -> String {
        match self.tokens.get(self.at) {
            Some((p, _)) => format!("position {p}"),
            None => "the end".into(),
        }
    }

    fn keyword(&mut self, kw: &str) -> bool {
        if matches!(self.peek(), Some(Token::Word(w)) if w.eq_ignore_ascii_case(kw)) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn parse(mut self) -> Result<Expr, String> {
        let e = self.or()?;
        if self.at != self.tokens.len() {
            return Err(format!("unexpected {:?} at {}", self.peek(), self.pos()));
        }
        Ok(e)
    }

    fn deeper(&mut self) -> Result<(), String> {
        self.depth += 1;
        if self.depth > DEPTH_MAX {
            return Err(format!("expression nested deeper than {DEPTH_MAX}"));
        }
        Ok(())
    }

    fn or(&mut self) -> Result<Expr, String> {
        let mut e = self.and()?;
        while self.keyword("OR") {
            e = Expr::Or(Box::new(e), Box::new(self.and()?));
        }
        Ok(e)
    }

    fn and(&mut self) -> Result<Expr, String> {
        let mut e = self.not()?;
        while self.keyword("AND") {
            e = Expr::And(Box::new(e), Box::new(self.not()?));
        }
        Ok(e)
    }

    fn not(&mut self) -> Result<Expr, String> {
        if self.keyword("NOT") {
            self.deeper()?;
            let e = Expr::Not(Box::new(self.not()?));
            self.depth -= 1;
            return Ok(e);
        }
        self.predicate()
    }

    fn predicate(&mut self) -> Result<Expr, String> {
        let left = self.operand()?;
        if let Some(Token::Op(op)) = self.peek().cloned() {
            self.at += 1;
            let cmp = match op {
                "=" => Cmp::Eq,
                "<>" => Cmp::Ne,
                "<" => Cmp::Lt,
                "<=" => Cmp::Le,
                ">" => Cmp::Gt,
                _ => Cmp::Ge,
            };
            return Ok(Expr::Compare(
                Box::new(left),
                cmp,
                Box::new(self.operand()?),
            ));
        }
        if self.keyword("IS") {
            let negated = self.keyword("NOT");
            if !self.keyword("NULL") {
                return Err(format!("expected NULL at {}", self.pos()));
            }
            return Ok(Expr::IsNull(Box::new(left), negated));
        }
        let negated = self.keyword("NOT");
        if self.keyword("IN") {
            if self.peek() != Some(&Token::LParen) {
                return Err(format!("expected ( after IN at {}", self.pos()));
            }
            self.at += 1;
            let mut list = Vec::new();
            loop {
                match self.operand()? {
                    Expr::Literal(v) => list.push(v),
                    _ => return Err(format!("IN takes literals, at {}", self.pos())),
                }
                match self.peek() {
                    Some(Token::Comma) => self.at += 1,
                    Some(Token::RParen) => {
                        self.at += 1;
                        break;
                    }
                    _ => return Err(format!("expected , or ) at {}", self.pos())),
                }
            }
            return Ok(Expr::In(Box::new(left), list, negated));
        }
        if self.keyword("BETWEEN") {
            let lo = self.operand()?;
            if !self.keyword("AND") {
                return Err(format!("expected AND in BETWEEN at {}", self.pos()));
            }
            let hi = self.operand()?;
            return Ok(Expr::Between(
                Box::new(left),
                Box::new(lo),
                Box::new(hi),
                negated,
            ));
        }
        if negated {
            return Err(format!(
                "expected IN or BETWEEN after NOT at {}",
                self.pos()
            ));
        }
        Ok(left)
    }

    fn operand(&mut self) -> Result<Expr, String> {
        let Some((_, token)) = self.tokens.get(self.at).cloned() else {
            return Err("expression ends too early".into());
        };
        self.at += 1;
        match token {
            Token::LParen => {
                self.deeper()?;
                let e = self.or()?;
                self.depth -= 1;
                if self.peek() != Some(&Token::RParen) {
                    return Err(format!("expected ) at {}", self.pos()));
                }
                self.at += 1;
                Ok(e)
            }
            Token::Text(t) => Ok(Expr::Literal(Value::Text(t))),
            Token::Number(n) => Ok(Expr::Literal(Value::Number(n))),
            Token::Word(w) if w.eq_ignore_ascii_case("TRUE") => {
                Ok(Expr::Literal(Value::Bool(true)))
            }
            Token::Word(w) if w.eq_ignore_ascii_case("FALSE") => {
                Ok(Expr::Literal(Value::Bool(false)))
            }
            Token::Word(w)
                if ["AND", "OR", "NOT", "IN", "IS", "NULL", "BETWEEN"]
                    .iter()
                    .any(|k| w.eq_ignore_ascii_case(k)) =>
            {
                self.at -= 1;
                Err(format!("unexpected keyword {w} at {}", self.pos()))
            }
            Token::Word(w) => Ok(Expr::Header(w)),
            other => {
                self.at -= 1;
                Err(format!("unexpected {other:?} at {}", self.pos()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Header, MessageId};

    fn msg(tag: Option<&str>, headers: &[(&str, &str)]) -> Message {
        Message {
            offset: 0,
            id: MessageId::new(1, 1),
            timestamp_ms: 0,
            payload: vec![],
            key: None,
            tag: tag.map(String::from),
            headers: headers
                .iter()
                .map(|(n, v)| Header {
                    name: n.to_string(),
                    value: v.to_string(),
                })
                .collect(),
        }
    }

    fn sql(s: &str) -> Filter {
        Filter::compile(None, Some(s)).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn tags() {
        let f = Filter::compile(Some("TagA || TagB"), None).unwrap();
        assert!(f.matches(&msg(Some("TagA"), &[])));
        assert!(f.matches(&msg(Some("TagB"), &[])));
        assert!(!f.matches(&msg(Some("TagC"), &[])));
        assert!(!f.matches(&msg(None, &[])));
        assert!(Filter::compile(Some("*"), None).unwrap().matches_all());
        assert!(Filter::compile(Some("A || "), None).is_err());
    }

    #[test]
    fn sql_comparisons_logic_and_nulls() {
        let m = msg(Some("pay"), &[("amount", "1500"), ("region", "EU")]);
        assert!(sql("amount > 1000 AND region = 'EU'").matches(&m));
        assert!(!sql("amount > 2000 AND region = 'EU'").matches(&m));
        assert!(sql("amount > 2000 OR region = 'EU'").matches(&m));
        assert!(sql("NOT (region = 'US')").matches(&m));
        assert!(sql("region IN ('EU', 'UK')").matches(&m));
        assert!(sql("region NOT IN ('US')").matches(&m));
        assert!(sql("amount BETWEEN 1000 AND 2000").matches(&m));
        assert!(!sql("amount NOT BETWEEN 1000 AND 2000").matches(&m));
        assert!(sql("missing IS NULL AND amount IS NOT NULL").matches(&m));
        assert!(
            !sql("missing > 1").matches(&m),
            "comparisons with NULL are false"
        );
        assert!(
            !sql("NOT (missing > 1)").matches(&m),
            "NOT UNKNOWN is UNKNOWN"
        );
        assert!(
            sql("amount <> 1 AND amount != 2 AND amount >= 1500 AND amount <= 1500").matches(&m)
        );
        assert!(sql("msmq.tag = 'pay'").matches(&m));
        assert!(sql("amount = 1500.0").matches(&m), "numeric comparison");
        assert!(sql("TRUE").matches(&m));
        assert!(sql("region = 'it''s'").matches(&msg(None, &[("region", "it's")])));
    }

    #[test]
    fn invalid_expressions_are_errors_not_panics() {
        for bad in [
            "amount >",
            "AND",
            "(amount > 1",
            "amount > 1)",
            "region = 'EU",
            "amount IN 1",
            "amount BETWEEN 1",
            "x IS 3",
            "!",
            "a !! b",
            "1e",
            "amount > 1 region",
            "NOT",
            "#",
            "amount IN ('a' 'b')",
            "é",
        ] {
            assert!(
                Filter::compile(None, Some(bad)).is_err(),
                "{bad:?} should not parse"
            );
        }
        let deep = format!("{}a = 1{}", "(".repeat(100), ")".repeat(100));
        assert!(Filter::compile(None, Some(&deep)).is_err());
        let long = "a = 1 AND ".repeat(500);
        assert!(Filter::compile(None, Some(&long)).is_err());
        // A cheap sweep of arbitrary bytes: never a panic.
        let mut seed = 12345u64;
        for len in 0..300 {
            let alphabet = b"ab1 ()'=<>!,.-INOTANDORBETWEENISNULL";
            let s: String = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    alphabet[(seed % alphabet.len() as u64) as usize] as char
                })
                .collect();
            let _ = Filter::compile(None, Some(&s));
        }
    }
}
