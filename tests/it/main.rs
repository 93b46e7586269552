//! Integration tests: each starts real `qpidd` processes (through `integration_tests::TestBroker`)
//! and judges them with a real client (lapin) or a raw socket, one module per area.

mod t100_replication;
mod t10_connection;
mod t110_cluster;
mod t111_cluster_scripts;
mod t112_cluster_catalogue;
mod t113_cluster_catalogue_more;
mod t114_cluster_hold_and_loop;
mod t120_store;
mod t121_store_crash;
mod t122_store_replication;
mod t20_exchanges;
mod t30_queues;
mod t40_basic;
mod t50_confirms_tx;
mod t60_limits;
mod t70_bad_input;
mod t80_daemon;
mod t90_mgmt;
mod t95_qpid_config;
mod t96_qpid_ha;
mod t97_qpid_ha_cli;
