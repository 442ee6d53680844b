//! Not ours: passed on untouched. Traffic for no frontend of the XDP path, other protocols
//! (ARP, IPv6, ICMP), and IPv4 the parser does not take (options, truncated or
//! inconsistent headers), and fragments, which XDP hands to the uplink's tc (fragments.rs).
use super::*;

packet_test!(
    node_address_port_without_service,
    untouched(
        "node address, port without a service",
        syn(40041, NODE, 22).bytes(),
    )
);

packet_test!(
    nodeport_number_on_foreign_address,
    untouched(
        "NodePort number on a foreign address",
        syn(40042, [172, 30, 0, 77], 30080).bytes(),
    )
);

packet_test!(
    arp,
    untouched("ARP", {
        let mut f = vec![0xff; 6];
        f.extend(MAC_CLIENT);
        f.extend([0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
        f.extend(MAC_CLIENT);
        f.extend(CLIENT);
        f.extend([0; 6]);
        f.extend(NODE);
        f
    })
);

packet_test!(
    ipv6,
    untouched("IPv6", {
        let mut f = Vec::new();
        PacketBuilder::ethernet2(MAC_CLIENT, MAC_NODE)
            .ipv6([0xfd; 16], [0xfe; 16], 64)
            .tcp(40104, 30080, 1, 1024)
            .syn()
            .write(&mut f, &[])
            .unwrap();
        f
    })
);

packet_test!(
    icmp_echo_to_the_node,
    untouched("ICMP echo to the node", {
        let mut f = Vec::new();
        PacketBuilder::ethernet2(MAC_CLIENT, MAC_NODE)
            .ipv4(CLIENT, NODE, 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut f, b"ping")
            .unwrap();
        f
    })
);

packet_test!(
    ipv4_fragment,
    untouched("IPv4 fragment: XDP hands it to tc", {
        let mut frag = udp(40100, NODE, 30053).bytes();
        frag[20] |= 0x20; // more fragments
        frag[24..26].copy_from_slice(&[0, 0]);
        let c = csum::checksum(&frag[14..34], 0);
        frag[24..26].copy_from_slice(&c.to_ne_bytes());
        frag
    })
);

packet_test!(
    ipv4_with_options,
    untouched("IPv4 with options", {
        let mut options = syn(40101, NODE, 30080).bytes();
        options.splice(34..34, [1, 1, 1, 1]); // four NOP options
        options[14] = 0x46;
        let tot = (options.len() - 14) as u16;
        options[16..18].copy_from_slice(&tot.to_be_bytes());
        options
    })
);

// The kernel refuses test runs below 14 bytes, so the shortest frame is a bare header.
packet_test!(
    ethernet_header_alone,
    untouched(
        "Ethernet header alone (IPv4 type, no IP header)",
        syn(40046, NODE, 30080).bytes()[..14].to_vec(),
    )
);

packet_test!(
    truncated_ipv4_header,
    untouched(
        "truncated IPv4 header",
        syn(40043, NODE, 30080).bytes()[..24].to_vec(),
    )
);

packet_test!(
    truncated_tcp_header,
    untouched("truncated TCP header", {
        let mut f = syn(40044, NODE, 30080).bytes()[..44].to_vec();
        f[16..18].copy_from_slice(&30u16.to_be_bytes());
        f
    })
);

packet_test!(
    ipv4_total_length_beyond_the_frame,
    untouched("IPv4 total length beyond the frame", {
        let mut long_tot = syn(40103, NODE, 30080).bytes();
        long_tot[16..18].copy_from_slice(&2000u16.to_be_bytes());
        long_tot
    })
);

packet_test!(
    ipv4_header_length_below_5,
    untouched("IPv4 header length below 5", {
        let mut f = syn(40045, NODE, 30080).bytes();
        f[14] = 0x44;
        f
    })
);
