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

/// Highest vertical rise of one lift, metres. The highest lift rises are around 2,000 m
/// (aerial tramways in the Alps); 3,000 m leaves room and still catches a unit mistake (feet,
/// centimetres) or a typo. Bounded so that a ride's vertical stays a plausible figure and
/// the sums of a skier-day (≤ [`crate::domain::MAX_RIDES_PER_SKIER_DAY`] rides) stay small.
pub const MAX_LIFT_RISE_M: u32 = 3_000;

/// Longest resort name, bytes: it is sent in every `GET .../day/{dayID}/skiers` answer.
pub const MAX_NAME_BYTES: usize = 200;

const DEFAULT_NAMES: [&str; 10] = [
    "Alpine Meadows",
    "Brighton",
    "Crystal Mountain",
    "Deer Valley",
    "Eagle Crest",
    "Fernie Alpine",
    "Grand Targhee",
    "Heavenly",
    "Iron Peak",
    "Jackson Hole",
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
    /// Loads a TOML catalog file (`[[resorts]] id, name, lifts | lift_count`) and checks
    /// it: ids > 0 and unique, 1..65535 lifts, each rising 1..=[`MAX_LIFT_RISE_M`] m, a name.
    /// A bad catalog stops the start with a message naming the resort and lift.
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
            if r.name.trim().is_empty() || r.name.len() > MAX_NAME_BYTES {
                return Err(format!("resort {}: the name must be 1 to {MAX_NAME_BYTES} bytes, not blank", r.id));
            }
            if let Some((i, rise)) = lifts.iter().enumerate().find(|(_, rise)| !(1..=MAX_LIFT_RISE_M).contains(*rise)) {
                return Err(format!(
                    "resort {}: lift {} rises {rise} m; a lift's vertical rise must be 1 to {MAX_LIFT_RISE_M} m (with `lift_count`, lift n rises n×10 m)",
                    r.id,
                    i + 1
                ));
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

    #[test]
    fn rejects_rises_no_lift_has_with_a_message_naming_the_lift() {
        let one = |lifts: &str| Catalog::parse(&format!("[[resorts]]\nid = 3\nname = \"X\"\n{lifts}\n"));
        for (lifts, names) in [
            ("lifts = [100, 0]", "lift 2"),
            ("lifts = [3001]", "lift 1"),
            ("lifts = [100, 200, 4294967295]", "lift 3"),
            // The default rise is n × 10 m: lift 301 would rise 3,010 m.
            ("lift_count = 301", "lift 301"),
        ] {
            match one(lifts) {
                Err(e) => assert!(e.contains("resort 3") && e.contains(names), "{lifts}: {e}"),
                Ok(_) => panic!("{lifts} must be refused"),
            }
        }
        assert_eq!(one("lifts = [1, 3000]").unwrap().resort(3).unwrap().lifts, vec![1, 3000]);
        assert_eq!(one("lift_count = 300").unwrap().resort(3).unwrap().lifts[299], 3000);
        assert!(Catalog::parse("[[resorts]]\nid = 3\nname = \"\"\nlift_count = 2\n").is_err(), "a resort needs a name");
    }
}
