//! Real `cellmesh node` processes joining one another over TCP on loopback.

mod common;

use common::{Proc, create_cell};

#[test]
fn three_nodes_join_one_another_and_a_stranger_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let homes: Vec<_> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| dir.path().join(n))
        .collect();
    let ids: Vec<_> = homes.iter().map(|h| create_cell(h)).collect();
    let (a_cell, a_node) = &ids[0];
    let (b_cell, b_node) = &ids[1];
    let (c_cell, c_node) = &ids[2];
    let (_, d_node) = &ids[3];

    let mut a = Proc::start(
        &homes[0],
        "node",
        &[
            "--listen",
            "127.0.0.1:0",
            "--allow",
            b_cell,
            "--allow",
            c_cell,
        ],
    );
    let listening = a.expect("listening", |v| v["event"] == "listening");
    assert_eq!(listening["cell_id"], a_cell.as_str());
    let a_addr = listening["addr"].as_str().unwrap().to_string();
    assert!(!a_addr.ends_with(":0"), "the bound port is printed");

    let mut b = Proc::start(
        &homes[1],
        "node",
        &["--listen", "127.0.0.1:0", "--join", &a_addr],
    );
    let b_addr = b.expect("listening", |v| v["event"] == "listening")["addr"]
        .as_str()
        .unwrap()
        .to_string();
    b.expect("B joined A", |v| {
        v["event"] == "joined" && v["node_id"] == a_node.as_str()
    });
    a.expect("A accepted B", |v| {
        v["event"] == "joined" && v["node_id"] == b_node.as_str() && v["inbound"] == true
    });

    // C joins both A and B.
    let mut c = Proc::start(&homes[2], "node", &["--join", &a_addr, "--join", &b_addr]);
    c.expect("C joined A", |v| {
        v["event"] == "joined" && v["node_id"] == a_node.as_str()
    });
    c.expect("C joined B", |v| {
        v["event"] == "joined" && v["node_id"] == b_node.as_str()
    });
    a.expect("A accepted C", |v| {
        v["event"] == "joined" && v["node_id"] == c_node.as_str()
    });
    // A tells B about C (UPDATE).
    b.expect("B learned of C via A", |v| {
        v["event"] == "learned" && v["node_id"] == c_node.as_str() && v["via"] == a_node.as_str()
    });

    // D is not on A's allow-list.
    let mut d = Proc::start(&homes[3], "node", &["--join", &a_addr]);
    let refused = d.expect("D refused", |v| v["event"] == "refused");
    assert_eq!(refused["code"], "unauthorized");
    assert_eq!(refused["by_peer"], true);
    let refused = a.expect("A refused D", |v| v["event"] == "refused");
    assert_eq!(refused["node_id"], d_node.as_str());
    assert_eq!(refused["by_peer"], false);

    for p in [d, c, b] {
        p.stop();
    }
    a.expect("A saw B leave", |v| {
        v["event"] == "left" && v["node_id"] == b_node.as_str()
    });
    a.stop();
}
