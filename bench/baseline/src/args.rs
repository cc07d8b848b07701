//! A tiny `--name value` flag parser: the subcommands take a handful of numbers and
//! strings each, not worth a clap feature set of their own (see Cargo.toml).

use std::collections::HashMap;
use std::str::FromStr;

pub struct Args {
    values: HashMap<String, String>,
}

impl Args {
    /// Parses `--name value`, `--name=value` and bare `--flag` (value "true").
    pub fn parse(raw: impl IntoIterator<Item = String>) -> Result<Args, String> {
        let mut values = HashMap::new();
        let mut it = raw.into_iter().peekable();
        while let Some(a) = it.next() {
            let Some(name) = a.strip_prefix("--") else { return Err(format!("unexpected argument `{a}`")) };
            if let Some((n, v)) = name.split_once('=') {
                values.insert(n.to_string(), v.to_string());
            } else if it.peek().is_some_and(|next| !next.starts_with("--")) {
                values.insert(name.to_string(), it.next().unwrap_or_default());
            } else {
                values.insert(name.to_string(), "true".into());
            }
        }
        Ok(Args { values })
    }

    /// The flag's value parsed, or `default` when absent. Exits with a message on a bad value.
    pub fn get<T: FromStr>(&self, name: &str, default: T) -> T {
        match self.values.get(name) {
            None => default,
            Some(v) => v.parse().unwrap_or_else(|_| {
                eprintln!("--{name}: cannot parse `{v}`");
                std::process::exit(2)
            }),
        }
    }

    pub fn string(&self, name: &str, default: &str) -> String {
        self.values.get(name).cloned().unwrap_or_else(|| default.to_string())
    }

    /// A `LO-HI` range such as `1-100000`.
    pub fn range(&self, name: &str, default: (u32, u32)) -> (u32, u32) {
        match self.values.get(name) {
            None => default,
            Some(v) => {
                v.split_once('-').and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?))).filter(|(a, b)| a <= b).unwrap_or_else(|| {
                    eprintln!("--{name}: expected LO-HI, got `{v}`");
                    std::process::exit(2)
                })
            }
        }
    }
}
