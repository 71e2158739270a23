//! Money as integer micro-dollars (decision 9): sums of many small costs must
//! not drift, and status shows exact decimal strings, never floats.

use std::fmt;
use std::str::FromStr;

/// An amount in millionths of a US dollar.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MicroUsd(pub i64);

const SCALE: i64 = 1_000_000;

impl MicroUsd {
    pub const ZERO: MicroUsd = MicroUsd(0);

    /// Cost of `seconds` of active time at `per_hour`, rounded half up to the
    /// micro-dollar.
    pub fn for_seconds(per_hour: MicroUsd, seconds: i64) -> MicroUsd {
        let num = per_hour.0 as i128 * seconds as i128;
        MicroUsd(((num + 1800) / 3600) as i64)
    }

    pub fn saturating_add(self, other: MicroUsd) -> MicroUsd {
        MicroUsd(self.0.saturating_add(other.0))
    }
}

impl fmt::Display for MicroUsd {
    /// `12.345678`: always six decimals, so the string sorts and diffs well.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        write!(f, "{sign}{}.{:06}", abs / SCALE as u64, abs % SCALE as u64)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid amount {0:?}: expected a decimal number of dollars with at most 6 decimals")]
pub struct ParseMoneyError(String);

impl FromStr for MicroUsd {
    type Err = ParseMoneyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseMoneyError(s.to_string());
        let t = s.trim();
        let (neg, t) = match t.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, t),
        };
        let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
        if whole.is_empty() && frac.is_empty() || frac.len() > 6 {
            return Err(err());
        }
        let digits = |d: &str| d.chars().all(|c| c.is_ascii_digit());
        if !digits(whole) || !digits(frac) {
            return Err(err());
        }
        let whole: i64 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| err())?
        };
        let frac_micros: i64 = format!("{frac:0<6}").parse().map_err(|_| err())?;
        let v = whole
            .checked_mul(SCALE)
            .and_then(|w| w.checked_add(frac_micros))
            .ok_or_else(err)?;
        Ok(MicroUsd(if neg { -v } else { v }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_with_six_decimals() {
        assert_eq!(MicroUsd(0).to_string(), "0.000000");
        assert_eq!(MicroUsd(1).to_string(), "0.000001");
        assert_eq!(MicroUsd(20_640_000).to_string(), "20.640000");
        assert_eq!(MicroUsd(-1_500_000).to_string(), "-1.500000");
    }

    #[test]
    fn parses_decimal_strings_exactly() {
        assert_eq!("0.18".parse(), Ok(MicroUsd(180_000)));
        assert_eq!("20.640000".parse(), Ok(MicroUsd(20_640_000)));
        assert_eq!("3".parse(), Ok(MicroUsd(3_000_000)));
        assert_eq!(".5".parse(), Ok(MicroUsd(500_000)));
        for bad in ["", ".", "1.2345678", "abc", "1,5", "1e3"] {
            assert!(bad.parse::<MicroUsd>().is_err(), "{bad}");
        }
    }

    #[test]
    fn round_trips_through_status_strings() {
        for v in [0, 1, 999_999, 1_000_000, 123_456_789, -42] {
            assert_eq!(MicroUsd(v).to_string().parse::<MicroUsd>(), Ok(MicroUsd(v)));
        }
    }

    #[test]
    fn per_second_costs_do_not_drift() {
        // $0.18/h is exactly 50 micro-dollars a second: 96 h a month (the
        // seed's heartbeat pattern) is $17.28 whether summed per second or at once.
        let rate = MicroUsd(180_000);
        let mut sum = MicroUsd::ZERO;
        for _ in 0..(96 * 3600) {
            sum = sum.saturating_add(MicroUsd::for_seconds(rate, 1));
        }
        assert_eq!(sum, MicroUsd::for_seconds(rate, 96 * 3600));
        assert_eq!(sum.to_string(), "17.280000");
    }

    #[test]
    fn rounding_is_half_up_to_the_micro_dollar() {
        // $0.01/h for 1 s = 2.777... micro-dollars -> 3.
        assert_eq!(MicroUsd::for_seconds(MicroUsd(10_000), 1), MicroUsd(3));
        // $0.001/h for 1 s = 0.2777... -> 0.
        assert_eq!(MicroUsd::for_seconds(MicroUsd(1_000), 1), MicroUsd(0));
    }
}
