//! The credit price of an image, by the integration guide's price list.
//!
//! Up to 512×512 pixels costs `small`, up to 1024×1024 costs `large`, anything
//! bigger (upscaled) or high quality costs `high`; each variation after the
//! first adds `extra_variation`. The table is configurable (`PRICE_TABLE`).

use std::str::FromStr;

/// Image quality asked for in a quote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quality {
    /// The default quality.
    Standard,
    /// High quality or upscaled output.
    High,
}

/// Credit prices; parsed from `small=2,large=5,high=8,extra_variation=2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PriceTable {
    /// Up to 512×512 pixels.
    pub small: i64,
    /// Up to 1024×1024 pixels.
    pub large: i64,
    /// High quality, or more than 1024×1024 pixels.
    pub high: i64,
    /// Each variation after the first.
    pub extra_variation: i64,
}

impl Default for PriceTable {
    fn default() -> Self {
        Self {
            small: 2,
            large: 5,
            high: 8,
            extra_variation: 2,
        }
    }
}

impl FromStr for PriceTable {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut table = Self::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, value) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}` is not name=credits"))?;
            let value: i64 = value
                .trim()
                .parse()
                .map_err(|_| format!("`{part}`: credits must be a whole number"))?;
            if !(0..=1_000_000).contains(&value) {
                return Err(format!("`{part}`: credits must be from 0 to 1000000"));
            }
            match name.trim() {
                "small" => table.small = value,
                "large" => table.large = value,
                "high" => table.high = value,
                "extra_variation" => table.extra_variation = value,
                other => {
                    return Err(format!(
                        "unknown price `{other}` (expected small, large, high, extra_variation)"
                    ));
                }
            }
        }
        Ok(table)
    }
}

/// A priced image request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quote {
    /// Price of the first image.
    pub base: i64,
    /// Price of the extra variations.
    pub extra: i64,
    /// What the request costs in all.
    pub total: i64,
}

impl PriceTable {
    /// Prices `variations` images of `width`×`height` at `quality`.
    /// Inputs are validated by the caller (positive, bounded).
    pub fn quote(&self, width: u32, height: u32, quality: Quality, variations: u32) -> Quote {
        let pixels = u64::from(width) * u64::from(height);
        let base = if quality == Quality::High || pixels > 1024 * 1024 {
            self.high
        } else if pixels > 512 * 512 {
            self.large
        } else {
            self.small
        };
        let extra = self.extra_variation * i64::from(variations.saturating_sub(1));
        Quote {
            base,
            extra,
            total: base + extra,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guide_price_list_holds() {
        let t = PriceTable::default();
        assert_eq!(t.quote(512, 512, Quality::Standard, 1).total, 2);
        assert_eq!(t.quote(1024, 1024, Quality::Standard, 1).total, 5);
        assert_eq!(t.quote(1024, 1024, Quality::High, 1).total, 8);
        assert_eq!(t.quote(2048, 2048, Quality::Standard, 1).total, 8);
        assert_eq!(t.quote(1024, 1024, Quality::Standard, 3).total, 9);
        assert_eq!(t.quote(256, 256, Quality::Standard, 1).total, 2);
        assert_eq!(t.quote(768, 512, Quality::Standard, 1).total, 5);
    }

    #[test]
    fn the_table_is_configurable() {
        let t: PriceTable = "small=1, high=10".parse().expect("parses");
        assert_eq!((t.small, t.large, t.high, t.extra_variation), (1, 5, 10, 2));
        assert!("tiny=1".parse::<PriceTable>().is_err());
        assert!("small=-1".parse::<PriceTable>().is_err());
        assert!("small".parse::<PriceTable>().is_err());
    }
}
