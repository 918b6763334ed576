//! `testing::HostMaps` behaves as the kernel maps do: lookups through the
//! port array and slots, free slots invisible, writes refused where the
//! kernel refuses them.

use mesh_common::abi::*;
use mesh_common::fwd::Tables;
use mesh_common::rev::RevTables;
use mesh_common::testing::{HostMaps, MapError, Sizes};

fn maps() -> HostMaps {
    HostMaps::new(Sizes {
        max_services: 4,
        max_backends: 8,
        reply_entries: 8,
        maglev_entries: 2 * 4 * 7,
        max_nodes: 4,
    })
}

fn svc(svc_id: u32, table_off: u32) -> SvcValue {
    SvcValue {
        svc_id,
        table_off,
        table_size: 7,
        ..Default::default()
    }
}

#[test]
fn a_service_is_what_its_port_points_at() {
    let mut m = maps();
    let key = SvcKey::new(30080, IPPROTO_TCP);
    assert_eq!(m.service(&key), None, "nothing published");
    m.put_service(2, svc(1, 14)).unwrap();
    assert_eq!(m.service(&key), None, "a slot the port does not point at");
    m.switch_port(&key, 2).unwrap();
    assert_eq!(m.port(&key), Some(2));
    assert_eq!(m.service(&key), Some(svc(1, 14)));
    assert_eq!(m.service(&SvcKey::new(30080, IPPROTO_UDP)), None);
    // The other half, then one switch.
    m.put_service(3, svc(1, 21)).unwrap();
    assert_eq!(m.service(&key), Some(svc(1, 14)));
    m.switch_port(&key, 3).unwrap();
    assert_eq!(m.service(&key), Some(svc(1, 21)));
    m.del_port(&key).unwrap();
    assert_eq!(m.service(&key), None);
    assert_eq!(m.service_slot(3), Some(svc(1, 21)), "the slot stays");

    assert!(matches!(
        m.put_service(8, svc(4, 0)),
        Err(MapError::OutOfRange { .. })
    ));
    assert!(m.switch_port(&key, 8).is_err(), "no such slot");
    assert_eq!(
        m.switch_port(&SvcKey::new(1, IPPROTO_ICMP), 0),
        Err(MapError::Protocol {
            proto: IPPROTO_ICMP
        })
    );
}

#[test]
fn a_free_backend_slot_is_not_a_backend() {
    let mut m = maps();
    let b = Backend {
        addr: [0x0281_12c6, 0, 0, 0],
        port_be: 80u16.to_be(),
        family: FAMILY_V4,
        flags: BE_F_LOCAL,
        node_id: 0,
        gen_: 3,
        ..Default::default()
    };
    assert_eq!(m.backend(5), None);
    m.put_backend(5, b).unwrap();
    assert_eq!(m.backend(5), Some(b));
    m.del_backend(5).unwrap();
    assert_eq!(m.backend(5), None);
    assert_eq!(m.backend_slot(5), Some(Backend::default()));
    assert_eq!(m.backend(8), None, "past the map");
    assert!(m.put_backend(8, b).is_err());
}

#[test]
fn the_node_address_set_holds_sixteen() {
    let mut m = maps();
    assert!(!m.is_node_addr4(0), "a free place is not an address");
    for a in 1..=MAX_NODE_ADDRS {
        m.put_node_addr(a).unwrap();
    }
    m.put_node_addr(1).unwrap();
    assert_eq!(
        m.put_node_addr(99),
        Err(MapError::Full {
            map: MAP_NODE_ADDR4
        })
    );
    assert!(m.is_node_addr4(16) && !m.is_node_addr4(99));
    m.del_node_addr(7);
    m.put_node_addr(99).unwrap();
    assert_eq!(m.node_addrs()[6], 99, "the freed place is reused");
    assert!(!m.is_node_addr4(0));
    assert_eq!(m.node_addr_lookups(), 4);
}

#[test]
fn maglev_tables_stay_inside_the_array() {
    let mut m = maps();
    m.write_table(49, &[7; 7]).unwrap();
    assert_eq!(m.maglev(55), Some(7));
    assert_eq!(m.maglev(56), None);
    assert!(m.write_table(50, &[7; 7]).is_err());
}

#[test]
fn counters_reset_and_stay_inside_the_array() {
    let mut m = maps();
    m.account(1, 1, 100, true);
    m.account(1, 1, 50, false);
    m.account(9, 1, 50, true);
    assert_eq!(
        m.stats(1),
        SvcStats {
            packets: 2,
            bytes: 150,
            new_flows: 1
        }
    );
    assert_eq!(m.all_stats().len(), 4);
    m.reset_stats(1).unwrap();
    assert_eq!(m.stats(1), SvcStats::default());
    assert!(m.reset_stats(4).is_err());
}

#[test]
fn replies_and_nodes() {
    let mut m = maps();
    for i in 0..8 {
        let k = ReplyKey4 {
            addr: i,
            ..Default::default()
        };
        m.put_reply(k, ReplyValue4::default()).unwrap();
    }
    let ninth = ReplyKey4 {
        addr: 8,
        ..Default::default()
    };
    assert_eq!(
        m.put_reply(ninth, ReplyValue4::default()),
        Err(MapError::Full { map: MAP_REPLY4 })
    );
    m.del_reply(&ReplyKey4::default());
    m.put_reply(ninth, ReplyValue4::default()).unwrap();
    assert!(RevTables::reply(&m, &ninth).is_some());

    let n = NodeValue {
        addr: [0x0180_12c6, 0, 0, 0],
        family: FAMILY_V4,
        flags: NODE_F_SELF,
        gen_: 1,
        ..Default::default()
    };
    m.put_node(3, n).unwrap();
    assert_eq!(m.node(3), Some(n));
    m.del_node(3).unwrap();
    assert_eq!(m.node(3), Some(NodeValue::default()));
    assert!(m.put_node(4, n).is_err());
}
