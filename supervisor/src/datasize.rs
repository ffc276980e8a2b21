//! Spring-style data sizes (`256MB`, `1Mb`, `64KB`, `65536`), as Axon Server's
//! `*.segment-size` and `max-message-size` settings are written.
//!
//! Units are binary (1 KB = 1024 bytes, as in Spring's `DataSize`), matched without regard to
//! case; a bare number is bytes. Whitespace around and between number and unit is ignored.

/// Parses a data size into bytes, or says what is wrong with it.
pub fn parse(text: &str) -> Result<u64, String> {
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    let digits_end = compact.find(|c: char| !c.is_ascii_digit()).unwrap_or(compact.len());
    let (number, unit) = compact.split_at(digits_end);
    if number.is_empty() {
        return Err("expected a number of bytes with an optional unit B, KB, MB, GB or TB".into());
    }
    let multiplier: u64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "KB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        "TB" => 1 << 40,
        _ => {
            return Err(format!(
                "unknown unit {unit:?} (use B, KB, MB, GB or TB; 1KB = 1024 bytes)"
            ));
        }
    };
    let number: u64 = number.parse().map_err(|_| format!("{number} is too large"))?;
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("{text} is too large"))
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn units_are_binary_and_case_insensitive() {
        assert_eq!(parse("65536"), Ok(65536));
        assert_eq!(parse("64KB"), Ok(64 * 1024));
        assert_eq!(parse("1Mb"), Ok(1024 * 1024));
        assert_eq!(parse("256MB"), Ok(256 * 1024 * 1024));
        assert_eq!(parse(" 2 gb "), Ok(2 << 30));
        assert_eq!(parse("1TB"), Ok(1 << 40));
        assert_eq!(parse("10B"), Ok(10));
        assert_eq!(parse("0"), Ok(0));
    }

    #[test]
    fn rejects_what_is_not_a_size() {
        assert!(parse("12XB").unwrap_err().contains("unknown unit"));
        assert!(parse("MB").is_err());
        assert!(parse("").is_err());
        assert!(parse("-1MB").is_err());
        assert!(parse("1.5MB").is_err());
        assert!(parse("99999999999TB").unwrap_err().contains("too large"));
        assert!(parse("99999999999999999999999").is_err());
    }
}
