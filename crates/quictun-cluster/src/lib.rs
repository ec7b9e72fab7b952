//! The relay cluster's shared state.
//!
//! - [`etcd`]: the few etcd v3 calls the cluster needs (KV, Lease, Watch), over tonic with
//!   hand-written prost messages: no `.proto` compilation, no `protoc` at build time.
//! - [`directory`]: the session directory: which relay holds which agent. Each relay writes its
//!   own agents under a lease it keeps alive, and watches everyone's into a local cache, so no
//!   request waits on etcd, and a relay that dies takes its entries with it when its lease ends.

pub mod directory;
pub mod etcd;

pub use directory::{Directory, DirectoryConfig, Holder, PeerRelay};
pub use etcd::{Etcd, EtcdError};
