//! The resort catalog: configured data naming each resort and the vertical rise of its
//! lifts. Rides are validated and their vertical resolved against it.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// One resort: its name and, per lift (index 0 = liftID 1), the vertical rise in metres.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resort {
    pub id: u32,
    pub name: String,
    /// Vertical rise per lift, liftID n at index n-1.
    pub lifts: Vec<u32>,
}

/// All resorts, by id. Loaded once at start; a catalog change needs a restart, which is
/// fine for data that changes a few times a season.
#[derive(Clone, Debug)]
pub struct Catalog {
    resorts: BTreeMap<u32, Resort>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    resorts: Vec<ResortFile>,
}

/// A resort as written in a catalog file: either `lifts` (explicit rises) or
/// `lift_count` with the default rise of n×10 m.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResortFile {
    id: u32,
    name: String,
    #[serde(default)]
    lifts: Option<Vec<u32>>,
    #[serde(default)]
    lift_count: Option<u16>,
}

const DEFAULT_NAMES: [&str; 10] = [
    "Alpine Meadows", "Brighton", "Crystal Mountain", "Deer Valley", "Eagle Crest",
    "Fernie Alpine", "Grand Targhee", "Heavenly", "Iron Peak", "Jackson Hole",
];

impl Default for Catalog {
    /// API.md's default: resorts 1–10, 40 lifts each, lift n rises n×10 metres.
    fn default() -> Self {
        let resorts = DEFAULT_NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let id = i as u32 + 1;
                (id, Resort { id, name: (*name).to_string(), lifts: default_lifts(40) })
            })
            .collect();
        Catalog { resorts }
    }
}

fn default_lifts(count: u16) -> Vec<u32> {
    (1..=count as u32).map(|n| n * 10).collect()
}

impl Catalog {
    /// Loads a TOML catalog file (`[[resorts]] id, name, lifts | lift_count`).
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("reading catalog {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("catalog {}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let file: CatalogFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut resorts = BTreeMap::new();
        for r in file.resorts {
            let lifts = match (r.lifts, r.lift_count) {
                (Some(l), None) => l,
                (None, Some(n)) => default_lifts(n),
                _ => return Err(format!("resort {}: give exactly one of `lifts` or `lift_count`", r.id)),
            };
            if r.id == 0 || lifts.is_empty() || lifts.len() > u16::MAX as usize {
                return Err(format!("resort {}: id must be > 0 and it needs 1..65535 lifts", r.id));
            }
            if resorts.insert(r.id, Resort { id: r.id, name: r.name, lifts }).is_some() {
                return Err(format!("resort {} is listed twice", r.id));
            }
        }
        Ok(Catalog { resorts })
    }

    pub fn resort(&self, id: u32) -> Option<&Resort> {
        self.resorts.get(&id)
    }

    pub fn resorts(&self) -> impl Iterator<Item = &Resort> {
        self.resorts.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_catalog_matches_api_md() {
        let c = Catalog::default();
        assert_eq!(c.resorts().count(), 10);
        let r = c.resort(10).unwrap();
        assert_eq!(r.lifts.len(), 40);
        assert_eq!(r.lifts[20], 210);
        assert!(c.resort(11).is_none());
    }

    #[test]
    fn parses_a_file_and_rejects_ambiguity() {
        let c = Catalog::parse("[[resorts]]\nid = 3\nname = \"X\"\nlifts = [100, 250]\n").unwrap();
        assert_eq!(c.resort(3).unwrap().lifts, vec![100, 250]);
        assert!(Catalog::parse("[[resorts]]\nid = 3\nname = \"X\"\n").is_err());
        assert!(Catalog::parse("[[resorts]]\nid = 3\nname = \"X\"\nlift_count = 2\ncolour = 1\n").is_err());
    }
}
