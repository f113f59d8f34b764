//! Decisions the controller takes from the metadata, as pure functions (tested here without
//! nodes): which partitions a node opens and closes, what a drain does next, and who the
//! metadata group's members should be.
