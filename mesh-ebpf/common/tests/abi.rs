//! The ABI's lists: drop reasons keep their numbers, names are distinct.

use std::collections::HashSet;

use mesh_common::abi::*;

#[test]
fn every_drop_reason_is_listed_at_its_number_with_its_own_name() {
    for (i, r) in DropReason::ALL.iter().enumerate() {
        assert_eq!(*r as usize, i, "{r:?}");
    }
    assert!(DropReason::ALL.len() as u32 <= MAX_DROP_REASONS);
    let names: HashSet<_> = DropReason::ALL.iter().map(|r| r.name()).collect();
    assert_eq!(names.len(), DropReason::ALL.len());
    // Appended, never renumbered.
    assert_eq!(DropReason::TableOutOfRange as u32, 10);
    assert_eq!(DropReason::StaleBackend as u32, 11);
}

#[test]
fn map_and_program_names_are_distinct() {
    let all: Vec<&str> = MAP_NAMES
        .iter()
        .chain(LOG_MAP_NAMES)
        .chain(FLOOR_MAP_NAMES)
        .copied()
        .collect();
    assert_eq!(all.iter().collect::<HashSet<_>>().len(), all.len());
    let progs: Vec<&str> = PROG_NAMES.iter().chain(FLOOR_PROG_NAMES).copied().collect();
    assert_eq!(progs.iter().collect::<HashSet<_>>().len(), progs.len());
}
