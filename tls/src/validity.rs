//! A certificate's validity period, read from its DER encoding.
//!
//! rustls checks the validity of the certificates a peer presents, never of the one a server
//! serves itself; an expired server certificate would be found only by every client failing.
//! Reading the two dates needs a walk over five fields of the `TBSCertificate` (RFC 5280,
//! section 4.1), done here rather than with a full X.509 parser.

/// Seconds since the Unix epoch.
pub type UnixTime = i64;

/// `(notBefore, notAfter)` of a DER certificate; `None` when it is not one.
pub fn validity(der: &[u8]) -> Option<(UnixTime, UnixTime)> {
    let (certificate, _) = element(der, SEQUENCE)?;
    let (tbs, _) = element(certificate, SEQUENCE)?;
    let mut rest = tbs;
    // version [0] EXPLICIT, absent in v1 certificates.
    if rest.first() == Some(&0xa0) {
        rest = element(rest, 0xa0)?.1;
    }
    rest = element(rest, INTEGER)?.1; // serialNumber
    rest = element(rest, SEQUENCE)?.1; // signature AlgorithmIdentifier
    rest = element(rest, SEQUENCE)?.1; // issuer Name
    let (validity, _) = element(rest, SEQUENCE)?;
    let (not_before, rest) = time(validity)?;
    let (not_after, _) = time(rest)?;
    Some((not_before, not_after))
}

const INTEGER: u8 = 0x02;
const SEQUENCE: u8 = 0x30;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// The content of the element at the start of `input`, which must have tag `tag`, and what
/// follows it.
fn element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&first, rest) = input.split_first()?;
    if first != tag {
        return None;
    }
    let (&len, mut rest) = rest.split_first()?;
    let len = if len < 0x80 {
        usize::from(len)
    } else {
        let octets = usize::from(len & 0x7f);
        if octets == 0 || octets > 4 || rest.len() < octets {
            return None;
        }
        let (bytes, after) = rest.split_at(octets);
        rest = after;
        bytes.iter().fold(0usize, |n, &b| (n << 8) | usize::from(b))
    };
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// A `Time` (UTCTime or GeneralizedTime, both in UTC with seconds as RFC 5280 requires).
fn time(input: &[u8]) -> Option<(UnixTime, &[u8])> {
    let (year, digits, rest) = match *input.first()? {
        UTC_TIME => {
            let (text, rest) = element(input, UTC_TIME)?;
            let text = text.strip_suffix(b"Z")?;
            if text.len() != 12 {
                return None;
            }
            // RFC 5280: YY >= 50 means 19YY, else 20YY.
            let yy = number(&text[..2])?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..], rest)
        }
        GENERALIZED_TIME => {
            let (text, rest) = element(input, GENERALIZED_TIME)?;
            let text = text.strip_suffix(b"Z")?;
            if text.len() != 14 {
                return None;
            }
            (number(&text[..4])?, &text[4..], rest)
        }
        _ => return None,
    };
    let [month, day, hour, minute, second] = [0, 2, 4, 6, 8].map(|i| number(&digits[i..i + 2]));
    let (month, day) = (month?, day?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let days = days_from_civil(year, month, day);
    Some((days * 86_400 + hour? * 3600 + minute? * 60 + second?, rest))
}

fn number(digits: &[u8]) -> Option<i64> {
    digits
        .iter()
        .try_fold(0i64, |n, &d| d.is_ascii_digit().then(|| n * 10 + i64::from(d - b'0')))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `2026-12-07T20:00:00Z`, for messages.
pub fn format(time: UnixTime) -> String {
    let days = time.div_euclid(86_400);
    let secs = time.rem_euclid(86_400);
    // The inverse of `days_from_civil`.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Now, in seconds since the Unix epoch.
pub fn now() -> UnixTime {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(not_before: (i32, u8, u8), not_after: (i32, u8, u8)) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn dates_come_back_from_utc_and_generalized_times() {
        // rcgen writes UTCTime before 2050 and GeneralizedTime from 2050 on.
        let der = certificate((2020, 2, 29), (2049, 12, 31));
        assert_eq!(validity(&der), Some((1_582_934_400, 2_524_521_600)));
        let der = certificate((1999, 1, 1), (2051, 3, 1));
        let (not_before, not_after) = validity(&der).unwrap();
        assert_eq!(format(not_before), "1999-01-01T00:00:00Z");
        assert_eq!(format(not_after), "2051-03-01T00:00:00Z");
    }

    #[test]
    fn anything_else_is_not_a_certificate() {
        let der = certificate((2020, 1, 1), (2030, 1, 1));
        for cut in 0..der.len() {
            // A truncated certificate may still hold both dates once past them; never panics.
            let _ = validity(&der[..cut]);
        }
        assert_eq!(validity(&der[..40]), None);
        assert_eq!(validity(b"not DER at all"), None);
        assert_eq!(validity(&[]), None);
    }

    #[test]
    fn format_and_days_agree() {
        for (y, m, d) in [(1970, 1, 1), (2000, 2, 29), (2024, 12, 31), (2100, 3, 1)] {
            let t = days_from_civil(y, m, d) * 86_400 + 3661;
            assert_eq!(format(t), format!("{y:04}-{m:02}-{d:02}T01:01:01Z"));
        }
    }
}
