//! Reporting packets the sandbox's nftables rules drop (UDP other than DNS, and any other
//! non-TCP protocol): the rule logs them to an NFLOG group, and the supervisor reads that group
//! through a netlink socket the child bound inside the sandbox's netns.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// NFLOG group the drop rule logs to (groups are per network namespace).
pub const GROUP: u16 = 7;
/// Bytes of each dropped packet copied to the supervisor: enough for the IP and UDP headers.
const COPY_RANGE: u32 = 128;

const NFNL_SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_PACKET: u16 = 0;
const NFULNL_MSG_CONFIG: u16 = 1;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULA_CFG_QTHRESH: u16 = 5;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_PACKET: u8 = 2;
const NFULA_PAYLOAD: u16 = 9;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;

/// Appends a netlink attribute (type, payload, padding to 4 bytes).
pub(crate) fn push_attr(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = 4 + data.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(data);
    out.resize(out.len() + (4 - len % 4) % 4, 0);
}

/// Wraps `body` in a netlink header.
pub(crate) fn netlink_message(kind: u16, flags: u16, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + body.len());
    out.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&1u32.to_ne_bytes()); // sequence number
    out.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    out.extend_from_slice(body);
    out
}

/// The config message that binds the socket to [`GROUP`], copying packet heads, one message
/// per packet (no batching delay).
pub(crate) fn bind_message() -> Vec<u8> {
    // nfgenmsg: family AF_UNSPEC, version 0, resource id = group (big endian).
    let mut body = vec![0, 0];
    body.extend_from_slice(&GROUP.to_be_bytes());
    push_attr(&mut body, NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND]);
    let mut mode = COPY_RANGE.to_be_bytes().to_vec();
    mode.extend_from_slice(&[NFULNL_COPY_PACKET, 0]);
    push_attr(&mut body, NFULA_CFG_MODE, &mode);
    push_attr(&mut body, NFULA_CFG_QTHRESH, &1u32.to_be_bytes());
    netlink_message(
        (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG,
        NLM_F_REQUEST | NLM_F_ACK,
        &body,
    )
}

/// A packet the sandbox tried to send and the rules dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Dropped {
    /// Destination address.
    pub(crate) ip: IpAddr,
    /// IP protocol number (17 = UDP).
    pub(crate) proto: u8,
    /// Destination port for UDP/TCP, else 0.
    pub(crate) port: u16,
}

impl Dropped {
    /// The violation reason for this packet.
    pub(crate) fn reason(&self) -> String {
        match self.proto {
            6 => "not allowed".into(),
            17 => "udp not allowed".into(),
            1 | 58 => "icmp not allowed".into(),
            p => format!("ip protocol {p} not allowed"),
        }
    }
}

/// The dropped packets in one buffer of NFLOG netlink messages.
pub(crate) fn parse(buf: &[u8]) -> Vec<Dropped> {
    let mut out = Vec::new();
    let mut rest = buf;
    while rest.len() >= 16 {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        if len < 16 || len > rest.len() {
            break;
        }
        if kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET && len >= 20 {
            if let Some(d) = packet_payload(&rest[20..len]).and_then(parse_ip) {
                out.push(d);
            }
        }
        rest = rest.get((len + 3) & !3..).unwrap_or(&[]);
    }
    out
}

/// The `NFULA_PAYLOAD` attribute among a packet message's attributes.
fn packet_payload(mut attrs: &[u8]) -> Option<&[u8]> {
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if kind == NFULA_PAYLOAD {
            return Some(&attrs[4..len]);
        }
        attrs = attrs.get((len + 3) & !3..)?;
    }
    None
}

/// Destination, protocol and port of an IPv4 or IPv6 packet head.
fn parse_ip(pkt: &[u8]) -> Option<Dropped> {
    let port_at = |off: usize| {
        pkt.get(off + 2..off + 4)
            .map_or(0, |p| u16::from_be_bytes([p[0], p[1]]))
    };
    match pkt.first()? >> 4 {
        4 => {
            let ihl = usize::from(pkt[0] & 0xf) * 4;
            let proto = *pkt.get(9)?;
            let dst: [u8; 4] = pkt.get(16..20)?.try_into().ok()?;
            let port = if matches!(proto, 6 | 17) {
                port_at(ihl)
            } else {
                0
            };
            Some(Dropped {
                ip: IpAddr::V4(Ipv4Addr::from(dst)),
                proto,
                port,
            })
        }
        6 => {
            let proto = *pkt.get(6)?;
            let dst: [u8; 16] = pkt.get(24..40)?.try_into().ok()?;
            let port = if matches!(proto, 6 | 17) {
                port_at(40)
            } else {
                0
            };
            Some(Dropped {
                ip: IpAddr::V6(Ipv6Addr::from(dst)),
                proto,
                port,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An NFLOG packet message as the kernel sends it (captured from a real netns, then trimmed).
    fn message(payload: &[u8]) -> Vec<u8> {
        let mut body = vec![2, 0, 0, 7];
        push_attr(&mut body, 1, &[0, 0, 8, 0, 3, 0]); // packet header attribute
        push_attr(&mut body, NFULA_PAYLOAD, payload);
        netlink_message(NFNL_SUBSYS_ULOG << 8, 0, &body)
    }

    #[test]
    fn parses_dropped_udp() {
        let v4 = hex("4500001d33ad400040117aecc6120009c612000999eb270f00098c5178");
        let v6 = hex("6004533b000911400000000000000000000000000000000120010db80000000000000000000000098af3270e00092ddd78");
        let mut buf = message(&v4);
        buf.extend(message(&v6));
        let got = parse(&buf);
        assert_eq!(
            got,
            vec![
                Dropped {
                    ip: "198.18.0.9"
                        .parse()
                        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                    proto: 17,
                    port: 9999
                },
                Dropped {
                    ip: "2001:db8::9"
                        .parse()
                        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                    proto: 17,
                    port: 9998
                },
            ]
        );
        assert_eq!(got[0].reason(), "udp not allowed");
    }

    #[test]
    fn ignores_junk() {
        assert!(parse(&[1, 2, 3]).is_empty());
        assert!(parse(&message(&[0x45])).is_empty());
        let mut bad_len = message(&hex(
            "4500001d33ad400040117aecc6120009c612000999eb270f00098c5178",
        ));
        bad_len[0] = 200;
        assert!(parse(&bad_len).is_empty());
    }

    #[test]
    fn bind_message_shape() {
        let m = bind_message();
        assert_eq!(m.len() % 4, 0);
        assert_eq!(
            u32::from_ne_bytes([m[0], m[1], m[2], m[3]]) as usize,
            m.len()
        );
        assert_eq!(&m[16..20], &[0, 0, 0, 7]);
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap_or(0))
            .collect()
    }
}
