//! qemu-img's size syntax, for every command and option that takes one.

/// A number with an optional binary suffix (`b`, `k`, `M`, `G`, `T`, `P`,
/// `E`; `1.5G` allowed), as qemu-img reads sizes. The error says why.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_lowercase() {
                'b' => 1,
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                'p' => 1 << 50,
                'e' => 1 << 60,
                _ => return Err(format!("Invalid size '{s}': unknown suffix")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let value: f64 = num.parse().map_err(|_| {
        format!("Invalid size '{s}': expected a number with an optional suffix k, M, G, T, P, E")
    })?;
    if !(0.0..=(i64::MAX as f64)).contains(&(value * mult as f64)) {
        return Err(format!("Invalid size '{s}': out of range"));
    }
    Ok((value * mult as f64) as u64)
}
