//! Internet checksum arithmetic (RFC 1071 / RFC 1624), shared by the datapath and the tests.
//!
//! All values are the raw 16-bit words as stored in the packet (network order read as a
//! native `u16`): one's-complement sums are byte-order independent as long as every operand
//! is taken the same way.

/// Folds a 32-bit one's-complement accumulator to 16 bits.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Adds a 32-bit value (two 16-bit words) to an accumulator.
#[inline(always)]
pub fn add32(sum: u32, v: u32) -> u32 {
    let s = sum as u64 + (v & 0xffff) as u64 + (v >> 16) as u64;
    ((s & 0xffff_ffff) + (s >> 32)) as u32
}

/// RFC 1624 eqn. 3: new checksum after a 16-bit field changed from `old` to `new`.
#[inline(always)]
pub fn replace16(check: u16, old: u16, new: u16) -> u16 {
    // HC' = ~(~HC + ~m + m')
    let sum = (!check) as u32 + (!old) as u32 + new as u32;
    !fold(sum)
}

/// New checksum after a 32-bit field (an address) changed from `old` to `new`.
#[inline(always)]
pub fn replace32(check: u16, old: u32, new: u32) -> u16 {
    let mut sum = (!check) as u32;
    sum = add32(sum, !old);
    sum = add32(sum, new);
    !fold(sum)
}

/// UDP: a zero checksum means "none"; an update must keep it zero, and a computed zero is
/// sent as 0xffff (RFC 768).
#[inline(always)]
pub fn udp_fix(check: u16, updated: u16) -> u16 {
    if check == 0 {
        0
    } else if updated == 0 {
        0xffff
    } else {
        updated
    }
}

/// Full checksum of a byte slice (used by tests and for small headers built from scratch).
pub fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial as u64;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_ne_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        sum += u16::from_ne_bytes([*last, 0]) as u64;
    }
    // A fixed number of folds (no data-dependent loop: the eBPF verifier must see it end).
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    !fold(sum as u32)
}

/// One's-complement sum of the IPv4 pseudo-header, for `checksum(.., initial)`.
pub fn pseudo_header(src_be: u32, dst_be: u32, proto: u8, len: u16) -> u32 {
    let mut sum = 0u32;
    sum = add32(sum, src_be);
    sum = add32(sum, dst_be);
    sum = add32(sum, u16::from_ne_bytes([0, proto]) as u32);
    add32(sum, u16::from_ne_bytes(len.to_be_bytes()) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    // An IPv4 header with a known-good checksum (from RFC 1071 examples / Wikipedia).
    const HDR: [u8; 20] = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];

    #[test]
    fn full_checksum_verifies_to_zero() {
        assert_eq!(checksum(&HDR, 0), 0);
        let mut h = HDR;
        h[10] = 0;
        h[11] = 0;
        assert_eq!(checksum(&h, 0).to_ne_bytes(), [0xb8, 0x61]);
    }

    #[test]
    fn incremental_address_update_matches_full_recompute() {
        let mut h = HDR;
        let old = u32::from_ne_bytes([h[16], h[17], h[18], h[19]]);
        let new_bytes = [10u8, 244, 1, 7];
        let new = u32::from_ne_bytes(new_bytes);
        let check = u16::from_ne_bytes([h[10], h[11]]);
        let upd = replace32(check, old, new);
        h[16..20].copy_from_slice(&new_bytes);
        h[10..12].copy_from_slice(&upd.to_ne_bytes());
        assert_eq!(checksum(&h, 0), 0);
    }

    #[test]
    fn incremental_port_update_matches_full_recompute() {
        let mut h = HDR;
        let old = u16::from_ne_bytes([h[4], h[5]]);
        let new = u16::from_ne_bytes([0xbe, 0xef]);
        let upd = replace16(u16::from_ne_bytes([h[10], h[11]]), old, new);
        h[4..6].copy_from_slice(&new.to_ne_bytes());
        h[10..12].copy_from_slice(&upd.to_ne_bytes());
        assert_eq!(checksum(&h, 0), 0);
    }

    #[test]
    fn udp_zero_checksum_stays_zero() {
        assert_eq!(udp_fix(0, 0x1234), 0);
        assert_eq!(udp_fix(5, 0), 0xffff);
        assert_eq!(udp_fix(5, 7), 7);
    }
}
